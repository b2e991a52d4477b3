"""Triangle meshes as arrays, and area-weighted sampling of points on their surface."""

from typing import NamedTuple

import numpy as np


class Mesh(NamedTuple):
    """A triangle mesh; with no faces it is a plain point set.

    vertices: float64 [V, 3]. faces: int64 [F, 3], indices into ``vertices`` (F may be 0).
    """

    vertices: np.ndarray
    faces: np.ndarray

    @property
    def is_point_set(self) -> bool:
        return len(self.faces) == 0


def merge_meshes(meshes: list[Mesh]) -> Mesh:
    """Concatenate meshes into one, offsetting each mesh's face indices."""
    offsets = np.cumsum([0] + [len(m.vertices) for m in meshes[:-1]])
    vertices = np.concatenate([m.vertices for m in meshes])
    faces = np.concatenate([m.faces + offset for m, offset in zip(meshes, offsets, strict=True)])
    return Mesh(vertices, faces)


def triangle_areas(mesh: Mesh) -> np.ndarray:
    """Area of every face: float64 [F]."""
    a, b, c = (mesh.vertices[mesh.faces[:, k]] for k in range(3))
    return 0.5 * np.linalg.norm(np.cross(b - a, c - a), axis=1)


def sample_surface(mesh: Mesh, num_points: int, rng: np.random.Generator) -> np.ndarray:
    """Draw ``num_points`` points uniformly on the mesh surface: float64 [num_points, 3].

    Faces are chosen with probability proportional to their area, then a point is drawn
    uniformly inside the chosen triangle. The result depends only on the mesh and ``rng``.
    Raises ValueError when the mesh has no faces or its total area is zero.
    """
    areas = triangle_areas(mesh)
    total = areas.sum()
    if not total > 0:
        raise ValueError(f"cannot sample a surface of total area {total} ({len(areas)} faces)")
    chosen = rng.choice(len(areas), size=num_points, p=areas / total)
    # Uniform barycentric coordinates: fold the unit square onto the triangle u + v <= 1.
    u, v = rng.random((2, num_points))
    outside = u + v > 1
    u[outside], v[outside] = 1 - u[outside], 1 - v[outside]
    a, b, c = (mesh.vertices[mesh.faces[chosen, k]] for k in range(3))
    return a + u[:, None] * (b - a) + v[:, None] * (c - a)
