"""Part-segmentation datasets: the item contract, and procedural shapes with labelled parts (no download).

A part dataset's items are ``(points float32 [n, 3], category int64 scalar, parts int64 [n])``,
untransformed; ``parts`` are global part ids (indices into ``part_names``), each one of its
category's ``category_parts``. The training code resamples and augments points and labels
together (:mod:`any2point_fast.partseg`). ``labels`` (the category of every item) lets the
stratified selections of :mod:`.split` work on part datasets too.
"""

from __future__ import annotations

from abc import abstractmethod

import numpy as np
from torch.utils.data import Dataset

from .base import check_split
from .surface import Mesh, sample_surface, triangle_areas
from .synthetic import _SPLIT_IDS, _arc, _box, _random_rotation, _revolve


class PartDataset(Dataset):
    """Base of the part datasets. Subclasses set ``classes`` (category names), ``part_names``,
    ``category_parts`` (each category's part ids) and ``labels``, and implement :meth:`load`."""

    classes: list[str]
    part_names: list[str]
    category_parts: list[list[int]]
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    @abstractmethod
    def load(self, index: int) -> tuple[np.ndarray, int, np.ndarray]:
        """Points ``[n, 3]`` (any float dtype), category, and part ids ``[n]`` of item ``index``."""

    def __getitem__(self, index: int) -> tuple[np.ndarray, int, np.ndarray]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        return self.load(index % len(self))


def _moved(mesh: Mesh, offset: tuple[float, float, float]) -> Mesh:
    return Mesh(mesh.vertices + np.asarray(offset, dtype=float), mesh.faces)


def _legs(rng: np.random.Generator, half_x: float, half_z: float, height: float) -> list[Mesh]:
    thick = rng.uniform(0.03, 0.05)
    return [_moved(_box((thick, height / 2, thick)), (sx * (half_x - thick), -height / 2, sz * (half_z - thick)))
            for sx in (-1, 1) for sz in (-1, 1)]


def _chair(rng: np.random.Generator) -> list[list[Mesh]]:
    """seat, legs, back."""
    w, d = rng.uniform(0.4, 0.55), rng.uniform(0.4, 0.55)
    back_h = rng.uniform(0.4, 0.7)
    seat = [_box((w, 0.05, d))]
    back = [_moved(_box((w, back_h / 2, 0.04)), (0, 0.05 + back_h / 2, -d + 0.04))]
    return [seat, _legs(rng, w, d, rng.uniform(0.4, 0.6)), back]


def _table(rng: np.random.Generator) -> list[list[Mesh]]:
    """top, legs."""
    w, d = rng.uniform(0.6, 0.9), rng.uniform(0.4, 0.7)
    return [[_box((w, 0.04, d))], _legs(rng, w, d, rng.uniform(0.5, 0.8))]


def _lamp(rng: np.random.Generator) -> list[list[Mesh]]:
    """base, pole, shade."""
    base_r, pole_h = rng.uniform(0.2, 0.35), rng.uniform(0.6, 1.0)
    base = _revolve(np.array([0.0, base_r, base_r]), np.array([0.05, 0.05, 0.0]))
    pole = _revolve(np.full(2, 0.03), np.array([0.0, pole_h]), y_offset=0.05)
    top, bottom = rng.uniform(0.1, 0.2), rng.uniform(0.25, 0.4)
    shade = _revolve(np.array([bottom, top]), np.array([0.0, rng.uniform(0.2, 0.35)]), y_offset=0.05 + pole_h - 0.1)
    return [[base], [pole], [shade]]


def _mug(rng: np.random.Generator) -> list[list[Mesh]]:
    """body, handle."""
    r, h = rng.uniform(0.3, 0.45), rng.uniform(0.6, 1.0)
    body = _revolve(np.array([0.0, r, r]), np.array([0.0, 0.0, h]))
    phi = _arc(-np.pi / 2, np.pi / 2, 8)
    reach = rng.uniform(0.15, 0.3)
    handle = [_moved(_box((0.03, 0.03, 0.03)), (r + reach * np.cos(a), h / 2 + 0.6 * h / 2 * np.sin(a), 0.0))
              for a in phi]
    return [[body], handle]


#: category -> (generator of its parts' meshes, part names)
CATEGORIES = {
    "chair": (_chair, ("seat", "legs", "back")),
    "table": (_table, ("top", "legs")),
    "lamp": (_lamp, ("base", "pole", "shade")),
    "mug": (_mug, ("body", "handle")),
}


def generate_parts(category: int, num_points: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One random shape of ``category``: points float64 ``[num_points, 3]`` (area-uniform over all its
    parts, jittered, posed about the gravity axis) and local part indices int64 ``[num_points]``."""
    build = list(CATEGORIES.values())[category][0]
    parts = build(rng)
    meshes = [(mesh, part) for part, group in enumerate(parts) for mesh in group]
    areas = np.array([triangle_areas(mesh).sum() for mesh, _ in meshes])
    counts = rng.multinomial(num_points, areas / areas.sum())
    points = np.concatenate([sample_surface(mesh, n, rng) for (mesh, _), n in zip(meshes, counts)])
    labels = np.concatenate([np.full(n, part, dtype=np.int64) for (_, part), n in zip(meshes, counts)])
    order = rng.permutation(num_points)  # not part by part
    points = points[order] + rng.normal(scale=0.005, size=points.shape)
    return points @ _random_rotation(rng, "gravity").T, labels[order]


class SyntheticParts(PartDataset):
    """``num_samples`` procedural shapes with labelled parts, balanced over the categories of
    :data:`CATEGORIES` (item ``i`` has category ``i % 4``): chair (seat, legs, back), table (top,
    legs), lamp (base, pole, shade), mug (body, handle). Each item is generated from
    ``numpy.random.default_rng((seed, split_id, index))``; train and test never share a shape."""

    def __init__(self, split: str = "train", num_samples: int = 800, num_points: int = 1024, seed: int = 0):
        self.split_id = _SPLIT_IDS[check_split(split)]
        self.num_points, self.seed = num_points, seed
        self.classes = list(CATEGORIES)
        self.part_names, self.category_parts = [], []
        for name, (_, parts) in CATEGORIES.items():
            self.category_parts.append(list(range(len(self.part_names), len(self.part_names) + len(parts))))
            self.part_names += [f"{name}/{part}" for part in parts]
        self.labels = np.arange(num_samples, dtype=np.int64) % len(self.classes)

    def load(self, index: int) -> tuple[np.ndarray, int, np.ndarray]:
        rng = np.random.default_rng((self.seed, self.split_id, index))
        category = int(self.labels[index])
        points, local = generate_parts(category, self.num_points, rng)
        return points.astype(np.float32), category, np.asarray(self.category_parts[category])[local]


__all__ = ["CATEGORIES", "PartDataset", "SyntheticParts", "generate_parts"]
