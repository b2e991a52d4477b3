"""The routes of the torch path's bucket attention, for tests to run each one against the reference."""

from __future__ import annotations

import os

import pytest
import torch

from any2point_fast.torch_ops import attention as torch_attention
from any2point_fast.torch_ops import native

#: ``compiled``: the C++ kernel (:mod:`any2point_fast.torch_ops.native`) attends the long buckets;
#: ``flash``: plain PyTorch, with its fused CPU flash kernel; ``tiles``: plain PyTorch off that
#: kernel (the path on other devices), with logits tiles small enough to split test buckets.
ROUTES = ("compiled", "flash", "tiles")


def attention_route(monkeypatch: pytest.MonkeyPatch, route: str) -> None:
    """Send the long buckets of every view through ``route`` (one of :data:`ROUTES`)."""
    if route == "compiled":
        require_compiled()
        return
    monkeypatch.setattr(native, "available", lambda device: False)
    monkeypatch.setattr(torch_attention, "FLASH_ON_CPU", route == "flash" and torch_attention.FLASH_ON_CPU)
    if route == "tiles":
        monkeypatch.setattr(torch_attention, "TILE_ELEMENTS", 20_000)


def require_compiled() -> None:
    """Skip where the user turned the compiled kernels off; anywhere else they must build."""
    if os.environ.get(native.ENV_VAR, "").strip() == "0":
        pytest.skip(f"{native.ENV_VAR}=0: compiled kernels turned off")
    assert native.available(torch.device("cpu")), "the compiled CPU kernels did not build (see the warning)"
