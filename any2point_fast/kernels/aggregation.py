"""``neighborhood_aggregate``: a tokenizer stage's gather, position code, residual bottleneck MLP
with its BatchNorms over all neighbours, and max over the ``k`` neighbours, in Triton.

The algebra and the passes are those of :mod:`any2point_fast.torch_ops.aggregation` (read its
docstring first); here the passes that touch ``[R, 2C]`` data (``R = B·S·k`` rows, ``D = 2C``)
are kernels that hold such data only in registers, so that no ``[R, D]`` tensor ever exists.
The position code is recomputed wherever it is needed, its angles in float32 as
``(beta·x) / alpha^(i/f)`` with IEEE division (``tl.div_rn``) and the divisors computed by
torch, like the reference's, so that near-ties in the max fall the same way. Everything is
computed in float32 (``tl.dot`` with ``input_precision="ieee"``), whatever the inputs' dtype.

forward
  1. ``_hidden_kernel`` (grid: row blocks): ``h = W1 PE(o) + W1a f_n + W1b f_c`` ``[R, H]``, the
     feature parts ``W1a f``, ``W1b f`` ``[B·P, H]`` computed per point by torch and gathered;
  2. torch: BN1's statistics over ``h``, BN2's from the float64 moments of ``a = relu(BN1(h))``
     (:func:`~any2point_fast.torch_ops.aggregation._moments`, chunk by chunk): float32 moments
     cancel where ``W2`` meets a flat direction of ``a``, and the ``2·R·H²`` float64 flops of the
     moments are ``H / D`` of the float32 ones of each other pass, on data-centre GPUs (A100,
     H100: float64 units at half the float32 rate) a small share of the op;
  3. ``_output_kernel`` (grid: channel blocks × centre blocks): per neighbour ``j`` of a block of
     centres, ``y = W2 a`` (``tl.dot``), ``v = relu(BN2(y) + PE(o) + cat(f_n, f_c))`` and the
     running maximum over ``j`` (the first of equal maxima, like ``torch.max``), its argmax and
     BN2's normalised ``ŷ = (y − mean2)·rstd2`` there.

backward (``du`` is the output's gradient where the maximum passed the relu, ``[B·S, D]``)
  4. ``_hidden_grad_kernel`` (grid: centre blocks): ``da = da_shift − a·(W2ᵀ diag(q) W2) +
     [arg = j]·du (diag(s) W2)`` (the scatter at the argmax as a masked product), ``dz = da·[a > 0]``
     ``[R, H]`` and per block BN1's sums ``Σ dz``, ``Σ dz (h − mean1)``;
  5. ``_maxima_kernel`` (grid: channel blocks × centre splits): ``Σ du aᵀ`` ``[D, H]`` over the
     rows at the maxima, the sparse part of ``dW2``;
  6. torch: BN1's backward ``dz → dh`` on ``[R, H]``;
  7. ``_point_grad_kernel`` (grid: points): per point, in the stable order of
     :func:`~.buckets.group_by_key` (deterministic, no atomics), the sums of ``dh`` over the rows
     it is the neighbour of and of the centres it is, and the residual's gradient at the maxima;
     ``dfeat`` and the feature parts of ``dW1`` follow by small products in torch;
  8. ``_position_weight_kernel`` (grid: channel blocks × row splits): the position code's share
     ``Σ dh PE(o)ᵀ`` of ``dW1``; ``_offset_grad_kernel`` (grid: row blocks), when the offsets
     need a gradient: ``dx = W1ᵀ dh + [arg = j]·du`` through the position code.

Partial sums of the splits and blocks are added by torch: every gradient is deterministic.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from any2point_fast.torch_ops._common import without_autocast
from any2point_fast.torch_ops.aggregation import (
    _moments,
    _slices,
    chunk_centres,
    gradient_dtypes,
    input_gradients,
    normalisation,
    output_statistics,
)

from ._common import channel_block, check_float, device_function, pow2_at_least, tsum
from .buckets import group_by_key

_BLOCK_ROWS = 16  # rows per program of the row kernels
_BLOCK_CENTRES = 16  # centres per block of the kernels that loop over the k neighbours
_BLOCK_POINTS = 16  # rows per step of a point's sums
_MAX_SPLITS = 64  # programs per channel block of the weight-gradient kernels
# fp32 FMA dots against [H, 2C] weight tiles: 2C in blocks of 32 and 8 warps keep every kernel within 255
# registers without spills up to H = 64 (ptxas, sm_90; a few bytes at H = 96)
_CHANNEL_CAP = 32
_NUM_WARPS = 8


@device_function
def _angles(off_ptr, rows, rmask, ch, dim, freqs, div_ptr, beta):
    """The float32 angles ``[R, D]`` of the position code at rows ``rows`` and channels ``ch`` (zero
    where masked), the tile's mask, each channel's axis and whether it is a cosine."""
    axis = ch // (2 * freqs)
    dmask = ch < dim
    mask = rmask[:, None] & dmask[None, :]
    x = tl.load(off_ptr + rows[:, None] * 3 + axis[None, :], mask=mask, other=0.0)
    divisor = tl.load(div_ptr + (ch // 2) % freqs, mask=dmask, other=1.0)
    return tl.div_rn(beta * x, divisor[None, :]), mask, axis, ch % 2 == 1


@device_function
def _position_code(off_ptr, rows, rmask, ch, dim, freqs, div_ptr, beta):
    """The position code ``[R, D]`` of rows ``rows`` at channels ``ch``, zero where masked."""
    angle, mask, _, cosine = _angles(off_ptr, rows, rmask, ch, dim, freqs, div_ptr, beta)
    return tl.where(mask, tl.where(cosine[None, :], tl.cos(angle), tl.sin(angle)), 0.0)


@device_function
def _activation(h_ptr, rows, rmask, hc, hmask, hidden, scale1, shift1):
    """``h`` and ``a = relu(BN1(h))`` ``[R, H]`` of rows ``rows`` (zero where masked) and their mask."""
    mask = rmask[:, None] & hmask[None, :]
    h = tl.load(h_ptr + rows[:, None] * hidden + hc[None, :], mask=mask, other=0.0)
    a = tl.where(mask, tl.maximum(h * scale1[None, :] + shift1[None, :], 0.0), 0.0)
    return h, a, mask


@device_function
def _at_maxima(du_ptr, arg_ptr, centres, ch, mask, dim, j):
    """``du`` ``[S, D]`` of ``centres`` at channels ``ch`` where neighbour ``j`` holds the maximum, else 0."""
    offs = centres[:, None] * dim + ch[None, :]
    grad = tl.load(du_ptr + offs, mask=mask, other=0.0)
    return tl.where(tl.load(arg_ptr + offs, mask=mask, other=-1) == j, grad, 0.0)


@triton.jit
def _hidden_kernel(off_ptr, nbr_ptr, ctr_ptr, fa_ptr, fb_ptr, w1_ptr, div_ptr, h_ptr, rows, k, dim, hidden, freqs,
                   beta, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr):
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = r < rows
    hc = tl.arange(0, BLOCK_H)
    hmask = hc < hidden
    acc = tl.full((BLOCK_R, BLOCK_H), 0, tl.float32)
    for d0 in range(0, dim, BLOCK_D):
        ch = d0 + tl.arange(0, BLOCK_D)
        pe = _position_code(off_ptr, r, rmask, ch, dim, freqs, div_ptr, beta)
        w1 = tl.load(w1_ptr + hc[None, :] * dim + ch[:, None], mask=(ch < dim)[:, None] & hmask[None, :], other=0.0)
        acc += tl.dot(pe, w1, input_precision="ieee")
    tile = rmask[:, None] & hmask[None, :]
    n = tl.load(nbr_ptr + r, mask=rmask, other=0)
    c = tl.load(ctr_ptr + r // k, mask=rmask, other=0)
    acc += tl.load(fa_ptr + n[:, None] * hidden + hc[None, :], mask=tile, other=0.0)
    acc += tl.load(fb_ptr + c[:, None] * hidden + hc[None, :], mask=tile, other=0.0)
    tl.store(h_ptr + r[:, None] * hidden + hc[None, :], acc, mask=tile)


@triton.jit
def _output_kernel(h_ptr, off_ptr, nbr_ptr, ctr_ptr, f_ptr, w2_ptr, div_ptr, scale1_ptr, shift1_ptr, scale2_ptr,
                   shift2_ptr, mean2_ptr, rstd2_ptr, out_ptr, arg_ptr, yhat_ptr, num_centres, k, channels, hidden,
                   freqs, beta, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr):
    # channel blocks on the fast grid axis: the programs of one block of centres, which read the same h rows, run
    # side by side
    s = tl.program_id(1).to(tl.int64) * BLOCK_S + tl.arange(0, BLOCK_S)
    smask = s < num_centres
    dim = 2 * channels
    ch = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = ch < dim
    hc = tl.arange(0, BLOCK_H)
    hmask = hc < hidden
    w2 = tl.load(w2_ptr + ch[None, :] * hidden + hc[:, None], mask=hmask[:, None] & dmask[None, :], other=0.0)
    scale1 = tl.load(scale1_ptr + hc, mask=hmask, other=0.0)
    shift1 = tl.load(shift1_ptr + hc, mask=hmask, other=0.0)
    scale2 = tl.load(scale2_ptr + ch, mask=dmask, other=0.0)
    shift2 = tl.load(shift2_ptr + ch, mask=dmask, other=0.0)
    tile = smask[:, None] & dmask[None, :]
    # the residual's features: the neighbour's in the first C channels, the centre's in the last C
    own = ch >= channels
    col = tl.where(own, ch - channels, ch)
    c = tl.load(ctr_ptr + s, mask=smask, other=0)
    centre_feat = tl.load(f_ptr + c[:, None] * channels + col[None, :], mask=tile & own[None, :], other=0.0)
    best = tl.full((BLOCK_S, BLOCK_D), float("-inf"), tl.float32)
    best_y = tl.full((BLOCK_S, BLOCK_D), 0, tl.float32)
    arg = tl.full((BLOCK_S, BLOCK_D), 0, tl.int32)
    for j in range(k):
        r = s * k + j
        _, a, _ = _activation(h_ptr, r, smask, hc, hmask, hidden, scale1, shift1)
        y = tl.dot(a, w2, input_precision="ieee")
        n = tl.load(nbr_ptr + r, mask=smask, other=0)
        nbr_feat = tl.load(f_ptr + n[:, None] * channels + col[None, :], mask=tile & ~own[None, :], other=0.0)
        v = y * scale2[None, :] + shift2[None, :]
        v += _position_code(off_ptr, r, smask, ch, dim, freqs, div_ptr, beta)
        v = tl.maximum(v + tl.where(own[None, :], centre_feat, nbr_feat), 0.0)
        greater = v > best
        best = tl.where(greater, v, best)
        best_y = tl.where(greater, y, best_y)
        arg = tl.where(greater, j, arg)
    mean2 = tl.load(mean2_ptr + ch, mask=dmask, other=0.0)
    rstd2 = tl.load(rstd2_ptr + ch, mask=dmask, other=0.0)
    offs = s[:, None] * dim + ch[None, :]
    tl.store(out_ptr + offs, best, mask=tile)
    tl.store(arg_ptr + offs, arg, mask=tile)
    tl.store(yhat_ptr + offs, (best_y - mean2[None, :]) * rstd2[None, :], mask=tile)


@triton.jit
def _hidden_grad_kernel(h_ptr, du_ptr, arg_ptr, w2s_ptr, cross_ptr, da_shift_ptr, scale1_ptr, shift1_ptr, mean1_ptr,
                        dz_ptr, sums_ptr, num_centres, k, dim, hidden, TRAINING: tl.constexpr,
                        BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr):
    block = tl.program_id(0)
    s = block.to(tl.int64) * BLOCK_S + tl.arange(0, BLOCK_S)
    smask = s < num_centres
    hc = tl.arange(0, BLOCK_H)
    hmask = hc < hidden
    scale1 = tl.load(scale1_ptr + hc, mask=hmask, other=0.0)
    shift1 = tl.load(shift1_ptr + hc, mask=hmask, other=0.0)
    mean1 = tl.load(mean1_ptr + hc, mask=hmask, other=0.0)
    da_shift = tl.load(da_shift_ptr + hc, mask=hmask, other=0.0)
    if TRAINING:
        cross = tl.load(cross_ptr + hc[:, None] * hidden + hc[None, :], mask=hmask[:, None] & hmask[None, :],
                        other=0.0)
    sum_dz = tl.full((BLOCK_H,), 0, tl.float32)
    sum_dz_h = tl.full((BLOCK_H,), 0, tl.float32)
    for j in range(k):
        r = s * k + j
        h, a, mask = _activation(h_ptr, r, smask, hc, hmask, hidden, scale1, shift1)
        da = tl.full((BLOCK_S, BLOCK_H), 0, tl.float32) + da_shift[None, :]
        if TRAINING:
            da -= tl.dot(a, cross, input_precision="ieee")
        for d0 in range(0, dim, BLOCK_D):
            ch = d0 + tl.arange(0, BLOCK_D)
            dmask = ch < dim
            du = _at_maxima(du_ptr, arg_ptr, s, ch, smask[:, None] & dmask[None, :], dim, j)
            w2s = tl.load(w2s_ptr + ch[:, None] * hidden + hc[None, :], mask=dmask[:, None] & hmask[None, :],
                          other=0.0)
            da += tl.dot(du, w2s, input_precision="ieee")
        dz = tl.where(mask & (a > 0), da, 0.0)
        tl.store(dz_ptr + r[:, None] * hidden + hc[None, :], dz, mask=mask)
        sum_dz += tsum(dz, 0)
        sum_dz_h += tsum(dz * (h - mean1[None, :]), 0)
    tl.store(sums_ptr + block * 2 * hidden + hc, sum_dz, mask=hmask)
    tl.store(sums_ptr + block * 2 * hidden + hidden + hc, sum_dz_h, mask=hmask)


@triton.jit
def _maxima_kernel(h_ptr, du_ptr, arg_ptr, scale1_ptr, shift1_ptr, part_ptr, num_centres, k, dim, hidden, per_split,
                   BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr):
    ch = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = ch < dim
    split = tl.program_id(1)
    hc = tl.arange(0, BLOCK_H)
    hmask = hc < hidden
    scale1 = tl.load(scale1_ptr + hc, mask=hmask, other=0.0)
    shift1 = tl.load(shift1_ptr + hc, mask=hmask, other=0.0)
    start = split.to(tl.int64) * per_split
    end = tl.minimum(start + per_split, num_centres)
    acc = tl.full((BLOCK_D, BLOCK_H), 0, tl.float32)
    for s0 in range(start, end, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        smask = s < end
        for j in range(k):
            _, a, _ = _activation(h_ptr, s * k + j, smask, hc, hmask, hidden, scale1, shift1)
            du = _at_maxima(du_ptr, arg_ptr, s, ch, smask[:, None] & dmask[None, :], dim, j)
            acc += tl.dot(tl.trans(du), a, input_precision="ieee")
    tl.store(part_ptr + (split * dim + ch[:, None]) * hidden + hc[None, :], acc,
             mask=dmask[:, None] & hmask[None, :])


@device_function
def _row_sum(perm_ptr, start, end, values_ptr, hc, hmask, hidden, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr):
    """``Σ values[perm[p]]`` ``[H]`` over the sorted positions ``start … end − 1``, in order of blocks."""
    acc = tl.full((BLOCK_H,), 0, tl.float32)
    for p0 in range(start, end, BLOCK_T):
        pos = p0 + tl.arange(0, BLOCK_T)
        pmask = pos < end
        row = tl.load(perm_ptr + pos, mask=pmask, other=0)
        acc += tsum(tl.load(values_ptr + row[:, None] * hidden + hc[None, :], mask=pmask[:, None] & hmask[None, :],
                            other=0.0), 0)
    return acc


@triton.jit
def _point_grad_kernel(nbr_perm_ptr, nbr_offsets_ptr, ctr_perm_ptr, ctr_offsets_ptr, dh_ptr, dh_sum_ptr, du_ptr,
                       arg_ptr, per_nbr_ptr, per_ctr_ptr, residual_ptr, k, channels, hidden, BLOCK_T: tl.constexpr,
                       BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr):
    point = tl.program_id(0).to(tl.int64)
    nbr_start = tl.load(nbr_offsets_ptr + point)
    nbr_end = tl.load(nbr_offsets_ptr + point + 1)
    ctr_start = tl.load(ctr_offsets_ptr + point)
    ctr_end = tl.load(ctr_offsets_ptr + point + 1)
    hc = tl.arange(0, BLOCK_H)
    hmask = hc < hidden
    per_nbr = _row_sum(nbr_perm_ptr, nbr_start, nbr_end, dh_ptr, hc, hmask, hidden, BLOCK_T, BLOCK_H)
    tl.store(per_nbr_ptr + point * hidden + hc, per_nbr, mask=hmask)
    per_ctr = _row_sum(ctr_perm_ptr, ctr_start, ctr_end, dh_sum_ptr, hc, hmask, hidden, BLOCK_T, BLOCK_H)
    tl.store(per_ctr_ptr + point * hidden + hc, per_ctr, mask=hmask)
    dim = 2 * channels
    for c0 in range(0, channels, BLOCK_C):
        cc = c0 + tl.arange(0, BLOCK_C)
        cmask = cc < channels
        acc = tl.full((BLOCK_C,), 0, tl.float32)
        for p0 in range(nbr_start, nbr_end, BLOCK_T):  # the neighbour half of the rows it is the maximum of
            pos = p0 + tl.arange(0, BLOCK_T)
            pmask = pos < nbr_end
            row = tl.load(nbr_perm_ptr + pos, mask=pmask, other=0)
            du = _at_maxima(du_ptr, arg_ptr, row // k, cc, pmask[:, None] & cmask[None, :], dim, (row % k)[:, None])
            acc += tsum(du, 0)
        for p0 in range(ctr_start, ctr_end, BLOCK_T):  # the centre half, whichever neighbour holds the maximum
            pos = p0 + tl.arange(0, BLOCK_T)
            pmask = pos < ctr_end
            centre = tl.load(ctr_perm_ptr + pos, mask=pmask, other=0)
            acc += tsum(tl.load(du_ptr + centre[:, None] * dim + channels + cc[None, :],
                                mask=pmask[:, None] & cmask[None, :], other=0.0), 0)
        tl.store(residual_ptr + point * channels + cc, acc, mask=cmask)


@triton.jit
def _position_weight_kernel(off_ptr, dh_ptr, div_ptr, part_ptr, rows, dim, hidden, freqs, beta, per_split,
                            BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr):
    ch = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    split = tl.program_id(1)
    hc = tl.arange(0, BLOCK_H)
    hmask = hc < hidden
    start = split.to(tl.int64) * per_split
    end = tl.minimum(start + per_split, rows)
    acc = tl.full((BLOCK_H, BLOCK_D), 0, tl.float32)
    for r0 in range(start, end, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        rmask = r < end
        pe = _position_code(off_ptr, r, rmask, ch, dim, freqs, div_ptr, beta)
        dh = tl.load(dh_ptr + r[:, None] * hidden + hc[None, :], mask=rmask[:, None] & hmask[None, :], other=0.0)
        acc += tl.dot(tl.trans(dh), pe, input_precision="ieee")
    tl.store(part_ptr + (split * hidden + hc[:, None]) * dim + ch[None, :], acc,
             mask=hmask[:, None] & (ch < dim)[None, :])


@triton.jit
def _offset_grad_kernel(off_ptr, dh_ptr, w1_ptr, du_ptr, arg_ptr, div_ptr, slope_ptr, grad_ptr, rows, k, dim, hidden,
                        freqs, beta, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr):
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = r < rows
    hc = tl.arange(0, BLOCK_H)
    hmask = hc < hidden
    dh = tl.load(dh_ptr + r[:, None] * hidden + hc[None, :], mask=rmask[:, None] & hmask[None, :], other=0.0)
    centre = r // k
    j = (r % k)[:, None]
    grad_x = tl.full((BLOCK_R,), 0, tl.float32)
    grad_y = tl.full((BLOCK_R,), 0, tl.float32)
    grad_z = tl.full((BLOCK_R,), 0, tl.float32)
    for d0 in range(0, dim, BLOCK_D):
        ch = d0 + tl.arange(0, BLOCK_D)
        angle, mask, axis, cosine = _angles(off_ptr, r, rmask, ch, dim, freqs, div_ptr, beta)
        w1 = tl.load(w1_ptr + hc[:, None] * dim + ch[None, :], mask=hmask[:, None] & (ch < dim)[None, :], other=0.0)
        dx = tl.dot(dh, w1, input_precision="ieee") + _at_maxima(du_ptr, arg_ptr, centre, ch, mask, dim, j)
        slope = tl.load(slope_ptr + (ch // 2) % freqs, mask=ch < dim, other=0.0)
        d_angle = dx * tl.where(cosine[None, :], -tl.sin(angle), tl.cos(angle)) * slope[None, :]
        d_angle = tl.where(mask, d_angle, 0.0)
        grad_x += tsum(tl.where(axis[None, :] == 0, d_angle, 0.0), 1)
        grad_y += tsum(tl.where(axis[None, :] == 1, d_angle, 0.0), 1)
        grad_z += tsum(tl.where(axis[None, :] == 2, d_angle, 0.0), 1)
    tl.store(grad_ptr + r * 3, grad_x, mask=rmask)
    tl.store(grad_ptr + r * 3 + 1, grad_y, mask=rmask)
    tl.store(grad_ptr + r * 3 + 2, grad_z, mask=rmask)


def _tiles(dim: int, hidden: int) -> dict:
    """The channel and hidden blocks and warps of the kernels that hold ``[·, H]`` and ``[H, 2C]`` tiles."""
    return dict(BLOCK_D=channel_block(dim, cap=_CHANNEL_CAP), BLOCK_H=pow2_at_least(hidden), num_warps=_NUM_WARPS)


def _splits(count: int, block: int) -> tuple[int, int]:
    """``(programs, items per program)`` covering ``count`` items in at most :data:`_MAX_SPLITS` programs, each
    a multiple of ``block`` items."""
    per_split = triton.cdiv(triton.cdiv(max(count, 1), _MAX_SPLITS), block) * block
    return triton.cdiv(max(count, 1), per_split), per_split


def _code_constants(dim: int, alpha: float, beta: float,
                    device: torch.device) -> tuple[int, torch.Tensor, torch.Tensor]:
    """The position code's frequencies ``f``, divisors ``alpha^(i/f)`` and slopes ``beta / alpha^(i/f)``
    ``[f]`` float32, computed by torch as the reference computes them."""
    freqs = math.ceil(dim / 6)
    divisors = alpha ** (torch.arange(freqs, device=device, dtype=torch.float32) / freqs)
    return freqs, divisors, beta / divisors


class _Aggregate(torch.autograd.Function):
    @staticmethod
    @without_autocast
    def forward(ctx, feat, offsets, centre_index, neighbour_index, weight1, norm1_weight, norm1_bias, norm1_mean,
                norm1_var, weight2, norm2_weight, norm2_bias, norm2_mean, norm2_var, training, eps, alpha, beta,
                chunk):
        dtype, device = torch.float32, feat.device
        batch, points, channels = feat.shape
        samples, k = neighbour_index.shape[1:]
        dim, hidden, centres = 2 * channels, weight1.shape[0], batch * samples
        rows = centres * k
        f = feat.to(dtype).reshape(batch * points, channels).contiguous()
        off = offsets.to(dtype).reshape(rows, 3).contiguous()
        w1, w2 = weight1.to(dtype).contiguous(), weight2.to(dtype).contiguous()
        first = torch.arange(batch, device=device) * points
        nbr = (neighbour_index + first[:, None, None]).reshape(rows).contiguous()
        ctr = (centre_index + first[:, None]).reshape(centres).contiguous()
        freqs, divisors, slopes = _code_constants(dim, alpha, beta, device)
        tiles = _tiles(dim, hidden)

        # 1. h = W1 PE + W1a f_n + W1b f_c
        fa, fb = f @ w1[:, :channels].T, f @ w1[:, channels:].T  # [B·P, H]
        h = torch.empty(centres, k, hidden, dtype=dtype, device=device)
        _hidden_kernel[(triton.cdiv(rows, _BLOCK_ROWS),)](
            off, nbr, ctr, fa.contiguous(), fb.contiguous(), w1, divisors, h, rows, k, dim, hidden, freqs, beta,
            BLOCK_R=_BLOCK_ROWS, **tiles)

        # 2. the statistics of BN1 (over h) and of BN2 (from the moments of a = relu(BN1(h)))
        if training:
            var1, mean1 = torch.var_mean(h.view(rows, hidden), dim=0, correction=0)
        else:
            mean1, var1 = norm1_mean.to(dtype), norm1_var.to(dtype)
        rstd1, scale1, shift1 = normalisation(norm1_weight, norm1_bias, mean1, var1, eps, dtype)
        if training:
            a_sum, a_spread = _moments(h, scale1, shift1, _slices(centres, chunk or chunk_centres(k, 2 * hidden)))
            mean2, var2 = output_statistics(w2, a_sum, a_spread, rows, dtype)
            a_sum, a_spread = a_sum.to(dtype), a_spread.to(dtype)
        else:
            a_sum = a_spread = None
            mean2, var2 = norm2_mean.to(dtype), norm2_var.to(dtype)
        rstd2, scale2, shift2 = normalisation(norm2_weight, norm2_bias, mean2, var2, eps, dtype)

        # 3. v = relu(x + BN2(W2 a)) and its maximum over the k; the argmax and ŷ there
        out = torch.empty(centres, dim, dtype=dtype, device=device)
        arg = torch.empty(centres, dim, dtype=torch.int32, device=device)
        yhat = torch.empty(centres, dim, dtype=dtype, device=device)
        grid = (triton.cdiv(dim, tiles["BLOCK_D"]), triton.cdiv(centres, _BLOCK_CENTRES))
        _output_kernel[grid](h, off, nbr, ctr, f, w2, divisors, scale1, shift1, scale2, shift2, mean2.contiguous(),
                             rstd2, out, arg, yhat, centres, k, channels, hidden, freqs, beta, BLOCK_S=_BLOCK_CENTRES,
                             **tiles)

        ctx.save_for_backward(f, off, nbr, ctr, w1, w2, h, mean1, rstd1, scale1, shift1, mean2, rstd2, scale2, a_sum,
                              a_spread, out, arg, yhat, divisors, slopes)
        ctx.config = (training, beta, freqs, batch * points)
        ctx.shapes = (feat.shape, offsets.shape)
        ctx.dtypes = gradient_dtypes(feat, offsets, weight1, norm1_weight, norm1_bias, weight2, norm2_weight,
                                     norm2_bias)
        ctx.mark_non_differentiable(mean1, var1, mean2, var2)
        return out.view(batch, samples, dim).to(feat.dtype), mean1, var1, mean2, var2

    @staticmethod
    @without_autocast
    def backward(ctx, grad, *_):
        (f, off, nbr, ctr, w1, w2, h, mean1, rstd1, scale1, shift1, mean2, rstd2, scale2, a_sum, a_spread,
         out, arg, yhat, divisors, slopes) = ctx.saved_tensors
        training, beta, freqs, num_points = ctx.config
        centres, dim = out.shape
        k, hidden = h.shape[1:]
        channels, rows = dim // 2, centres * k
        tiles = _tiles(dim, hidden)
        du = (grad.reshape(centres, dim).to(out.dtype) * (out > 0)).contiguous()

        # BN2 and W2: dy = s·du + c0 − q·(W2 a) per row, with s = scale2
        grad_bias2, grad_weight2 = du.sum(dim=0), (du * yhat).sum(dim=0)
        w2s = (w2 * scale2[:, None]).contiguous()
        if training:
            q = scale2 * rstd2 * grad_weight2 / rows
            c0 = q * mean2 - scale2 * grad_bias2 / rows
            cross = (w2.T @ (w2 * q[:, None])).contiguous()  # W2ᵀ diag(q) W2, symmetric
            da_shift = (c0 @ w2).contiguous()
        else:
            cross, da_shift = w2s, w2.new_zeros(hidden)  # cross is not read
        blocks = triton.cdiv(centres, _BLOCK_CENTRES)
        dz = torch.empty_like(h)
        sums = h.new_empty(blocks, 2, hidden)
        _hidden_grad_kernel[(blocks,)](h, du, arg, w2s, cross, da_shift, scale1, shift1, mean1.contiguous(), dz, sums,
                                       centres, k, dim, hidden, TRAINING=training, BLOCK_S=_BLOCK_CENTRES, **tiles)
        grad_bias1, grad_weight1 = sums.sum(dim=0)
        grad_weight1 *= rstd1
        splits, per_split = _splits(centres, _BLOCK_CENTRES)
        parts = h.new_empty(splits, dim, hidden)
        _maxima_kernel[(triton.cdiv(dim, tiles["BLOCK_D"]), splits)](h, du, arg, scale1, shift1, parts, centres, k, dim,
                                                                     hidden, per_split, BLOCK_S=_BLOCK_CENTRES, **tiles)
        grad_w2 = parts.sum(dim=0).mul_(scale2[:, None])  # diag(s) Σ du aᵀ
        if training:
            grad_w2.sub_(torch.outer(scale2 * grad_bias2 / rows, a_sum)).sub_(q[:, None] * (w2 @ a_spread))

        # BN1: dh = scale1·(dz − Σdz/R − ĥ·Σdz ĥ/R), in place of dz
        dh = dz.mul_(scale1)
        if training:
            slope = scale1 * rstd1 * grad_weight1 / rows
            dh.addcmul_(h, -slope).add_(slope * mean1 - scale1 * grad_bias1 / rows)

        # W1 and the features: per-point sums of dh and of the residual's gradient at the maxima
        nbr_perm, nbr_offsets = group_by_key(nbr, num_points)
        ctr_perm, ctr_offsets = group_by_key(ctr, num_points)
        per_nbr, per_ctr = f.new_empty(num_points, hidden), f.new_empty(num_points, hidden)
        grad_feat = torch.empty_like(f)
        _point_grad_kernel[(num_points,)](nbr_perm, nbr_offsets, ctr_perm, ctr_offsets, dh, dh.sum(dim=1), du, arg,
                                          per_nbr, per_ctr, grad_feat, k, channels, hidden, BLOCK_T=_BLOCK_POINTS,
                                          BLOCK_C=channel_block(channels), BLOCK_H=tiles["BLOCK_H"])
        grad_feat += per_nbr @ w1[:, :channels] + per_ctr @ w1[:, channels:]
        splits, per_split = _splits(rows, _BLOCK_ROWS)
        parts = h.new_empty(splits, hidden, dim)
        _position_weight_kernel[(triton.cdiv(dim, tiles["BLOCK_D"]), splits)](off, dh, divisors, parts, rows, dim,
                                                                              hidden, freqs, beta, per_split,
                                                                              BLOCK_R=_BLOCK_ROWS, **tiles)
        grad_w1 = torch.cat((per_nbr.T @ f, per_ctr.T @ f), dim=1) + parts.sum(dim=0)
        grad_off = None
        if ctx.needs_input_grad[1]:
            grad_off = torch.empty_like(off)
            _offset_grad_kernel[(triton.cdiv(rows, _BLOCK_ROWS),)](off, dh, w1, du, arg, divisors, slopes, grad_off,
                                                                   rows, k, dim, hidden, freqs, beta,
                                                                   BLOCK_R=_BLOCK_ROWS, **tiles)

        return input_gradients(ctx, grad_feat, grad_off, grad_w1, grad_weight1, grad_bias1, grad_w2, grad_weight2,
                               grad_bias2)


def neighborhood_aggregate(feat: torch.Tensor, offsets: torch.Tensor, centre_index: torch.Tensor,
                           neighbour_index: torch.Tensor, weight1: torch.Tensor, norm1_weight: torch.Tensor,
                           norm1_bias: torch.Tensor, norm1_mean: torch.Tensor, norm1_var: torch.Tensor,
                           weight2: torch.Tensor, norm2_weight: torch.Tensor, norm2_bias: torch.Tensor,
                           norm2_mean: torch.Tensor, norm2_var: torch.Tensor, training: bool, eps: float,
                           alpha: float, beta: float, *, chunk: int | None = None) -> tuple[torch.Tensor, ...]:
    """The values of :func:`any2point_fast.reference.neighborhood_aggregate`, without ``[B·S·k, 2C]`` tensors.

    Args: as the reference's, float32/float16/bfloat16 (computed in float32), any strides;
        ``chunk``: centres per chunk of BN2's float64 moments (``None``: 16 MiB of them a chunk).

    Returns:
        ``[B, S, 2C]`` of ``feat``'s dtype; the float32 ``[H]`` mean and biased variance BN1 used and
        the ``[2C]`` ones of BN2 (no gradient).
    """
    for name, tensor in (("feat", feat), ("offsets", offsets), ("weight1", weight1), ("weight2", weight2)):
        check_float(name, tensor)
    return _Aggregate.apply(feat, offsets, centre_index, neighbour_index, weight1, norm1_weight, norm1_bias, norm1_mean,
                            norm1_var, weight2, norm2_weight, norm2_bias, norm2_mean, norm2_var, bool(training),
                            float(eps), float(alpha), float(beta), chunk)


__all__ = ["neighborhood_aggregate"]
