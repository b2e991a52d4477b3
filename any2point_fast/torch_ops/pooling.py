"""``segment_pool``: ``mean`` / ``max + mean`` of rows grouped by segment, as segment reductions.

The rows are visited in the stable order of their segment ids: sums are one ``embedding_bag``
with offsets (gather and reduce fused, no scatter), maxima a ``segment_reduce`` over the
gathered rows. Backward spreads the mean gradient back with one gather and shares each
maximum's gradient equally among the rows that attain it, as the reference does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._common import compute_dtype, exclusive_cumsum


class _SegmentPool(torch.autograd.Function):
    @staticmethod
    def forward(ctx, values: torch.Tensor, segment_ids: torch.Tensor, num_segments: int, pooling: str) -> torch.Tensor:
        dtype = compute_dtype(values)
        v = values.to(dtype)
        ids = segment_ids.long()
        order = torch.argsort(ids, stable=True)
        counts = torch.bincount(ids, minlength=num_segments)
        pooled = F.embedding_bag(order, v, exclusive_cumsum(counts), mode="sum")
        pooled = pooled / counts.clamp_min(1)[:, None].to(dtype)
        maxima = None
        if pooling == "max+mean":
            maxima = torch.segment_reduce(v.index_select(0, order), "max", lengths=counts, axis=0, unsafe=True)
            if num_segments and bool((counts == 0).any()):
                maxima = maxima.masked_fill((counts == 0)[:, None], 0)
            pooled = pooled + maxima
        ctx.save_for_backward(values, ids, order, counts, maxima)
        ctx.pooling = pooling
        return pooled.to(values.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        values, ids, order, counts, maxima = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        dtype = compute_dtype(values)
        g = grad.to(dtype)
        grad_values = (g / counts.clamp_min(1)[:, None].to(dtype)).index_select(0, ids)
        if ctx.pooling == "max+mean":
            # a maximum is exact, so the rows that attain it compare equal to it
            ties = values.to(dtype) == maxima.index_select(0, ids)
            num_ties = F.embedding_bag(order, ties.to(dtype), exclusive_cumsum(counts), mode="sum")
            share = (g / num_ties.clamp_min(1)).index_select(0, ids)
            grad_values = grad_values.add_(share.mul_(ties))
        return grad_values.to(values.dtype), None, None, None


def segment_pool(values: torch.Tensor, segment_ids: torch.Tensor, num_segments: int, pooling: str) -> torch.Tensor:
    """Pool rows into segments: ``mean`` or ``max + mean`` (the two summed).

    Args:
        values: ``[T, C]`` rows.
        segment_ids: ``[T]`` int64 in ``[0, num_segments)``.
        num_segments: ``S``; an empty segment pools to zeros.
        pooling: ``"mean"`` or ``"max+mean"``.

    Returns:
        ``[S, C]`` of ``values``' dtype, computed in float32 (float64 for float64 input).
        Rows tied for a maximum share its gradient equally.
    """
    if pooling not in ("mean", "max+mean"):
        raise ValueError(f"pooling must be 'mean' or 'max+mean', got {pooling!r}")
    return _SegmentPool.apply(values, segment_ids, num_segments, pooling)
