"""Small helpers shared by the torch ops."""

from __future__ import annotations

import functools

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


def without_autocast(method):
    """Run an autograd ``Function``'s ``forward``/``backward`` with autocast off.

    The ops choose their compute dtype themselves (:func:`compute_dtype`) and return the input
    dtype; autocast would recast some of their matmuls to float16/bfloat16 and mix dtypes.
    """

    @functools.wraps(method)
    def wrapper(ctx, *args):
        device = next((a.device.type for a in args if isinstance(a, torch.Tensor)), "cpu")
        with torch.autocast(device_type=device, enabled=False):
            return method(ctx, *args)

    return wrapper


def linear_pool_weights(counts: torch.Tensor, pooling: str, dtype: torch.dtype) -> torch.Tensor:
    """Weight of a segment's row sum in its pooled row: ``1/n`` (mean); ``2`` for a singleton under
    ``max + mean`` (its maximum is its only row, so it joins the linear part); empty segments 1."""
    weights = 1 / counts.clamp_min(1).to(dtype)
    return weights.masked_fill_(counts == 1, 2.0) if pooling == "max+mean" else weights
