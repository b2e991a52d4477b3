"""The part-segmentation task for the training loop: datasets, per-point outputs, mIoU evaluation.

:mod:`any2point_fast.training` runs ``model.task: partseg`` through the same loop as classification;
what differs lives here:

- items are ``(points [P, 3], category, parts [P])``: :class:`PartItems` resamples points and
  labels together (a seeded random subset: a new one every epoch when training, always the same when
  testing; files may list their points part by part), then
  normalises into the unit sphere and, when training, scales (0.9–1.1) and translates (±0.2);
- :func:`model_outputs` flattens the per-point logits and labels for the loss and accuracy;
- :func:`evaluate_parts` reports instance and class mIoU (:mod:`any2point_fast.metrics`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .data.cached import CachedItems
from .data.folder import PartFolder, has_split_folders
from .data.parts import PartDataset, SyntheticParts
from .data.shapenetpart import ShapeNetPart, ShapeNetPartH5
from .data.transforms import Compose, NormalizeUnitSphere, RandomScale, RandomTranslate, Resample
from .metrics import PartSegmentationScores, format_segmentation, restricted_argmax

#: The heads a run can train (``model.task``).
TASKS = ("classification", "partseg")
#: ``data.dataset`` names of the part datasets (``model.task: partseg``).
PART_DATASETS = {"synthetic_parts": SyntheticParts, "shapenetpart": ShapeNetPart, "shapenetpart_h5": ShapeNetPartH5,
                 "folder": PartFolder}


class PartItems(CachedItems):
    """A part dataset addressed by ``(epoch, index)``, like :class:`~any2point_fast.training.datasets.EpochItems`:
    the resampling and augmentation of an item are drawn from ``generator`` reseeded from ``(seed, epoch,
    index)`` by ``mix``. Items: ``(points float32 [P, 3], category int64, parts int64 [P])``."""

    def __init__(self, base: PartDataset, num_points: int, train: bool, seed: int, mix: Callable[..., int],
                 cache: bool = False):
        super().__init__(base, cache)
        self.seed, self.mix = seed, mix
        self.classes, self.category_parts = list(base.classes), base.category_parts
        self.num_parts = len(base.part_names)
        self.generator = torch.Generator()
        self.pick = Resample(num_points, generator=self.generator)  # test items: a fixed draw (epoch 0)
        steps = [NormalizeUnitSphere()]
        if train:
            steps += [RandomScale(0.9, 1.1, generator=self.generator), RandomTranslate(0.2, generator=self.generator)]
        self.transform = Compose(steps)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        points, category, parts = self._raw(index)
        self.generator.manual_seed(self.mix(self.seed, epoch, index))
        keep = self.pick(torch.arange(len(points)))
        cloud = self.transform(torch.as_tensor(points, dtype=torch.float32)[keep])
        return cloud, torch.tensor(category, dtype=torch.int64), torch.as_tensor(parts, dtype=torch.int64)[keep]


def build_part_items(dataset: str, root: str | None, splits: tuple[str | None, str | None], num_points: int,
                     options: tuple[dict, dict], seed: int, mix: Callable[..., int],
                     cache: bool = False, test_ratio: float = 0.2,
                     split_seed: int = 0) -> tuple[PartItems, PartItems]:
    """The train and test :class:`PartItems` of part dataset ``dataset`` (a key of :data:`PART_DATASETS`).

    ``splits``: the train and test split names; ``options``: each split's constructor options
    (``num_samples``, ``seed`` of the synthetic parts; ``parts`` of the folder). ``seed`` and ``mix``
    seed the augmentation. The folder dataset, like the classification one, holds a seeded stratified
    ``test_ratio`` of each category out as its test set (seed ``split_seed``) when it has no
    ``<category>/<train split>/`` subfolders or when the test split is None.
    """
    from .config import ConfigError

    if dataset not in PART_DATASETS:
        raise ConfigError(f"model.task partseg needs a part dataset: data.dataset one of {sorted(PART_DATASETS)}, "
                          f"got {dataset!r}")
    if dataset == "folder":
        if not root:
            raise ConfigError("dataset 'folder' needs its folder: --set data.root=/path/to/data")
        train_split, test_split = splits
        if train_split is None or not has_split_folders(root, train_split):
            train_split = test_split = None  # flat <root>/<category>/ layout
        held = {"test_ratio": test_ratio, "split_seed": split_seed}
        train_set = PartFolder(root, train_split, "train", **held, **options[0])
        test_set = (PartFolder(root, train_split, "test", **held, **options[1]) if test_split is None
                    else PartFolder(root, test_split, **options[1]))
        return (PartItems(train_set, num_points, True, mix(seed, "train"), mix, cache),
                PartItems(test_set, num_points, False, mix(seed, "test"), mix, cache))
    if None in splits:
        raise ConfigError("model.task partseg: part datasets need both split names (no held-out test split)")
    if dataset == "synthetic_parts":
        if root is not None:
            raise ConfigError(f"dataset 'synthetic_parts' is generated, it takes no root (got {root!r})")
        make = [lambda split, o=o: SyntheticParts(split, num_points=2 * num_points, **o) for o in options]
    elif not root:
        raise ConfigError(f"dataset {dataset!r} needs its folder: --set data.root=/path/to/data")
    else:
        make = [lambda split, o=o: PART_DATASETS[dataset](root, split, **o) for o in options]
    return tuple(PartItems(build(split), num_points, train, mix(seed, split), mix, cache)
                 for build, split, train in zip(make, splits, (True, False)))


def model_outputs(net: nn.Module, points: torch.Tensor, targets: list[torch.Tensor]) -> tuple[torch.Tensor,
                                                                                            torch.Tensor]:
    """``(logits [X, K], labels [X])`` of a batch: per cloud (``targets = [label]``) or per point
    (``targets = [category, parts]``: the ``B·P`` points' part logits and labels)."""
    if len(targets) == 1:
        return net(points), targets[0]
    category, parts = targets
    logits = net(points, category)
    return logits.reshape(-1, logits.shape[-1]), parts.reshape(-1)


@torch.no_grad()
def evaluate_parts(model: nn.Module, loader, items: PartItems, device: torch.device,
                   autocast: Callable[[], Any], shares: Callable[[PartSegmentationScores], None]) -> dict[str, Any]:
    """Instance and class mIoU, point accuracy and loss of ``model`` on ``loader``'s batches of ``items``.

    ``autocast()`` gives the precision context; ``shares(scores)`` merges other processes' shapes
    into ``scores`` (a no-op with one process). Returns ``instance_miou``, ``class_miou``, ``acc``
    (point accuracy), ``loss`` (per point), ``shapes`` and ``table`` (the per-category lines).
    """
    scores = PartSegmentationScores(items.classes, items.category_parts)
    loss_sum = correct = seen = 0.0
    for points, category, parts in loader:
        points, category, parts = points.to(device), category.to(device), parts.to(device)
        with autocast():
            logits = model(points, category)
        loss_sum += F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), parts.reshape(-1),
                                    reduction="sum").item()
        pred = restricted_argmax(logits, category, items.category_parts)
        correct += (pred == parts).sum().item()
        seen += parts.numel()
        scores.add(pred, parts, category)
    shares(scores)
    return {**scores.result(), "acc": correct / max(seen, 1.0), "loss": loss_sum / max(seen, 1.0),
            "table": scores.table()}


def primary_metric(metrics: dict[str, Any]) -> float:
    """What a run ranks its checkpoints by: instance mIoU for part segmentation, else accuracy."""
    return metrics.get("instance_miou", metrics["acc"])


def format_result(metrics: dict[str, Any]) -> str:
    """The last line of a run and of ``eval``: ``test instance mIoU: 83.1% (class mIoU 80.2%)`` for part
    segmentation, ``test accuracy: 93.4%`` for classification."""
    if "instance_miou" in metrics:
        return format_segmentation(metrics)
    return f"test accuracy: {100 * metrics['acc']:.1f}%"


def describe_test(metrics: dict[str, Any]) -> str:
    """The test part of an epoch line: ``test acc 93.1% (mean-class 92.0%)`` or ``test mIoU 81.2% (class 79.0%)``."""
    if "instance_miou" in metrics:
        return f"test mIoU {100 * metrics['instance_miou']:.1f}% (class {100 * metrics['class_miou']:.1f}%)"
    return f"test acc {100 * metrics['acc']:.1f}% (mean-class {100 * metrics['mean_class_acc']:.1f}%)"


__all__ = ["PART_DATASETS", "PartItems", "TASKS", "build_part_items", "describe_test", "evaluate_parts",
           "format_result", "model_outputs", "primary_metric"]
