"""``segment_pool``: ``mean`` / ``max + mean`` of rows grouped by segment, as segment reductions.

The weighted sums are one sparse CSR product (a matrix row per segment, an entry per row of
``values`` in the stable order of their segment ids), the maxima one ``scatter_reduce``, added
for the segments of two or more rows — a singleton's maximum is its row, which joins the linear
part with weight 2. Backward spreads the linear gradient back with one gather and shares each
maximum's gradient equally among the rows that attain it, as the reference does.
"""

from __future__ import annotations

import torch

from ._common import (
    compute_dtype,
    csr,
    csr_mm,
    linear_pool_weights,
    max_gradient_shares,
    segment_max,
    without_autocast,
)


class _SegmentPool(torch.autograd.Function):
    @staticmethod
    @without_autocast
    def forward(ctx, values: torch.Tensor, segment_ids: torch.Tensor, num_segments: int, pooling: str) -> torch.Tensor:
        dtype = compute_dtype(values)
        v = values.to(dtype)
        ids = segment_ids.long()
        order = torch.argsort(ids, stable=True)
        counts = torch.bincount(ids, minlength=num_segments)
        weights = linear_pool_weights(counts, pooling, dtype)
        pooled = csr_mm(csr(counts, order, weights.index_select(0, ids.index_select(0, order)), len(v)), v)
        shared = rows = maxima = None
        if pooling == "max+mean":
            shared = (counts > 1).nonzero().squeeze(1)  # segments whose maximum is not their only row
            rows = order[(counts > 1).index_select(0, ids.index_select(0, order))]  # their rows, segment by segment
            maxima = segment_max(v, ids, num_segments).index_select(0, shared)
            pooled.index_add_(0, shared, maxima)
        ctx.save_for_backward(values, ids, counts, shared, rows, maxima)
        ctx.pooling = pooling
        return pooled.to(values.dtype)

    @staticmethod
    @without_autocast
    def backward(ctx, grad: torch.Tensor):
        values, ids, counts, shared, rows, maxima = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        dtype = compute_dtype(values)
        g = grad.to(dtype)
        grad_values = (g * linear_pool_weights(counts, ctx.pooling, dtype)[:, None]).index_select(0, ids)
        if ctx.pooling == "max+mean" and len(shared):
            # a maximum is exact: the rows that attain it compare equal to it
            local = (torch.cumsum(counts > 1, 0) - 1).index_select(0, ids.index_select(0, rows))
            at_max = maxima.index_select(0, local).eq_(values.to(dtype).index_select(0, rows))
            grad_values.index_add_(0, rows, max_gradient_shares(g.index_select(0, shared), at_max, local))
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
