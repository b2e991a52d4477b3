"""``segment_pool``: ``mean`` / ``max + mean`` of rows grouped by segment, as segment reductions.

The weighted sums are one sparse CSR product (a matrix row per segment, an entry per row of
``values`` in the stable order of their segment ids), the maxima one ``scatter_reduce``, added
for the segments of two or more rows — a singleton's maximum is its row, which joins the linear
part with weight 2. Backward spreads the linear gradient back with one gather and shares each
maximum's gradient equally among the rows that attain it, as the reference does.

On the CPU, where the compiled kernels of :mod:`.native` build, ``max + mean`` pools in the
kernel of ``neighborhood_attention_pool`` (with no attention term: the features are the rows),
every pooled row in one pass over the rows, keeping the row holding each maximum; its backward
writes every row's gradient (the linear part's and, where the row holds it, the maximum's) in one
pass. Where some maximum is attained twice, backward takes the PyTorch route above. The sort
order and counts are derived once per ``segment_ids`` tensor (every block passes the same).
"""

from __future__ import annotations

import torch

from . import native
from ._common import (
    compute_dtype,
    csr,
    csr_mm,
    csr_offsets,
    derived_from,
    linear_pool_weights,
    max_gradient_shares,
    segment_max,
    without_autocast,
)


class _SegmentPool(torch.autograd.Function):
    @staticmethod
    @without_autocast
    def forward(ctx, values: torch.Tensor, segment_ids: torch.Tensor, num_segments: int, pooling: str,
                compiled: bool) -> torch.Tensor:
        dtype = compute_dtype(values)
        v = values.to(dtype)
        ids, order, counts, shared = derived_from(segment_ids, ("segment pool", num_segments),
                                                  lambda: _sort(segment_ids, num_segments))
        with_max = pooling == "max+mean"
        rows = maxima = argmax = None
        compiled = with_max and compiled
        if compiled:  # every pooled row in one pass over its rows
            pooled, argmax = _compiled_pool(v.contiguous(), order, counts)
        else:
            pool_matrix = derived_from(segment_ids, ("segment pool matrix", num_segments, pooling, dtype), lambda: csr(
                counts, order, linear_pool_weights(counts, pooling, dtype).index_select(0, ids.index_select(0, order)),
                len(v)))
            pooled = csr_mm(pool_matrix, v)
        if with_max and argmax is None:  # no compiled kernels, or a maximum attained twice
            rows = order[(counts > 1).index_select(0, ids.index_select(0, order))]  # their rows, segment by segment
            maxima = segment_max(v, ids, num_segments).index_select(0, shared)
            if not compiled:
                pooled.index_add_(0, shared, maxima)
        # with argmax (the row holding every maximum), backward needs no maxima
        ctx.save_for_backward(values, ids, order, counts, shared, rows, maxima if argmax is None else None, argmax)
        ctx.pooling = pooling
        return pooled.to(values.dtype)

    @staticmethod
    @without_autocast
    def backward(ctx, grad: torch.Tensor):
        values, ids, order, counts, shared, rows, maxima, argmax = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        dtype = compute_dtype(values)
        g = grad.to(dtype)
        weights = linear_pool_weights(counts, ctx.pooling, dtype)
        if argmax is not None:  # the compiled kernel: the linear part and the maxima, segment by segment
            grad_values = g.new_empty(values.shape)  # every row is in one segment: all written
            none = g.new_empty(len(order), 0)  # no attention term
            num_segments = len(counts)
            segments = torch.arange(num_segments, device=counts.device)  # each row in one: any runs are apart
            runs = torch.linspace(0, num_segments, native.POOL_BACKWARD_RUNS + 1, device=counts.device).round().long()
            native.ops().bucket_pool_backward(g.contiguous(), weights, g.new_zeros(num_segments, 1), argmax,
                                              torch.ones(1, dtype=torch.bool), none, g.new_empty(1, g.shape[1], 0),
                                              g.new_empty(1, 0, g.shape[1]), order, csr_offsets(counts)[:-1], counts,
                                              torch.zeros_like(counts), segments, runs, grad_values, none)
        else:
            grad_values = (g * weights[:, None]).index_select(0, ids)
        if argmax is None and ctx.pooling == "max+mean" and len(shared):
            # a maximum is exact: the rows that attain it compare equal to it
            local = (torch.cumsum(counts > 1, 0) - 1).index_select(0, ids.index_select(0, rows))
            at_max = maxima.index_select(0, local).eq_(values.to(dtype).index_select(0, rows))
            grad_values.index_add_(0, rows, max_gradient_shares(g.index_select(0, shared), at_max, local))
        return grad_values.to(values.dtype), None, None, None, None


def _sort(segment_ids: torch.Tensor, num_segments: int):
    """``(ids, order, counts, shared)``: int64 ids ``[T]``, the rows in the stable order of their
    segments, ``[S]`` rows per segment, and the ``[K]`` segments of two or more rows (those whose
    maximum is not their only row)."""
    # a copy: the cache must not keep segment_ids alive
    ids = segment_ids.to(torch.long, memory_format=torch.contiguous_format, copy=True)
    counts = torch.bincount(ids, minlength=num_segments)
    return ids, torch.argsort(ids, stable=True), counts, (counts > 1).nonzero().squeeze(1)


def _compiled_pool(v: torch.Tensor, order: torch.Tensor,
                   counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Pooled rows ``[S, C]`` under ``max + mean`` by the compiled kernel (no attention term, no
    bias), and the segment-local index of the row holding every maximum of the segments of two or
    more rows (``None`` if some maximum is attained twice)."""
    pooled, argmax, tied = native.ops().bucket_pool(v, v.new_empty(len(order), 0), v.new_empty(1, 0, v.shape[1]),
                                                    v.new_empty(0), order, csr_offsets(counts)[:-1], counts,
                                                    torch.zeros_like(counts), 0.0,
                                                    torch.arange(len(counts), device=counts.device))
    return pooled, None if bool(tied.any()) else argmax


def segment_pool(values: torch.Tensor, segment_ids: torch.Tensor, num_segments: int, pooling: str, *,
                 compiled: bool | None = None) -> torch.Tensor:
    """Pool rows into segments: ``mean`` or ``max + mean`` (the two summed).

    Args:
        values: ``[T, C]`` rows.
        segment_ids: ``[T]`` int64 in ``[0, num_segments)``.
        num_segments: ``S``; an empty segment pools to zeros.
        pooling: ``"mean"`` or ``"max+mean"``.
        compiled: ``max + mean`` by the compiled CPU kernel (:mod:`.native`), or (``False``) by
            PyTorch's segment reductions; ``None``: compiled wherever the kernels run.

    Returns:
        ``[S, C]`` of ``values``' dtype, computed in float32 (float64 for float64 input).
        Rows tied for a maximum share its gradient equally.
    """
    if pooling not in ("mean", "max+mean"):
        raise ValueError(f"pooling must be 'mean' or 'max+mean', got {pooling!r}")
    return _SegmentPool.apply(values, segment_ids, num_segments, pooling, native.resolve(compiled, values.device))
