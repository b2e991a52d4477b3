"""Small helpers shared by the torch ops."""

from __future__ import annotations

import torch


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 if any input is float64 (gradcheck), float32 otherwise (float16/bfloat16 included)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def exclusive_cumsum(counts: torch.Tensor) -> torch.Tensor:
    """``[0, c0, c0 + c1, ...]`` without the total: the start of every run of ``counts``."""
    return counts.cumsum(0) - counts


def grad_as(grad: torch.Tensor | None, like: torch.Tensor, needed: bool) -> torch.Tensor | None:
    """``grad`` in ``like``'s dtype, or ``None`` where autograd does not need it."""
    return grad.to(like.dtype) if needed and grad is not None else None
