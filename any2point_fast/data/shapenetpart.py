"""ShapeNetPart (16 categories, 50 parts) in the two layouts people have.

- ``shapenetcore_partanno_segmentation_benchmark_v0_normal``: ``<root>/<synset>/<id>.txt`` with rows
  ``x y z nx ny nz part`` (the part a global id 0..49), and the official split lists
  ``<root>/train_test_split/shuffled_{train,val,test}_file_list.json`` (entries
  ``shape_data/<synset>/<id>``);
- ``hdf5_data``: ``<root>/ply_data_{train,val,test}<i>.h5`` with ``data`` float ``[n, 2048, 3]``,
  ``label`` int ``[n]`` or ``[n, 1]`` (the category) and ``pid`` int ``[n, 2048]`` (global part ids).

Split ``trainval`` is ``train`` + ``val`` (what the published results train on). Every file is
checked; a bad one raises :class:`~.errors.DatasetError` starting with its path.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .base import check_split, dataset_dir
from .errors import DatasetError
from .h5 import read_h5_clouds, read_h5_key
from .parts import PartDataset

#: (category, synset id, number of parts), in the order of the category indices; parts are numbered
#: consecutively in this order (Airplane 0-3, Bag 4-5, ..., Table 47-49).
SHAPENETPART_CATEGORIES = (
    ("Airplane", "02691156", 4), ("Bag", "02773838", 2), ("Cap", "02954340", 2), ("Car", "02958343", 4),
    ("Chair", "03001627", 4), ("Earphone", "03261776", 3), ("Guitar", "03467517", 3), ("Knife", "03624134", 2),
    ("Lamp", "03636649", 4), ("Laptop", "03642806", 2), ("Motorbike", "03790512", 6), ("Mug", "03797390", 2),
    ("Pistol", "03948459", 3), ("Rocket", "04099429", 3), ("Skateboard", "04225987", 3), ("Table", "04379243", 3),
)
SPLITS = ("train", "val", "test", "trainval")


class _ShapeNetPartBase(PartDataset):
    def __init__(self):
        self.classes = [name for name, _, _ in SHAPENETPART_CATEGORIES]
        self.category_parts, self.part_names = [], []
        for name, _, count in SHAPENETPART_CATEGORIES:
            first = len(self.part_names)
            self.category_parts.append(list(range(first, first + count)))
            self.part_names += [f"{name}/{i}" for i in range(count)]

    def _check_parts(self, path: Path, category: int, parts: np.ndarray, where: str = "") -> None:
        allowed = self.category_parts[category]
        bad = np.flatnonzero((parts < allowed[0]) | (parts > allowed[-1]))
        if bad.size:
            raise DatasetError(f"{path}: part {parts[bad[0]]}{where} at point {bad[0]} is not a part of "
                               f"{self.classes[category]} (expected {allowed[0]}..{allowed[-1]})")


def _splits(split: str) -> tuple[str, ...]:
    return ("train", "val") if check_split(split, SPLITS) == "trainval" else (split,)


class ShapeNetPart(_ShapeNetPartBase):
    """The ``shapenetcore_partanno_segmentation_benchmark_v0_normal`` release (``root`` is that folder
    or its parent). Files are read on access; ``labels`` (categories) come from the split lists."""

    def __init__(self, root: str | Path, split: str = "trainval"):
        super().__init__()
        self.root = dataset_dir(root, "shapenetcore_partanno_segmentation_benchmark_v0_normal")
        synsets = {synset: index for index, (_, synset, _) in enumerate(SHAPENETPART_CATEGORIES)}
        self.files: list[Path] = []
        labels = []
        for name in _splits(split):
            listing = self.root / "train_test_split" / f"shuffled_{name}_file_list.json"
            for entry in _read_list(listing):
                parts = entry.split("/")
                if len(parts) != 3 or parts[1] not in synsets:
                    raise DatasetError(f"{listing}: entry {entry!r} is not shape_data/<synset>/<id> of a "
                                       f"ShapeNetPart category")
                self.files.append(self.root / parts[1] / f"{parts[2]}.txt")
                labels.append(synsets[parts[1]])
        self.labels = np.asarray(labels, dtype=np.int64)

    def load(self, index: int) -> tuple[np.ndarray, int, np.ndarray]:
        path, category = self.files[index], int(self.labels[index])
        if not path.is_file():
            raise DatasetError(f"{path}: file not found (listed in the split)")
        try:
            rows = np.loadtxt(path, dtype=np.float64, ndmin=2)
        except ValueError as err:
            raise DatasetError(f"{path}: expected rows of 7 numbers (x y z nx ny nz part): {err}") from err
        if rows.shape[0] == 0 or rows.shape[1] != 7:
            raise DatasetError(f"{path}: expected rows of 7 numbers (x y z nx ny nz part), found shape "
                               f"{list(rows.shape)}")
        if not np.isfinite(rows).all() or (rows[:, 6] != np.round(rows[:, 6])).any():
            raise DatasetError(f"{path}: non-finite values or a non-integer part column")
        parts = rows[:, 6].astype(np.int64)
        self._check_parts(path, category, parts)
        return rows[:, :3].astype(np.float32), category, parts


def _read_list(path: Path) -> list[str]:
    if not path.is_file():
        raise DatasetError(f"{path}: file not found (expected the official split list)")
    try:
        entries = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DatasetError(f"{path}: not a JSON list of shape_data/<synset>/<id> entries: {err}") from err
    if not isinstance(entries, list) or not entries or not all(isinstance(e, str) for e in entries):
        raise DatasetError(f"{path}: expected a non-empty JSON list of shape_data/<synset>/<id> entries")
    return entries


class ShapeNetPartH5(_ShapeNetPartBase):
    """The ``hdf5_data`` release (``root`` is that folder or its parent), read into memory."""

    def __init__(self, root: str | Path, split: str = "trainval"):
        super().__init__()
        folder = dataset_dir(root, "hdf5_data")
        points, labels, parts = [], [], []
        for name in _splits(split):
            files = sorted(folder.glob(f"ply_data_{name}*.h5"))
            if not files:
                raise DatasetError(f"{folder}: no ply_data_{name}*.h5 files (expected the hdf5_data release)")
            for path in files:
                data, label = read_h5_clouds(path, len(self.classes))
                pid = read_h5_key(path, "pid", "[n, P]")
                if pid.shape != data.shape[:2] or not np.issubdtype(pid.dtype, np.integer):
                    raise DatasetError(f"{path}: expected key 'pid' with shape {list(data.shape[:2])} of integers, "
                                       f"found shape {list(pid.shape)} of {pid.dtype}")
                for row, (category, row_parts) in enumerate(zip(label, pid)):
                    self._check_parts(path, int(category), row_parts, f" of cloud {row}")
                points.append(data)
                labels.append(label)
                parts.append(pid.astype(np.int64))
        self.points, self.labels, self.parts = np.concatenate(points), np.concatenate(labels), np.concatenate(parts)

    def load(self, index: int) -> tuple[np.ndarray, int, np.ndarray]:
        return self.points[index], int(self.labels[index]), self.parts[index]


__all__ = ["SHAPENETPART_CATEGORIES", "ShapeNetPart", "ShapeNetPartH5"]
