"""Evaluation of a model on a run's test set (sharded over processes), and of a saved checkpoint.

Classification reports overall and mean-class accuracy and the loss; part segmentation the
instance and class mIoU of :func:`~any2point_fast.partseg.evaluate_parts`.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from ..partseg import PartItems, evaluate_parts
from ..train_state import load_checkpoint
from ..voting import vote_logits
from .checkpointing import load_trainable_state
from .datasets import build_datasets, make_loader, mix_seed
from .model_factory import build_model
from .run_config import load_run_config
from .runtime import DistInfo, all_reduce, autocast, runtime, select_device, unwrap


@torch.no_grad()
def evaluate(model: nn.Module, items: Dataset, num_classes: int, batch_size: int, device: torch.device,
             precision: str = "fp32", info: DistInfo | None = None, num_workers: int = 0,
             votes: int = 1) -> dict[str, float]:
    """Overall accuracy, mean-class accuracy and loss of ``model`` on ``items`` (sharded over ranks);
    on :class:`~any2point_fast.partseg.PartItems` the metrics of :func:`~any2point_fast.partseg.evaluate_parts`.
    ``votes > 1``: classification logits averaged over that many augmented passes (:mod:`~any2point_fast.voting`,
    seeded: the same votes every time)."""
    info = info or DistInfo()
    model = unwrap(model)
    was_training = model.training
    model.eval()
    correct = torch.zeros(num_classes, dtype=torch.float64)
    total = torch.zeros(num_classes, dtype=torch.float64)
    loss_sum = 0.0
    keys = list(range(info.rank, len(items), info.world_size))
    loader = make_loader(items, keys, batch_size, num_workers, 0, drop_last=False, pin=device.type == "cuda")
    if isinstance(items, PartItems):
        def shares(scores) -> None:
            if info.distributed:
                gathered = [None] * info.world_size
                dist.all_gather_object(gathered, scores.shape_ious)
                scores.shape_ious = [sum((g[c] for g in gathered), []) for c in range(len(scores.shape_ious))]

        metrics = evaluate_parts(model, loader, items, device, lambda: autocast(device, precision), shares)
        model.train(was_training)
        return metrics
    vote_generator = torch.Generator().manual_seed(mix_seed("votes", info.rank))
    for points, labels in loader:
        points, labels = points.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with autocast(device, precision):
            logits = model(points) if votes == 1 else vote_logits(model, points, votes, vote_generator)
        loss_sum += F.cross_entropy(logits.float(), labels, reduction="sum").item()
        hits = (logits.argmax(dim=1) == labels).double().cpu()
        labels = labels.cpu()
        correct.index_add_(0, labels, hits)
        total.index_add_(0, labels, torch.ones_like(hits))
    model.train(was_training)
    stats = all_reduce([*correct.tolist(), *total.tolist(), loss_sum], info, device)
    correct, total = torch.tensor(stats[:num_classes]), torch.tensor(stats[num_classes:2 * num_classes])
    seen = total > 0
    count = float(total.sum())
    return {
        "acc": float(correct.sum() / max(count, 1.0)),
        "mean_class_acc": float((correct[seen] / total[seen]).mean()) if seen.any() else 0.0,
        "loss": stats[-1] / max(count, 1.0),
        "samples": count,
    }


def evaluate_checkpoint(path: str | Path, overrides: list[str] | None = None, votes: int = 1) -> dict[str, float]:
    """Rebuild the model of a checkpoint, load its weights and evaluate it on its test split
    (classification: with ``votes`` augmented passes averaged)."""
    run = load_run_config(path).with_overrides(overrides or [])
    checkpoint = load_checkpoint(path, with_state=False)
    info = DistInfo()
    device = select_device(run.train.device, info)
    with runtime(run.train, device):
        _, test_set = build_datasets(run.data, run.train.seed, task=run.model.task)
        num_classes = len(test_set.classes)
        torch.manual_seed(run.train.seed)
        model = build_model(run, num_classes, getattr(test_set, "num_parts", None))
        load_trainable_state(model, checkpoint.model, str(checkpoint.path))
        model.to(device)
        metrics = evaluate(model, test_set, num_classes, run.train.eval_batch_size or run.train.batch_size, device,
                           run.train.precision, info, run.train.num_workers, votes)
    return {**metrics, "epoch": checkpoint.manifest.get("epoch"), "step": checkpoint.manifest.get("step")}


__all__ = ["evaluate", "evaluate_checkpoint"]
