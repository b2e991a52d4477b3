"""Seeded, stratified item selections: a held-out split and a per-class subset of a dataset.

Both draw one permutation per class from ``numpy.random.default_rng((seed, stream))`` (classes
in label order), so a selection depends on the seed and the labels only, never on the machine
or on the training seed. Taking the first items of those permutations makes subsets nested: the
items kept with ``limit=50`` are among those kept with ``limit=100``.
"""

from collections.abc import Sequence

import numpy as np
from torch.utils.data import Dataset

_HOLDOUT, _LIMIT = 0, 1  # independent random streams of one seed


def dataset_labels(dataset: Dataset) -> np.ndarray:
    """The int64 label of every item, from the dataset's ``labels`` (no file is read)."""
    labels = getattr(dataset, "labels", None)
    if labels is None:
        raise TypeError(f"{type(dataset).__name__} has no 'labels': cannot select items per class")
    return np.asarray(labels, dtype=np.int64)


def _class_permutations(labels: np.ndarray, seed: int, stream: int) -> list[np.ndarray]:
    """For each label present (ascending), its item indices in a seeded random order."""
    rng = np.random.default_rng((seed, stream))
    return [rng.permutation(np.flatnonzero(labels == label)) for label in np.unique(labels)]


def holdout_count(size: int, ratio: float) -> int:
    """Items of a class of ``size`` held out: ``round(ratio * size)``, but at least one and at
    most ``size - 1`` when the class has two items or more (a class of one is kept for training)."""
    if size < 2 or ratio <= 0:
        return 0
    return min(max(round(ratio * size), 1), size - 1)


def stratified_holdout(labels: Sequence[int], ratio: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted ``(kept, held_out)`` item indices: :func:`holdout_count` items of each class held out."""
    labels = np.asarray(labels, dtype=np.int64)
    kept, held = [], []
    for order in _class_permutations(labels, seed, _HOLDOUT):
        count = holdout_count(len(order), ratio)
        held.append(order[:count])
        kept.append(order[count:])
    return _sorted(kept), _sorted(held)


def limit_per_class(labels: Sequence[int], limit: int, seed: int) -> np.ndarray:
    """Sorted indices of at most ``limit`` seeded random items of each class."""
    labels = np.asarray(labels, dtype=np.int64)
    return _sorted([order[:limit] for order in _class_permutations(labels, seed, _LIMIT)])


def _sorted(parts: list[np.ndarray]) -> np.ndarray:
    return np.sort(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.int64)


class Subset(Dataset):
    """Items ``indices`` of ``dataset``, with its ``classes`` and the matching ``labels``."""

    def __init__(self, dataset: Dataset, indices: Sequence[int]):
        self.dataset = dataset
        self.indices = np.asarray(indices, dtype=np.int64)
        self.classes = list(dataset.classes)
        self.labels = dataset_labels(dataset)[self.indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int):
        return self.dataset[int(self.indices[index])]
