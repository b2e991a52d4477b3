"""A run's checkpoints: what they hold of the model and the training state, saving one, resuming from one.

A checkpoint stores the trainable parameters and BatchNorm buffers (:func:`trainable_state`; the
frozen backbone is never copied), the optimizer, scheduler and scaler states, the
:class:`Progress` counters, the run config and every process's RNG states, so a run killed and
resumed ends with the same weights as one that was not. The files are written and verified by
:mod:`any2point_fast.train_state` (safetensors + JSON, never pickle).
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .. import __version__
from ..checkpoint import CheckpointError
from ..train_state import (
    Checkpoint,
    capture_rng_state,
    flatten_optimizer_state,
    point,
    prune_checkpoints,
    restore_rng_state,
    save_checkpoint,
    unflatten_optimizer_state,
)
from .run_config import RunConfig
from .run_log import CHECKPOINTS_DIR
from .runtime import DistInfo, unwrap


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """What a checkpoint stores of ``model``: trainable parameters and BatchNorm buffers (detached)."""
    model = unwrap(model)
    names = {name for name, p in model.named_parameters() if p.requires_grad}
    for module_name, module in model.named_modules():
        if isinstance(module, _BatchNorm):
            names.update(f"{module_name}.{b}".lstrip(".") for b, _ in module.named_buffers(recurse=False))
    state = model.state_dict(keep_vars=False)
    return {name: state[name].detach() for name in sorted(names)}


def load_trainable_state(model: nn.Module, tensors: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Load :func:`trainable_state` tensors into ``model``; keys must match exactly."""
    model = unwrap(model)
    expected = set(trainable_state(model))
    missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if missing or unexpected:
        raise CheckpointError(f"{source}: does not match the model (missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}); was it trained with another model config?")
    model.load_state_dict(tensors, strict=False)


@dataclass
class Progress:
    """Counters saved in checkpoints: where the run is and what the current epoch has seen."""

    epoch: int = 0  # epochs completed
    batch_in_epoch: int = 0  # micro-batches of epoch `epoch` already trained
    step: int = 0  # optimizer steps done
    loss_sum: float = 0.0
    correct: float = 0.0
    seen: float = 0.0
    best_acc: float = -1.0  # of the primary metric: accuracy, or instance mIoU (partseg)
    best_epoch: int = 0
    elapsed_s: float = 0.0


@dataclass
class TrainingState:
    """What a checkpoint saves and a resume restores besides the RNG states: the (unwrapped) model,
    its optimizer, scheduler and gradient scaler, and the :class:`Progress` counters."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    progress: Progress


def restore_training_state(state: TrainingState, checkpoint: Checkpoint, info: DistInfo,
                           device: torch.device) -> None:
    """Load the optimizer, scheduler, scaler, progress and this rank's RNG states of ``checkpoint``
    (the model's weights are loaded before it is wrapped, see :func:`load_trainable_state`)."""
    manifest = checkpoint.manifest
    state.optimizer.load_state_dict(unflatten_optimizer_state(manifest["optimizer"], checkpoint.state))
    state.scheduler.load_state_dict(manifest["scheduler"])
    if manifest.get("scaler"):
        state.scaler.load_state_dict(manifest["scaler"])
    state.progress = Progress(**manifest["progress"])
    if manifest.get("world_size") == info.world_size:
        rank_tensors = {k.split(".", 1)[1]: v for k, v in checkpoint.state.items()
                        if k.startswith(f"rank{info.rank}.")}
        restore_rng_state(rank_tensors, manifest["rng"][info.rank], device)
    else:
        warnings.warn(f"resuming a {manifest.get('world_size')}-process run with {info.world_size} "
                      "processes: data order and RNG streams differ from the original run", stacklevel=2)


def save_training_state(state: TrainingState, run: RunConfig, out: Path, info: DistInfo, device: torch.device,
                        best: bool) -> None:
    """Write a checkpoint of ``state`` under ``out/checkpoints`` (rank 0; every rank gives its RNG states)
    and point ``latest`` (and ``best`` when ``best``) at it; keep ``train.keep_checkpoints`` of the others."""
    rng_tensors, rng_json = capture_rng_state(device)
    gathered = [(rng_tensors, rng_json)]
    if info.distributed:
        gathered = [None] * info.world_size
        dist.all_gather_object(gathered, ({k: v.cpu() for k, v in rng_tensors.items()}, rng_json))
    if not info.is_main:
        return
    progress = state.progress
    opt_tensors, opt_structure = flatten_optimizer_state(state.optimizer.state_dict())
    tensors = dict(opt_tensors)
    for rank, (rank_tensors, _) in enumerate(gathered):
        tensors.update({f"rank{rank}.{k}": v for k, v in rank_tensors.items()})
    manifest = {
        "epoch": progress.epoch, "step": progress.step, "world_size": info.world_size,
        "progress": dataclasses.asdict(progress), "run_config": run.to_dict(),
        "optimizer": opt_structure, "scheduler": state.scheduler.state_dict(),
        "scaler": state.scaler.state_dict() if state.scaler.is_enabled() else None,
        "rng": [structure for _, structure in gathered],
        "versions": {"any2point_fast": __version__, "torch": torch.__version__},
    }
    name = f"step-{progress.step:08d}-epoch-{progress.epoch:04d}"
    if progress.batch_in_epoch:
        name += f"-batch-{progress.batch_in_epoch:06d}"
    checkpoints_dir = out / CHECKPOINTS_DIR
    directory = save_checkpoint(checkpoints_dir, name, trainable_state(state.model), tensors, manifest)
    point(out, "latest", directory)
    if best:
        point(out, "best", directory)
    prune_checkpoints(out, checkpoints_dir, run.train.keep_checkpoints)


__all__ = ["Progress", "TrainingState", "load_trainable_state", "restore_training_state",
           "save_training_state", "trainable_state"]
