"""What a run writes for people: its directory (``config.yaml``, ``metrics.jsonl``) and its lines.

``config.yaml`` is the resolved run config; ``metrics.jsonl`` has one JSON line per epoch, then a
``final`` line (a resumed run keeps the lines of the epochs its checkpoint has seen). On a terminal
a tqdm bar shows progress; when stdout is redirected, :class:`ProgressLines` prints a line every
few steps or seconds, and every epoch ends with one line (:func:`epoch_line`).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..atomic_io import atomic_write_bytes
from ..partseg import describe_test
from ..train_state import remove_stale_temporaries, resolve_pointer
from .run_config import RunConfig

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.yaml"
CHECKPOINTS_DIR = "checkpoints"
#: Evaluation results written to ``metrics.jsonl`` (as ``test_<name>``).
RECORDED = ("acc", "mean_class_acc", "loss", "instance_miou", "class_miou")


def open_run_dir(out: Path, run: RunConfig, resumed_from: Path | None, epochs_done: int) -> None:
    """Create ``out``, clean what a killed save left, write ``config.yaml`` and start ``metrics.jsonl``
    (with the epoch lines of the run ``resumed_from`` up to ``epochs_done``, if resumed)."""
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out, out / CHECKPOINTS_DIR)
    write_config(out / CONFIG_FILE, run)
    kept = []
    if resumed_from is not None:  # the metrics of the epochs the checkpoint has seen, from its own run
        kept = read_metrics(find_run_dir(resumed_from) / METRICS_FILE, epochs_done)
    atomic_write_bytes(out / METRICS_FILE, "".join(line + "\n" for line in kept).encode())


def write_config(path: Path, run: RunConfig) -> None:
    """``config.yaml``: the run config as a recipe, written atomically."""
    import yaml

    atomic_write_bytes(path, yaml.safe_dump(run.to_dict(), sort_keys=False).encode())


def read_metrics(path: Path, upto_epoch: int) -> list[str]:
    """The epoch lines of ``metrics.jsonl`` for epochs ``<= upto_epoch`` (what a resumed run keeps)."""
    if not path.is_file():
        return []
    kept = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            record = json.loads(line)
            if record.get("type") == "epoch" and record.get("epoch", math.inf) <= upto_epoch:
                kept.append(line)
    return kept


def append_line(path: Path, record: dict[str, Any]) -> None:
    """Append one JSON line (the metrics file is rewritten atomically only on resume)."""
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record, sort_keys=True) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def recorded_results(metrics: dict[str, Any]) -> dict[str, float]:
    """The :data:`RECORDED` evaluation results of ``metrics`` as ``metrics.jsonl`` keys (``test_acc``, ...)."""
    return {f"test_{k}": v for k, v in metrics.items() if k in RECORDED}


def epoch_line(record: dict[str, Any], epochs: int, metrics: dict[str, Any] | None) -> str:
    """``epoch 3/12  loss 1.2345  train acc 56.2%  test acc ...  lr 4.00e-04  12 samples/s  train 41.2 s, ...``
    (the test part when ``metrics``, the epoch's evaluation, is given)."""
    line = (f"epoch {record['epoch']}/{epochs}  loss {record['train_loss']:.4f}  "
            f"train acc {100 * record['train_acc']:.1f}%")
    if metrics is not None:
        line += "  " + describe_test(metrics)
    return line + f"  lr {record['lr']:.2e}  {record['samples_per_s']:.0f} samples/s  " + epoch_seconds(record)


def epoch_seconds(record: dict[str, Any]) -> str:
    """``train 41.2 s, eval 12.0 s, checkpoint 0.3 s``: where an epoch's time went (eval when it ran)."""
    parts = [f"train {record['epoch_time_s']:.1f} s"]
    if "eval_time_s" in record:
        parts.append(f"eval {record['eval_time_s']:.1f} s")
    parts.append(f"checkpoint {record['checkpoint_time_s']:.1f} s")
    return ", ".join(parts)


class ProgressLines:
    """Progress lines for logs that are not a terminal: one every ``every_steps`` steps of an epoch
    and whenever ``every_s`` seconds have passed since the last one (or since the epoch began)."""

    def __init__(self, say: Callable[[str], None], every_steps: int, every_s: float, enabled: bool):
        self.say, self.every_steps, self.every_s, self.enabled = say, every_steps, every_s, enabled
        self.last = time.perf_counter()

    def start(self) -> None:
        self.last = time.perf_counter()

    def after_step(self, where: str, step_in_epoch: int, loss: float, acc: float, rate: float) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        due_step = self.every_steps and step_in_epoch % self.every_steps == 0
        due_time = self.every_s and now - self.last >= self.every_s
        if due_step or due_time:
            self.last = now
            self.say(f"{where} loss {loss:.3f} acc {100 * acc:.1f}% {rate:.1f} samples/s")


def progress_bar(show: bool, total: int, initial: int, desc: str):
    """A tqdm bar of an epoch's ``total`` micro-batches on stderr (None unless ``show``)."""
    if not show:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, leave=False, dynamic_ncols=True, file=sys.stderr)


def find_run_dir(path: str | Path) -> Path:
    """The run directory of a checkpoint path: a run directory itself, or ``<run>/checkpoints/<name>``."""
    path = Path(path)
    if resolve_pointer(path, "latest") is not None or (path / CONFIG_FILE).is_file():
        return path
    resolved = path.resolve()
    if resolved.parent.name == CHECKPOINTS_DIR:
        return resolved.parent.parent
    return resolved.parent


__all__ = ["CHECKPOINTS_DIR", "CONFIG_FILE", "METRICS_FILE", "RECORDED", "ProgressLines", "append_line", "epoch_line",
           "epoch_seconds", "find_run_dir", "open_run_dir", "progress_bar", "read_metrics", "recorded_results",
           "write_config"]
