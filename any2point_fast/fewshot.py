"""Few-shot classification: N-way K-shot episodes on any classification dataset, mean ± std over folds.

As the peers report it (Point-BERT, Point-MAE, ReCon on ModelNet40): each fold draws ``ways``
classes among those with enough items, ``shots`` training clouds per class from the train split
and ``queries`` test clouds per class from the test split, trains a fresh model on the
``shots × ways`` clouds (labels renumbered ``0..ways-1``) and reports its test accuracy. Fold
``f`` is drawn from ``numpy.random.default_rng((seed, f))``, so the episodes are fixed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from .data.split import dataset_labels


@dataclass(frozen=True)
class Episode:
    """One fold: the original ``classes`` (in label order ``0..ways-1``) and the item indices of its
    ``train`` (``shots`` per class) and ``test`` (``queries`` per class) clouds."""

    classes: tuple[int, ...]
    train: tuple[int, ...]
    test: tuple[int, ...]


def draw_episodes(train_labels: np.ndarray, test_labels: np.ndarray, ways: int, shots: int, queries: int,
                  folds: int = 10, seed: int = 0) -> list[Episode]:
    """``folds`` seeded episodes; raises ValueError when fewer than ``ways`` classes have ``shots`` train
    and ``queries`` test items."""
    eligible = [c for c in np.unique(train_labels)
                if (train_labels == c).sum() >= shots and (test_labels == c).sum() >= queries]
    if len(eligible) < ways:
        raise ValueError(f"{ways}-way {shots}-shot with {queries} queries needs {ways} classes with {shots} train "
                         f"and {queries} test items; {len(eligible)} have them")
    episodes = []
    for fold in range(folds):
        rng = np.random.default_rng((seed, fold))
        classes = sorted(int(c) for c in rng.choice(eligible, size=ways, replace=False))
        train = [int(i) for c in classes for i in rng.choice(np.flatnonzero(train_labels == c), shots, replace=False)]
        test = [int(i) for c in classes for i in rng.choice(np.flatnonzero(test_labels == c), queries, replace=False)]
        episodes.append(Episode(tuple(classes), tuple(train), tuple(test)))
    return episodes


class EpisodeItems(Dataset):
    """The items ``indices`` of ``items`` (addressed by ``(epoch, index)`` like
    :class:`~any2point_fast.training.datasets.EpochItems`), labels renumbered by their place in ``classes``."""

    def __init__(self, items: Dataset, indices: tuple[int, ...], classes: tuple[int, ...]):
        self.items, self.indices = items, indices
        self.remap = {c: i for i, c in enumerate(classes)}
        self.classes = [items.classes[c] for c in classes]

    def __len__(self) -> int:
        return len(self.indices)

    def preload(self) -> None:
        """Nothing to do: the underlying items keep their own cache."""

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        points, label = self.items[(epoch, self.indices[index])]
        return points, torch.tensor(self.remap[int(label)], dtype=torch.int64)


def run_fewshot(run, ways: int, shots: int, queries: int = 20, folds: int = 10, seed: int = 0,
                output_dir: str | Path = "runs/fewshot", log: Callable[[str], None] = print) -> list[float]:
    """Train and evaluate a fresh model of ``run`` (a :class:`~any2point_fast.training.run_config.RunConfig`) on every
    episode; returns the test accuracy of every fold (each run in ``output_dir/fold-<f>``)."""
    from .training.datasets import build_datasets
    from .training.engine import train

    train_items, test_items = build_datasets(run.data, run.train.seed)
    episodes = draw_episodes(dataset_labels(train_items.base), dataset_labels(test_items.base), ways, shots,
                             queries, folds, seed)
    accuracies = []
    for fold, episode in enumerate(episodes):
        sets = (EpisodeItems(train_items, episode.train, episode.classes),
                EpisodeItems(test_items, episode.test, episode.classes))
        result = train(run, Path(output_dir) / f"fold-{fold}", log=lambda _line: None, datasets=sets)
        accuracies.append(result.final["acc"])
        log(f"fold {fold + 1}/{len(episodes)}: classes {[train_items.classes[c] for c in episode.classes]}, "
            f"test accuracy {100 * accuracies[-1]:.1f}%")
    return accuracies


def summarize(accuracies: list[float], ways: int, shots: int) -> str:
    """``5-way 10-shot: 93.2 ± 2.1% (10 folds)``: mean ± sample standard deviation of the fold accuracies."""
    values = 100 * np.asarray(accuracies, dtype=np.float64)
    std = values.std(ddof=1) if len(values) > 1 else 0.0
    return f"{ways}-way {shots}-shot: {values.mean():.1f} ± {std:.1f}% ({len(values)} folds)"


__all__ = ["Episode", "EpisodeItems", "draw_episodes", "run_fewshot", "summarize"]
