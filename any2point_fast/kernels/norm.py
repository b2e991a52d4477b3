"""``batch_norm_gelu``: BatchNorm of groups of consecutive rows, then exact GELU, forward and backward.

Grid: groups × channel blocks (:func:`._common.segment_program`); every program owns its group's
channels, so both passes are deterministic and use no atomics. Everything is computed in fp32.

- forward: for a group normalised with its own statistics, one loop over its rows for the mean,
  a second for the biased variance around it (two-pass); otherwise the given running
  statistics. The statistics used are stored (``[G, C]`` fp32), then a third loop writes
  ``y = GELU(z)``, ``z = (x − mean) · rstd · γ + β``, ``rstd = 1/sqrt(var + eps)``, with the
  exact GELU ``z · Φ(z)``;
- backward: a loop recomputes ``x̂``, ``z`` and ``dz = dy · (Φ(z) + z · φ(z))`` and sums ``dz``
  and ``dz · x̂`` per channel — ``dβ`` and ``dγ`` of the group, stored directly; a second loop
  writes ``dx = γ · rstd · (dz − mean(dz) − x̂ · mean(dz · x̂))``, without the two means for groups
  normalised with given statistics.

Empty groups write no rows; their statistics are the given running ones and their ``dγ``,
``dβ`` zero, like the reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import as_index, channel_block, check_float, device_function, segment_program, tsum

# narrow channel blocks, long row blocks: a program per (group, 16 channels) keeps the GPU busy with few, long
# groups (H200, 7 groups of 3000-6000 rows × 768 channels, fwd+bwd: 0.74-0.86 ms fp32, 0.61-0.73 ms bf16; with
# 64 channels × 16 rows 2.4 ms; the reference 2.5-3.2 ms)
_BLOCK_ROWS = 128
_CHANNEL_CAP = 16
# kernels read no plain Python globals: 1/sqrt(2) and 1/sqrt(2π) are written out where used


@device_function
def _tile(ptr, p0, end, c, cmask, channels, BLOCK_R: tl.constexpr):
    """The fp32 ``[R, C]`` tile of rows ``p0 … p0 + BLOCK_R − 1`` (before ``end``), zero where masked;
    its offsets and mask."""
    row = p0 + tl.arange(0, BLOCK_R)
    mask = (row < end)[:, None] & cmask[None, :]
    offs = row[:, None] * channels + c[None, :]
    return tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32), offs, mask


@triton.jit
def _batch_norm_gelu_fwd_kernel(x_ptr, offsets_ptr, batch_ptr, w_ptr, b_ptr, running_mean_ptr, running_var_ptr,
                                y_ptr, mean_ptr, var_ptr, channels, eps, BLOCK_R: tl.constexpr,
                                BLOCK_C: tl.constexpr):
    g, c, cmask, start, end = segment_program(offsets_ptr, channels, BLOCK_C)
    stat = g * channels + c
    mean = tl.load(running_mean_ptr + stat, mask=cmask, other=0.0).to(tl.float32)
    var = tl.load(running_var_ptr + stat, mask=cmask, other=1.0).to(tl.float32)
    if tl.load(batch_ptr + g) != 0:
        count = tl.maximum(end - start, 1).to(tl.float32)
        total = tl.full((BLOCK_C,), 0, tl.float32)
        for p0 in range(start, end, BLOCK_R):
            x, _, _ = _tile(x_ptr, p0, end, c, cmask, channels, BLOCK_R)
            total += tsum(x, 0)
        mean = total / count
        total = tl.full((BLOCK_C,), 0, tl.float32)
        for p0 in range(start, end, BLOCK_R):
            x, _, mask = _tile(x_ptr, p0, end, c, cmask, channels, BLOCK_R)
            d = tl.where(mask, x - mean[None, :], 0.0)
            total += tsum(d * d, 0)
        var = total / count
    tl.store(mean_ptr + stat, mean, mask=cmask)
    tl.store(var_ptr + stat, var, mask=cmask)
    rstd = 1.0 / tl.sqrt(var + eps)
    scale = tl.load(w_ptr + stat, mask=cmask, other=0.0).to(tl.float32) * rstd
    shift = tl.load(b_ptr + stat, mask=cmask, other=0.0).to(tl.float32)
    for p0 in range(start, end, BLOCK_R):
        x, offs, mask = _tile(x_ptr, p0, end, c, cmask, channels, BLOCK_R)
        z = (x - mean[None, :]) * scale[None, :] + shift[None, :]
        y = 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
        tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@device_function
def _grad_z(x_ptr, dy_ptr, p0, end, c, cmask, channels, mean, rstd, w, b, BLOCK_R: tl.constexpr):
    """``x̂`` and ``dz = dy · GELU'(z)`` ``[R, C]`` (``dz`` zero where masked) of one block of rows, and the
    block's offsets and mask."""
    x, offs, mask = _tile(x_ptr, p0, end, c, cmask, channels, BLOCK_R)
    dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    xhat = (x - mean[None, :]) * rstd[None, :]
    z = xhat * w[None, :] + b[None, :]
    dgelu = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476)) + z * tl.exp(-0.5 * z * z) * 0.3989422804014327
    return xhat, dy * dgelu, offs, mask


@triton.jit
def _batch_norm_gelu_bwd_kernel(dy_ptr, x_ptr, offsets_ptr, batch_ptr, w_ptr, b_ptr, mean_ptr, var_ptr, dx_ptr,
                                dw_ptr, db_ptr, channels, eps, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    g, c, cmask, start, end = segment_program(offsets_ptr, channels, BLOCK_C)
    stat = g * channels + c
    mean = tl.load(mean_ptr + stat, mask=cmask, other=0.0)
    rstd = 1.0 / tl.sqrt(tl.load(var_ptr + stat, mask=cmask, other=1.0) + eps)
    w = tl.load(w_ptr + stat, mask=cmask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + stat, mask=cmask, other=0.0).to(tl.float32)
    sum_dz = tl.full((BLOCK_C,), 0, tl.float32)
    sum_dz_xhat = tl.full((BLOCK_C,), 0, tl.float32)
    for p0 in range(start, end, BLOCK_R):
        xhat, dz, _, _ = _grad_z(x_ptr, dy_ptr, p0, end, c, cmask, channels, mean, rstd, w, b, BLOCK_R)
        sum_dz += tsum(dz, 0)
        sum_dz_xhat += tsum(dz * xhat, 0)
    tl.store(db_ptr + stat, sum_dz.to(db_ptr.dtype.element_ty), mask=cmask)
    tl.store(dw_ptr + stat, sum_dz_xhat.to(dw_ptr.dtype.element_ty), mask=cmask)
    own = tl.load(batch_ptr + g) != 0
    count = tl.maximum(end - start, 1).to(tl.float32)
    mean_dz = tl.where(own, sum_dz / count, 0.0)
    mean_dz_xhat = tl.where(own, sum_dz_xhat / count, 0.0)
    scale = w * rstd
    for p0 in range(start, end, BLOCK_R):
        xhat, dz, offs, mask = _grad_z(x_ptr, dy_ptr, p0, end, c, cmask, channels, mean, rstd, w, b, BLOCK_R)
        dx = scale[None, :] * (dz - mean_dz[None, :] - xhat * mean_dz_xhat[None, :])
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


class BatchNormGeluFunction(torch.autograd.Function):
    """Autograd wrapper of the two kernels; saves the inputs and the ``[G, C]`` statistics used."""

    @staticmethod
    def forward(ctx, rows, offsets, weight, bias, running_mean, running_var, batch, eps):
        x = rows.contiguous()
        w, b = weight.contiguous(), bias.contiguous()
        groups, channels = w.shape
        out = torch.empty_like(x)
        mean = torch.empty(groups, channels, dtype=torch.float32, device=x.device)
        var = torch.empty_like(mean)
        block_c = channel_block(channels, cap=_CHANNEL_CAP)
        grid = (groups, triton.cdiv(channels, block_c))
        if groups and channels:
            _batch_norm_gelu_fwd_kernel[grid](x, offsets, batch, w, b, running_mean.contiguous(),
                                              running_var.contiguous(), out, mean, var, channels, eps,
                                              BLOCK_R=_BLOCK_ROWS, BLOCK_C=block_c)
        ctx.save_for_backward(x, offsets, batch, w, b, mean, var)
        ctx.eps, ctx.grid, ctx.block_c = eps, grid, block_c
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(mean, var)
        return out, mean, var

    @staticmethod
    def backward(ctx, grad_out, _grad_mean, _grad_var):
        x, offsets, batch, w, b, mean, var = ctx.saved_tensors
        needs = ctx.needs_input_grad
        if grad_out is None or not (needs[0] or needs[2] or needs[3]):
            return (None,) * 8
        dx, dw, db = torch.empty_like(x), torch.empty_like(w), torch.empty_like(b)
        if w.numel():
            _batch_norm_gelu_bwd_kernel[ctx.grid](grad_out.contiguous(), x, offsets, batch, w, b, mean, var, dx, dw,
                                                  db, w.shape[1], ctx.eps, BLOCK_R=_BLOCK_ROWS,
                                                  BLOCK_C=ctx.block_c)
        return (dx if needs[0] else None, None, dw if needs[2] else None, db if needs[3] else None,
                None, None, None, None)


def batch_norm_gelu(rows: torch.Tensor, offsets: tuple[int, ...], weight: torch.Tensor, bias: torch.Tensor,
                    running_mean: torch.Tensor, running_var: torch.Tensor, batch: tuple[bool, ...],
                    eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``GELU(BN_g(rows))`` for every group ``g`` of consecutive rows → ``[S, C]`` of ``rows``' dtype,
    and the float32 ``[G, C]`` mean and biased variance each group was normalised with (no gradient).

    Same contract as :func:`any2point_fast.reference.batch_norm_gelu`; computed in float32, the
    gradients in the inputs' dtypes.
    """
    for name, tensor in (("rows", rows), ("weight", weight), ("bias", bias), ("running_mean", running_mean),
                         ("running_var", running_var)):
        check_float(name, tensor)
    offsets, batch = tuple(int(o) for o in offsets), tuple(bool(own) for own in batch)
    groups = len(batch)
    if rows.dim() != 2 or len(offsets) != groups + 1 or offsets[0] != 0 or offsets[-1] != rows.shape[0]:
        raise ValueError(f"rows must be [S, C] and offsets rise from 0 to S with one flag of batch per group; got "
                         f"{tuple(rows.shape)}, {list(offsets)} and {len(batch)} flags")
    for name, tensor in (("weight", weight), ("bias", bias), ("running_mean", running_mean),
                         ("running_var", running_var)):
        if tensor.shape != (groups, rows.shape[1]):
            raise ValueError(f"{name} must be [{groups}, {rows.shape[1]}], got {tuple(tensor.shape)}")
    sizes = [last - first for first, last in zip(offsets[:-1], offsets[1:])]
    if min(sizes, default=0) < 0 or any(own and size < 2 for own, size in zip(batch, sizes)):
        raise ValueError(f"offsets must not decrease and groups with their own statistics need 2 rows; got "
                         f"{list(offsets)}, batch {list(batch)}")
    offsets_t = as_index(torch.tensor(offsets, device=rows.device))
    batch_t = torch.tensor(batch, dtype=torch.int32, device=rows.device)
    return BatchNormGeluFunction.apply(rows, offsets_t, weight, bias, running_mean, running_var, batch_t,
                                       float(eps))
