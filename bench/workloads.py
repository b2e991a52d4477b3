"""Inputs of the benchmarks, built once per case with fixed seeds, and small measuring helpers."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from any2point_fast import Any2PointConfig
from any2point_fast.geometry import Geometry, ProjectionSpec
from any2point_fast.reference import build_geometry

#: The paper's scale of one block: B = 32 clouds of N = 128 tokens, C = 768, M = 6 views.
PAPER = dict(batch=32, tokens=128, hidden=768)
TINY = dict(batch=2, tokens=32, hidden=48)
#: Eight times the paper's tokens per cloud: where a GPU's memory-bound kernels are measured.
LONG = dict(batch=32, tokens=1024, hidden=768)


def case_sizes(quick: bool, device: torch.device) -> list[dict]:
    """The sizes of the per-op and adapter suites: tiny under ``--quick``; the paper's, and on a
    GPU also :data:`LONG`."""
    if quick:
        return [TINY]
    return [PAPER, LONG] if device.type == "cuda" else [PAPER]


@dataclass
class AdapterCase:
    """One block's adapter inputs: ``hidden``/``ffn`` ``[B, 1 + N, C]``, centres, PE table, geometry."""

    config: Any2PointConfig
    spec: ProjectionSpec
    centers: torch.Tensor
    pe_table: torch.Tensor
    hidden: torch.Tensor
    ffn: torch.Tensor
    geometry: Geometry

    @property
    def label(self) -> str:
        b, n1, c = self.hidden.shape
        return f"{self.config.modality} B={b} N={n1 - 1} C={c} M={self.config.num_views}"


def adapter_case(recipe: str, batch: int, tokens: int, hidden: int, device: torch.device, seed: int = 0) -> AdapterCase:
    """Random clouds' token centres (unit-ish Gaussian blobs) and features for the ``recipe`` preset."""
    config = Any2PointConfig.preset(recipe, hidden_size=hidden)
    spec = ProjectionSpec.from_config(config)
    gen = torch.Generator().manual_seed(seed)
    centers = torch.randn(batch, tokens, 3, generator=gen)
    shape = (config.pe_length, hidden) if config.pe_kind == "1d" else (*config.pe_grid, hidden)
    pe_table = torch.randn(shape, generator=gen) * 0.02
    x = torch.randn(2, batch, tokens + 1, hidden, generator=gen)
    _, geometry = build_geometry(centers, pe_table, spec, config.voxel_size)
    return AdapterCase(config, spec, centers.to(device), pe_table.to(device), x[0].to(device), x[1].to(device),
                       geometry.to(device))


def adapter_pair(case: AdapterCase):
    """An ops-dispatched adapter (train mode) and the reference adapter with the same weights."""
    from any2point_fast.adapter import Any2PointAdapter
    from any2point_fast.reference import ReferenceAdapter

    torch.manual_seed(0)
    adapter = Any2PointAdapter(case.config).to(case.hidden.device).train()
    oracle = ReferenceAdapter(case.config).to(case.hidden.device).train()
    oracle.load_state_dict(adapter.state_dict())
    return adapter, oracle


def count_operator_calls(fn: Callable[[], object]) -> int:
    """Top-level ATen operator calls made by ``fn()`` (forward and any backward it runs)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    count = 0
    for event in prof.events():
        if not event.name.startswith("aten::"):
            continue
        parent = event.cpu_parent
        while parent is not None and not parent.name.startswith("aten::"):
            parent = parent.cpu_parent
        count += parent is None
    return count


#: The autocast dtype of the whole run (``pytest bench/ --precision bf16``), or None for float32.
AUTOCAST_DTYPE: torch.dtype | None = None


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """The run's autocast context for forward passes on ``device`` (a no-op in float32)."""
    if AUTOCAST_DTYPE is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=AUTOCAST_DTYPE)


def tolerance_dtype() -> torch.dtype:
    """The dtype whose tolerances (``tests/tolerances.py``) a benchmark's result is checked at."""
    return torch.float32 if AUTOCAST_DTYPE is None else AUTOCAST_DTYPE


def forward_backward(fn: Callable[[], torch.Tensor], inputs: list[torch.Tensor]) -> Callable[[], torch.Tensor]:
    """A callable running ``fn()`` (under the run's autocast) and back-propagating a fixed random
    gradient into ``inputs`` (drawn at the first call, from the output's shape: no extra forward),
    outside autocast as PyTorch prescribes."""
    grads: list[torch.Tensor] = []

    def run() -> torch.Tensor:
        for t in inputs:
            t.grad = None
        with autocast(inputs[0].device):
            result = fn()
        if not grads:
            grads.append(torch.randn(result.shape, generator=torch.Generator().manual_seed(1)).to(result))
        result.backward(grads[0])
        return result.detach()

    return run
