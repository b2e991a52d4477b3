"""``ensemble_propagate``: Eq. 3's adaptive ensemble and residual, gathered per token, fused.

The ``M·B·N`` cosines need the dot products ``B_i · F_ij`` of a token's baseline row with its
view rows: one sampled matrix product (SDDMM) of the two row tables, evaluated only at the
``(view row, baseline row)`` pair of every item, with no row gathered. The weighted sum
``Σ_j w_ij F_ij`` is one ``embedding_bag`` over the ``M`` rows of every token. Only the
``[M, B·N]`` dot products and the rows' norms (``[S]``, ``[Sv]``) are kept for backward.

Backward, with ``g`` the output gradient: the weight gradients need ``g_i · F_ij``, the same
sampled product against ``g``; the table gradients are sums over the items of every row with
per-item coefficients, i.e. products of a sparse CSR matrix (a row per table row, an entry per
item) with ``g`` or a table: ``∂F_s = Σ_{(i,j)→s} (c·w_ij g_i + ∂dot_ij B_i) + ∂‖F_s‖ F_s/‖F_s‖``
and ``∂B_v = Σ_{i→v} Σ_j ∂dot_ij F_ij + ∂‖B_v‖ B_v/‖B_v‖`` (on the CPU several times faster than
``embedding_bag`` with per-sample weights). No ``[M, B·N, C]`` tensor is formed.

On CPU tensors, where the compiled kernels of :mod:`.native` build, the same products are each
one pass over the rows they read: ``ensemble_forward`` for the whole forward, token by token (its
``M`` dots, their weights, and the weighted sum and residual over the same rows, still in
cache), ``row_dots`` for backward's dot products, ``segment_rows`` for the table gradients (the
rows of a table visited cloud by cloud, so the rows they read stay in cache). The weights'
gradients (``[M, B·N]``) are computed the same way on both routes. The integer bookkeeping (sort
orders, counts, offsets) is derived once per ``view_ids`` tensor, which every block passes again.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import native
from ._common import compute_dtype, csr, csr_mm, csr_offsets, derived_from, grad_as, without_autocast

#: ``eps`` of :func:`any2point_fast.reference.ensemble_weights`, for both clamps.
EPS = 1e-8


def _sampled_dots(rows: torch.Tensor, view_ids: torch.Tensor, other: torch.Tensor,
                  other_ids: torch.Tensor | None = None) -> torch.Tensor:
    """``[M, B·N]`` dot products ``rows[view_ids[j, i]] · other[other_ids[i]]`` (``other[i]``
    without ids): one SDDMM, evaluated once per distinct pair of rows (the CSR pattern of
    ``sampled_addmm`` must not repeat a pair)."""
    columns = torch.arange(view_ids.shape[1], device=rows.device) if other_ids is None else other_ids
    pairs, inverse = torch.unique(view_ids * other.shape[0] + columns, return_inverse=True)
    counts = torch.bincount(torch.div(pairs, other.shape[0], rounding_mode="floor"), minlength=rows.shape[0])
    pattern = csr(counts, pairs % other.shape[0], rows.new_zeros(len(pairs)), other.shape[0])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta", category=UserWarning)
        values = torch.sparse.sampled_addmm(pattern, rows, other.T, beta=0.0).values()
    return values[inverse]


def _weights(dots: torch.Tensor, base_norm: torch.Tensor, view_norm: torch.Tensor):
    """Eq. 3's normalised weights and the intermediates backward needs (reference arithmetic)."""
    denominator_raw = base_norm * view_norm
    denominator = denominator_raw.clamp_min(EPS)
    cos = dots / denominator
    unnormalised = (cos + 1) / 2
    total_raw = unnormalised.sum(dim=0)
    total = total_raw.clamp_min(EPS)
    return unnormalised / total, cos, denominator, denominator_raw >= EPS, total, total_raw >= EPS


def _inverse_or_zero(norm: torch.Tensor) -> torch.Tensor:
    return torch.where(norm > 0, 1 / norm, torch.zeros_like(norm))


@dataclass
class _IndexPlan:
    """The integer bookkeeping of one pair of id tensors (every block of a model passes the same).

    Attributes:
        vid: ``[M, B·N]`` view row of every item; ``bid``: ``[B·N]`` baseline row of every token.
        order: ``[M·B·N]`` items sorted by view row (stable); ``token``: their tokens;
            ``counts``: ``[S]`` items per view row; ``offsets``: ``[S + 1]``.
        cloud_order: ``[S]`` view rows in the order of the cloud of their first token (the compiled
            route visits them so); ``base_of_item``: ``[M·B·N]`` baseline row of every sorted item.
        base_order: ``[B·N]`` tokens sorted by baseline row; ``base_offsets``: ``[Sv + 1]`` of their
            ``M`` items each; ``base_items``: ``[M·B·N]`` view row of those items, token by token.
    """

    vid: torch.Tensor
    bid: torch.Tensor
    order: torch.Tensor
    token: torch.Tensor
    counts: torch.Tensor
    offsets: torch.Tensor
    cloud_order: torch.Tensor
    base_of_item: torch.Tensor
    base_order: torch.Tensor
    base_offsets: torch.Tensor
    base_items: torch.Tensor


def _index_plan(view_ids: torch.Tensor, base_ids: torch.Tensor, num_view_rows: int, num_base_rows: int,
                tokens_per_cloud: int) -> _IndexPlan:
    views = view_ids.shape[0]
    # copies, never views: the cache (see derived_from) must not keep view_ids alive
    vid = view_ids.reshape(views, -1).to(torch.long, memory_format=torch.contiguous_format, copy=True)
    bid = base_ids.reshape(-1).to(torch.long, memory_format=torch.contiguous_format, copy=True)
    order = torch.argsort(vid.flatten(), stable=True)
    token = order % vid.shape[1]
    counts = torch.bincount(vid.flatten(), minlength=num_view_rows)
    offsets = csr_offsets(counts)
    first_token = token[offsets[:-1].clamp_max(max(len(token) - 1, 0))]
    clouds = torch.div(first_token, tokens_per_cloud, rounding_mode="floor")
    base_order = torch.argsort(bid, stable=True)
    base_counts = torch.bincount(bid, minlength=num_base_rows) * views
    return _IndexPlan(vid, bid, order, token, counts, offsets, torch.argsort(clouds, stable=True), bid[token],
                      base_order, csr_offsets(base_counts), vid[:, base_order].T.flatten())


class _EnsemblePropagate(torch.autograd.Function):
    @staticmethod
    @without_autocast
    def forward(ctx, x, base_rows, base_ids, view_rows, view_ids, coef, compiled):
        dtype = compute_dtype(x, base_rows, view_rows)
        batch, tokens, channels = x.shape
        rows_f, rows_b = view_rows.to(dtype).contiguous(), base_rows.to(dtype).contiguous()
        plan = derived_from(view_ids, ("ensemble", len(rows_f), len(rows_b), tokens), lambda: _index_plan(
            view_ids, base_ids, len(rows_f), len(rows_b), tokens), base_ids)
        vid, bid = plan.vid, plan.bid
        norms_f, norms_b = rows_f.norm(dim=1), rows_b.norm(dim=1)
        x_rows = x.reshape(batch * tokens, channels).to(dtype)
        if compiled:  # token by token: dots, weights and weighted sum over the same rows, read once
            y, dots = native.ops().ensemble_forward(x_rows.contiguous(), rows_f, vid, rows_b, bid, norms_f, norms_b,
                                                    coef, EPS)
        else:
            dots = _sampled_dots(rows_f, vid, rows_b, bid)
            w = _weights(dots, norms_b.index_select(0, bid), norms_f[vid])[0]
            out = F.embedding_bag(vid.T.contiguous(), rows_f, per_sample_weights=w.T.contiguous(), mode="sum")
            y = torch.add(x_rows, out, alpha=coef)
        ctx.save_for_backward(base_rows, view_rows, dots, norms_f, norms_b)
        ctx.coef, ctx.compiled, ctx.plan = coef, compiled, plan
        return y.view(batch, tokens, channels).to(x.dtype)

    @staticmethod
    @without_autocast
    def backward(ctx, grad):
        base_rows, view_rows, dots, norms_f, norms_b = ctx.saved_tensors
        plan = ctx.plan
        vid, bid = plan.vid, plan.bid
        needs = ctx.needs_input_grad
        if not (needs[1] or needs[3]):
            return grad if needs[0] else None, None, None, None, None, None, None
        coef, dtype, compiled = ctx.coef, dots.dtype, ctx.compiled
        rows_f, rows_b = view_rows.to(dtype).contiguous(), base_rows.to(dtype).contiguous()
        base_norm, view_norm = norms_b.index_select(0, bid), norms_f[vid]
        w, cos, denominator, den_passes, total, total_passes = _weights(dots, base_norm, view_norm)
        g = grad.reshape(vid.shape[1], -1).to(dtype).contiguous()

        grad_w = (native.ops().row_dots(rows_f, vid, g) if compiled else _sampled_dots(rows_f, vid, g)).mul_(coef)
        grad_u = (grad_w - total_passes * (grad_w * w).sum(dim=0)) / total
        grad_cos = grad_u / 2
        grad_dot = grad_cos / denominator
        grad_den = -grad_cos * cos / denominator * den_passes
        grad_base_norm = (grad_den * view_norm).sum(dim=0)  # [B·N]
        grad_view_norm = grad_den * base_norm  # [M, B·N]

        grad_f = grad_b = None
        if needs[3]:  # rows: view rows, an entry per item
            norm_grad = torch.zeros_like(norms_f).index_add_(0, vid.flatten(), grad_view_norm.flatten())
            scale = norm_grad * _inverse_or_zero(norms_f)
            on_g, on_base = (w * coef).flatten()[plan.order], grad_dot.flatten()[plan.order]
            if compiled:  # rows visited cloud by cloud: the g and baseline rows they read stay in cache
                grad_f = native.ops().segment_rows(plan.offsets, plan.cloud_order, on_g, plan.token, g, on_base,
                                                   plan.base_of_item, rows_b, scale, rows_f)
            else:
                grad_f = csr_mm(csr(plan.counts, plan.token, on_g, vid.shape[1]), g)
                grad_f.addmm_(csr(plan.counts, plan.base_of_item, on_base, rows_b.shape[0]), rows_b)
                grad_f.addcmul_(scale[:, None], rows_f)
        if needs[1]:  # rows: baseline rows, an entry per item of each of their tokens
            norm_grad = torch.zeros_like(norms_b).index_add_(0, bid, grad_base_norm)
            scale = norm_grad * _inverse_or_zero(norms_b)
            on_rows = grad_dot[:, plan.base_order].T.flatten()
            if compiled:
                grad_b = native.ops().segment_rows(plan.base_offsets, None, None, None, None, on_rows, plan.base_items,
                                                   rows_f, scale, rows_b)
            else:
                counts = plan.base_offsets.diff()
                grad_b = csr_mm(csr(counts, plan.base_items, on_rows, rows_f.shape[0]), rows_f)
                grad_b.addcmul_(scale[:, None], rows_b)
        return (grad if needs[0] else None, grad_as(grad_b, base_rows, needs[1]), None,
                grad_as(grad_f, view_rows, needs[3]), None, None, None)


def ensemble_propagate(x: torch.Tensor, base_rows: torch.Tensor, base_ids: torch.Tensor, view_rows: torch.Tensor,
                       view_ids: torch.Tensor, coef: float, *, compiled: bool | None = None) -> torch.Tensor:
    """Adaptive any-to-3D ensemble and residual: ``x + c · Σ_j w_ij F_ij``.

    ``w_ij = (cos(B_i, F_ij) + 1)/2`` normalised over ``j`` (Eq. 3), as
    :func:`any2point_fast.reference.ensemble_weights`, computed without any ``[M, B·N, C]``
    tensor (see the module docstring).

    Args:
        x: ``[B, N, C]`` residual stream of the point tokens.
        base_rows: ``[Sv, C]`` pooled 3D baseline rows; ``base_ids``: ``[B, N]`` row of each token.
        view_rows: ``[S, C]`` pooled view rows; ``view_ids``: ``[M, B, N]`` row of each token per view.
        coef: ``c``.
        compiled: the row products by the compiled CPU kernels (:mod:`.native`), or (``False``) by
            PyTorch's sparse products; ``None``: compiled wherever the kernels run.

    Returns:
        ``[B, N, C]`` of ``x``'s dtype.
    """
    return _EnsemblePropagate.apply(x, base_rows, base_ids, view_rows, view_ids, coef,
                                    native.resolve(compiled, x.device))
