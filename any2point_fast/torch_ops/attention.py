"""``neighborhood_attention_pool``: bucket-local attention and pooling of every view, fused.

For view ``j`` and bucket ``s`` the op computes ``t_j = x + Attn_j(LN_j(x))`` with attention
among the tokens of ``s`` only, then pools ``t_j`` over ``s``. It returns only the pooled
``[S, C]`` rows. The algorithm, shared with the Triton kernels:

1. **LayerNorm folded into the projection.** ``LN_j(x) = x̂ ⊙ γ_j + β_j`` with ``x̂`` the
   view-independent normalised tokens, so ``qkv_j = x̂ (W_j ⊙ γ_j)ᵀ + (W_j β_j + b_j)``: one
   matmul ``[B·N, C] × [C, M·3D]`` gives the ``q, k, v`` of all views (``D = 12`` channels).
2. **Attention on sorted items.** Items (token, view) in the order of
   :class:`~any2point_fast.geometry.Segments` make every bucket a contiguous run. Singletons
   copy ``v``. On the CPU, where the compiled kernels of :mod:`.native` build, every other
   bucket goes to one of them (no padding: short buckets of one length a SIMD vector of buckets
   at a time, longer ones a bucket per thread). Elsewhere buckets are
   batched by length: lengths ≤ ``EXPLICIT_MAX_LEN`` run an explicit softmax on exact lengths;
   longer ones are exact up to ``EXACT_MAX_LEN``, then padded to ``CLASSES_PER_OCTAVE`` length
   classes per octave with a key mask (a bounded number of batches, under 1/32 padding), and go
   to PyTorch's fused CPU flash attention — or, off the CPU, to an explicit softmax over tiles of
   at most ``TILE_ELEMENTS`` logits. Memory is ``O(items · D)`` plus one tile or one bucket's
   keys: no ``N × N`` tensor, however long a bucket.
3. **Pooling without token features.** The mean is linear:
   ``mean_s(t_j) = mean_s(x) + mean_s(Attn) W_oᵀ + b_o``, so it needs only one sparse
   ``[S, B·N]`` product with ``x`` (all views at once) and the ``D``-wide attention outputs; so
   is the maximum of a singleton bucket (its token). The maximum of the other buckets needs
   ``t_j`` itself: it is formed one view at a time for their tokens only (at most
   ``[B·N, C]``, grouped by bucket length) and reduced per bucket, never for all views at once.
4. **Backward recomputes, or scatters from argmaxes.** Saved are ``x`` (as a contiguous float
   copy only where it is not one already), ``x̂`` with its LayerNorm statistics (``[B·N, C]``,
   shared by the views), the ``D``-wide ``qkv`` and attention outputs, the log-sum-exps of the
   buckets not attended by the explicit softmax and, per view, ``[S_j, C]`` rows (not token
   features): where a view's buckets are long (``ARGMAX_MIN_LENGTH``), the item holding every
   maximum, so that backward scatters the maximum's gradient straight to it; elsewhere, or where
   some maximum is attained twice, the maxima themselves, and ``t_j`` is recomputed one view at a
   time and compared with them. Tied tokens share the maximum's gradient equally, as in the
   reference.

On the CPU, where the compiled kernels of :mod:`.native` build, ``max + mean`` pools in one
kernel: it forms every item's features a block of channels at a time in registers and writes
every pooled row (``max_s + mean_s`` of ``t_j − b_o``, plus ``2 b_o``: no sparse product),
keeping per channel the bucket-local index of the item holding each maximum of the buckets of
two or more tokens (``[K, C]``). Under either pooling, backward is one more kernel over all the
views: each pooled row's gradient is read once for the tokens', the attention outputs' (each
maximum's straight to its item) and ``[W_o | b_o]``'s gradients. Both visit the segments cloud by
cloud, so that a cloud's token rows stay in cache across its views. A view where some maximum is
attained twice recomputes its maxima on the PyTorch route above, for backward. Another kernel
there gives ``x̂`` in one pass over the tokens, and one more adds their gradient through it.

The route (compiled kernels, flash, or tiles; the tile size; when argmaxes are saved) is the
explicit argument ``route`` (:class:`Route`); :mod:`any2point_fast.registry` offers each route as
an implementation of the op, and the tests run every one of them.

The integer bookkeeping (the plan of step 2, the compiled kernels' segment views and cloud
order, the sparse pooling matrices) depends on the segments only: it is derived once per
:class:`Segments` object (:meth:`Segments.derived`) and reused by every block of the model that
pools over them. (The PyTorch route's per-view lists of the maxima's items are built per call.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..geometry import Segments
from . import native
from ._common import (
    compute_dtype,
    count_ones,
    csr,
    csr_mm,
    csr_offsets,
    exclusive_cumsum,
    grad_as,
    linear_pool_weights,
    max_gradient_shares,
    segment_max,
    without_autocast,
)

#: Without the compiled kernels, buckets up to this length use an explicit softmax on exact
#: lengths, laid out with the buckets innermost (``[L, L, H, n]``) so that every step is
#: elementwise over the batch (cheaper than the flash kernel or batched ``L × L`` matmuls at
#: these lengths).
EXPLICIT_MAX_LEN = 8
#: Buckets up to this length are batched with others of exactly the same length (no padding).
EXACT_MAX_LEN = 64
#: Longer buckets are padded to one of this many length classes per octave (a power of two;
#: 32 keeps the padding under 1/32).
CLASSES_PER_OCTAVE = 32

#: Elements of one ``[buckets, heads, queries, keys]`` logits tile where attention is explicit
#: (off the CPU flash kernel): long buckets are processed in chunks of queries (and buckets).
TILE_ELEMENTS = 1 << 18

#: Views whose buckets of two or more tokens average at least this many items (length-class
#: padding included) save the item of every pooled maximum: backward then scatters from
#: ``[S_j, C]`` rows instead of recomputing and comparing the ``[T_j, C]`` features. Finding the
#: items costs forward a few passes over the features, and the scatter handles ``[S_j, C, D]``
#: products: both pay off only once buckets are this long.
ARGMAX_MIN_LENGTH = 48
#: Such views find their maxima per length class ``[n, L, C]``, a few ops per class; their classes
#: are exact up to this length, then this many per octave (a power of two; padding under 1/4).
ARGMAX_CLASSES = 4

#: PyTorch's fused CPU flash attention (forward and backward, key masks, float32/float64).
FLASH_ON_CPU = hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")


@dataclass(frozen=True)
class Route:
    """How the op attends and pools the buckets: the explicit arguments of its routes.

    Attributes:
        compiled: every bucket of two or more tokens (and ``max + mean`` pooling, LayerNorm) by the
            compiled CPU kernels of :mod:`.native`; otherwise PyTorch ops, buckets batched by length.
        flash: without ``compiled``, buckets longer than ``EXPLICIT_MAX_LEN`` go to PyTorch's CPU
            flash kernel (CPU tensors, :data:`FLASH_ON_CPU`); otherwise an explicit softmax over tiles.
        tile_elements: logits per tile of that explicit softmax (and of the short buckets' chunks).
        argmax_min_length: views whose buckets average this many items save the item of every
            maximum for backward (otherwise backward recomputes and compares the features).
    """

    compiled: bool
    flash: bool
    tile_elements: int = TILE_ELEMENTS
    argmax_min_length: int = ARGMAX_MIN_LENGTH

    @classmethod
    def default(cls, device: torch.device) -> Route:
        """The fastest route on ``device``: compiled where the kernels run, else flash on the CPU, else tiles."""
        compiled = native.available(device)
        return cls(compiled=compiled, flash=not compiled and FLASH_ON_CPU and device.type == "cpu")

    def check(self, device: torch.device) -> None:
        """Refuse a route that cannot run tensors on ``device``."""
        native.resolve(self.compiled, device)
        if self.flash and not (FLASH_ON_CPU and device.type == "cpu"):
            raise RuntimeError(f"PyTorch's CPU flash attention does not run tensors on {device}")


@dataclass
class _Batch:
    """Buckets of one length class, attended together as ``[S_c, H, L, d]``.

    Attributes:
        length: ``L``, the padded length of the class.
        positions: ``[S_c·L]`` sorted positions of the items; padding repeats a bucket's first item.
        keep: ``[K]`` indices into ``positions`` of the real items, ``None`` without padding.
        valid: ``[S_c, L]`` bool, real items, ``None`` without padding.
    """

    length: int
    positions: torch.Tensor
    keep: torch.Tensor | None
    valid: torch.Tensor | None

    @property
    def num_buckets(self) -> int:
        return self.positions.numel() // self.length

    def key_mask(self, dtype: torch.dtype) -> torch.Tensor | None:
        """``[S_c, 1, 1, L]`` additive mask hiding the padded keys."""
        if self.valid is None:
            return None
        mask = torch.zeros(self.valid.shape, dtype=dtype, device=self.valid.device)
        return mask.masked_fill_(~self.valid, float("-inf"))[:, None, None, :]


@dataclass
class _Plan:
    """Integer bookkeeping of one ``Segments``, derived once for it (every block reuses it) and kept
    for backward.

    Attributes:
        tokens: ``[T]`` token (``b·N + i``) of every sorted item, ``T = M·B·N``.
        rows: ``[T]`` row ``token·M + view`` of every sorted item in the ``[B·N·M, 3D]`` qkv rows.
        segment_of_position: ``[T]`` segment of every sorted item.
        counts: ``[S]`` items per segment; ``starts``: ``[S]`` first sorted position.
        batches: the length classes.
        native: ``(starts, lengths)`` ``[S_n]`` of the buckets of two or more tokens, which the
            compiled kernel attends (:mod:`.native`); ``None`` off the compiled route, and those
            buckets are in ``batches``.
        route: the route the plan was made for.
    """

    tokens: torch.Tensor
    rows: torch.Tensor
    segment_of_position: torch.Tensor
    counts: torch.Tensor
    starts: torch.Tensor
    batches: list[_Batch]
    native: tuple[torch.Tensor, torch.Tensor] | None
    route: Route


def _padded_lengths(counts: torch.Tensor, exact_max: int = EXACT_MAX_LEN,
                    per_octave: int = CLASSES_PER_OCTAVE) -> torch.Tensor:
    """Length class of every bucket: exact up to ``exact_max``, then ``per_octave`` (a power of two) per octave."""
    _, exponent = torch.frexp((counts - 1).clamp_min(1).double())  # 2^(e-1) ≤ count − 1 < 2^e
    shift = (exponent - per_octave.bit_length()).clamp_min(0)
    step = torch.pow(2.0, shift.double()).long()
    padded = torch.div(counts + step - 1, step, rounding_mode="floor") * step
    return torch.where(counts > exact_max, padded, counts)


def _plan(segments: Segments, tokens_per_view: int, route: Route) -> _Plan:
    perm, offsets = segments.perm, segments.offsets
    views = segments.num_views
    counts = offsets[1:] - offsets[:-1]
    starts = offsets[:-1]
    tokens = perm % tokens_per_view
    rows = tokens * views + torch.div(perm, tokens_per_view, rounding_mode="floor")
    segment_of_position = torch.repeat_interleave(torch.arange(len(counts), device=perm.device), counts)
    batched, native_buckets = counts, None
    if route.compiled:
        long = counts > 1
        native_buckets = starts[long], counts[long]
        batched = counts.masked_fill(long, 0)  # length 0: in no batch
    padded = _padded_lengths(batched)
    order = torch.argsort(padded, stable=True)
    lengths, sizes = torch.unique_consecutive(padded[order], return_counts=True)
    batches, first = [], 0
    for length, size in zip(lengths.tolist(), sizes.tolist()):
        chosen = order[first:first + size]
        first += size
        if length == 0:
            continue
        steps = torch.arange(length, device=perm.device)
        count = counts[chosen][:, None]
        if length <= EXACT_MAX_LEN or bool((count == length).all()):
            batches.append(_Batch(length, (starts[chosen][:, None] + steps).flatten(), None, None))
            continue
        valid = steps < count
        positions = (starts[chosen][:, None] + torch.where(valid, steps, 0)).flatten()
        batches.append(_Batch(length, positions, valid.flatten().nonzero().squeeze(1), valid))
    return _Plan(tokens, rows, segment_of_position, counts, starts, batches, native_buckets, route)


def _derived(segments: Segments, name: str, tokens_per_view: int, route: Route, build):
    """``build()`` once per ``segments`` (every block of a model shares them), keyed by what the
    plan depends on: the grouping of the buckets and the route."""
    return segments.derived((name, tokens_per_view, route), build)


def _short_chunks(n: int, length: int, width: int, tile_elements: int):
    """Slices of ``n`` buckets whose ``[L, L, d, H, n]`` products stay under ``tile_elements``."""
    step = max(1, tile_elements // (length * length * width))
    return [slice(first, first + step) for first in range(0, n, step)]


def _buckets_last(block: torch.Tensor) -> torch.Tensor:
    """``[n, L, 3, H, d]`` qkv as ``[3, L, d, H, n]``: with the buckets innermost, every step of the
    short-bucket attention is elementwise over long contiguous rows (the head dims are tiny)."""
    return block.permute(2, 1, 4, 3, 0).contiguous()


def _head_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``Σ_e a[..., e, :, :] b[..., e, :, :]`` over the head-dim axis (third from last), broadcast;
    a few fused multiply-adds for small head dims."""
    if a.shape[-3] > 4:
        return (a * b).sum(dim=-3)
    out = a[..., 0, :, :] * b[..., 0, :, :]
    for e in range(1, a.shape[-3]):
        out.addcmul_(a[..., e, :, :], b[..., e, :, :])
    return out


def _short_probs(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """Softmax probabilities ``[L_q, L_k, H, n]`` of short buckets; ``q, k``: ``[L, d, H, n]``."""
    s = _head_dot(q[:, None], k[None]).mul_(scale)
    s = s.sub_(s.amax(dim=1, keepdim=True)).exp_()
    return s.div_(s.sum(dim=1, keepdim=True))


def _short_attention(block: torch.Tensor, scale: float, tile_elements: int) -> torch.Tensor:
    """Outputs ``[n, L, H, d]`` of short buckets from their ``[n, L, 3, H, d]`` qkv."""
    out = block.new_empty(block[:, :, 0].shape)
    for chunk in _short_chunks(block.shape[0], block.shape[1], block[0, 0, 0].numel(), tile_elements):
        q, k, v = _buckets_last(block[chunk])
        p = _short_probs(q, k, scale)
        out[chunk] = (p[:, :, None] * v[None]).sum(dim=1).permute(3, 0, 2, 1)
    return out


def _short_attention_backward(do: torch.Tensor, block: torch.Tensor, scale: float,
                              tile_elements: int) -> torch.Tensor:
    """Gradient ``[n, L, 3, H, d]`` of the qkv of short buckets from that of their outputs ``[n, L, H, d]``."""
    grad = torch.empty_like(block)
    for chunk in _short_chunks(block.shape[0], block.shape[1], block[0, 0, 0].numel(), tile_elements):
        q, k, v = _buckets_last(block[chunk])  # [L, d, H, n] each
        d_out = do[chunk].permute(1, 3, 2, 0).contiguous()
        p = _short_probs(q, k, scale)  # [L_q, L_k, H, n]
        grad_v = (p[:, :, None] * d_out[:, None]).sum(dim=0)
        dp = _head_dot(d_out[:, None], v[None])
        ds = dp.sub_((p * dp).sum(dim=1, keepdim=True)).mul_(p).mul_(scale)
        grad_q = (ds[:, :, None] * k[None]).sum(dim=1)
        grad_k = (ds[:, :, None] * q[:, None]).sum(dim=0)
        grad[chunk] = torch.stack((grad_q, grad_k, grad_v)).permute(4, 1, 0, 3, 2)
    return grad


def _tiles(q: torch.Tensor, tile_elements: int):
    """``(buckets, queries)`` slices covering ``[n, H, L, d]`` with logits tiles of ≤ ``tile_elements``."""
    n, heads, length, _ = q.shape
    row = heads * length  # one query of one bucket against all its keys
    buckets = max(1, min(n, tile_elements // (row * length)))
    queries = length if buckets > 1 else max(1, min(length, tile_elements // row))
    for first in range(0, n, buckets):
        for start in range(0, length, queries):
            yield slice(first, first + buckets), slice(start, start + queries)


def _logits(q, k, mask, scale, tile):
    b, r = tile
    s = torch.matmul(q[b, :, r], k[b].transpose(-1, -2)).mul_(scale)
    return s if mask is None else s.add_(mask[b])


def _attend(q, k, v, mask, scale, route: Route) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention ``[n, H, L, d]`` with an additive key mask: outputs and log-sum-exps."""
    if route.flash:
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, attn_mask=mask, scale=scale)
    out, lse = q.new_empty(q.shape), q.new_empty(q.shape[:-1])
    for tile in _tiles(q, route.tile_elements):
        s = _logits(q, k, mask, scale, tile)
        tile_lse = torch.logsumexp(s, dim=-1, keepdim=True)
        out[tile[0], :, tile[1]] = torch.matmul(s.sub_(tile_lse).exp_(), v[tile[0]])
        lse[tile[0], :, tile[1]] = tile_lse.squeeze(-1)
    return out, lse


def _attend_backward(do, q, k, v, out, lse, mask, scale,
                     route: Route) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of ``q, k, v`` of :func:`_attend`, the probabilities recomputed tile by tile."""
    if route.flash:
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            do, q, k, v, out, lse, 0.0, False, attn_mask=mask, scale=scale)
    dq, dk, dv = torch.empty_like(q), torch.zeros_like(k), torch.zeros_like(v)
    delta = (do * out).sum(dim=-1, keepdim=True)
    for b, r in _tiles(q, route.tile_elements):
        p = _logits(q, k, mask, scale, (b, r)).sub_(lse[b, :, r, None]).exp_()
        dv[b] += torch.matmul(p.transpose(-1, -2), do[b, :, r])
        ds = torch.matmul(do[b, :, r], v[b].transpose(-1, -2)).sub_(delta[b, :, r]).mul_(p).mul_(scale)
        dq[b, :, r] = torch.matmul(ds, k[b])
        dk[b] += torch.matmul(ds.transpose(-1, -2), q[b, :, r])
    return dq, dk, dv


def _attention_forward(qkv_rows: torch.Tensor, plan: _Plan, num_heads: int) -> tuple[torch.Tensor, list]:
    """Attention inside every bucket: ``[T, D]`` outputs in sorted order and the flash log-sum-exps."""
    width = qkv_rows.shape[1] // 3
    head_dim = width // num_heads
    scale = head_dim**-0.5
    out = qkv_rows.new_empty(len(plan.rows), width)
    lse = []
    for batch in plan.batches:
        n, length = batch.num_buckets, batch.length
        block = qkv_rows.index_select(0, plan.rows.index_select(0, batch.positions))
        lse.append(None)
        if length == 1:
            outputs = block[:, 2 * width:]
        elif length <= EXPLICIT_MAX_LEN:
            outputs = _short_attention(block.view(n, length, 3, num_heads, head_dim), scale,
                                       plan.route.tile_elements).view(n * length, width)
        else:
            q, k, v = block.view(n, length, 3, num_heads, head_dim).permute(2, 0, 3, 1, 4)
            o, lse[-1] = _attend(q, k, v, batch.key_mask(q.dtype), scale, plan.route)
            outputs = o.transpose(1, 2).reshape(n * length, width)
        if batch.keep is None:
            out.index_copy_(0, batch.positions, outputs)
        else:
            out.index_copy_(0, batch.positions.index_select(0, batch.keep), outputs.index_select(0, batch.keep))
    if plan.native is not None:  # last entry of lse: [T, H], written at the compiled buckets' items
        lse.append(qkv_rows.new_empty(len(plan.rows), num_heads))
        native.ops().bucket_attention(qkv_rows, plan.rows, *plan.native, num_heads, scale, out, lse[-1])
    return out, lse


def _attention_backward(grad_out: torch.Tensor, qkv_rows: torch.Tensor, out: torch.Tensor, lse: list,
                        plan: _Plan, num_heads: int) -> torch.Tensor:
    """Gradient of the ``[B·N·M, 3D]`` qkv rows from that of the sorted outputs ``[T, D]``."""
    width = qkv_rows.shape[1] // 3
    head_dim = width // num_heads
    scale = head_dim**-0.5
    grad_rows = torch.empty_like(qkv_rows)  # every row is one item's: all written below
    for batch, batch_lse in zip(plan.batches, lse):
        n, length = batch.num_buckets, batch.length
        rows = plan.rows.index_select(0, batch.positions)
        g_out = grad_out.index_select(0, batch.positions)
        if length == 1:
            grad_block = torch.zeros(n, 3 * width, dtype=qkv_rows.dtype, device=qkv_rows.device)
            grad_block[:, 2 * width:] = g_out
        elif length <= EXPLICIT_MAX_LEN:
            block = qkv_rows.index_select(0, rows).view(n, length, 3, num_heads, head_dim)
            do = g_out.view(n, length, num_heads, head_dim)
            grad_block = _short_attention_backward(do, block, scale, plan.route.tile_elements).view(n * length,
                                                                                                    3 * width)
        else:
            if batch.valid is not None:
                g_out = g_out.mul_(batch.valid.view(-1, 1))
            q, k, v = qkv_rows.index_select(0, rows).view(n, length, 3, num_heads, head_dim).permute(2, 0, 3, 1, 4)
            do = g_out.view(n, length, num_heads, head_dim).transpose(1, 2)
            o = out.index_select(0, batch.positions).view(n, length, num_heads, head_dim).transpose(1, 2)
            dq, dk, dv = _attend_backward(do.contiguous(), q, k, v, o, batch_lse, batch.key_mask(q.dtype), scale,
                                          plan.route)
            grad_block = torch.stack((dq, dk, dv), dim=2).permute(0, 3, 2, 1, 4).reshape(n * length, 3 * width)
        if batch.keep is None:
            grad_rows.index_copy_(0, rows, grad_block)
        else:
            grad_rows.index_copy_(0, rows.index_select(0, batch.keep), grad_block.index_select(0, batch.keep))
    if plan.native is not None:
        native.ops().bucket_attention_backward(grad_out.contiguous(), qkv_rows, out, lse[-1], plan.rows, *plan.native,
                                               num_heads, scale, grad_rows)
    return grad_rows


def _normalized(xf: torch.Tensor, eps: float, compiled: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LayerNorm without its affine part: ``x̂`` ``[R, C]``, and the mean and rstd ``[R, 1]`` of every row."""
    if compiled:
        return native.ops().layer_norm_rows(xf, eps)
    return torch.native_layer_norm(xf, [xf.shape[1]], None, None, eps)


def _normalized_backward(grad_xhat: torch.Tensor, xf: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
                         grad_x: torch.Tensor, compiled: bool) -> None:
    """Add the gradient of ``x`` through :func:`_normalized`'s ``x̂`` to ``grad_x`` ``[R, C]``."""
    if compiled:
        native.ops().layer_norm_rows_backward(grad_xhat, xf, mean, rstd, grad_x)
    else:
        grad_x += torch.ops.aten.native_layer_norm_backward(grad_xhat, xf, [xf.shape[1]], mean, rstd, None, None,
                                                            [True, False, False])[0]


def _folded_projection(ln_weight, ln_bias, qkv_weight, qkv_bias, dtype):
    """``W_j ⊙ γ_j`` as ``[M·3D, C]`` and ``W_j β_j + b_j`` as ``[M·3D]``."""
    w = qkv_weight.to(dtype)
    folded_weight = w * ln_weight.to(dtype)[:, None, :]
    folded_bias = torch.matmul(w, ln_bias.to(dtype)[:, :, None]).squeeze(-1) + qkv_bias.to(dtype)
    return folded_weight.flatten(0, 1), folded_bias.flatten()


@dataclass
class _MaxItems:
    """The items of one view's buckets of two or more tokens (singletons need no maximum).

    Attributes:
        positions: ``[T_j]`` sorted positions of the items, bucket after bucket, the buckets
            ordered by length class (:data:`ARGMAX_CLASSES` where ``saves_argmax``, exact
            otherwise); padding repeats a bucket's first item.
        local: ``[T_j]`` bucket of every item, numbered ``0..S_j − 1`` in that order.
        segments: ``[S_j]`` global segment of every such bucket.
        classes: ``(length, buckets)`` of every class, in order.
        padding: ``[P]`` rows of ``positions`` that are padding, ``None`` without padding.
        saves_argmax: the view's buckets are long (:attr:`Route.argmax_min_length`).
    """

    positions: torch.Tensor
    local: torch.Tensor
    segments: torch.Tensor
    classes: list[tuple[int, int]]
    padding: torch.Tensor | None
    saves_argmax: bool


def _max_items(plan: _Plan, segments: Segments) -> list[_MaxItems]:
    result = []
    for first, last in zip(segments.view_offsets[:-1], segments.view_offsets[1:]):
        counts = plan.counts[first:last]
        chosen = (counts > 1).nonzero().squeeze(1)
        lengths = counts.index_select(0, chosen)
        # (item ranks are found in t's float dtype: exact below 2^24, padding of under 1/4 included)
        saves_argmax = plan.route.argmax_min_length * max(1, len(chosen)) <= int(lengths.sum()) < 2**23
        if saves_argmax:
            lengths = _padded_lengths(lengths, ARGMAX_CLASSES, ARGMAX_CLASSES)
        order = torch.argsort(lengths, stable=True)
        chosen, lengths = chosen.index_select(0, order), lengths.index_select(0, order)
        classes, sizes = torch.unique_consecutive(lengths, return_counts=True)
        local = torch.repeat_interleave(torch.arange(len(chosen), device=chosen.device), lengths)
        step = torch.arange(len(local), device=local.device) - exclusive_cumsum(lengths).index_select(0, local)
        valid = step < counts.index_select(0, chosen).index_select(0, local)
        positions = plan.starts.index_select(0, chosen + first).index_select(0, local) + torch.where(valid, step, 0)
        padding = None if bool(valid.all()) else (~valid).nonzero().squeeze(1)
        result.append(_MaxItems(positions, local, chosen + first, list(zip(classes.tolist(), sizes.tolist())),
                                padding, saves_argmax))
    return result


@dataclass
class _CompiledMax:
    """The maxima of the buckets of two or more tokens, found by the compiled kernel (:mod:`.native`).

    Attributes:
        argmax: ``[K, C]`` bucket-local index of the item holding every maximum (in the compute dtype),
            the buckets in segment order.
        tied: the views where some maximum is attained twice: their pooled rows are the kernel's, but
            their maxima go backward on the PyTorch route (recomputed in forward for it).
    """

    argmax: torch.Tensor
    tied: set[int]


def _spread_matrix(segments: Segments, weights: torch.Tensor, tokens: int) -> torch.Tensor:
    """Sparse CSR ``[B·N, S]``: a token's row holds ``weights`` at its ``M`` segments (the transpose
    of the linear pooling)."""
    views = segments.num_views
    segment_ids = segments.segment_ids.reshape(views, -1).T.flatten()  # M per token, token after token
    token_views = torch.full((tokens,), views, dtype=torch.long, device=weights.device)
    return csr(token_views, segment_ids, weights.index_select(0, segment_ids), len(weights))


def _max_views(plan: _Plan, segments: Segments) -> torch.Tensor:
    """``[K]`` view of every bucket of two or more tokens, in segment order."""
    chosen = (plan.counts > 1).nonzero().squeeze(1)
    return torch.bucketize(chosen, torch.tensor(segments.view_offsets[1:-1], device=chosen.device), right=True)


def _segment_views(segments: Segments) -> torch.Tensor:
    """``[S]`` view of every segment."""
    counts = torch.tensor(segments.view_offsets, device=segments.perm.device).diff()
    return torch.repeat_interleave(torch.arange(len(counts), device=counts.device), counts)


def _cloud_order(plan: _Plan, tokens_per_cloud: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[S]`` the segments ordered by the cloud of their tokens (stable: view after view within a
    cloud), the order the compiled kernels visit them in: a cloud's token rows are then read from
    memory once for all its views; and the offsets into it that cut it into
    :data:`~.native.POOL_BACKWARD_RUNS` runs of whole clouds. A segment never spans two clouds
    (:func:`~any2point_fast.torch_ops.bucket_sort` groups by view, cloud and bucket)."""
    first = plan.tokens[plan.starts.clamp_max(max(len(plan.tokens) - 1, 0))]  # (an empty segment's: any)
    clouds = torch.div(first, tokens_per_cloud, rounding_mode="floor")
    order = torch.argsort(clouds, stable=True)
    num_clouds = int(clouds.max()) + 1 if len(clouds) else 0
    cloud_offsets = csr_offsets(torch.bincount(clouds, minlength=num_clouds))
    cuts = torch.linspace(0, num_clouds, min(native.POOL_BACKWARD_RUNS, max(num_clouds, 1)) + 1).round().long()
    return order, cloud_offsets[cuts]


def _compiled_pool(xf: torch.Tensor, out: torch.Tensor, wo: torch.Tensor, bo: torch.Tensor, plan: _Plan,
                   segments: Segments, tokens_per_cloud: int, bias_factor: float) -> tuple[torch.Tensor, _CompiledMax]:
    """Every pooled row ``[S, C]`` under ``max + mean`` by the compiled kernel, and the item holding
    every maximum of the buckets of two or more tokens."""
    views = _derived(segments, "segment views", len(xf), plan.route, lambda: _segment_views(segments))
    visit, _ = _derived(segments, f"cloud order {tokens_per_cloud}", len(xf), plan.route,
                        lambda: _cloud_order(plan, tokens_per_cloud))
    pooled, argmax, tied = native.ops().bucket_pool(xf, out, wo.transpose(1, 2).contiguous(), bo.contiguous(),
                                                    plan.tokens, plan.starts, plan.counts, views, bias_factor, visit)
    max_views = _derived(segments, "max views", len(xf), plan.route, lambda: _max_views(plan, segments))
    return pooled, _CompiledMax(argmax, set(max_views[tied].tolist()))


def _scratch(max_items: list[_MaxItems], like: torch.Tensor, count: int) -> list[torch.Tensor]:
    """``count`` buffers of the largest view's ``[T_j, C]``, reused by every view: on the CPU, a
    fresh allocation of this size per view costs more in page faults than its fill."""
    rows = max((len(items.positions) for items in max_items), default=0)
    return [like.new_empty(rows, like.shape[1]) for _ in range(count)]


def _max_features(xf: torch.Tensor, out: torch.Tensor, plan: _Plan, items: _MaxItems,
                  out_weight: torch.Tensor, buffer: torch.Tensor) -> torch.Tensor:
    """``t_j − b_o = x + Attn_j W_oᵀ`` of one view's ``items``, ``[T_j, C]`` in ``buffer``; −inf on padding."""
    t = torch.index_select(xf, 0, plan.tokens.index_select(0, items.positions), out=buffer[:len(items.positions)])
    t.addmm_(out.index_select(0, items.positions), out_weight.T)
    return t if items.padding is None else t.index_fill_(0, items.padding, float("-inf"))


def _maxima_and_items(t: torch.Tensor, items: _MaxItems,
                      buffer: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-bucket maxima ``[S_j, C]`` of ``t`` and the row of ``t`` holding each, ``None`` for the
    rows if some maximum is attained twice; ``buffer`` (``t``'s size at least) holds the masks.

    Bucket by bucket ``[n, L, C]`` per length class: ``amax``, then the 0/1 mask of the maxima
    (its count tells a tie) times the item's rank, maximised again. Both are plain reductions,
    several times faster on the CPU than ``max`` with indices.
    """
    maxima = t.new_empty(len(items.segments), t.shape[1])
    rows = torch.empty(maxima.shape, dtype=torch.long, device=t.device)
    row = bucket = 0
    tied = False
    for length, count in items.classes:
        block = t[row:row + count * length].view(count, length, -1)
        top = torch.amax(block, dim=1, out=maxima[bucket:bucket + count])
        at_max = torch.eq(block, top[:, None], out=buffer[row:row + count * length].view_as(block))
        tied = tied or count_ones(at_max) != top.numel()
        rank = torch.arange(row, row + count * length, dtype=t.dtype, device=t.device).view(count, length, 1)
        rows[bucket:bucket + count] = at_max.mul_(rank).amax(dim=1)
        row, bucket = row + count * length, bucket + count
    return maxima, None if tied else rows


def _scatter_max_grad(g_max: torch.Tensor, positions: torch.Tensor, plan: _Plan, out: torch.Tensor,
                      out_weight: torch.Tensor, grad_x: torch.Tensor, grad_out: torch.Tensor,
                      grad_out_weight: torch.Tensor) -> None:
    """Accumulate the gradient ``g_max`` ``[S_j, C]`` of one view's maxima through
    ``t_j = x + Attn_j W_oᵀ + b_o`` at the sorted ``positions`` ``[S_j, C]`` of the items holding them."""
    grad_x.scatter_add_(0, plan.tokens[positions], g_max)
    flat = positions.flatten()
    grad_out.index_add_(0, flat, (g_max[:, :, None] * out_weight).flatten(0, 1))
    grad_out_weight += (g_max[:, :, None] * out.index_select(0, flat).view(*g_max.shape, -1)).sum(dim=0)


class _NeighborhoodAttentionPool(torch.autograd.Function):
    @staticmethod
    @without_autocast
    def forward(ctx, x, ln_weight, ln_bias, qkv_weight, qkv_bias, out_weight, out_bias, segments, num_heads,
                pooling, eps, route):
        dtype = compute_dtype(x, ln_weight, qkv_weight, out_weight)
        batch, tokens, channels = x.shape
        xf = x.reshape(batch * tokens, channels).to(dtype).contiguous()
        plan = _derived(segments, "plan", batch * tokens, route, lambda: _plan(segments, batch * tokens, route))
        xhat, mean, rstd = _normalized(xf, eps, route.compiled)
        folded_weight, folded_bias = _folded_projection(ln_weight, ln_bias, qkv_weight, qkv_bias, dtype)
        qkv = torch.addmm(folded_bias, xhat, folded_weight.T)  # [B·N, M·3D], row-major = [B·N·M, 3D]
        out, lse = _attention_forward(qkv.view(-1, qkv_weight.shape[1]), plan, num_heads)

        # linear part (the mean, and the maximum of singletons): sums of x and of the D-wide outputs
        wo, bo = out_weight.to(dtype), out_bias.to(dtype)
        weights = linear_pool_weights(plan.counts, pooling, dtype)
        linear_out = torch.segment_reduce(out, "sum", lengths=plan.counts, axis=0, unsafe=True).mul_(weights[:, None])
        bias_factor = 2.0 if pooling == "max+mean" else 1.0  # b_o's, twice under max + mean
        fused, compiled = route.compiled, None
        if pooling == "max+mean" and fused:  # every pooled row in one pass over its items
            pooled, compiled = _compiled_pool(xf, out, wo, bo, plan, segments, tokens, bias_factor)
        # b_o as one more column: [S, D + 1] (backward's [W_o | b_o] gradient from the same rows)
        linear_out = torch.cat((linear_out, linear_out.new_full((len(linear_out), 1), bias_factor)), dim=1)
        if compiled is None:
            pool_matrix = _derived(segments, f"pool {pooling} {dtype} {xf.device}", len(xf), plan.route, lambda: csr(
                plan.counts, plan.tokens, weights.index_select(0, plan.segment_of_position), len(xf)))
            pooled = csr_mm(pool_matrix, xf)
            out_weight_bias = torch.cat((wo, bo[:, :, None]), dim=2)  # [M, C, D + 1]
            for view, (first, last) in enumerate(zip(segments.view_offsets[:-1], segments.view_offsets[1:])):
                pooled[first:last].addmm_(linear_out[first:last], out_weight_bias[view].T)
        # maximum of the buckets of two or more tokens: by the compiled kernel (a view with a tie
        # also recomputes them below, for backward), or one view at a time
        max_items = _max_items(plan, segments) if pooling == "max+mean" and (compiled is None or compiled.tied) else []
        # per view, for backward, [S_j, C] (far smaller than the [T_j, C] features): the maxima, or
        # the rows of the items that hold them
        maxima, argmax_rows = [], []
        features, masks = _scratch(max_items, xf, 2)
        for view, items in enumerate(max_items):
            top = rows = None
            if len(items.segments) and (compiled is None or view in compiled.tied):
                t = _max_features(xf, out, plan, items, wo[view], features)
                if items.saves_argmax:
                    top, rows = _maxima_and_items(t, items, masks)
                else:
                    top = segment_max(t, items.local, len(items.segments))
                if compiled is None:
                    pooled.index_add_(0, items.segments, top)
            maxima.append(top if rows is None else None)
            argmax_rows.append(rows)
        del features, masks
        ctx.save_for_backward(xf, ln_weight, ln_bias, qkv_weight, qkv_bias, out_weight, out_bias, xhat, mean, rstd,
                              qkv, out, linear_out)
        ctx.plan, ctx.max_items, ctx.lse, ctx.segments = plan, max_items, lse, segments
        ctx.maxima, ctx.argmax_rows, ctx.compiled, ctx.fused = maxima, argmax_rows, compiled, fused
        ctx.num_heads, ctx.pooling, ctx.x_dtype, ctx.x_shape = num_heads, pooling, x.dtype, x.shape
        return pooled.to(x.dtype)

    @staticmethod
    @without_autocast
    def backward(ctx, grad):
        (xf, ln_weight, ln_bias, qkv_weight, qkv_bias, out_weight, out_bias, xhat, mean, rstd, qkv, out,
         linear_out) = ctx.saved_tensors
        plan, segments, pooling = ctx.plan, ctx.segments, ctx.pooling
        dtype = qkv.dtype
        channels = xf.shape[1]
        views, width = qkv_weight.shape[0], qkv_weight.shape[1] // 3
        g = grad.to(dtype)
        wo = out_weight.to(dtype)

        # linear part: pooled = Σ w·x + (Σ w·out) W_oᵀ + b_o (twice b_o under max + mean); [W_o | b_o]'s
        # gradient is g ⊗ linear_out (its last column: b_o's factor)
        weights = linear_pool_weights(plan.counts, pooling, dtype)
        if ctx.fused:  # the compiled kernel: each row of g read once, for every gradient, cloud by cloud
            g = g.contiguous()
            tokens_per_cloud = ctx.x_shape[1]
            visit, runs = _derived(segments, f"cloud order {tokens_per_cloud}", len(xf), plan.route,
                                   lambda: _cloud_order(plan, tokens_per_cloud))
            segment_views = _derived(segments, "segment views", len(xf), plan.route, lambda: _segment_views(segments))
            compiled = ctx.compiled
            has_max = torch.tensor([compiled is not None and view not in compiled.tied for view in range(views)])
            argmax = compiled.argmax if compiled is not None else g.new_empty(0, channels)
            # (every token has an item in view 0, which writes its row of grad_x: no zero fill)
            grad_x, grad_out = torch.empty_like(xf), torch.empty_like(out)
            grad_out_weight_bias = native.ops().bucket_pool_backward(
                g, weights, linear_out, argmax, has_max, out, wo.contiguous(), wo.transpose(1, 2).contiguous(),
                plan.tokens, plan.starts, plan.counts, segment_views, visit, runs, grad_x, grad_out)
        else:
            grad_out_weight_bias = torch.empty(views, channels, width + 1, dtype=dtype, device=g.device)
            offsets = segments.view_offsets
            grad_linear_out = torch.empty(len(linear_out), width, dtype=dtype, device=g.device)
            for view, (first, last) in enumerate(zip(offsets[:-1], offsets[1:])):
                g_view = g[first:last]
                torch.mm(g_view.T, linear_out[first:last], out=grad_out_weight_bias[view])
                torch.mm(g_view, wo[view], out=grad_linear_out[first:last])
            grad_x = csr_mm(_derived(segments, f"spread {pooling} {dtype} {g.device}", len(xf), plan.route,
                                     lambda: _spread_matrix(segments, weights, len(xf))), g)
            grad_out = grad_linear_out.mul_(weights[:, None]).index_select(0, plan.segment_of_position)
        grad_out_weight, grad_out_bias = grad_out_weight_bias[..., :width], grad_out_weight_bias[..., width]

        # maximum (where the compiled kernel did not take it): scattered to the saved items holding it,
        # or (t_j recomputed, compared with the saved maxima) shared equally among tied tokens
        recomputed = [items for items, top in zip(ctx.max_items, ctx.maxima) if top is not None]
        features, masks = _scratch(recomputed, xf, 2)
        for view, (items, top, rows) in enumerate(zip(ctx.max_items, ctx.maxima, ctx.argmax_rows)):
            if rows is not None:
                _scatter_max_grad(g.index_select(0, items.segments), items.positions[rows], plan, out, wo[view],
                                  grad_x, grad_out, grad_out_weight[view])
                continue
            if top is None:
                continue
            t = _max_features(xf, out, plan, items, wo[view], features)
            at_max = torch.index_select(top, 0, items.local, out=masks[:len(t)]).eq_(t)
            share = max_gradient_shares(g.index_select(0, items.segments), at_max, items.local, out=t)  # t is done
            grad_x.index_add_(0, plan.tokens.index_select(0, items.positions), share)
            grad_out.index_add_(0, items.positions, torch.mm(share, wo[view]))
            grad_out_weight[view].addmm_(share.T, out.index_select(0, items.positions))
        del features, masks

        # attention, then the folded LayerNorm + qkv projection
        grad_qkv = _attention_backward(grad_out, qkv.view(-1, 3 * width), out, ctx.lse, plan, ctx.num_heads)
        grad_qkv = grad_qkv.view(xf.shape[0], -1)
        folded_weight, _ = _folded_projection(ln_weight, ln_bias, qkv_weight, qkv_bias, dtype)
        grad_folded_bias = grad_qkv.sum(dim=0).view(views, 3 * width)
        # (x̂ᵀ ∂qkv, transposed after: MKL is faster so than ∂qkvᵀ x̂)
        grad_folded_weight = torch.mm(xhat.T, grad_qkv).T.reshape(views, 3 * width, channels)
        w = qkv_weight.to(dtype)
        grad_qkv_weight = grad_folded_weight * ln_weight.to(dtype)[:, None, :]
        grad_qkv_weight += grad_folded_bias[:, :, None] * ln_bias.to(dtype)[:, None, :]
        grad_ln_weight = (grad_folded_weight * w).sum(dim=1)
        grad_ln_bias = torch.matmul(grad_folded_bias[:, None, :], w).squeeze(1)
        grad_xhat = torch.mm(grad_qkv, folded_weight)
        _normalized_backward(grad_xhat, xf, mean, rstd, grad_x, plan.route.compiled)
        needs = ctx.needs_input_grad
        return (grad_x.view(*ctx.x_shape).to(ctx.x_dtype) if needs[0] else None,
                grad_as(grad_ln_weight, ln_weight, needs[1]), grad_as(grad_ln_bias, ln_bias, needs[2]),
                grad_as(grad_qkv_weight, qkv_weight, needs[3]), grad_as(grad_folded_bias, qkv_bias, needs[4]),
                grad_as(grad_out_weight, out_weight, needs[5]), grad_as(grad_out_bias, out_bias, needs[6]),
                None, None, None, None, None)


def neighborhood_attention_pool(x: torch.Tensor, segments: Segments, ln_weight: torch.Tensor,
                                ln_bias: torch.Tensor, qkv_weight: torch.Tensor, qkv_bias: torch.Tensor,
                                out_weight: torch.Tensor, out_bias: torch.Tensor, num_heads: int,
                                pooling: str, eps: float = 1e-5, *, route: Route | None = None) -> torch.Tensor:
    """1D/2D-guided local aggregation: per view, bucket-local attention then bucket pooling.

    ``t_j = x + Attn_j(LN_j(x))`` among the tokens of each bucket of view ``j``, pooled per
    bucket; the same values as :func:`any2point_fast.reference.neighborhood_attention_pool`,
    computed without any ``N × N`` or ``[M, B·N, C]`` tensor (see the module docstring).

    Args:
        x: ``[B, N, C]`` tokens.
        segments: the ``M`` views' buckets (``segments.segment_ids`` is ``[M, B, N]``), as
            :func:`~any2point_fast.torch_ops.bucket_sort` makes them: every segment a non-empty
            group of one view, cloud and bucket (the compiled kernels rely on it).
        ln_weight, ln_bias: ``[M, C]``; qkv_weight ``[M, 3D, C]``; qkv_bias ``[M, 3D]``;
        out_weight ``[M, C, D]``; out_bias ``[M, C]``; ``D = num_heads · head_dim``.
        pooling: ``"mean"`` or ``"max+mean"``.
        route: how the buckets are attended and pooled (:class:`Route`); ``None``: :meth:`Route.default`.

    Returns:
        ``[S, C]`` pooled rows of every segment, of ``x``'s dtype.
    """
    if pooling not in ("mean", "max+mean"):
        raise ValueError(f"pooling must be 'mean' or 'max+mean', got {pooling!r}")
    if qkv_weight.shape[1] % (3 * num_heads):
        raise ValueError(f"qkv_weight rows {qkv_weight.shape[1]} are not 3 × num_heads ({num_heads}) × head_dim")
    if route is None:
        route = Route.default(x.device)
    else:
        route.check(x.device)
    return _NeighborhoodAttentionPool.apply(x, ln_weight, ln_bias, qkv_weight, qkv_bias, out_weight, out_bias,
                                            segments, num_heads, pooling, eps, route)


__all__ = ["ARGMAX_MIN_LENGTH", "CLASSES_PER_OCTAVE", "EXACT_MAX_LEN", "EXPLICIT_MAX_LEN", "FLASH_ON_CPU", "Route",
           "TILE_ELEMENTS", "neighborhood_attention_pool"]
