"""SyntheticShapes: a procedural 12-class point-cloud dataset that needs no download.

Each item is generated on access from ``numpy.random.default_rng((seed, split_id, index))``:
a parametric surface of its class (random proportions) is sampled area-uniformly, given a
random anisotropy, partially occluded by a random plane, jittered, polluted by a few
outliers, and placed with a random pose and scale. Item ``i`` has class ``i % 12``.
"""

from collections.abc import Callable

import numpy as np

from .base import PointCloudDataset, check_split
from .surface import Mesh, merge_meshes, sample_surface
from .transforms import Transform

_SPLIT_IDS = {"train": 0, "test": 1}
_SEGMENTS = 24  # angular resolution of the revolved and tubular meshes

# Generation parameters, in units of the unit-sphere-normalised shape.
_ANISOTROPY = (0.85, 1.18)  # per-axis stretch, drawn independently
_MAX_OCCLUDED = 0.3  # at most this fraction is cut away by the occluding plane
_NOISE_SIGMA = 0.01
_OUTLIER_FRACTION = 0.005  # at most this fraction of points replaced by uniform outliers
_SCALE = (0.7, 1.3)
_SHIFT = 0.1


def _grid_mesh(grid: np.ndarray) -> Mesh:
    """Triangulate a ``[U, V, 3]`` grid of vertices, two triangles per grid cell."""
    rows, cols = grid.shape[:2]
    index = np.arange(rows * cols).reshape(rows, cols)
    a, b = index[:-1, :-1].ravel(), index[1:, :-1].ravel()
    c, d = index[1:, 1:].ravel(), index[:-1, 1:].ravel()
    faces = np.concatenate([np.stack([a, b, c], 1), np.stack([a, c, d], 1)])
    return Mesh(grid.reshape(-1, 3).astype(np.float64), faces.astype(np.int64))


def _revolve(radius: np.ndarray, height: np.ndarray, y_offset: float = 0.0) -> Mesh:
    """Surface of revolution about the y axis of the profile polyline ``(radius, height)``."""
    theta = np.linspace(0, 2 * np.pi, _SEGMENTS + 1)
    grid = np.stack(
        [
            radius[:, None] * np.cos(theta),
            np.broadcast_to(height[:, None] + y_offset, (len(height), len(theta))),
            radius[:, None] * np.sin(theta),
        ],
        axis=-1,
    )
    return _grid_mesh(grid)


def _arc(start: float, stop: float, steps: int = 12) -> np.ndarray:
    return np.linspace(start, stop, steps)


def _box(half: tuple[float, float, float]) -> Mesh:
    """An axis-aligned box centred at the origin with half extents ``half``."""
    corners = np.array([[x, y, z] for x in (-1, 1) for y in (-1, 1) for z in (-1, 1)], float)
    quads = [(0, 1, 3, 2), (4, 6, 7, 5), (0, 4, 5, 1), (2, 3, 7, 6), (0, 2, 6, 4), (1, 5, 7, 3)]
    faces = [tri for a, b, c, d in quads for tri in ((a, b, c), (a, c, d))]
    return Mesh(corners * np.asarray(half), np.asarray(faces, dtype=np.int64))


def _sphere(rng: np.random.Generator) -> Mesh:
    phi = _arc(np.pi, 0)
    return _revolve(np.sin(phi), np.cos(phi))


def _hemisphere(rng: np.random.Generator) -> Mesh:
    phi = _arc(np.pi, np.pi / 2)  # the lower half: an open bowl
    return _revolve(np.sin(phi), np.cos(phi))


def _cube(rng: np.random.Generator) -> Mesh:
    return _box((1.0, 1.0, 1.0))


def _cylinder(rng: np.random.Generator) -> Mesh:
    h = rng.uniform(0.8, 1.2)
    return _revolve(np.array([0, 1, 1, 0.0]), np.array([-h, -h, h, h]))


def _cone(rng: np.random.Generator) -> Mesh:
    return _revolve(np.array([0, 1, 0.0]), np.array([0, 0, rng.uniform(1.5, 2.5)]))


def _pyramid(rng: np.random.Generator) -> Mesh:
    vertices = np.array([[-1, 0, -1], [1, 0, -1], [1, 0, 1], [-1, 0, 1], [0, 0, 0.0]])
    vertices[4, 1] = rng.uniform(1.2, 2.0)
    faces = np.array([[0, 1, 2], [0, 2, 3], [0, 4, 1], [1, 4, 2], [2, 4, 3], [3, 4, 0]])
    return Mesh(vertices, faces)


def _torus(rng: np.random.Generator) -> Mesh:
    tube, psi = rng.uniform(0.25, 0.4), _arc(0, 2 * np.pi, _SEGMENTS + 1)
    return _revolve(1 + tube * np.cos(psi), tube * np.sin(psi))


def _capsule(rng: np.random.Generator) -> Mesh:
    radius, half_length = rng.uniform(0.35, 0.5), rng.uniform(0.8, 1.2)
    bottom, top = _arc(np.pi, np.pi / 2), _arc(np.pi / 2, 0)  # two half-circle profiles
    heights = np.concatenate([radius * np.cos(bottom) - half_length, radius * np.cos(top) + half_length])
    return _revolve(radius * np.sin(np.concatenate([bottom, top])), heights)


def _disk(rng: np.random.Generator) -> Mesh:
    return _revolve(np.array([0, 1.0]), np.array([0, 0.0]))


def _helix(rng: np.random.Generator) -> Mesh:
    turns, height, tube = rng.uniform(2, 3), rng.uniform(1.5, 2.5), 0.12
    t = np.linspace(0, 1, int(40 * turns))[:, None]
    psi = np.linspace(0, 2 * np.pi, 9)[None, :]
    angle = 2 * np.pi * turns * t
    radial = 1 + tube * np.cos(psi)  # tube cross-section in the (radial, up) plane
    grid = np.stack(
        [radial * np.cos(angle), height * (t - 0.5) + tube * np.sin(psi), radial * np.sin(angle)],
        axis=-1,
    )
    return _grid_mesh(grid)


def _dumbbell(rng: np.random.Generator) -> Mesh:
    radius, bar = rng.uniform(0.45, 0.6), 0.12
    phi = _arc(np.pi, 0)
    end = 1 - 0.9 * radius  # the bar starts just inside each ball
    return merge_meshes(
        [
            _revolve(radius * np.sin(phi), radius * np.cos(phi), y_offset=-1),
            _revolve(radius * np.sin(phi), radius * np.cos(phi), y_offset=1),
            _revolve(np.array([bar, bar]), np.array([-end, end])),
        ]
    )


def _cross(rng: np.random.Generator) -> Mesh:
    width = rng.uniform(0.2, 0.3)
    return merge_meshes([_box((1.2, width, width)), _box((width, 1.2, width))])


SHAPES: dict[str, Callable[[np.random.Generator], Mesh]] = {
    "sphere": _sphere,
    "hemisphere": _hemisphere,
    "cube": _cube,
    "cylinder": _cylinder,
    "cone": _cone,
    "pyramid": _pyramid,
    "torus": _torus,
    "capsule": _capsule,
    "disk": _disk,
    "helix": _helix,
    "dumbbell": _dumbbell,
    "cross": _cross,
}


def _random_rotation(rng: np.random.Generator, mode: str) -> np.ndarray:
    """A 3x3 rotation: uniform on SO(3) (``"so3"``) or about the y axis (``"gravity"``)."""
    if mode == "gravity":
        angle = rng.uniform(0, 2 * np.pi)
        c, s = np.cos(angle), np.sin(angle)
        return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])
    quaternion = rng.normal(size=4)  # a normalised gaussian 4-vector is uniform on SO(3)
    w, x, y, z = quaternion / np.linalg.norm(quaternion)
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
            [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
            [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
        ]
    )


def _occlude(points: np.ndarray, rng: np.random.Generator, keep: int) -> np.ndarray:
    """Drop up to ``_MAX_OCCLUDED`` of the points beyond a random plane, then pick ``keep``."""
    direction = rng.normal(size=3)
    depth = points @ (direction / np.linalg.norm(direction))
    cut = np.quantile(depth, 1 - rng.uniform(0, _MAX_OCCLUDED))
    visible = points[depth <= cut]
    return visible[rng.choice(len(visible), size=keep, replace=len(visible) < keep)]


def generate_shape(label: int, num_points: int, rng: np.random.Generator, rotation: str) -> np.ndarray:
    """One random cloud of class ``label`` (an index into SHAPES): float64 ``[num_points, 3]``."""
    mesh = list(SHAPES.values())[label](rng)
    points = sample_surface(mesh, 2 * num_points, rng)
    points -= points.mean(axis=0)
    points /= np.linalg.norm(points, axis=1).max()
    points *= rng.uniform(*_ANISOTROPY, size=3)
    points = _occlude(points, rng, num_points)
    points += rng.normal(scale=_NOISE_SIGMA, size=points.shape)
    num_outliers = rng.integers(0, int(_OUTLIER_FRACTION * num_points) + 2)
    outliers = rng.choice(num_points, size=num_outliers, replace=False)
    points[outliers] = rng.uniform(-1, 1, size=(len(outliers), 3))
    points = points @ _random_rotation(rng, rotation).T
    return points * rng.uniform(*_SCALE) + rng.uniform(-_SHIFT, _SHIFT, size=3)


class SyntheticShapes(PointCloudDataset):
    """``num_samples`` procedural clouds of the 12 classes in SHAPES, balanced (label = index % 12).

    ``rotation``: ``"gravity"`` (random angle about y, the default) or ``"so3"`` (uniformly
    random orientation). Train and test use different split ids, so they never share a cloud;
    different ``seed`` values give different datasets.
    """

    def __init__(
        self,
        split: str = "train",
        num_samples: int = 1200,
        num_points: int = 1024,
        seed: int = 0,
        transform: Transform | None = None,
        rotation: str = "gravity",
    ):
        super().__init__(num_points, transform)
        if rotation not in ("gravity", "so3"):
            raise ValueError(f"expected rotation 'gravity' or 'so3', got {rotation!r}")
        self.split_id = _SPLIT_IDS[check_split(split)]
        self.num_samples = num_samples
        self.seed = seed
        self.rotation = rotation
        self.classes = list(SHAPES)

    def __len__(self) -> int:
        return self.num_samples

    @property
    def labels(self) -> np.ndarray:
        """The label of every item (``index % 12``), known without generating a cloud."""
        return np.arange(self.num_samples, dtype=np.int64) % len(self.classes)

    def load(self, index: int) -> tuple[np.ndarray, int]:
        rng = np.random.default_rng((self.seed, self.split_id, index))
        label = index % len(self.classes)
        return generate_shape(label, self.num_points, rng, self.rotation), label
