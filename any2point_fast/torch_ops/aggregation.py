"""``neighborhood_aggregate``: a tokenizer stage's gather, position code, residual bottleneck MLP
with its BatchNorms over all neighbours, and max over the ``k`` neighbours, chunk by chunk.

The reference materialises the ``R = B·S·k`` rows ``x = cat(f_n, f_c) + PE(o)`` ``[R, 2C]`` and
every MLP activation of that size. Here only ``[R, H]`` tensors (``H = 2C / bottleneck``) and
per-centre ``[B·S, 2C]`` ones exist for the whole batch; the ``[R, 2C]`` ones live a chunk of
centres at a time (:func:`chunk_centres`), in passes:

forward
  1. ``h = W1 x = W1a f_n + W1b f_c + W1 PE(o)``: the feature parts per point before the gather,
     the position code's per chunk; ``h`` ``[R, H]`` is kept (for backward too);
  2. BN1's statistics over ``h``; BN2's from those of ``a = relu(BN1(h))``: ``mean(y) = W2 ā`` and
     ``var(y) = diag(W2 Cov(a) W2ᵀ)``, the covariance ``[H, H]`` merged chunk by chunk (no ``y``);
  3. per chunk ``v = relu(x + BN2(W2 a))`` and its maximum over the ``k``, keeping the argmax and
     the normalised ``ŷ`` there (``[B·S, 2C]``).

backward
  Only the rows holding a maximum receive the output's gradient, so ``dv`` (``= du``, BN2's output
  gradient) is sparse: BN2's sums ``Σ du`` and ``Σ du·ŷ`` come from the saved ``[B·S, 2C]``, and
  ``dy = s·du + c0 − q·W2 a`` (``s, q, c0`` per channel) gives
  ``da = W2ᵀ(s·du) + W2ᵀc0 − (W2ᵀ diag(q) W2) a`` and ``dW2 = diag(s) Σ du aᵀ + c0 (Σ a)ᵀ − diag(q) W2 Σ a aᵀ``
  (the last two from forward's ``[H]``, ``[H, H]`` moments; the sparse ``du`` terms as a gather of
  ``a`` and a scatter into ``da`` at the argmax rows): one pass over the chunks for ``da``,
  ``dz = da·[a > 0]`` and BN1's sums, then ``dh`` over ``[R, H]``, and a last pass for the
  position code's share of ``dW1`` (and the offsets' gradient when they need one). The feature
  parts of ``dW1`` and ``dfeat`` go through per-point sums of ``dh``.

Compiled (:mod:`.native`, CPU): every pass over the rows runs in C++, a tile of
:func:`tile_centres` centres at a time in cache, with the same algebra: forward's passes 1 (with
BN1's float64 moments) and 3 and the moments of ``a``; backward's ``da`` pass and the last one
(``dh``, its per-point sums, the position code's share of ``dW1``, the offsets' gradient). The
``[H]``, ``[B·S, 2C]`` and ``[H, H]`` steps stay in PyTorch. In float32 its position code takes
its own vectorised sine and cosine (within an ulp or so of ATen's; the angles are the reference's
to the bit), in float64 ATen's float32 ones, as the reference.

Inputs may be float16/bfloat16 (computed in float32, returned in their dtype), float32 or float64.
"""

from __future__ import annotations

import math

import torch

from . import native
from ._common import compute_dtype, without_autocast

#: Bytes of a chunk's ``[rows, 2C]`` float32 tensor: few enough chunks that the per-op overhead
#: (thread hand-offs on a busy machine above all) stays small beside the gemms.
_CHUNK_BYTES = 16 << 20


#: Bytes of a compiled tile's ``[rows, 2C]`` float32 buffer: the tile's rows stay in cache.
_TILE_BYTES = 256 << 10


def chunk_centres(k: int, channels: int) -> int:
    """Centres per chunk: ``k`` rows each, ``channels`` float32 columns within :data:`_CHUNK_BYTES`."""
    return max(1, _CHUNK_BYTES // (4 * channels * k))


def tile_centres(k: int, channels: int) -> int:
    """Centres per tile of the compiled route: ``k`` rows each, ``channels`` float32 columns within
    :data:`_TILE_BYTES`."""
    return max(1, _TILE_BYTES // (4 * channels * k))


def _divisors(dim: int, alpha: float, device: torch.device) -> torch.Tensor:
    """The float32 divisors ``alpha^(i/f)`` ``[f]`` of the position code's ``f = ceil(dim / 6)`` frequencies."""
    freqs = math.ceil(dim / 6)
    return alpha ** (torch.arange(freqs, device=device, dtype=torch.float32) / freqs)


def _angles(offsets: torch.Tensor, dim: int, alpha: float, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The float32 angles ``[..., 3, f]`` of the position code of ``[..., 3]`` offsets, and ``[f]`` their
    slopes ``beta / alpha^(i/f)``."""
    # the angles in float32 as (beta·x) / alpha^(i/f) whatever the dtype, the reference's to the bit,
    # so that near-ties in the max over neighbours fall the same way
    divisors = _divisors(dim, alpha, offsets.device)
    return beta * offsets.float().unsqueeze(-1) / divisors, beta / divisors


def position_code(offsets: torch.Tensor, dim: int, alpha: float, beta: float) -> torch.Tensor:
    """Point-PN's code of ``[..., 3]`` offsets → ``[..., dim]`` of their dtype: axis ``a`` and frequency
    ``i`` of ``f = ceil(dim / 6)`` give ``sin(beta · x_a / alpha^(i/f))`` and ``cos(...)`` (axis-major,
    then frequency, then sin/cos), cut to ``dim``."""
    angle, _ = _angles(offsets, dim, alpha, beta)
    code = angle.new_empty(*angle.shape, 2)
    torch.sin(angle, out=code[..., 0])
    torch.cos(angle, out=code[..., 1])
    return code.flatten(-3)[..., :dim].to(offsets.dtype)


def _position_code_backward(grad: torch.Tensor, offsets: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """The gradient ``[..., 3]`` of ``offsets`` from that of their :func:`position_code` ``[..., dim]``."""
    dim = grad.shape[-1]
    angle, slopes = _angles(offsets, dim, alpha, beta)
    full = grad.new_zeros(*grad.shape[:-1], 6 * angle.shape[-1], dtype=torch.float32)
    full[..., :dim] = grad
    full = full.view(angle.shape + (2,))
    d_angle = full[..., 0] * angle.cos() - full[..., 1] * angle.sin()
    return (d_angle * slopes).sum(dim=-1).to(offsets.dtype)


def gradient_dtypes(feat, offsets, weight1, norm1_weight, norm1_bias, weight2, norm2_weight,
                    norm2_bias) -> tuple[torch.dtype | None, ...]:
    """The dtypes of the op's first 12 inputs' gradients (``None``: an input without one), for
    :func:`input_gradients`."""
    return (feat.dtype, offsets.dtype, None, None, weight1.dtype, norm1_weight.dtype, norm1_bias.dtype, None, None,
            weight2.dtype, norm2_weight.dtype, norm2_bias.dtype)


def input_gradients(ctx, grad_feat, grad_off, grad_w1, grad_weight1, grad_bias1, grad_w2, grad_weight2,
                    grad_bias2) -> tuple[torch.Tensor | None, ...]:
    """An autograd Function's ``backward`` result: the gradients of the op's first 12 inputs in their
    dtypes (``ctx.dtypes`` from :func:`gradient_dtypes`, ``ctx.shapes`` those of ``feat`` and
    ``offsets``), ``None`` where not needed, then ``None`` for every further input."""
    grads = (grad_feat.view(ctx.shapes[0]), None if grad_off is None else grad_off.view(ctx.shapes[1]),
             None, None, grad_w1, grad_weight1, grad_bias1, None, None, grad_w2, grad_weight2, grad_bias2)
    needs = ctx.needs_input_grad
    return (*(g.to(dtype) if g is not None and need and dtype is not None else None
              for g, need, dtype in zip(grads, needs, ctx.dtypes)),
            *([None] * (len(needs) - len(grads))))


def _slices(count: int, step: int):
    return [slice(first, min(first + step, count)) for first in range(0, count, step)]


def _moments(h: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
             chunks: list[slice]) -> tuple[torch.Tensor, torch.Tensor]:
    """``Σ a`` ``[H]`` and ``Σ (a − ā)(a − ā)ᵀ`` ``[H, H]`` of ``a = relu(h·scale + shift)`` over every
    row of ``h`` ``[B·S, k, H]``, chunk by chunk (Chan's pairwise merge of centred moments), in
    float64: BN2's variance ``diag(W2 Cov W2ᵀ)`` cancels where ``W2`` rows meet a flat direction of
    ``a``, and float32 moments then lose the digits a direct variance of ``y`` keeps."""
    hidden = h.shape[2]
    total = h.new_zeros(hidden, dtype=torch.float64)
    spread, count = h.new_zeros(hidden, hidden, dtype=torch.float64), 0
    for part in chunks:
        a = torch.relu_(torch.addcmul(shift, h[part], scale)).view(-1, hidden).double()
        size, part_sum = a.shape[0], a.sum(dim=0)
        centred = a - part_sum / size
        spread.addmm_(centred.T, centred)
        if count:
            delta = part_sum / size - total / count
            spread.add_(torch.outer(delta, delta), alpha=count * size / (count + size))
        total += part_sum
        count += size
    return total, spread


def _hidden_grad(h, scale1, shift1, mean1, arg, du, w2s, cross, da_shift, chunks):
    """The plain route of backward's ``da`` pass, chunk by chunk: ``dz = [a > 0]·da`` ``[B·S, k, H]``,
    ``Σ du aᵀ`` ``[2C, H]``, ``Σ dz`` and ``Σ dz·(h − mean1)`` ``[H]`` (``cross``: ``None`` in evaluation)."""
    hidden, dim = h.shape[2], du.shape[1]
    du_a = h.new_zeros(dim, hidden)  # Σ du aᵀ
    dz = torch.empty_like(h)
    grad_bias1, grad_weight1 = h.new_zeros(hidden), h.new_zeros(hidden)
    for part in chunks:
        a = torch.relu_(torch.addcmul(shift1, h[part], scale1))  # [c, k, H]
        # the rows at the maxima: per centre and channel, the row of its argmax
        at_max = arg[part].unsqueeze(-1).expand(-1, -1, hidden)  # [c, 2C, H]
        du_part = du[part].unsqueeze(-1)
        du_a += (torch.gather(a, 1, at_max) * du_part).sum(dim=0)
        da = torch.matmul(a, cross).neg_().add_(da_shift) if cross is not None else da_shift.expand_as(a).clone()
        da.scatter_add_(1, at_max, du_part * w2s)
        dz_part = dz[part]
        torch.mul(da, a > 0, out=dz_part)
        grad_bias1 += dz_part.sum(dim=(0, 1))
        grad_weight1 += (dz_part * (h[part] - mean1)).sum(dim=(0, 1))
    return dz, du_a, grad_bias1, grad_weight1


def normalisation(weight: torch.Tensor, bias: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, eps: float,
                  dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A BatchNorm as ``x·scale + shift``: ``rstd``, ``scale``, ``shift`` (each like ``mean``, in ``dtype``)."""
    rstd = torch.rsqrt(var + eps)
    scale = weight.to(dtype) * rstd
    return rstd, scale, bias.to(dtype) - mean * scale


def output_statistics(weight2: torch.Tensor, a_sum: torch.Tensor, a_spread: torch.Tensor, rows: int,
                      dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """BN2's batch mean and biased variance ``[2C]`` of ``y = W2 a`` from the float64 moments of ``a``
    (:func:`_moments`): ``W2 ā`` and ``diag(W2 Cov(a) W2ᵀ)``, in ``dtype``."""
    wide = weight2.double()
    mean = (wide @ (a_sum / rows)).to(dtype)
    return mean, ((wide @ a_spread) * wide).sum(dim=1).div_(rows).clamp_min_(0).to(dtype)


class _Aggregate(torch.autograd.Function):
    @staticmethod
    @without_autocast
    def forward(ctx, feat, offsets, centre_index, neighbour_index, weight1, norm1_weight, norm1_bias, norm1_mean,
                norm1_var, weight2, norm2_weight, norm2_bias, norm2_mean, norm2_var, training, eps, alpha, beta,
                chunk, compiled):
        dtype = compute_dtype(feat, offsets, weight1, weight2)
        batch, points, channels = feat.shape
        samples, k = neighbour_index.shape[1:]
        dim, hidden, centres = 2 * channels, weight1.shape[0], batch * samples
        rows = centres * k
        f = feat.to(dtype).reshape(batch * points, channels).contiguous()
        off = offsets.to(dtype).reshape(centres, k, 3).contiguous()
        w1, w2 = weight1.to(dtype).contiguous(), weight2.to(dtype).contiguous()
        first = torch.arange(batch, device=feat.device) * points
        nbr = (neighbour_index + first[:, None, None]).reshape(centres, k)
        ctr = (centre_index + first[:, None]).reshape(centres)
        chunks = _slices(centres, chunk)  # the plain route's (the compiled one's tiles are `chunk` centres)
        divisors = _divisors(dim, alpha, feat.device)

        # 1. h = W1a f_n + W1b f_c + W1 PE, the feature parts per point
        fa, fb = f @ w1[:, :channels].T, f @ w1[:, channels:].T  # [B·P, H]
        if compiled:
            h, mean1, var1 = native.ops().aggregate_hidden(fa, fb, off, nbr, ctr, w1, divisors, beta, chunk)
        else:
            h = torch.empty(centres, k, hidden, dtype=dtype, device=feat.device)
            for part in chunks:
                torch.matmul(position_code(off[part], dim, alpha, beta), w1.T, out=h[part])
                h[part] += fa[nbr[part]]
                h[part] += fb[ctr[part]].unsqueeze(1)

        # 2. the statistics of BN1 (over h) and of BN2 (from the moments of a = relu(BN1(h)))
        if training and compiled:  # float64 moments of the tiles, from the pass above
            mean1, var1 = mean1.to(dtype), var1.to(dtype)
        elif training:
            var1, mean1 = torch.var_mean(h.view(rows, hidden), dim=0, correction=0)
        else:
            mean1, var1 = norm1_mean.to(dtype), norm1_var.to(dtype)
        rstd1, scale1, shift1 = normalisation(norm1_weight, norm1_bias, mean1, var1, eps, dtype)
        if training:
            if compiled:
                a_sum, a_spread = native.ops().aggregate_moments(h, scale1, shift1, chunk, native.AGGREGATE_RUNS)
            else:
                a_sum, a_spread = _moments(h, scale1, shift1, chunks)
            mean2, var2 = output_statistics(w2, a_sum, a_spread, rows, dtype)
            a_sum, a_spread = a_sum.to(dtype), a_spread.to(dtype)
        else:
            a_sum = a_spread = None
            mean2, var2 = norm2_mean.to(dtype), norm2_var.to(dtype)
        rstd2, scale2, shift2 = normalisation(norm2_weight, norm2_bias, mean2, var2, eps, dtype)

        # 3. v = relu(x + BN2(W2 a)) and its maximum over the k; the argmax and ŷ there
        if compiled:
            out, arg, yhat = native.ops().aggregate_max(h, scale1, shift1, w2, scale2, shift2, f, off, nbr, ctr,
                                                        divisors, beta, chunk)
        else:
            out = torch.empty(centres, dim, dtype=dtype, device=feat.device)
            arg = torch.empty(centres, dim, dtype=torch.int64, device=feat.device)
            yhat = torch.empty(centres, 1, dim, dtype=dtype, device=feat.device)
            for part in chunks:
                y = torch.matmul(torch.relu_(torch.addcmul(shift1, h[part], scale1)), w2.T)  # [c, k, 2C]
                v = torch.addcmul(shift2, y, scale2)
                v += position_code(off[part], dim, alpha, beta)
                v[..., :channels] += f[nbr[part]]
                v[..., channels:] += f[ctr[part]].unsqueeze(1)
                torch.max(v.relu_(), dim=1, out=(out[part], arg[part]))
                torch.gather(y, 1, arg[part].unsqueeze(1), out=yhat[part])
        yhat = yhat.view(centres, dim).sub_(mean2).mul_(rstd2)

        ctx.save_for_backward(f, off, nbr, ctr, w1, w2, h, mean1, rstd1, scale1, shift1, mean2, rstd2, scale2, a_sum,
                              a_spread, out, arg, yhat)
        ctx.config, ctx.shapes = (training, alpha, beta, chunk, compiled), (feat.shape, offsets.shape)
        ctx.dtypes = gradient_dtypes(feat, offsets, weight1, norm1_weight, norm1_bias, weight2, norm2_weight,
                                     norm2_bias)
        ctx.mark_non_differentiable(mean1, var1, mean2, var2)
        return out.view(batch, samples, dim).to(feat.dtype), mean1, var1, mean2, var2

    @staticmethod
    @without_autocast
    def backward(ctx, grad, *_):
        (f, off, nbr, ctr, w1, w2, h, mean1, rstd1, scale1, shift1, mean2, rstd2, scale2, a_sum, a_spread,
         out, arg, yhat) = ctx.saved_tensors
        training, alpha, beta, chunk, compiled = ctx.config
        centres, dim = out.shape
        k, hidden = nbr.shape[1], h.shape[2]
        channels, rows = dim // 2, centres * k
        chunks = _slices(centres, chunk)
        runs = native.AGGREGATE_RUNS
        # dv = du (BN2's output gradient): the output's gradient at each maximum that passed the relu
        du = grad.reshape(centres, dim).to(out.dtype) * (out > 0)

        # BN2 and W2: dy = s·du + c0 − q·(W2 a) per row, with s = scale2
        grad_bias2, grad_weight2 = du.sum(dim=0), (du * yhat).sum(dim=0)
        w2s = w2 * scale2[:, None]
        if training:
            q = scale2 * rstd2 * grad_weight2 / rows
            c0 = q * mean2 - scale2 * grad_bias2 / rows
            cross = w2.T @ (w2 * q[:, None])  # W2ᵀ diag(q) W2, symmetric
            da_shift = c0 @ w2
        else:
            da_shift = w2.new_zeros(hidden)
        if compiled:
            dz, du_a, grad_bias1, grad_weight1 = native.ops().aggregate_hidden_grad(
                h, scale1, shift1, mean1.contiguous(), arg, du, w2s, cross if training else h.new_empty(0, 0),
                da_shift, chunk, runs)
        else:
            dz, du_a, grad_bias1, grad_weight1 = _hidden_grad(h, scale1, shift1, mean1, arg, du, w2s,
                                                              cross if training else None, da_shift, chunks)
        grad_weight1 *= rstd1
        grad_w2 = du_a.mul_(scale2[:, None])
        if training:
            grad_w2.sub_(torch.outer(scale2 * grad_bias2 / rows, a_sum)).sub_(q[:, None] * (w2 @ a_spread))

        # BN1: dh = scale1·(dz − Σdz/R − ĥ·Σdz ĥ/R) = scale1·dz − slope·h + shift
        slope = scale1 * rstd1 * grad_weight1 / rows if training else torch.zeros_like(scale1)
        shift = slope * mean1 - scale1 * grad_bias1 / rows if training else torch.zeros_like(scale1)
        # W1 and the features: per-point sums of dh, the residual's maxima; the position code's share
        if compiled:  # dh a tile at a time, with the per-point sums and the position code's terms
            divisors = _divisors(dim, alpha, f.device)
            per_nbr, per_ctr, code_w1, grad_off = native.ops().aggregate_position_grad(
                dz, h, scale1, slope, shift, off, nbr, ctr, f.shape[0], divisors, beta / divisors, beta, w1, arg,
                du, ctx.needs_input_grad[1], chunk, runs)
        else:
            dh = dz.mul_(scale1)  # in place of dz
            if training:
                dh.addcmul_(h, -slope).add_(shift)
            per_nbr = f.new_zeros(f.shape[0], hidden).index_add_(0, nbr.view(-1), dh.view(rows, hidden))
            per_ctr = f.new_zeros(f.shape[0], hidden).index_add_(0, ctr, dh.sum(dim=1))
        grad_feat = per_nbr @ w1[:, :channels] + per_ctr @ w1[:, channels:]
        # the residual's maxima: channel d of the neighbour at the argmax, as flat indices of grad_feat
        at_max = nbr.gather(1, arg[:, :channels]) * channels + torch.arange(channels, device=f.device)
        grad_feat.view(-1).index_add_(0, at_max.view(-1), du[:, :channels].reshape(-1))
        grad_feat.index_add_(0, ctr, du[:, channels:])
        grad_w1 = torch.cat((per_nbr.T @ f, per_ctr.T @ f), dim=1)
        if compiled:
            grad_w1 += code_w1
            grad_off = grad_off if ctx.needs_input_grad[1] else None
        else:
            grad_off = torch.empty_like(off) if ctx.needs_input_grad[1] else None
            for part in chunks:
                grad_w1.addmm_(dh[part].view(-1, hidden).T, position_code(off[part], dim, alpha, beta).view(-1, dim))
                if grad_off is not None:
                    dx = torch.matmul(dh[part], w1).scatter_add_(1, arg[part].unsqueeze(1), du[part].unsqueeze(1))
                    grad_off[part] = _position_code_backward(dx, off[part], alpha, beta)

        return input_gradients(ctx, grad_feat, grad_off, grad_w1, grad_weight1, grad_bias1, grad_w2, grad_weight2,
                               grad_bias2)


def neighborhood_aggregate(feat: torch.Tensor, offsets: torch.Tensor, centre_index: torch.Tensor,
                           neighbour_index: torch.Tensor, weight1: torch.Tensor, norm1_weight: torch.Tensor,
                           norm1_bias: torch.Tensor, norm1_mean: torch.Tensor, norm1_var: torch.Tensor,
                           weight2: torch.Tensor, norm2_weight: torch.Tensor, norm2_bias: torch.Tensor,
                           norm2_mean: torch.Tensor, norm2_var: torch.Tensor, training: bool, eps: float,
                           alpha: float, beta: float, *, chunk: int | None = None,
                           compiled: bool | None = None) -> tuple[torch.Tensor, ...]:
    """The values of :func:`any2point_fast.reference.neighborhood_aggregate`, chunk by chunk.

    Args: as the reference's; ``compiled``: the passes over the neighbour rows in the compiled CPU
    kernels (:mod:`.native`), or (``False``) in PyTorch; ``None``: compiled wherever the kernels run.
    ``chunk``: centres per chunk (``None``: :func:`chunk_centres`), or per tile on the compiled route
    (``None``: :func:`tile_centres`).

    Returns:
        ``[B, S, 2C]`` of ``feat``'s dtype; the ``[H]`` mean and biased variance BN1 used and the
        ``[2C]`` ones of BN2 (float32, float64 for float64 inputs; no gradient).
    """
    k = neighbour_index.shape[2]
    compiled = native.resolve(compiled, feat.device)
    chunk = chunk or (tile_centres if compiled else chunk_centres)(k, 2 * feat.shape[2])
    return _Aggregate.apply(feat, offsets, centre_index, neighbour_index, weight1, norm1_weight, norm1_bias, norm1_mean,
                            norm1_var, weight2, norm2_weight, norm2_bias, norm2_mean, norm2_var, bool(training),
                            float(eps), float(alpha), float(beta), int(chunk), compiled)


__all__ = ["chunk_centres", "neighborhood_aggregate", "position_code", "tile_centres"]
