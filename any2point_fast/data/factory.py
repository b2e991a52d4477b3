"""build_dataset: construct any dataset of the library by name; build_train_test: the two sets of a run."""

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset

from .base import PointCloudDataset
from .folder import PointFolder, has_split_folders
from .modelnet import ModelNet40H5, ModelNet40Resampled
from .scanobjectnn import ScanObjectNN
from .split import Subset, dataset_labels, stratified_holdout
from .split import limit_per_class as select_per_class
from .synthetic import SyntheticShapes
from .transforms import Transform

DATASETS = {
    "modelnet40_h5": ModelNet40H5,
    "modelnet40_resampled": ModelNet40Resampled,
    "scanobjectnn": ScanObjectNN,
    "folder": PointFolder,
    "synthetic": SyntheticShapes,
}


def build_dataset(
    name: str,
    root: str | Path | None,
    split: str | None,
    num_points: int = 1024,
    transform: Transform | None = None,
    **options,
) -> PointCloudDataset:
    """The dataset ``name`` (a key of DATASETS) for ``split``, with ``[num_points, 3]`` items.

    ``options`` go to the dataset's constructor (``variant`` for "scanobjectnn"; ``mesh_points``
    and ``seed`` for "folder"; ``num_samples``, ``seed`` and ``rotation`` for "synthetic").
    "synthetic" needs no ``root`` (pass None); "folder" takes ``split=None`` for a
    ``<root>/<class>/`` layout and a split name for ``<root>/<class>/<split>/``.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}, expected one of {list(DATASETS)}")
    kwargs = {"split": split, "num_points": num_points, "transform": transform, **options}
    if name == "synthetic":
        if root is not None:
            raise ValueError(f"dataset 'synthetic' is generated, it takes no root (got {root!r})")
        return SyntheticShapes(**kwargs)
    if root is None:
        raise ValueError(f"dataset {name!r} needs a root folder")
    return DATASETS[name](root, **kwargs)


@dataclass
class TrainTest:
    """The datasets of a run: ``train``, ``test``, and one sentence per selection made (for the log)."""

    train: Dataset
    test: Dataset
    notes: list[str] = field(default_factory=list)


def build_train_test(
    name: str,
    root: str | Path | None,
    train_split: str | None = "train",
    test_split: str | None = "test",
    num_points: int | None = 1024,
    *,
    options: dict | None = None,
    train_options: dict | None = None,
    test_options: dict | None = None,
    test_ratio: float = 0.2,
    split_seed: int = 0,
    limit_per_class: int | None = None,
) -> TrainTest:
    """The train and test sets of dataset ``name`` (untransformed items of ``num_points`` points).

    ``test_split=None`` holds out a seeded stratified ``test_ratio`` of each class of the train
    split as the test set (see :func:`~.split.stratified_holdout`; seed ``split_seed``); those items
    are not trained on. The folder dataset takes the flat ``<root>/<class>/`` layout when
    ``train_split`` is None or when no class folder has a ``<train_split>/`` subfolder, and then
    always holds its test set out. ``limit_per_class`` keeps that many seeded random training
    items per class (None: all). ``options`` go to both splits' constructors, ``train_options`` /
    ``test_options`` to one split's only.
    """
    options, train_options, test_options = options or {}, train_options or {}, test_options or {}
    notes: list[str] = []
    train_split, test_split = _layout(name, root, train_split, test_split, notes)
    train = build_dataset(name, root, train_split, num_points, **{**options, **train_options})
    if test_split is None:
        if test_options:
            raise ValueError(f"test options {test_options} cannot apply to a test set held out of the train split")
        train, test = _hold_out(train, train_split, test_ratio, split_seed, notes)
    else:
        test = build_dataset(name, root, test_split, num_points, **{**options, **test_options})
    if limit_per_class is not None:
        before = len(train)
        train = Subset(train, select_per_class(dataset_labels(train), limit_per_class, split_seed))
        notes.append(f"training subset: at most {limit_per_class} seeded random clouds per class "
                     f"(limit_per_class {limit_per_class}, split_seed {split_seed}): {len(train)} of {before}")
    return TrainTest(train, test, notes)


def _layout(name: str, root, train_split: str | None, test_split: str | None,
            notes: list[str]) -> tuple[str | None, str | None]:
    """The split names to read: both None for a flat folder (whose test set is then held out)."""
    if name == "folder" and (train_split is None or not has_split_folders(root, train_split)):
        if train_split is not None:
            notes.append(f"{root}: no class folder has a {train_split}/ subfolder, so it is read as a flat "
                         "<root>/<class>/ layout")
        return None, None
    if train_split is None:
        raise ValueError(f"dataset {name!r} needs a train split name (a null train split is for the folder dataset)")
    return train_split, test_split


def _hold_out(dataset: Dataset, split: str | None, ratio: float, seed: int,
              notes: list[str]) -> tuple[Subset, Subset]:
    """``(train, test)``: a seeded stratified ``ratio`` of each class of ``dataset`` held out as test."""
    kept, held = stratified_holdout(dataset_labels(dataset), ratio, seed)
    train, test = Subset(dataset, kept), Subset(dataset, held)
    per_class = np.bincount(test.labels, minlength=len(test.classes))
    source = f"the {split} split" if split else "the whole folder"
    notes.append(f"test set: {100 * ratio:g}% of each class held out of {source}, seeded and stratified "
                 f"(test_ratio {ratio:g}, split_seed {seed}): {len(train)} train / {len(test)} test "
                 f"clouds, {per_class.min()}-{per_class.max()} test clouds per class")
    return train, test
