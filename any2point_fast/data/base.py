"""What every dataset shares: the item contract, and small checked file-layout helpers."""

from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from .errors import DatasetError
from .mesh_io import read_geometry
from .surface import sample_surface
from .transforms import Resample, Transform

SPLITS = ("train", "test")


class PointCloudDataset(Dataset[tuple[Tensor, Tensor]], ABC):
    """A labelled point-cloud dataset; items are ``(points, label)``.

    ``points``: float32 ``[num_points, 3]`` — the raw cloud, passed through ``transform``, then
    cut to its first ``num_points`` points (repeated cyclically when shorter; a transform that
    already returns ``num_points`` points, such as a random :class:`Resample`, is left as is).
    ``num_points=None`` keeps every point. ``label``: int64 scalar, an index into ``classes``.

    Subclasses set ``classes`` and implement ``__len__`` and :meth:`load`.
    """

    classes: list[str]

    def __init__(self, num_points: int | None, transform: Transform | None):
        self.num_points = num_points
        self.transform = transform
        self._fit = None if num_points is None else Resample(num_points, mode="first")

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def load(self, index: int) -> tuple[np.ndarray, int]:
        """The untransformed cloud ``[n, 3]`` (any float dtype) and label of item ``index``."""

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        points, label = self.load(index % len(self))
        cloud = torch.tensor(points, dtype=torch.float32)  # a copy: transforms never alias data
        if self.transform is not None:
            cloud = self.transform(cloud)
        if self._fit is not None:
            cloud = self._fit(cloud)
        return cloud, torch.tensor(label, dtype=torch.int64)


class InMemoryDataset(PointCloudDataset):
    """A dataset held as arrays: ``points`` float32 ``[n, P, 3]`` and ``labels`` int64 ``[n]``.

    Subclasses set both arrays (and ``classes``) in their constructor.
    """

    points: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def load(self, index: int) -> tuple[np.ndarray, int]:
        return self.points[index], int(self.labels[index])


class FileDataset(PointCloudDataset):
    """A dataset of geometry files (any suffix in ``mesh_io.SUPPORTED_SUFFIXES``), read on access.

    Point files are used as they are; meshes yield ``mesh_points`` area-weighted surface
    samples (default: ``num_points``, or 2048 when that is None), drawn from
    ``numpy.random.default_rng((seed, index))`` so an item is the same every time.
    Subclasses fill ``files`` and ``labels`` (and set ``classes``) in their constructor.
    """

    def __init__(
        self,
        num_points: int | None,
        transform: Transform | None,
        mesh_points: int | None = None,
        seed: int = 0,
    ):
        super().__init__(num_points, transform)
        self.mesh_points = mesh_points or num_points or 2048
        self.seed = seed
        self.files: list[Path] = []
        self.labels: list[int] = []

    def __len__(self) -> int:
        return len(self.files)

    def load(self, index: int) -> tuple[np.ndarray, int]:
        path = self.files[index]
        mesh = read_geometry(path)
        if mesh.is_point_set:
            return mesh.vertices, self.labels[index]
        rng = np.random.default_rng((self.seed, index))
        try:
            return sample_surface(mesh, self.mesh_points, rng), self.labels[index]
        except ValueError as err:
            raise DatasetError(f"{path}: {err}") from err


def check_split(split: str, allowed: tuple[str, ...] = SPLITS) -> str:
    """Return ``split`` if it is one of ``allowed``; raise ValueError otherwise."""
    if split not in allowed:
        raise ValueError(f"expected split in {list(allowed)}, got {split!r}")
    return split


def dataset_dir(root: str | Path, name: str) -> Path:
    """``root/name`` when that folder exists, else ``root``: users may pass either one."""
    root = Path(root)
    return root / name if (root / name).is_dir() else root


def read_name_list(path: Path) -> list[str]:
    """The non-empty, stripped lines of a text file listing unique names (classes or ids)."""
    if not path.is_file():
        raise DatasetError(f"{path}: file not found (expected one name per line)")
    names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not names:
        raise DatasetError(f"{path}: expected one name per line, found none")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise DatasetError(f"{path}: expected unique names, found duplicates {duplicates[:5]}")
    return names
