"""``segment_pool``: ``mean`` or ``max + mean`` of the rows of every segment, forward and backward.

The rows of a segment are found with the stable counting sort of :mod:`.buckets` (computed
once in forward, kept for backward), so both
passes are deterministic and use no floating-point atomics:

- forward (grid: segments × channel blocks) walks the segment's rows in sorted order and
  accumulates the sum and the maximum;
- backward (same grid) recomputes the maximum and the number of rows that reach it, then
  writes the gradient of every row of the segment: ``g/len + [v == max]·g/ties`` (max ties
  share the gradient equally, like ``scatter_reduce(..., "amax")``). Every row belongs to one
  segment, so each gradient row is written exactly once.

Empty segments pool to zero, like the reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (
    channel_block,
    check_float,
    check_pooling,
    device_function,
    max_and_ties,
    segment_program,
    tmax,
    tsum,
)
from .buckets import check_ids, group_by_key

_BLOCK_ROWS = 16


@device_function
def _rows(perm_ptr, p0, end, cmask, BLOCK_R: tl.constexpr):
    """The rows at sorted positions ``p0 … p0 + BLOCK_R − 1`` (before ``end``) and their ``[R, C]`` mask."""
    pos = p0 + tl.arange(0, BLOCK_R)
    rmask = pos < end
    row = tl.load(perm_ptr + pos, mask=rmask, other=0)
    return row, rmask[:, None] & cmask[None, :]


@triton.jit
def _segment_pool_fwd_kernel(values_ptr, perm_ptr, offsets_ptr, out_ptr, channels, MAXMEAN: tl.constexpr,
                             BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    seg, c, cmask, start, end = segment_program(offsets_ptr, channels, BLOCK_C)
    total = tl.full((BLOCK_C,), 0, tl.float32)
    largest = tl.full((BLOCK_C,), float("-inf"), tl.float32)
    for p0 in range(start, end, BLOCK_R):
        row, mask = _rows(perm_ptr, p0, end, cmask, BLOCK_R)
        v = tl.load(values_ptr + row[:, None] * channels + c[None, :], mask=mask, other=0.0).to(tl.float32)
        total += tsum(v, 0)
        largest = tl.maximum(largest, tmax(tl.where(mask, v, float("-inf")), 0))
    length = end - start
    pooled = total / tl.maximum(length, 1).to(tl.float32)
    if MAXMEAN:
        pooled += tl.where(length > 0, largest, 0.0)
    tl.store(out_ptr + seg * channels + c, pooled.to(out_ptr.dtype.element_ty), mask=cmask)


@triton.jit
def _segment_pool_bwd_kernel(values_ptr, grad_out_ptr, perm_ptr, offsets_ptr, grad_values_ptr, channels,
                             MAXMEAN: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    seg, c, cmask, start, end = segment_program(offsets_ptr, channels, BLOCK_C)
    g = tl.load(grad_out_ptr + seg * channels + c, mask=cmask, other=0.0).to(tl.float32)
    g_mean = g / tl.maximum(end - start, 1).to(tl.float32)
    largest = tl.full((BLOCK_C,), float("-inf"), tl.float32)
    ties = tl.full((BLOCK_C,), 0, tl.float32)
    if MAXMEAN:
        for p0 in range(start, end, BLOCK_R):
            row, mask = _rows(perm_ptr, p0, end, cmask, BLOCK_R)
            v = tl.load(values_ptr + row[:, None] * channels + c[None, :], mask=mask, other=0.0).to(tl.float32)
            largest, ties = max_and_ties(largest, ties, tl.where(mask, v, float("-inf")))
    g_max = g / tl.maximum(ties, 1.0)
    for p0 in range(start, end, BLOCK_R):
        row, mask = _rows(perm_ptr, p0, end, cmask, BLOCK_R)
        grad = tl.full((BLOCK_R, BLOCK_C), 0, tl.float32) + g_mean[None, :]
        if MAXMEAN:
            v = tl.load(values_ptr + row[:, None] * channels + c[None, :], mask=mask, other=0.0).to(tl.float32)
            grad += tl.where(v == largest[None, :], g_max[None, :], 0.0)
        tl.store(grad_values_ptr + row[:, None] * channels + c[None, :],
                 grad.to(grad_values_ptr.dtype.element_ty), mask=mask)


class SegmentPoolFunction(torch.autograd.Function):
    """Autograd wrapper of the two kernels; the sort is computed once in forward and reused."""

    @staticmethod
    def forward(ctx, values: torch.Tensor, segment_ids: torch.Tensor, num_segments: int, maxmean: bool):
        values = values.contiguous()
        rows, channels = values.shape
        out = torch.empty(num_segments, channels, dtype=values.dtype, device=values.device)
        ctx.maxmean = maxmean
        ctx.set_materialize_grads(False)
        if rows == 0:
            ctx.save_for_backward(values, None, None)
            return out.zero_()
        perm, offsets = group_by_key(segment_ids, num_segments)
        block_c = channel_block(channels)
        grid = (num_segments, triton.cdiv(channels, block_c))
        _segment_pool_fwd_kernel[grid](values, perm, offsets, out, channels, MAXMEAN=maxmean,
                                       BLOCK_R=_BLOCK_ROWS, BLOCK_C=block_c)
        ctx.save_for_backward(values, perm, offsets)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        values, perm, offsets = ctx.saved_tensors
        if grad_out is None or not ctx.needs_input_grad[0]:
            return None, None, None, None
        grad_values = torch.zeros_like(values)
        if perm is None:
            return grad_values, None, None, None
        channels = values.shape[1]
        block_c = channel_block(channels)
        grid = (offsets.numel() - 1, triton.cdiv(channels, block_c))
        _segment_pool_bwd_kernel[grid](values, grad_out.contiguous(), perm, offsets, grad_values, channels,
                                       MAXMEAN=ctx.maxmean, BLOCK_R=_BLOCK_ROWS, BLOCK_C=block_c)
        return grad_values, None, None, None


def segment_pool(values: torch.Tensor, segment_ids: torch.Tensor, num_segments: int, pooling: str) -> torch.Tensor:
    """Pool ``[T, C]`` rows into ``[num_segments, C]``: ``mean`` or ``max + mean``.

    Same contract as :func:`any2point_fast.reference.segment_pool`; computed in float32,
    returned in ``values``' dtype.
    """
    check_float("values", values)
    maxmean = check_pooling(pooling)
    if values.dim() != 2 or segment_ids.shape != values.shape[:1]:
        raise ValueError(f"values must be [T, C] and segment_ids [T], got {tuple(values.shape)} and "
                         f"{tuple(segment_ids.shape)}")
    check_ids(("segment_ids", segment_ids, num_segments))
    return SegmentPoolFunction.apply(values, segment_ids, num_segments, maxmean)
