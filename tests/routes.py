"""The routes of the torch path's neighbourhood attention pool, for tests to run each against the reference.

A route names how the buckets are attended: ``compiled``, every bucket of two or more tokens by
the C++ kernels of :mod:`any2point_fast.torch_ops.native` (which also find the maxima); or, the
short ones (``≤ EXPLICIT_MAX_LEN``) by an explicit softmax and the long ones by ``flash``,
PyTorch's fused CPU flash kernel, or ``tiles``, explicit logits tiles small enough to split test
buckets (the plain PyTorch path on other devices); then, optionally, how PyTorch's maxima go
backward (under ``compiled``, in the views with a tie only): ``saved argmax`` (scattered from the
items saved in forward) or ``recompute`` (the features recomputed and compared); without it, the
op's own thresholds choose.
"""

from __future__ import annotations

import os

import pytest
import torch

from any2point_fast.torch_ops import attention as torch_attention
from any2point_fast.torch_ops import native

ROUTES = tuple(f"{attention}, {maximum}" for attention in ("compiled", "flash", "tiles")
               for maximum in ("saved argmax", "recompute"))


def use_route(monkeypatch: pytest.MonkeyPatch, route: str) -> None:
    """Send every view through ``route`` (one of :data:`ROUTES`, or only its attention part)."""
    attention, _, maximum = route.partition(", ")
    assert attention in ("compiled", "flash", "tiles") and maximum in ("", "saved argmax", "recompute"), route
    if maximum:
        monkeypatch.setattr(torch_attention, "ARGMAX_MIN_LENGTH", 1 if maximum == "saved argmax" else 10**9)
    use_compiled(monkeypatch, attention == "compiled")
    if attention == "compiled":
        return
    monkeypatch.setattr(torch_attention, "FLASH_ON_CPU", attention == "flash" and torch_attention.FLASH_ON_CPU)
    if attention == "tiles":
        monkeypatch.setattr(torch_attention, "TILE_ELEMENTS", 20_000)


def use_compiled(monkeypatch: pytest.MonkeyPatch, compiled: bool) -> None:
    """Run the torch ops with their compiled kernels, or in plain PyTorch."""
    if compiled:
        require_compiled()
    else:
        monkeypatch.setattr(native, "available", lambda device: False)


def require_compiled() -> None:
    """Skip where the user turned the compiled kernels off; anywhere else they must build."""
    if os.environ.get(native.ENV_VAR, "").strip() == "0":
        pytest.skip(f"{native.ENV_VAR}=0: compiled kernels turned off")
    assert native.available(torch.device("cpu")), "the compiled CPU kernels did not build (see the warning)"
