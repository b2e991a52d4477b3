"""The memory invariants of DESIGN.md §2 checked on the shapes of every tensor an op produces (any device)."""

from __future__ import annotations

import math

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class RecordShapes(TorchDispatchMode):
    """Records the shape of every tensor produced by an aten op while active.

    Byte tensors are skipped: they are the Triton interpreter's views of existing storages.
    """

    def __init__(self):
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.dtype != torch.uint8:
                self.shapes.append(tuple(t.shape))
        return out


def memory_violations(fn, views: int, batch: int, tokens: int, channels: int) -> list[tuple[int, ...]]:
    """Shapes produced by ``fn()`` of ``[M, B·N, C]`` elements or more, or with two dims of ``N`` (``N × N``)."""
    with RecordShapes() as mode:
        fn()
    per_view_features = views * batch * tokens * channels
    return [s for s in mode.shapes if math.prod(s) >= per_view_features or sum(d == tokens for d in s) >= 2]
