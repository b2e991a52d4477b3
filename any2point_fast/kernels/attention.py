"""``neighborhood_attention_pool``: per view and bucket, ``x + Attn(LN(x))`` inside the bucket, pooled.

Layout (see :class:`~any2point_fast.geometry.Segments`): an *item* is ``v·B·N + token``; the
items of segment ``s`` are ``perm[offsets[s]:offsets[s + 1]]``. Small per-item buffers (width
``3D``, ``D`` or ``H``, ``D = heads · head_dim``, 12 in the recipes) are indexed by item;
nothing of width ``C`` is ever stored per item — the per-view token features
``t_j = x + Attn_j(LN_j(x))`` exist only in registers, in forward and in backward.

Forward, two kernels:

1. ``_ln_qkv_fwd_kernel`` (grid: token blocks × views × qkv-column blocks) — LayerNorm
   statistics of every token (two passes over ``C``, view independent) and the projection
   ``qkv = LN_j(x) W_jᵀ + b_j`` (``tl.dot`` over channel blocks), stored ``[M·B·N, 3D]`` fp32.
2. ``_attn_pool_fwd_kernel`` (grid: one program per segment) — for every query block and head,
   online-softmax attention over the segment's key blocks (so segments of any length work),
   ``o`` and the log-sum-exp stored per item; then per channel block the output projection,
   bias and residual ``y = o W_oᵀ + b_o + x`` for the segment's tokens, reduced to the
   segment's mean (+ max) and written as the pooled row. For ``max + mean`` with gradients
   required, the maximum and its tie count are kept (``[S, C]``, the output's size).

Backward recomputes ``y`` (rank-1 updates over ``D``: the same operations in every kernel, so
``y == max`` identifies the same tied tokens as in forward) and uses the saved small buffers:

3. ``_pool_out_bwd_kernel`` (grid: token blocks × views) — ``dy = g/len + [y == max]·g/ties``
   and ``do = dy W_o``;
4. ``_attn_bwd_kernel`` (grid: segments) — flash-attention backward per head inside the
   segment (``dk, dv`` by key block, then ``dq`` by query block; no atomics) → ``dqkv``;
5. ``_ln_bwd_dx_kernel`` (grid: token blocks) — ``dh = dqkv W`` per view, LayerNorm backward,
   plus ``dy``, summed over the views in registers → ``dx``;
6. ``_out_ln_wgrad_kernel`` (grid: views × channel blocks × token splits) and
   ``_qkv_wgrad_kernel`` (grid: views × channel blocks × token splits·qkv-column blocks) — every
   weight gradient as an in-order loop over a split of the view's tokens; the partial sums of
   the splits are added by ``torch.sum``: deterministic, no atomics.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from any2point_fast.geometry import Segments

from ._common import (
    as_index,
    channel_block,
    check_float,
    check_pooling,
    device_function,
    max_and_ties,
    pow2_at_least,
    tmax,
    tsum,
)

_BLOCK_T = 16  # tokens per block: queries/keys of a segment, and every tile that recomputes ``y``
_BLOCK_TOK = 32  # tokens per block of the kernels that do not recompute ``y``
_MAX_ATTN_DIM = 256
# fp32 FMA dots need many registers: 8 warps keep every kernel below 255 registers without spills (ptxas,
# sm_90). The kernels that recompute ``y`` must all use the same value (same dot layout, same bits).
_NUM_WARPS = 8
_WGRAD_SPLIT_TOKENS = 512  # tokens per program of the weight-gradient kernels


@device_function
def _xhat_tile(x_ptr, t, c, mask, mean, rstd, channels):
    """LayerNorm-normalised ``x`` of tokens ``t`` and channels ``c`` (fp32, zero outside ``mask``)."""
    xs = tl.load(x_ptr + t[:, None] * channels + c[None, :], mask=mask, other=0.0).to(tl.float32)
    return tl.where(mask, (xs - mean[:, None]) * rstd[:, None], 0.0)


@device_function
def _key_block(qkv_ptr, perm_ptr, k0, end, h, d, dmask, qkv_dim, attn_dim, head_dim, BLOCK_T: tl.constexpr):
    """Keys and values of head ``h`` of the items at sorted positions ``k0 …`` (before ``end``):
    their mask ``[T]``, items ``[T]``, tile mask ``[T, HD]``, ``k`` and ``v`` ``[T, HD]``."""
    kmask = k0 + tl.arange(0, BLOCK_T) < end
    kitem = tl.load(perm_ptr + k0 + tl.arange(0, BLOCK_T), mask=kmask, other=0)
    ktile = kmask[:, None] & dmask[None, :]
    row = qkv_ptr + kitem[:, None] * qkv_dim + h * head_dim + d[None, :]
    k = tl.load(row + attn_dim, mask=ktile, other=0.0)
    v = tl.load(row + 2 * attn_dim, mask=ktile, other=0.0)
    return kmask, kitem, ktile, k, v


@device_function
def _out_tile(x_ptr, o_ptr, wo_ptr, bo_ptr, item, rmask, view, c, cmask, tokens, channels, attn_dim,
              BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
    """``y = o W_oᵀ + b_o + x`` for rows ``item`` and channels ``c`` (fp32).

    Every kernel calls this with the same tile shape (``_BLOCK_T`` rows), so ``y`` is bitwise the
    same in forward and backward and ``y == max`` finds the same tied tokens.
    """
    dd = tl.arange(0, BLOCK_D)
    dmask = dd < attn_dim
    o = tl.load(o_ptr + item[:, None] * attn_dim + dd[None, :], mask=rmask[:, None] & dmask[None, :], other=0.0)
    wo = tl.load(wo_ptr + (view * channels + c[None, :]) * attn_dim + dd[:, None], mask=dmask[:, None] & cmask[None, :],
                 other=0.0).to(tl.float32)
    y = tl.dot(o, wo, input_precision="ieee")
    bias = tl.load(bo_ptr + view * channels + c, mask=cmask, other=0.0).to(tl.float32)
    token = item % tokens
    mask = rmask[:, None] & cmask[None, :]
    x = tl.load(x_ptr + token[:, None] * channels + c[None, :], mask=mask, other=0.0).to(tl.float32)
    return y + bias[None, :] + x


@device_function
def _dy_tile(x_ptr, o_ptr, wo_ptr, bo_ptr, grad_ptr, offsets_ptr, segmax_ptr, segcnt_ptr, seg, item, rmask, view,
             c, cmask, tokens, channels, attn_dim, MAXMEAN: tl.constexpr, BLOCK_R: tl.constexpr,
             BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
    """Gradient of ``y`` from the pooled rows' gradient: ``g/len + [y == max]·g/ties`` (zero outside the mask)."""
    mask = rmask[:, None] & cmask[None, :]
    length = tl.load(offsets_ptr + seg + 1, mask=rmask, other=1) - tl.load(offsets_ptr + seg, mask=rmask, other=0)
    g = tl.load(grad_ptr + seg[:, None] * channels + c[None, :], mask=mask, other=0.0).to(tl.float32)
    dy = g / length.to(tl.float32)[:, None]
    if MAXMEAN:
        y = _out_tile(x_ptr, o_ptr, wo_ptr, bo_ptr, item, rmask, view, c, cmask, tokens, channels, attn_dim,
                      BLOCK_R, BLOCK_C, BLOCK_D)
        largest = tl.load(segmax_ptr + seg[:, None] * channels + c[None, :], mask=mask, other=0.0)
        ties = tl.load(segcnt_ptr + seg[:, None] * channels + c[None, :], mask=mask, other=1.0)
        dy += tl.where(y == largest, g / tl.maximum(ties, 1.0), 0.0)
    return tl.where(mask, dy, 0.0)


@device_function
def _dh_tile(dqkv_ptr, wqkv_ptr, item, rmask, view, c, cmask, channels, qkv_dim, BLOCK_R: tl.constexpr,
             BLOCK_C: tl.constexpr, BLOCK_E: tl.constexpr):
    """``dh = dqkv W_qkv`` for rows ``item`` and channels ``c`` (fp32)."""
    dh = tl.full((BLOCK_R, BLOCK_C), 0, tl.float32)
    for e0 in range(0, qkv_dim, BLOCK_E):
        e = e0 + tl.arange(0, BLOCK_E)
        emask = e < qkv_dim
        dq = tl.load(dqkv_ptr + item[:, None] * qkv_dim + e[None, :], mask=rmask[:, None] & emask[None, :], other=0.0)
        w = tl.load(wqkv_ptr + (view * qkv_dim + e[:, None]) * channels + c[None, :],
                    mask=emask[:, None] & cmask[None, :], other=0.0).to(tl.float32)
        dh += tl.dot(dq, w, input_precision="ieee")
    return dh


@triton.jit
def _ln_qkv_fwd_kernel(x_ptr, lnw_ptr, lnb_ptr, wqkv_ptr, bqkv_ptr, qkv_ptr, mean_ptr, rstd_ptr, tokens, channels,
                       qkv_dim, eps, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_E: tl.constexpr):
    view = tl.program_id(1)
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    tmask = t < tokens
    total = tl.full((BLOCK_T,), 0, tl.float32)
    for c0 in range(0, channels, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        mask = tmask[:, None] & (c < channels)[None, :]
        total += tsum(tl.load(x_ptr + t[:, None] * channels + c[None, :], mask=mask, other=0.0).to(tl.float32), 1)
    mean = total / channels
    total = tl.full((BLOCK_T,), 0, tl.float32)
    for c0 in range(0, channels, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        mask = tmask[:, None] & (c < channels)[None, :]
        xs = tl.load(x_ptr + t[:, None] * channels + c[None, :], mask=mask, other=0.0).to(tl.float32)
        diff = tl.where(mask, xs - mean[:, None], 0.0)
        total += tsum(diff * diff, 1)
    rstd = 1.0 / tl.sqrt(total / channels + eps)
    e = tl.program_id(2) * BLOCK_E + tl.arange(0, BLOCK_E)
    emask = e < qkv_dim
    acc = tl.full((BLOCK_T, BLOCK_E), 0, tl.float32)
    for c0 in range(0, channels, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        cmask = c < channels
        mask = tmask[:, None] & cmask[None, :]
        lw = tl.load(lnw_ptr + view * channels + c, mask=cmask, other=0.0).to(tl.float32)
        lb = tl.load(lnb_ptr + view * channels + c, mask=cmask, other=0.0).to(tl.float32)
        h = tl.where(mask, _xhat_tile(x_ptr, t, c, mask, mean, rstd, channels) * lw[None, :] + lb[None, :], 0.0)
        w = tl.load(wqkv_ptr + (view * qkv_dim + e[None, :]) * channels + c[:, None],
                    mask=cmask[:, None] & emask[None, :], other=0.0).to(tl.float32)
        acc += tl.dot(h, w, input_precision="ieee")
    acc += tl.load(bqkv_ptr + view * qkv_dim + e, mask=emask, other=0.0).to(tl.float32)[None, :]
    item = view * tokens + t
    tl.store(qkv_ptr + item[:, None] * qkv_dim + e[None, :], acc, mask=tmask[:, None] & emask[None, :])
    if view == 0:
        if tl.program_id(2) == 0:
            tl.store(mean_ptr + t, mean, mask=tmask)
            tl.store(rstd_ptr + t, rstd, mask=tmask)


@triton.jit
def _attn_pool_fwd_kernel(x_ptr, qkv_ptr, wo_ptr, bo_ptr, perm_ptr, offsets_ptr, o_ptr, lse_ptr, out_ptr,
                          segmax_ptr, segcnt_ptr, tokens, channels, attn_dim, num_heads, head_dim, scale,
                          MAXMEAN: tl.constexpr, SAVE_MAX: tl.constexpr, BLOCK_T: tl.constexpr,
                          BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_HD: tl.constexpr):
    seg = tl.program_id(0)
    start = tl.load(offsets_ptr + seg)
    end = tl.load(offsets_ptr + seg + 1)
    view = tl.load(perm_ptr + start) // tokens
    qkv_dim = 3 * attn_dim
    d = tl.arange(0, BLOCK_HD)
    dmask = d < head_dim
    lane = tl.arange(0, BLOCK_T)
    # 1. attention of every query block over the segment's key blocks, online softmax
    for q0 in range(start, end, BLOCK_T):
        qmask = q0 + lane < end
        qitem = tl.load(perm_ptr + q0 + lane, mask=qmask, other=0)
        qtile = qmask[:, None] & dmask[None, :]
        for h in range(num_heads):
            q = tl.load(qkv_ptr + qitem[:, None] * qkv_dim + h * head_dim + d[None, :], mask=qtile, other=0.0)
            q = q * scale
            m_i = tl.full((BLOCK_T,), float("-inf"), tl.float32)
            l_i = tl.full((BLOCK_T,), 0, tl.float32)
            acc = tl.full((BLOCK_T, BLOCK_HD), 0, tl.float32)
            for k0 in range(start, end, BLOCK_T):
                kmask, kitem, ktile, k, v = _key_block(qkv_ptr, perm_ptr, k0, end, h, d, dmask, qkv_dim, attn_dim,
                                                       head_dim, BLOCK_T)
                logits = tl.dot(q, tl.trans(k), input_precision="ieee")
                logits = tl.where(kmask[None, :], logits, float("-inf"))
                m_new = tl.maximum(m_i, tmax(logits, 1))
                alpha = tl.exp(m_i - m_new)
                p = tl.exp(logits - m_new[:, None])
                l_i = l_i * alpha + tsum(p, 1)
                acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
                m_i = m_new
            o = acc / l_i[:, None]
            tl.store(o_ptr + qitem[:, None] * attn_dim + h * head_dim + d[None, :], o, mask=qtile)
            tl.store(lse_ptr + qitem * num_heads + h, m_i + tl.log(l_i), mask=qmask)
    tl.debug_barrier()  # the o rows written above are read back by other threads below
    # 2. output projection + residual, pooled over the segment, per channel block
    length = (end - start).to(tl.float32)
    for c0 in range(0, channels, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        cmask = c < channels
        total = tl.full((BLOCK_C,), 0, tl.float32)
        largest = tl.full((BLOCK_C,), float("-inf"), tl.float32)
        ties = tl.full((BLOCK_C,), 0, tl.float32)
        for p0 in range(start, end, BLOCK_T):
            rmask = p0 + lane < end
            item = tl.load(perm_ptr + p0 + lane, mask=rmask, other=0)
            y = _out_tile(x_ptr, o_ptr, wo_ptr, bo_ptr, item, rmask, view, c, cmask, tokens, channels, attn_dim,
                          BLOCK_T, BLOCK_C, BLOCK_D)
            mask = rmask[:, None] & cmask[None, :]
            total += tsum(tl.where(mask, y, 0.0), 0)
            if MAXMEAN:
                largest, ties = max_and_ties(largest, ties, tl.where(mask, y, float("-inf")))
        pooled = total / length
        if MAXMEAN:
            pooled += largest
            if SAVE_MAX:
                tl.store(segmax_ptr + seg * channels + c, largest, mask=cmask)
                tl.store(segcnt_ptr + seg * channels + c, ties, mask=cmask)
        tl.store(out_ptr + seg * channels + c, pooled.to(out_ptr.dtype.element_ty), mask=cmask)


@triton.jit
def _pool_out_bwd_kernel(x_ptr, o_ptr, wo_ptr, bo_ptr, grad_ptr, segment_ids_ptr, offsets_ptr, segmax_ptr,
                         segcnt_ptr, do_ptr, delta_ptr, tokens, channels, attn_dim, num_heads, head_dim,
                         MAXMEAN: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
                         BLOCK_H: tl.constexpr):
    view = tl.program_id(1)
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    tmask = t < tokens
    item = view * tokens + t
    seg = tl.load(segment_ids_ptr + item, mask=tmask, other=0)
    dd = tl.arange(0, BLOCK_D)
    dmask = dd < attn_dim
    tile = tmask[:, None] & dmask[None, :]
    do = tl.full((BLOCK_T, BLOCK_D), 0, tl.float32)
    for c0 in range(0, channels, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        cmask = c < channels
        dy = _dy_tile(x_ptr, o_ptr, wo_ptr, bo_ptr, grad_ptr, offsets_ptr, segmax_ptr, segcnt_ptr, seg, item, tmask,
                      view, c, cmask, tokens, channels, attn_dim, MAXMEAN, BLOCK_T, BLOCK_C, BLOCK_D)
        wo = tl.load(wo_ptr + (view * channels + c[:, None]) * attn_dim + dd[None, :],
                     mask=cmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
        do += tl.dot(dy, wo, input_precision="ieee")
    tl.store(do_ptr + item[:, None] * attn_dim + dd[None, :], do, mask=tile)
    # the softmax-backward row terms delta = Σ_{d ∈ head} do·o, all heads at once
    o = tl.load(o_ptr + item[:, None] * attn_dim + dd[None, :], mask=tile, other=0.0)
    hh = tl.arange(0, BLOCK_H)
    in_head = (dd[:, None] // head_dim == hh[None, :]) & dmask[:, None]
    delta = tsum((do * o)[:, :, None] * in_head.to(tl.float32)[None, :, :], 1)
    tl.store(delta_ptr + item[:, None] * num_heads + hh[None, :], delta,
             mask=tmask[:, None] & (hh < num_heads)[None, :])


@triton.jit
def _attn_bwd_kernel(qkv_ptr, do_ptr, lse_ptr, delta_ptr, perm_ptr, offsets_ptr, dqkv_ptr, attn_dim, num_heads,
                     head_dim, scale, BLOCK_T: tl.constexpr, BLOCK_HD: tl.constexpr):
    seg = tl.program_id(0)
    start = tl.load(offsets_ptr + seg)
    end = tl.load(offsets_ptr + seg + 1)
    qkv_dim = 3 * attn_dim
    d = tl.arange(0, BLOCK_HD)
    dmask = d < head_dim
    lane = tl.arange(0, BLOCK_T)
    for h in range(num_heads):
        # key blocks outside, query blocks inside: dk, dv accumulate in registers; dq (zero-initialised)
        # is read-modified-written by this program only, one key block after the other
        for k0 in range(start, end, BLOCK_T):
            kmask, kitem, ktile, k, v = _key_block(qkv_ptr, perm_ptr, k0, end, h, d, dmask, qkv_dim, attn_dim,
                                                   head_dim, BLOCK_T)
            dk = tl.full((BLOCK_T, BLOCK_HD), 0, tl.float32)
            dv = tl.full((BLOCK_T, BLOCK_HD), 0, tl.float32)
            for q0 in range(start, end, BLOCK_T):
                qmask = q0 + lane < end
                qitem = tl.load(perm_ptr + q0 + lane, mask=qmask, other=0)
                qtile = qmask[:, None] & dmask[None, :]
                q = tl.load(qkv_ptr + qitem[:, None] * qkv_dim + h * head_dim + d[None, :], mask=qtile, other=0.0)
                q = q * scale
                do = tl.load(do_ptr + qitem[:, None] * attn_dim + h * head_dim + d[None, :], mask=qtile, other=0.0)
                lse = tl.load(lse_ptr + qitem * num_heads + h, mask=qmask, other=0.0)
                delta = tl.load(delta_ptr + qitem * num_heads + h, mask=qmask, other=0.0)
                logits = tl.dot(q, tl.trans(k), input_precision="ieee")
                p = tl.where(qmask[:, None] & kmask[None, :], tl.exp(logits - lse[:, None]), 0.0)
                dv += tl.dot(tl.trans(p), do, input_precision="ieee")
                dp = tl.dot(do, tl.trans(v), input_precision="ieee")
                ds = p * (dp - delta[:, None])
                dk += tl.dot(tl.trans(ds), q, input_precision="ieee")
                dq_ptrs = dqkv_ptr + qitem[:, None] * qkv_dim + h * head_dim + d[None, :]
                dq = tl.load(dq_ptrs, mask=qtile, other=0.0) + tl.dot(ds, k, input_precision="ieee") * scale
                tl.store(dq_ptrs, dq, mask=qtile)
            tl.store(dqkv_ptr + kitem[:, None] * qkv_dim + attn_dim + h * head_dim + d[None, :], dk, mask=ktile)
            tl.store(dqkv_ptr + kitem[:, None] * qkv_dim + 2 * attn_dim + h * head_dim + d[None, :], dv, mask=ktile)
            tl.debug_barrier()  # the dq rows stored above are read back in the next key block


@triton.jit
def _ln_bwd_dx_kernel(x_ptr, o_ptr, wo_ptr, bo_ptr, grad_ptr, segment_ids_ptr, offsets_ptr, segmax_ptr, segcnt_ptr,
                      dqkv_ptr, wqkv_ptr, lnw_ptr, mean_ptr, rstd_ptr, stats_ptr, dx_ptr, tokens, channels, attn_dim,
                      num_views, MAXMEAN: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
                      BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr):
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    tmask = t < tokens
    mean = tl.load(mean_ptr + t, mask=tmask, other=0.0)
    rstd = tl.load(rstd_ptr + t, mask=tmask, other=0.0)
    qkv_dim = 3 * attn_dim
    # 1. per view, the two row reductions of the LayerNorm backward
    for view in range(num_views):
        item = view * tokens + t
        sum_gx = tl.full((BLOCK_T,), 0, tl.float32)
        sum_g = tl.full((BLOCK_T,), 0, tl.float32)
        for c0 in range(0, channels, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            cmask = c < channels
            mask = tmask[:, None] & cmask[None, :]
            xhat = _xhat_tile(x_ptr, t, c, mask, mean, rstd, channels)
            dh = _dh_tile(dqkv_ptr, wqkv_ptr, item, tmask, view, c, cmask, channels, qkv_dim, BLOCK_T, BLOCK_C,
                          BLOCK_E)
            lw = tl.load(lnw_ptr + view * channels + c, mask=cmask, other=0.0).to(tl.float32)
            g = dh * lw[None, :]
            sum_gx += tsum(g * xhat, 1)
            sum_g += tsum(g, 1)
        tl.store(stats_ptr + item * 2, sum_gx, mask=tmask)
        tl.store(stats_ptr + item * 2 + 1, sum_g, mask=tmask)
    tl.debug_barrier()  # the row statistics written above are read back by other threads below
    # 2. dx = Σ_views (dy + LayerNorm backward of dh), one channel block at a time
    for c0 in range(0, channels, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        cmask = c < channels
        mask = tmask[:, None] & cmask[None, :]
        xhat = _xhat_tile(x_ptr, t, c, mask, mean, rstd, channels)
        dx = tl.full((BLOCK_T, BLOCK_C), 0, tl.float32)
        for view in range(num_views):
            item = view * tokens + t
            sum_gx = tl.load(stats_ptr + item * 2, mask=tmask, other=0.0)
            sum_g = tl.load(stats_ptr + item * 2 + 1, mask=tmask, other=0.0)
            dh = _dh_tile(dqkv_ptr, wqkv_ptr, item, tmask, view, c, cmask, channels, qkv_dim, BLOCK_T, BLOCK_C,
                          BLOCK_E)
            lw = tl.load(lnw_ptr + view * channels + c, mask=cmask, other=0.0).to(tl.float32)
            g = dh * lw[None, :]
            dx += rstd[:, None] * (g - (sum_g[:, None] + xhat * sum_gx[:, None]) / channels)
            seg = tl.load(segment_ids_ptr + item, mask=tmask, other=0)
            dx += _dy_tile(x_ptr, o_ptr, wo_ptr, bo_ptr, grad_ptr, offsets_ptr, segmax_ptr, segcnt_ptr, seg, item,
                           tmask, view, c, cmask, tokens, channels, attn_dim, MAXMEAN, BLOCK_T, BLOCK_C, BLOCK_D)
        tl.store(dx_ptr + t[:, None] * channels + c[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _out_ln_wgrad_kernel(x_ptr, o_ptr, wo_ptr, bo_ptr, grad_ptr, segment_ids_ptr, offsets_ptr, segmax_ptr,
                         segcnt_ptr, dqkv_ptr, wqkv_ptr, mean_ptr, rstd_ptr, dwo_ptr, dbo_ptr, dlnw_ptr, dlnb_ptr,
                         tokens, channels, attn_dim, split_len, MAXMEAN: tl.constexpr, BLOCK_T: tl.constexpr,
                         BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr):
    view = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < channels
    split = tl.program_id(2)
    num_views = tl.num_programs(0)
    dd = tl.arange(0, BLOCK_D)
    dmask = dd < attn_dim
    dwo = tl.full((BLOCK_C, BLOCK_D), 0, tl.float32)
    dbo = tl.full((BLOCK_C,), 0, tl.float32)
    dlnw = tl.full((BLOCK_C,), 0, tl.float32)
    dlnb = tl.full((BLOCK_C,), 0, tl.float32)
    for t0 in range(split * split_len, (split + 1) * split_len, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        tmask = t < tokens
        item = view * tokens + t
        seg = tl.load(segment_ids_ptr + item, mask=tmask, other=0)
        dy = _dy_tile(x_ptr, o_ptr, wo_ptr, bo_ptr, grad_ptr, offsets_ptr, segmax_ptr, segcnt_ptr, seg, item, tmask,
                      view, c, cmask, tokens, channels, attn_dim, MAXMEAN, BLOCK_T, BLOCK_C, BLOCK_D)
        o = tl.load(o_ptr + item[:, None] * attn_dim + dd[None, :], mask=tmask[:, None] & dmask[None, :], other=0.0)
        dwo += tl.dot(tl.trans(dy), o, input_precision="ieee")
        dbo += tsum(dy, 0)
        mask = tmask[:, None] & cmask[None, :]
        mean = tl.load(mean_ptr + t, mask=tmask, other=0.0)
        rstd = tl.load(rstd_ptr + t, mask=tmask, other=0.0)
        xhat = _xhat_tile(x_ptr, t, c, mask, mean, rstd, channels)
        dh = _dh_tile(dqkv_ptr, wqkv_ptr, item, tmask, view, c, cmask, channels, 3 * attn_dim, BLOCK_T, BLOCK_C,
                      BLOCK_E)
        dlnw += tsum(dh * xhat, 0)
        dlnb += tsum(dh, 0)
    row = (split * num_views + view) * channels + c  # partial sums of this token split
    tl.store(dwo_ptr + row[:, None] * attn_dim + dd[None, :], dwo, mask=cmask[:, None] & dmask[None, :])
    tl.store(dbo_ptr + row, dbo, mask=cmask)
    tl.store(dlnw_ptr + row, dlnw, mask=cmask)
    tl.store(dlnb_ptr + row, dlnb, mask=cmask)


@triton.jit
def _qkv_wgrad_kernel(x_ptr, dqkv_ptr, lnw_ptr, lnb_ptr, mean_ptr, rstd_ptr, dwqkv_ptr, dbqkv_ptr, tokens, channels,
                      qkv_dim, split_len, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_E: tl.constexpr):
    view = tl.program_id(0)
    num_views = tl.num_programs(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < channels
    e_blocks = tl.cdiv(qkv_dim, BLOCK_E)
    split = tl.program_id(2) // e_blocks
    e = (tl.program_id(2) % e_blocks) * BLOCK_E + tl.arange(0, BLOCK_E)
    emask = e < qkv_dim
    lw = tl.load(lnw_ptr + view * channels + c, mask=cmask, other=0.0).to(tl.float32)
    lb = tl.load(lnb_ptr + view * channels + c, mask=cmask, other=0.0).to(tl.float32)
    dw = tl.full((BLOCK_E, BLOCK_C), 0, tl.float32)
    db = tl.full((BLOCK_E,), 0, tl.float32)
    for t0 in range(split * split_len, (split + 1) * split_len, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        tmask = t < tokens
        mask = tmask[:, None] & cmask[None, :]
        mean = tl.load(mean_ptr + t, mask=tmask, other=0.0)
        rstd = tl.load(rstd_ptr + t, mask=tmask, other=0.0)
        h = tl.where(mask, _xhat_tile(x_ptr, t, c, mask, mean, rstd, channels) * lw[None, :] + lb[None, :], 0.0)
        item = view * tokens + t
        dq = tl.load(dqkv_ptr + item[:, None] * qkv_dim + e[None, :], mask=tmask[:, None] & emask[None, :], other=0.0)
        dw += tl.dot(tl.trans(dq), h, input_precision="ieee")
        db += tsum(dq, 0)
    row = (split * num_views + view) * qkv_dim + e  # partial sums of this token split
    tl.store(dwqkv_ptr + row[:, None] * channels + c[None, :], dw, mask=emask[:, None] & cmask[None, :])
    if tl.program_id(1) == 0:
        tl.store(dbqkv_ptr + row, db, mask=emask)


class NeighborhoodAttentionPoolFunction(torch.autograd.Function):
    """Forward: LN + qkv kernel, then the per-segment attention/pool kernel; backward: four passes."""

    @staticmethod
    def forward(ctx, x, ln_weight, ln_bias, qkv_weight, qkv_bias, out_weight, out_bias, segment_ids, perm, offsets,
                num_heads, maxmean, eps):
        batch, length, channels = x.shape
        tokens = batch * length
        views, qkv_dim = qkv_weight.shape[0], qkv_weight.shape[1]
        attn_dim = qkv_dim // 3
        head_dim = attn_dim // num_heads
        num_segments = offsets.numel() - 1
        device = x.device
        x2 = x.reshape(tokens, channels).contiguous()
        weights = [w.contiguous() for w in (ln_weight, ln_bias, qkv_weight, qkv_bias, out_weight, out_bias)]
        ln_weight, ln_bias, qkv_weight, qkv_bias, out_weight, out_bias = weights
        block_c, block_e = channel_block(channels), channel_block(qkv_dim)
        f32 = dict(dtype=torch.float32, device=device)
        qkv = torch.empty(views * tokens, qkv_dim, **f32)
        mean, rstd = torch.empty(tokens, **f32), torch.empty(tokens, **f32)
        _ln_qkv_fwd_kernel[(triton.cdiv(tokens, _BLOCK_TOK), views, triton.cdiv(qkv_dim, block_e))](
            x2, ln_weight, ln_bias, qkv_weight, qkv_bias, qkv, mean, rstd, tokens, channels, qkv_dim, eps,
            BLOCK_T=_BLOCK_TOK, BLOCK_C=block_c, BLOCK_E=block_e, num_warps=_NUM_WARPS)
        o = torch.empty(views * tokens, attn_dim, **f32)
        lse = torch.empty(views * tokens, num_heads, **f32)
        out = torch.empty(num_segments, channels, dtype=x.dtype, device=device)
        save_max = maxmean and any(ctx.needs_input_grad[:7])
        segmax = torch.empty(num_segments, channels, **f32) if save_max else o
        segcnt = torch.empty(num_segments, channels, **f32) if save_max else o
        _attn_pool_fwd_kernel[(num_segments,)](
            x2, qkv, out_weight, out_bias, perm, offsets, o, lse, out, segmax, segcnt, tokens, channels, attn_dim,
            num_heads, head_dim, head_dim**-0.5, MAXMEAN=maxmean, SAVE_MAX=save_max, BLOCK_T=_BLOCK_T,
            BLOCK_C=block_c, BLOCK_D=pow2_at_least(attn_dim), BLOCK_HD=pow2_at_least(head_dim), num_warps=_NUM_WARPS)
        ctx.save_for_backward(x2, *weights, segment_ids, perm, offsets, qkv, mean, rstd, o, lse, segmax, segcnt)
        ctx.meta = (batch, length, num_heads, maxmean)
        ctx.set_materialize_grads(False)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        (x2, ln_weight, ln_bias, qkv_weight, qkv_bias, out_weight, out_bias, segment_ids, perm, offsets, qkv, mean,
         rstd, o, lse, segmax, segcnt) = ctx.saved_tensors
        batch, length, num_heads, maxmean = ctx.meta
        needs = ctx.needs_input_grad
        if grad_out is None or not any(needs[:7]):
            return (None,) * 13
        tokens, channels = x2.shape
        views, qkv_dim = qkv_weight.shape[0], qkv_weight.shape[1]
        attn_dim = qkv_dim // 3
        head_dim = attn_dim // num_heads
        num_segments = offsets.numel() - 1
        block_c, block_e, block_d = channel_block(channels), channel_block(qkv_dim, cap=32), pow2_at_least(attn_dim)
        f32 = dict(dtype=torch.float32, device=x2.device)
        grad_out = grad_out.contiguous()
        segment_ids = segment_ids.reshape(-1)
        token_blocks = triton.cdiv(tokens, _BLOCK_T)
        pool_args = (x2, o, out_weight, out_bias, grad_out, segment_ids, offsets, segmax, segcnt)

        do = torch.empty(views * tokens, attn_dim, **f32)
        delta = torch.empty(views * tokens, num_heads, **f32)
        _pool_out_bwd_kernel[(token_blocks, views)](
            *pool_args, do, delta, tokens, channels, attn_dim, num_heads, head_dim, MAXMEAN=maxmean,
            BLOCK_T=_BLOCK_T, BLOCK_C=block_c, BLOCK_D=block_d, BLOCK_H=triton.next_power_of_2(num_heads),
            num_warps=_NUM_WARPS)
        dqkv = torch.zeros(views * tokens, qkv_dim, **f32)
        _attn_bwd_kernel[(num_segments,)](
            qkv, do, lse, delta, perm, offsets, dqkv, attn_dim, num_heads, head_dim, head_dim**-0.5,
            BLOCK_T=_BLOCK_T, BLOCK_HD=pow2_at_least(head_dim), num_warps=4 if head_dim <= 16 else 8)

        dx = None
        if needs[0]:
            dx = torch.empty(tokens, channels, dtype=x2.dtype, device=x2.device)
            stats = torch.empty(views * tokens, 2, **f32)
            _ln_bwd_dx_kernel[(token_blocks,)](
                *pool_args, dqkv, qkv_weight, ln_weight, mean, rstd, stats, dx, tokens, channels, attn_dim, views,
                MAXMEAN=maxmean, BLOCK_T=_BLOCK_T, BLOCK_C=block_c, BLOCK_D=block_d, BLOCK_E=block_e,
                num_warps=_NUM_WARPS)
            dx = dx.view(batch, length, channels)

        grads = [None] * 6
        if any(needs[1:7]):
            # split the token loop of the weight gradients for parallelism; partial sums per split are
            # added by torch (a deterministic reduction)
            split_len = triton.cdiv(triton.cdiv(tokens, triton.cdiv(tokens, _WGRAD_SPLIT_TOKENS)), _BLOCK_TOK)
            split_len *= _BLOCK_TOK
            splits = triton.cdiv(tokens, split_len)
            dlnw, dlnb = torch.empty(splits, views, channels, **f32), torch.empty(splits, views, channels, **f32)
            dwo = torch.empty(splits, views, channels, attn_dim, **f32)
            dbo = torch.empty(splits, views, channels, **f32)
            dwqkv = torch.empty(splits, views, qkv_dim, channels, **f32)
            dbqkv = torch.empty(splits, views, qkv_dim, **f32)
            _out_ln_wgrad_kernel[(views, triton.cdiv(channels, block_c), splits)](
                *pool_args, dqkv, qkv_weight, mean, rstd, dwo, dbo, dlnw, dlnb, tokens, channels, attn_dim, split_len,
                MAXMEAN=maxmean, BLOCK_T=_BLOCK_T, BLOCK_C=block_c, BLOCK_D=block_d, BLOCK_E=block_e,
                num_warps=_NUM_WARPS)
            _qkv_wgrad_kernel[(views, triton.cdiv(channels, block_c), splits * triton.cdiv(qkv_dim, block_e))](
                x2, dqkv, ln_weight, ln_bias, mean, rstd, dwqkv, dbqkv, tokens, channels, qkv_dim, split_len,
                BLOCK_T=_BLOCK_TOK, BLOCK_C=block_c, BLOCK_E=block_e, num_warps=_NUM_WARPS)
            params = (ln_weight, ln_bias, qkv_weight, qkv_bias, out_weight, out_bias)
            for i, (grad, param) in enumerate(zip((dlnw, dlnb, dwqkv, dbqkv, dwo, dbo), params)):
                if needs[1 + i]:
                    grads[i] = grad.sum(0).to(param.dtype)
        return (dx, *grads, None, None, None, None, None, None)


def neighborhood_attention_pool(x: torch.Tensor, segments: Segments, ln_weight: torch.Tensor, ln_bias: torch.Tensor,
                                qkv_weight: torch.Tensor, qkv_bias: torch.Tensor, out_weight: torch.Tensor,
                                out_bias: torch.Tensor, num_heads: int, pooling: str,
                                eps: float = 1e-5) -> torch.Tensor:
    """Per view ``j``: ``t_j = x + Attn_j(LN_j(x))`` among each bucket's tokens, pooled per bucket → ``[S, C]``.

    Same contract as :func:`any2point_fast.reference.neighborhood_attention_pool`.
    """
    check_float("x", x)
    maxmean = check_pooling(pooling)
    if x.dim() != 3:
        raise ValueError(f"x must be [B, N, C], got shape {tuple(x.shape)}")
    views, qkv_dim, channels = qkv_weight.shape
    if segments.num_views != views or segments.segment_ids.shape != (views, *x.shape[:2]) or channels != x.shape[2]:
        raise ValueError(f"segments of {segments.num_views} views {tuple(segments.segment_ids.shape)} and qkv_weight "
                         f"{tuple(qkv_weight.shape)} do not match x {tuple(x.shape)}")
    if qkv_dim % 3 or (qkv_dim // 3) % num_heads:
        raise ValueError(f"qkv_weight rows ({qkv_dim}) must be 3·heads·head_dim with {num_heads} heads")
    attn_dim = qkv_dim // 3
    if attn_dim // num_heads > 64 or attn_dim > _MAX_ATTN_DIM:
        raise ValueError(f"the Triton kernel supports head_dim <= 64 and heads·head_dim <= {_MAX_ATTN_DIM}, got "
                         f"{num_heads} heads of dim {attn_dim // num_heads}")
    return NeighborhoodAttentionPoolFunction.apply(
        x, ln_weight, ln_bias, qkv_weight, qkv_bias, out_weight, out_bias, as_index(segments.segment_ids),
        as_index(segments.perm), as_index(segments.offsets), num_heads, maxmean, eps)
