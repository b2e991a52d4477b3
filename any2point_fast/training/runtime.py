"""Where and how a run executes: the process group, the device, precision and process-wide settings.

Several processes: launch with ``torchrun``; when ``WORLD_SIZE > 1`` the process group is
initialised from its environment variables (NCCL on CUDA, gloo on CPU) by :func:`init_distributed`;
only rank 0 logs and writes files.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from .. import ops
from ..config import ConfigError
from .run_config import TrainConfig


@dataclass
class DistInfo:
    """This process's place in the run: ``rank`` of ``world_size`` (one process: 0 of 1), its local GPU
    index, the process group's backend, and whether :func:`init_distributed` created the group."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None
    owns_group: bool = False

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_pref: str = "auto") -> DistInfo:
    """Join the torchrun process group when ``WORLD_SIZE > 1`` (NCCL with CUDA, gloo otherwise)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device_pref in ("auto", "cuda")
    owns = False
    if not dist.is_initialized():
        if use_cuda:
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if use_cuda else "gloo", init_method="env://")
        owns = True
    return DistInfo(dist.get_rank(), dist.get_world_size(), local, dist.get_backend(), owns)


def select_device(pref: str, info: DistInfo) -> torch.device:
    """The device of ``train.device`` (``"auto"``: this process's CUDA device if any, else the CPU)."""
    if pref == "auto":
        pref = "cuda" if torch.cuda.is_available() else "cpu"
    if pref == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("train.device='cuda' but CUDA is not available")
        return torch.device("cuda", info.local_rank)
    return torch.device(pref)


def all_reduce(values: list[float], info: DistInfo, device: torch.device) -> list[float]:
    """``values`` summed over the processes (float64; unchanged with one process)."""
    if not info.distributed:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


@contextlib.contextmanager
def runtime(cfg: TrainConfig, device: torch.device) -> Iterator[None]:
    """Process-wide settings for the run (backend, threads, determinism), restored afterwards."""
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark, torch.get_num_threads())
    try:
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        if cfg.deterministic:
            if device.type == "cuda":
                os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True, warn_only=False)
            torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
        with ops.use_backend(cfg.backend):
            yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[2], saved[3]
        torch.set_num_threads(saved[4])


def autocast(device: torch.device, precision: str):
    """The autocast context of ``train.precision`` (none for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a :class:`~torch.nn.parallel.DistributedDataParallel` wrapper (else ``model``)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


__all__ = ["DistInfo", "all_reduce", "autocast", "init_distributed", "runtime", "select_device", "unwrap"]
