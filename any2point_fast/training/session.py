"""A run's set-up on one process: its data, model, optimizer and progress (restored on resume), the
run directory and the lines a run starts with, gathered in one :class:`Session` for the loop."""

from __future__ import annotations

import math
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from ..config import ConfigError
from ..train_state import Checkpoint
from .checkpointing import Progress, TrainingState, load_trainable_state, restore_training_state, save_training_state
from .datasets import build_datasets
from .evaluation import evaluate
from .model_factory import build_model, describe_projection
from .optimization import build_optimizer
from .run_config import RunConfig
from .run_log import ProgressLines, open_run_dir
from .runtime import DistInfo


@dataclass
class Schedule:
    """How an epoch divides on this process: micro-batches, optimizer steps, and the whole run's steps."""

    micro_per_epoch: int
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int


def _schedule(run: RunConfig, train_size: int, world_size: int) -> Schedule:
    cfg = run.train
    micro_per_epoch = math.ceil(train_size / world_size) // cfg.batch_size
    if micro_per_epoch < 1:
        raise ConfigError(f"the training set ({train_size} items over {world_size} process(es)) "
                          f"is smaller than one batch ({cfg.batch_size})")
    steps_per_epoch = math.ceil(micro_per_epoch / cfg.grad_accum_steps)
    return Schedule(micro_per_epoch, steps_per_epoch, cfg.epochs * steps_per_epoch,
                    round(cfg.warmup_epochs * steps_per_epoch))


@dataclass
class Session:
    """Everything one process's loop works with, set up by :func:`start_session`."""

    run: RunConfig
    info: DistInfo
    device: torch.device
    out: Path
    say: Callable[[str], None]
    on_step: Callable[[int, float], None] | None
    train_set: Dataset
    test_set: Dataset
    num_classes: int
    schedule: Schedule
    state: TrainingState
    net: nn.Module  # the model, wrapped in DistributedDataParallel with several processes
    trainable: list[nn.Parameter]
    criterion: nn.Module
    lines: ProgressLines
    show_bar: bool
    started: float = 0.0  # perf_counter() at the run's start, earlier sessions' time included

    @property
    def progress(self) -> Progress:
        return self.state.progress

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def save(self, best: bool) -> None:
        save_training_state(self.state, self.run, self.out, self.info, self.device, best)

    def evaluate(self) -> dict[str, Any]:
        cfg = self.run.train
        return evaluate(self.net, self.test_set, self.num_classes, cfg.eval_batch_size or cfg.batch_size, self.device,
                        cfg.precision, self.info, cfg.num_workers)


def start_session(run: RunConfig, info: DistInfo, device: torch.device, out: Path, checkpoint: Checkpoint | None,
                  say: Callable[[str], None], on_step: Callable[[int, float], None] | None,
                  datasets: tuple[Dataset, Dataset] | None) -> Session:
    """Data, model, optimizer and progress (restored from ``checkpoint``); the run directory and header lines."""
    cfg = run.train
    random.seed(cfg.seed)  # seeded: every rank builds the same initial weights
    np.random.seed(cfg.seed % 2**32)
    torch.manual_seed(cfg.seed)
    train_set, test_set = datasets or build_datasets(run.data, cfg.seed, say, run.model.task)
    if cfg.num_workers:  # workers are started every epoch: give them a filled cache to copy
        train_set.preload()
        test_set.preload()
    num_classes = len(train_set.classes)
    schedule = _schedule(run, len(train_set), info.world_size)

    model = build_model(run, num_classes, getattr(train_set, "num_parts", None))
    if checkpoint is not None:
        load_trainable_state(model, checkpoint.model, str(checkpoint.path))
    sync_bn = info.distributed and info.backend == "nccl" and cfg.sync_batchnorm
    if sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(device)
    net: nn.Module = model
    if info.distributed:
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=cfg.find_unused_parameters,
        )
    state = TrainingState(model, *build_optimizer(model, cfg, schedule.warmup_steps, schedule.total_steps, device),
                          Progress())
    if checkpoint is not None:
        restore_training_state(state, checkpoint, info, device)

    if info.is_main:
        open_run_dir(out, run, checkpoint.path if checkpoint is not None else None, state.progress.epoch)
        for line in _header(run, out, model, (train_set, test_set), num_classes, schedule, info, device, sync_bn):
            say(line)
        if checkpoint is not None:
            say(f"resumed from {checkpoint.path} (epoch {state.progress.epoch}, step {state.progress.step})")
    lines = ProgressLines(say, cfg.progress_every_steps, cfg.progress_every_s,
                          enabled=cfg.progress and info.is_main and not sys.stdout.isatty())
    trainable = [p for p in model.parameters() if p.requires_grad]
    session = Session(run, info, device, out, say, on_step, train_set, test_set, num_classes, schedule, state, net,
                      trainable, nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing), lines,
                      show_bar=cfg.progress and info.is_main and sys.stderr.isatty())
    session.started = time.perf_counter() - state.progress.elapsed_s
    return session


def _header(run: RunConfig, out: Path, model: nn.Module, sets: tuple[Dataset, Dataset], num_classes: int,
            schedule: Schedule, info: DistInfo, device: torch.device, sync_bn: bool) -> list[str]:
    """The lines a run starts with: output, model and parameter counts, projection, data, devices."""
    cfg = run.train
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in model.parameters())
    projection = describe_projection(model)
    return [
        f"output: {out}",
        f"model: {run.model.backbone}, {num_classes} classes; trainable params: {n_train:,} || "
        f"all params: {n_all:,} || trainable%: {100 * n_train / max(n_all, 1):.2f}",
        *([projection] if projection is not None else []),
        f"data: {run.data.dataset}, {len(sets[0])} train / {len(sets[1])} test clouds of "
        f"{run.data.num_points} points; {schedule.steps_per_epoch} steps/epoch, {cfg.epochs} epochs",
        f"device: {device} x {info.world_size} process(es)"
        + (f" ({info.backend}; BatchNorm {'synchronised' if sync_bn else 'per process'})" if info.distributed else "")
        + f", precision {cfg.precision}, ops backend {cfg.backend}" + (", deterministic" if cfg.deterministic else ""),
    ]


__all__ = ["Schedule", "Session", "start_session"]
