"""The data of a run: train and test sets whose items depend only on ``(seed, epoch, index)``, and
their loaders.

Reproducibility: the augmentation of an item is a function of ``(seed, epoch, index)``
(:class:`EpochItems`, :class:`~any2point_fast.partseg.PartItems`), so items are the same in any
worker, in any order, before and after a resume; seeds are derived with :func:`mix_seed`.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..config import ConfigError
from ..data.cached import CachedItems
from ..partseg import PartItems, build_part_items
from .run_config import DataSettings

# data.augment "auto": the recipe of recipe_transforms() each dataset trains with.
_AUGMENT_RECIPES = {
    "synthetic": "scanobjectnn",  # random pose about the gravity axis, like ScanObjectNN
    "scanobjectnn": "scanobjectnn",
    "modelnet40_h5": "modelnet40",
    "modelnet40_resampled": "modelnet40",
    "folder": "modelnet40",
}


def mix_seed(*parts: Any) -> int:
    """A 63-bit seed derived from ``parts`` (stable across processes and Python versions)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


class EpochItems(CachedItems):
    """A dataset addressed by ``(epoch, index)``: the augmentation of an item depends on nothing else.

    The raw clouds come from ``base`` (built without transform); ``transform`` draws from one
    generator, reseeded from ``(seed, epoch, index)`` before each item, so items are identical in
    any worker, in any order, before and after a resume.
    """

    def __init__(self, base: Dataset, transform: Callable[[torch.Tensor], torch.Tensor], generator: torch.Generator,
                 seed: int, cache: bool = False):
        super().__init__(base, cache)
        self.transform, self.generator, self.seed = transform, generator, seed
        self.classes = list(base.classes)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        points, label = self._raw(index)
        self.generator.manual_seed(mix_seed(self.seed, epoch, index))
        return self.transform(points), label


def build_datasets(data: DataSettings, seed: int = 0, log: Callable[[str], None] | None = None,
                   task: str = "classification") -> tuple[EpochItems, EpochItems] | tuple[PartItems, PartItems]:
    """The train and test sets of ``data``: ``(points [P, 3], label)`` items with the recipe's transforms
    (``task="partseg"``: ``(points, category, parts [P])`` items, see :class:`~any2point_fast.partseg.PartItems`).

    ``log`` receives one line per selection made (a held-out test set, a training subset).
    """
    if task == "partseg":
        return build_part_items(data.dataset, data.root, (data.train_split, data.test_split), data.num_points,
                                ({**data.options, **data.train_options}, {**data.options, **data.test_options}),
                                seed, mix_seed, data.cache, data.test_ratio, data.split_seed)
    from ..data import build_train_test
    from ..data.transforms import Compose, NormalizeUnitSphere, Resample, recipe_transforms

    if data.dataset != "synthetic" and not data.root:
        raise ConfigError(f"dataset {data.dataset!r} needs its folder: --set data.root=/path/to/data")
    recipe = _AUGMENT_RECIPES.get(data.dataset, "modelnet40") if data.augment == "auto" else data.augment
    # Generated sets are made at the target size; file sets keep every point for random subsets.
    raw_points = data.num_points if data.dataset == "synthetic" else None
    sets = build_train_test(
        data.dataset, data.root, data.train_split, data.test_split, raw_points, options=data.options,
        train_options=data.train_options, test_options=data.test_options, test_ratio=data.test_ratio,
        split_seed=data.split_seed, limit_per_class=data.limit_per_class,
    )
    for note in sets.notes if log is not None else ():
        log(f"data: {note}")
    items = []
    for base, split, train in ((sets.train, data.train_split or "train", True),
                               (sets.test, data.test_split or "test", False)):
        generator = torch.Generator()
        if recipe == "none" or not train:
            transform = Compose([Resample(data.num_points, mode="first"), NormalizeUnitSphere()])
        else:
            transform = recipe_transforms(recipe, train=True, num_points=data.num_points, generator=generator)
        items.append(EpochItems(base, transform, generator, seed=mix_seed(seed, split), cache=data.cache))
    return items[0], items[1]


def _seed_worker(worker_id: int) -> None:
    """Seed a DataLoader worker's NumPy and ``random`` from its torch seed (drawn from the loader's generator)."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def make_loader(items: Dataset, keys: list, batch_size: int, workers: int, seed: int, drop_last: bool,
                pin: bool) -> DataLoader:
    """A loader of ``items[key]`` for ``key`` in ``keys``, in that order; workers seeded from ``seed``."""
    generator = torch.Generator()
    generator.manual_seed(seed)
    return DataLoader(items, batch_size=batch_size, sampler=keys, drop_last=drop_last, num_workers=workers,
                      worker_init_fn=_seed_worker, generator=generator, pin_memory=pin)


__all__ = ["EpochItems", "build_datasets", "make_loader", "mix_seed"]
