"""The training loop: :func:`train` runs a :class:`~any2point_fast.training.run_config.RunConfig`.

What the loop does (DESIGN.md; paper §3.1): gradient accumulation and norm clipping; fp32, bf16
or fp16 (CUDA, with a GradScaler) autocast; evaluation every ``eval_every`` epochs; the best
checkpoint tracked; one JSON line per epoch in ``metrics.jsonl``. It trains any ``nn.Module``
mapping points ``[B, P, 3]`` to logits ``[B, classes]`` (or, for part segmentation, points and
categories to per-point logits); which model is built is decided in
:func:`~any2point_fast.training.model_factory.build_model`.

Reproducibility and resume: the shuffle order of epoch ``e`` is a function of ``(seed, e)``
(a seeded :class:`~torch.utils.data.DistributedSampler`, also with one process), the
augmentation of an item a function of ``(seed, e, index)``, and every RNG state is saved in
the checkpoint, so a run killed and resumed ends with the same weights as one that was not
(bitwise in ``deterministic`` CPU mode).

Several processes (``torchrun``): the model is wrapped in ``DistributedDataParallel`` and data
sharded by a seeded ``DistributedSampler``. BatchNorm becomes SyncBatchNorm on NCCL; on gloo (CPU)
it stays a per-process BatchNorm whose running statistics DDP broadcasts from rank 0 at every step.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Dataset, DistributedSampler

from ..config import ConfigError
from ..partseg import model_outputs, primary_metric
from ..train_state import load_checkpoint
from .datasets import make_loader, mix_seed
from .run_config import RunConfig
from .run_log import METRICS_FILE, append_line, epoch_line, progress_bar, recorded_results
from .runtime import DistInfo, all_reduce, autocast, init_distributed, runtime, select_device
from .session import Session, start_session


@dataclass
class TrainResult:
    """What :func:`train` returns (on every rank)."""

    output_dir: Path
    model: nn.Module
    epoch: int
    step: int
    stopped: bool
    final: dict[str, float] | None
    best_acc: float
    best_epoch: int
    elapsed_s: float


def train(run: RunConfig, output_dir: str | Path | None = None, resume: str | Path | None = None, *,
          log: Callable[[str], None] = print, on_step: Callable[[int, float], None] | None = None,
          datasets: tuple[Dataset, Dataset] | None = None) -> TrainResult:
    """Train ``run``; write ``config.yaml``, ``metrics.jsonl`` and checkpoints under ``output_dir``.

    Args:
        run: the run's config.
        output_dir: where everything goes (default ``runs/<timestamp>``).
        resume: a checkpoint (or run) directory to continue from; the weights, optimizer,
            scheduler, scaler, RNG states, data position and metrics so far are restored.
        log: receives the human-readable lines (rank 0 only).
        on_step: called after every optimizer step with ``(step, loss of that step)`` on every rank.
        datasets: ``(train, test)`` sets addressed like :class:`~any2point_fast.training.datasets.EpochItems`
            to use instead of the ``data`` section's (the few-shot episodes).

    Returns:
        A :class:`TrainResult`; ``final`` holds the last evaluation (None when stopped early).
    """
    cfg = run.train
    info = init_distributed(cfg.device)
    say = log if info.is_main else (lambda _line: None)
    try:
        device = select_device(cfg.device, info)
        if cfg.precision == "fp16" and device.type != "cuda":
            raise ConfigError("train.precision='fp16' needs CUDA; use 'bf16' or 'fp32' on CPU")
        with runtime(cfg, device):
            out = _resolve_output(output_dir, info)
            checkpoint = load_checkpoint(resume) if resume is not None else None
            return _loop(start_session(run, info, device, out, checkpoint, say, on_step, datasets))
    finally:
        if info.owns_group:
            dist.destroy_process_group()


def _resolve_output(output_dir: str | Path | None, info: DistInfo) -> Path:
    """``output_dir``, or ``runs/<timestamp>`` chosen by rank 0 and shared with the others."""
    if output_dir is None:
        chosen = [time.strftime("runs/%Y%m%d-%H%M%S")]
        if info.distributed:
            dist.broadcast_object_list(chosen, src=0)
        output_dir = chosen[0]
    return Path(output_dir)


def _loop(s: Session) -> TrainResult:
    """Epochs until ``train.epochs`` (or an early stop), then the final evaluation and lines."""
    cfg, progress = s.run.train, s.progress
    last_eval: dict[str, Any] | None = None
    while progress.epoch < cfg.epochs:
        clock = _train_epoch(s)
        if clock is None:
            s.say(f"stopped after step {progress.step} (train.stop_after_steps); resume with --resume {s.out}")
            return _result(s, None, stopped=True)
        metrics = _end_epoch(s, clock)
        if metrics is not None:
            last_eval = metrics
        stop_epoch = cfg.stop_after_epoch is not None and progress.epoch >= cfg.stop_after_epoch
        stop_step = cfg.stop_after_steps is not None and progress.step >= cfg.stop_after_steps
        if (stop_epoch or stop_step) and progress.epoch < cfg.epochs:
            s.say(f"stopped after epoch {progress.epoch} (train.stop_after_*); resume with --resume {s.out}")
            return _result(s, None, stopped=True)
    if last_eval is None:  # resumed a finished run: evaluate the final weights again
        last_eval = s.evaluate()
    if s.info.is_main:
        append_line(s.out / METRICS_FILE, {
            "type": "final", "epoch": progress.epoch, "step": progress.step, **recorded_results(last_eval),
            "best_test_acc": progress.best_acc, "best_epoch": progress.best_epoch, "elapsed_s": progress.elapsed_s,
        })
        if "table" in last_eval:
            s.say(last_eval["table"])
        s.say(f"best test {'instance mIoU' if 'instance_miou' in last_eval else 'accuracy'} "
              f"{100 * progress.best_acc:.1f}% at epoch {progress.best_epoch}; "
              f"final checkpoint {s.out / 'latest'}; {progress.elapsed_s:.0f} s")
    return _result(s, last_eval, stopped=False)


def _result(s: Session, final: dict[str, Any] | None, stopped: bool) -> TrainResult:
    progress = s.progress
    return TrainResult(s.out, s.state.model, progress.epoch, progress.step, stopped, final, progress.best_acc,
                       progress.best_epoch, progress.elapsed_s)


@dataclass
class _EpochClock:
    """One epoch's time and throughput on this process (checkpoint saving excluded)."""

    start: float
    samples: int = 0
    saving_s: float = 0.0

    def train_s(self) -> float:
        return time.perf_counter() - self.start - self.saving_s


def _train_epoch(s: Session) -> _EpochClock | None:
    """Train the rest of epoch ``progress.epoch`` (all of it, unless resumed mid-epoch); None when
    ``train.stop_after_steps`` stopped it (after a checkpoint)."""
    cfg, progress, micro_per_epoch = s.run.train, s.progress, s.schedule.micro_per_epoch
    epoch = progress.epoch
    if progress.batch_in_epoch == 0:  # fresh epoch: its RNG stream is a function of (seed, epoch, rank)
        torch.manual_seed(mix_seed(cfg.seed, "epoch", epoch, s.info.rank))
        progress.loss_sum = progress.correct = progress.seen = 0.0
    sampler = DistributedSampler(s.train_set, num_replicas=s.info.world_size, rank=s.info.rank, shuffle=True,
                                 seed=cfg.seed, drop_last=False)
    sampler.set_epoch(epoch)
    order = list(sampler)[: micro_per_epoch * cfg.batch_size]
    keys = [(epoch, index) for index in order[progress.batch_in_epoch * cfg.batch_size:]]
    loader = make_loader(s.train_set, keys, cfg.batch_size, cfg.num_workers,
                         mix_seed(cfg.seed, "loader", epoch, s.info.rank), drop_last=True,
                         pin=s.device.type == "cuda")
    s.net.train()
    clock = _EpochClock(time.perf_counter())
    s.lines.start()
    bar = progress_bar(s.show_bar, micro_per_epoch, progress.batch_in_epoch, f"epoch {epoch + 1}/{cfg.epochs}")
    group_loss = 0.0
    try:
        for points, *targets in loader:
            b = progress.batch_in_epoch
            group_start = b - b % cfg.grad_accum_steps
            group_size = min(cfg.grad_accum_steps, micro_per_epoch - group_start)
            closes_group = b + 1 == group_start + group_size
            loss_value = _micro_batch(s, points, targets, group_size, closes_group)
            group_loss += loss_value / group_size
            clock.samples += len(points) * s.info.world_size
            if closes_group:
                _optimizer_step(s, group_loss)
                group_loss = 0.0
            _report(s, clock, bar, loss_value, closes_group)
            if closes_group and progress.batch_in_epoch < micro_per_epoch and _save_mid_epoch(s, clock):
                return None
    finally:
        if bar is not None:
            bar.close()
    return clock


def _micro_batch(s: Session, points: torch.Tensor, targets: list[torch.Tensor], group_size: int,
                 closes_group: bool) -> float:
    """Forward and backward of one micro-batch (gradients synchronised only when it closes its group);
    adds its loss and accuracy to the epoch's counters and returns its loss."""
    progress = s.progress
    points = points.to(s.device, non_blocking=True)
    targets = [t.to(s.device, non_blocking=True) for t in targets]
    sync = contextlib.nullcontext() if closes_group or not s.info.distributed else s.net.no_sync()
    with sync:
        with autocast(s.device, s.run.train.precision):
            logits, labels = model_outputs(s.net, points, targets)  # per cloud, or per point (partseg)
            loss = s.criterion(logits.float(), labels)
        s.state.scaler.scale(loss / group_size).backward()
    loss_value = loss.item()
    progress.loss_sum += loss_value * len(labels)
    progress.correct += (logits.argmax(dim=1) == labels).sum().item()
    progress.seen += len(labels)
    progress.batch_in_epoch += 1
    return loss_value


def _optimizer_step(s: Session, group_loss: float) -> None:
    """Clip, step, schedule; ``on_step(step, group_loss)``."""
    cfg, state = s.run.train, s.state
    if cfg.grad_clip:
        state.scaler.unscale_(state.optimizer)
        nn.utils.clip_grad_norm_(s.trainable, cfg.grad_clip)
    state.scaler.step(state.optimizer)
    state.scaler.update()
    state.optimizer.zero_grad(set_to_none=True)
    state.scheduler.step()
    state.progress.step += 1
    if s.on_step is not None:
        s.on_step(state.progress.step, group_loss)


def _report(s: Session, clock: _EpochClock, bar: Any, loss_value: float, closes_group: bool) -> None:
    """The progress line (after a step, when due) and the bar."""
    cfg, progress = s.run.train, s.progress
    rate = clock.samples / max(clock.train_s(), 1e-9)
    step_in_epoch = math.ceil(progress.batch_in_epoch / cfg.grad_accum_steps)
    if closes_group and step_in_epoch < s.schedule.steps_per_epoch:  # the epoch's own line follows its last step
        s.lines.after_step(f"epoch {progress.epoch + 1}/{cfg.epochs} step {step_in_epoch}/{s.schedule.steps_per_epoch}",
                           step_in_epoch, progress.loss_sum / progress.seen, progress.correct / progress.seen, rate)
    if bar is not None:
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.3f}", acc=f"{progress.correct / progress.seen:.1%}",
                        samples_s=f"{rate:.0f}", refresh=False)


def _save_mid_epoch(s: Session, clock: _EpochClock) -> bool:
    """After a step inside an epoch: a checkpoint every ``save_every_steps`` and at ``stop_after_steps``;
    True when the run stops here."""
    cfg, progress = s.run.train, s.progress
    stop = cfg.stop_after_steps is not None and progress.step >= cfg.stop_after_steps
    if stop or (cfg.save_every_steps and progress.step % cfg.save_every_steps == 0):
        progress.elapsed_s = s.elapsed()
        save_start = time.perf_counter()
        s.save(best=False)
        clock.saving_s += time.perf_counter() - save_start
    return stop


def _end_epoch(s: Session, clock: _EpochClock) -> dict[str, Any] | None:
    """Metrics, evaluation (when due), checkpoint and the epoch's line; returns the evaluation if one ran."""
    cfg, progress, info = s.run.train, s.progress, s.info
    if info.distributed:  # one set of BatchNorm running statistics: rank 0's (what is saved)
        for buffer in s.state.model.buffers():
            dist.broadcast(buffer, src=0)
    loss_sum, correct, seen = all_reduce([progress.loss_sum, progress.correct, progress.seen], info, s.device)
    progress.epoch, progress.batch_in_epoch = progress.epoch + 1, 0
    train_s = clock.train_s()
    record: dict[str, Any] = {
        "type": "epoch", "epoch": progress.epoch, "step": progress.step,
        "lr": s.state.optimizer.param_groups[0]["lr"],
        "train_loss": loss_sum / max(seen, 1), "train_acc": correct / max(seen, 1),
        "epoch_time_s": train_s, "samples_per_s": clock.samples / max(train_s, 1e-9),
    }
    metrics, is_best = None, False
    if progress.epoch % cfg.eval_every == 0 or progress.epoch == cfg.epochs:
        eval_start = time.perf_counter()
        metrics = s.evaluate()
        record["eval_time_s"] = time.perf_counter() - eval_start
        record.update(recorded_results(metrics))
        if primary_metric(metrics) > progress.best_acc:
            progress.best_acc, progress.best_epoch, is_best = primary_metric(metrics), progress.epoch, True
        record.update(best_test_acc=progress.best_acc, best_epoch=progress.best_epoch)
    progress.elapsed_s = s.elapsed()
    record["elapsed_s"] = progress.elapsed_s
    save_start = time.perf_counter()
    s.save(best=is_best)
    record["checkpoint_time_s"] = clock.saving_s + time.perf_counter() - save_start
    if info.is_main:
        append_line(s.out / METRICS_FILE, record)
        s.say(epoch_line(record, cfg.epochs, metrics))
    return metrics


__all__ = ["TrainResult", "train"]
