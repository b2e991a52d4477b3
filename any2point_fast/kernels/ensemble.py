"""``ensemble_propagate``: the adaptive any-to-3D ensemble (Eq. 3) and residual, forward and backward.

Forward (grid: token blocks): per token, gather ``B_i`` and the ``M`` rows ``F_ij`` (a
``[tokens, views, channels]`` tile per channel block), accumulate ``B·F_j``, ``|B|²``,
``|F_j|²`` over the channel blocks, form the cosine weights
``w_j = ((cos_j + 1)/2) / max(Σ_k (cos_k + 1)/2, eps)`` with ``cos = dot / max(|B||F|, eps)``
in fp32, then write ``x + c·Σ_j w_j F_j`` in a second pass over the channel blocks.

Backward, deterministic (no floating-point atomics):

1. ``_ensemble_coef_kernel`` (grid: token blocks) recomputes the per-token scalars and the
   gradient of the weights, and stores four small coefficient arrays such that
   ``dF_ij = w_ij·c·g_i + a_ij·B_i + k_ij·F_ij`` and ``dB_i = Σ_j a_ij·F_ij + k_i·B_i``;
2. ``_view_rows_grad_kernel`` / ``_base_rows_grad_kernel`` (grid: table rows × channel blocks)
   sum those contributions over the tokens of every row, in token order, using the stable
   counting sort of the row ids (:mod:`.buckets`).

``dx`` is the upstream gradient itself.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import channel_block, check_float, device_function, segment_program, tsum
from .buckets import check_ids, group_by_key

_BLOCK_T = 16
_BLOCK_R = 16
_EPS = 1e-8


@device_function
def _token_views(base_ids_ptr, view_ids_ptr, tokens, num_views, BLOCK_T: tl.constexpr, BLOCK_M: tl.constexpr):
    """This program's tokens ``t`` ``[T]`` and views ``j`` ``[M]``, their masks, and every token's baseline
    row ``[T]`` and view rows ``[T, M]``."""
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    tmask = t < tokens
    j = tl.arange(0, BLOCK_M)
    jmask = j < num_views
    tile = tmask[:, None] & jmask[None, :]
    bid = tl.load(base_ids_ptr + t, mask=tmask, other=0)
    vid = tl.load(view_ids_ptr + j[None, :] * tokens + t[:, None], mask=tile, other=0)
    return t, j, tmask, jmask, tile, bid, vid


@device_function
def _gather_stats(base_ptr, views_ptr, bid, vid, tmask, jmask, grad_ptr, t, channels, WITH_GRAD: tl.constexpr,
                  BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_M: tl.constexpr):
    """Per token and view: ``B·F_j``, ``|B|²``, ``|F_j|²`` and (optionally) ``g·F_j`` over all channels."""
    dots = tl.full((BLOCK_T, BLOCK_M), 0, tl.float32)
    f_sq = tl.full((BLOCK_T, BLOCK_M), 0, tl.float32)
    g_dots = tl.full((BLOCK_T, BLOCK_M), 0, tl.float32)
    b_sq = tl.full((BLOCK_T,), 0, tl.float32)
    tile = tmask[:, None] & jmask[None, :]
    for c0 in range(0, channels, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        cmask = c < channels
        mask = tmask[:, None] & cmask[None, :]
        b = tl.load(base_ptr + bid[:, None] * channels + c[None, :], mask=mask, other=0.0).to(tl.float32)
        f = tl.load(views_ptr + vid[:, :, None] * channels + c[None, None, :],
                    mask=tile[:, :, None] & cmask[None, None, :], other=0.0).to(tl.float32)
        dots += tsum(b[:, None, :] * f, 2)
        f_sq += tsum(f * f, 2)
        b_sq += tsum(b * b, 1)
        if WITH_GRAD:
            g = tl.load(grad_ptr + t[:, None] * channels + c[None, :], mask=mask, other=0.0).to(tl.float32)
            g_dots += tsum(g[:, None, :] * f, 2)
    return dots, f_sq, b_sq, g_dots


@triton.jit
def _ensemble_fwd_kernel(x_ptr, base_ptr, base_ids_ptr, views_ptr, view_ids_ptr, out_ptr, tokens, channels,
                         num_views, coef, eps, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
                         BLOCK_M: tl.constexpr):
    t, _, tmask, jmask, tile, bid, vid = _token_views(base_ids_ptr, view_ids_ptr, tokens, num_views, BLOCK_T, BLOCK_M)
    dots, f_sq, b_sq, _ = _gather_stats(base_ptr, views_ptr, bid, vid, tmask, jmask, x_ptr, t, channels, False,
                                        BLOCK_T, BLOCK_C, BLOCK_M)
    denom = tl.maximum(tl.sqrt(b_sq)[:, None] * tl.sqrt(f_sq), eps)
    u = tl.where(jmask[None, :], (dots / denom + 1) / 2, 0.0)
    w = u / tl.maximum(tsum(u, 1), eps)[:, None]
    for c0 in range(0, channels, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        cmask = c < channels
        mask = tmask[:, None] & cmask[None, :]
        f = tl.load(views_ptr + vid[:, :, None] * channels + c[None, None, :],
                    mask=tile[:, :, None] & cmask[None, None, :], other=0.0).to(tl.float32)
        x = tl.load(x_ptr + t[:, None] * channels + c[None, :], mask=mask, other=0.0).to(tl.float32)
        out = x + coef * tsum(w[:, :, None] * f, 1)
        tl.store(out_ptr + t[:, None] * channels + c[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _ensemble_coef_kernel(grad_ptr, base_ptr, base_ids_ptr, views_ptr, view_ids_ptr, w_ptr, a_ptr, kf_ptr, kb_ptr,
                          tokens, channels, num_views, coef, eps, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
                          BLOCK_M: tl.constexpr):
    t, j, tmask, jmask, tile, bid, vid = _token_views(base_ids_ptr, view_ids_ptr, tokens, num_views, BLOCK_T, BLOCK_M)
    dots, f_sq, b_sq, g_dots = _gather_stats(base_ptr, views_ptr, bid, vid, tmask, jmask, grad_ptr, t, channels,
                                             True, BLOCK_T, BLOCK_C, BLOCK_M)
    b_norm = tl.sqrt(b_sq)
    f_norm = tl.sqrt(f_sq)
    prod = b_norm[:, None] * f_norm
    denom = tl.maximum(prod, eps)
    u = tl.where(jmask[None, :], (dots / denom + 1) / 2, 0.0)
    u_sum = tsum(u, 1)
    total = tl.maximum(u_sum, eps)
    w = u / total[:, None]
    # backward of w = u / max(Σu, eps), u = (cos + 1)/2, cos = dot / max(|B||F|, eps)
    dw = coef * g_dots
    du = (dw - tl.where(u_sum >= eps, tsum(dw * w, 1), 0.0)[:, None]) / total[:, None]
    dcos = tl.where(jmask[None, :], du / 2, 0.0)
    a = dcos / denom
    ddenom = tl.where(prod >= eps, -dcos * dots / (denom * denom), 0.0)
    kf = tl.where(f_norm > 0, ddenom * b_norm[:, None] / tl.where(f_norm > 0, f_norm, 1.0), 0.0)
    kb = tl.where(b_norm > 0, tsum(ddenom * f_norm, 1) / tl.where(b_norm > 0, b_norm, 1.0), 0.0)
    dst = j[None, :] * tokens + t[:, None]
    tl.store(w_ptr + dst, w, mask=tile)
    tl.store(a_ptr + dst, a, mask=tile)
    tl.store(kf_ptr + dst, kf, mask=tile)
    tl.store(kb_ptr + t, kb, mask=tmask)


@triton.jit
def _view_rows_grad_kernel(grad_ptr, base_ptr, base_ids_ptr, views_ptr, perm_ptr, offsets_ptr, w_ptr, a_ptr, kf_ptr,
                           dviews_ptr, tokens, channels, coef, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    row, c, cmask, start, end = segment_program(offsets_ptr, channels, BLOCK_C)
    acc = tl.full((BLOCK_C,), 0, tl.float32)
    k_total = tl.full((BLOCK_R,), 0, tl.float32)
    for p0 in range(start, end, BLOCK_R):
        pos = p0 + tl.arange(0, BLOCK_R)
        rmask = pos < end
        item = tl.load(perm_ptr + pos, mask=rmask, other=0)  # view·tokens + token
        t = item % tokens
        mask = rmask[:, None] & cmask[None, :]
        w = tl.load(w_ptr + item, mask=rmask, other=0.0)
        a = tl.load(a_ptr + item, mask=rmask, other=0.0)
        k_total += tl.load(kf_ptr + item, mask=rmask, other=0.0)
        g = tl.load(grad_ptr + t[:, None] * channels + c[None, :], mask=mask, other=0.0).to(tl.float32)
        bid = tl.load(base_ids_ptr + t, mask=rmask, other=0)
        b = tl.load(base_ptr + bid[:, None] * channels + c[None, :], mask=mask, other=0.0).to(tl.float32)
        acc += tsum((coef * w)[:, None] * g + a[:, None] * b, 0)
    f = tl.load(views_ptr + row * channels + c, mask=cmask, other=0.0).to(tl.float32)
    acc += tsum(k_total, 0) * f
    tl.store(dviews_ptr + row * channels + c, acc.to(dviews_ptr.dtype.element_ty), mask=cmask)


@triton.jit
def _base_rows_grad_kernel(base_ptr, views_ptr, view_ids_ptr, perm_ptr, offsets_ptr, a_ptr, kb_ptr, dbase_ptr,
                           tokens, channels, num_views, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
                           BLOCK_M: tl.constexpr):
    row, c, cmask, start, end = segment_program(offsets_ptr, channels, BLOCK_C)
    j = tl.arange(0, BLOCK_M)
    jmask = j < num_views
    acc = tl.full((BLOCK_C,), 0, tl.float32)
    k_total = tl.full((BLOCK_R,), 0, tl.float32)
    for p0 in range(start, end, BLOCK_R):
        pos = p0 + tl.arange(0, BLOCK_R)
        rmask = pos < end
        t = tl.load(perm_ptr + pos, mask=rmask, other=0)
        tile = rmask[:, None] & jmask[None, :]
        vid = tl.load(view_ids_ptr + j[None, :] * tokens + t[:, None], mask=tile, other=0)
        a = tl.load(a_ptr + j[None, :] * tokens + t[:, None], mask=tile, other=0.0)
        k_total += tl.load(kb_ptr + t, mask=rmask, other=0.0)
        f = tl.load(views_ptr + vid[:, :, None] * channels + c[None, None, :],
                    mask=tile[:, :, None] & cmask[None, None, :], other=0.0).to(tl.float32)
        acc += tsum(tsum(a[:, :, None] * f, 1), 0)
    b = tl.load(base_ptr + row * channels + c, mask=cmask, other=0.0).to(tl.float32)
    acc += tsum(k_total, 0) * b
    tl.store(dbase_ptr + row * channels + c, acc.to(dbase_ptr.dtype.element_ty), mask=cmask)


class EnsemblePropagateFunction(torch.autograd.Function):
    """Autograd wrapper: forward kernel; backward coefficient kernel + two deterministic row reductions."""

    @staticmethod
    def forward(ctx, x, base_rows, base_ids, view_rows, view_ids, coef):
        batch, length, channels = x.shape
        tokens = batch * length
        num_views = view_ids.shape[0]
        x2 = x.reshape(tokens, channels).contiguous()
        base_rows, view_rows = base_rows.contiguous(), view_rows.contiguous()
        base_ids = base_ids.reshape(tokens).to(torch.int64).contiguous()
        view_ids = view_ids.reshape(num_views, tokens).to(torch.int64).contiguous()
        out = torch.empty_like(x2)
        block_c = channel_block(channels, cap=32)
        if tokens:
            _ensemble_fwd_kernel[(triton.cdiv(tokens, _BLOCK_T),)](
                x2, base_rows, base_ids, view_rows, view_ids, out, tokens, channels, num_views, coef, _EPS,
                BLOCK_T=_BLOCK_T, BLOCK_C=block_c, BLOCK_M=triton.next_power_of_2(num_views))
        ctx.save_for_backward(base_rows, base_ids, view_rows, view_ids)
        ctx.coef = coef
        ctx.set_materialize_grads(False)
        return out.view(batch, length, channels)

    @staticmethod
    def backward(ctx, grad_out):
        base_rows, base_ids, view_rows, view_ids = ctx.saved_tensors
        needs = ctx.needs_input_grad
        if grad_out is None:
            return (None,) * 6
        dx = grad_out if needs[0] else None
        dbase = dviews = None
        if needs[1] or needs[3]:
            num_views, tokens = view_ids.shape
            channels = base_rows.shape[1]
            grad = grad_out.reshape(tokens, channels).contiguous()
            block_c, block_m = channel_block(channels, cap=32), triton.next_power_of_2(num_views)
            f32 = dict(dtype=torch.float32, device=grad.device)
            w, a, kf = (torch.empty(num_views, tokens, **f32) for _ in range(3))
            kb = torch.empty(tokens, **f32)
            coef = ctx.coef
            _ensemble_coef_kernel[(triton.cdiv(tokens, _BLOCK_T),)](
                grad, base_rows, base_ids, view_rows, view_ids, w, a, kf, kb, tokens, channels, num_views, coef,
                _EPS, BLOCK_T=_BLOCK_T, BLOCK_C=block_c, BLOCK_M=block_m)
            if needs[3]:
                rows = view_rows.shape[0]
                perm, offsets = group_by_key(view_ids, rows)
                dviews = torch.empty_like(view_rows)
                _view_rows_grad_kernel[(rows, triton.cdiv(channels, block_c))](
                    grad, base_rows, base_ids, view_rows, perm, offsets, w, a, kf, dviews, tokens, channels, coef,
                    BLOCK_R=_BLOCK_R, BLOCK_C=block_c)
            if needs[1]:
                rows = base_rows.shape[0]
                perm, offsets = group_by_key(base_ids, rows)
                dbase = torch.empty_like(base_rows)
                _base_rows_grad_kernel[(rows, triton.cdiv(channels, block_c))](
                    base_rows, view_rows, view_ids, perm, offsets, a, kb, dbase, tokens, channels, num_views,
                    BLOCK_R=_BLOCK_R, BLOCK_C=block_c, BLOCK_M=block_m)
        return dx, dbase, None, dviews, None, None


def ensemble_propagate(x: torch.Tensor, base_rows: torch.Tensor, base_ids: torch.Tensor, view_rows: torch.Tensor,
                       view_ids: torch.Tensor, coef: float) -> torch.Tensor:
    """``x + c · Σ_j w_ij F_ij`` with Eq. 3's cosine weights → ``[B, N, C]`` of ``x``'s dtype.

    Same contract as :func:`any2point_fast.reference.ensemble_propagate`.
    """
    for name, tensor in (("x", x), ("base_rows", base_rows), ("view_rows", view_rows)):
        check_float(name, tensor)
    if x.dim() != 3 or base_ids.shape != x.shape[:2] or view_ids.shape[1:] != x.shape[:2]:
        raise ValueError(f"x must be [B, N, C], base_ids [B, N] and view_ids [M, B, N]; got {tuple(x.shape)}, "
                         f"{tuple(base_ids.shape)}, {tuple(view_ids.shape)}")
    if base_rows.shape[1:] != x.shape[2:] or view_rows.shape[1:] != x.shape[2:]:
        raise ValueError(f"rows must have {x.shape[2]} channels, got {tuple(base_rows.shape)} and "
                         f"{tuple(view_rows.shape)}")
    check_ids(("base_ids", base_ids, base_rows.shape[0]), ("view_ids", view_ids, view_rows.shape[0]))
    return EnsemblePropagateFunction.apply(x, base_rows, base_ids, view_rows, view_ids, float(coef))

