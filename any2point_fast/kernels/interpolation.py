"""3-NN inverse-distance interpolation in one Triton launch each way.

Forward: a program per block of query points of one cloud walks the ``N`` centres once, keeping
the 3 nearest (strictly smaller distances replace, so ties go to the lowest index), forms the
weights ``1 / (d + eps)`` normalised over them, and writes the weighted sum of their feature rows
a block of channels at a time; the neighbours and weights ``[B, P, 3]`` are kept for backward.
Backward: the same programs scatter ``w_j · grad_out`` into the feature rows with atomic adds
(float32). No ``[B, P, N]`` tensor exists.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import channel_block, check_float, pow2_at_least


@triton.jit
def _interpolate_forward_kernel(points_ptr, centers_ptr, feat_ptr, out_ptr, index_ptr, weight_ptr,
                                num_points, num_centers, channels, eps,
                                sp_b, sp_p, sp_d, sc_b, sc_n, sc_d, sf_b, sf_n, sf_c,
                                BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    cloud = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    inside = rows < num_points
    point = points_ptr + cloud * sp_b + rows * sp_p
    px = tl.load(point, mask=inside, other=0.0).to(tl.float32)
    py = tl.load(point + sp_d, mask=inside, other=0.0).to(tl.float32)
    pz = tl.load(point + 2 * sp_d, mask=inside, other=0.0).to(tl.float32)
    inf = float("inf")
    d0 = tl.full((BLOCK_P,), inf, tl.float32)
    d1 = tl.full((BLOCK_P,), inf, tl.float32)
    d2 = tl.full((BLOCK_P,), inf, tl.float32)
    i0 = tl.full((BLOCK_P,), 0, tl.int64)
    i1 = tl.full((BLOCK_P,), 0, tl.int64)
    i2 = tl.full((BLOCK_P,), 0, tl.int64)
    for n in range(num_centers):
        centre = centers_ptr + cloud * sc_b + n * sc_n
        dx = px - tl.load(centre).to(tl.float32)
        dy = py - tl.load(centre + sc_d).to(tl.float32)
        dz = pz - tl.load(centre + 2 * sc_d).to(tl.float32)
        d = (dx * dx + dy * dy) + dz * dz
        below0, below1, below2 = d < d0, d < d1, d < d2
        d2 = tl.where(below1, d1, tl.where(below2, d, d2))
        i2 = tl.where(below1, i1, tl.where(below2, n, i2))
        d1 = tl.where(below0, d0, tl.where(below1, d, d1))
        i1 = tl.where(below0, i0, tl.where(below1, n, i1))
        d0 = tl.where(below0, d, d0)
        i0 = tl.where(below0, n, i0)
    w0 = 1.0 / (tl.sqrt(d0) + eps)
    w1 = tl.where(d1 < inf, 1.0 / (tl.sqrt(d1) + eps), 0.0)  # fewer than 3 centres: no weight
    w2 = tl.where(d2 < inf, 1.0 / (tl.sqrt(d2) + eps), 0.0)
    total = w0 + w1 + w2
    w0, w1, w2 = w0 / total, w1 / total, w2 / total
    saved = (cloud * num_points + rows) * 3
    tl.store(index_ptr + saved, i0, mask=inside)
    tl.store(index_ptr + saved + 1, i1, mask=inside)
    tl.store(index_ptr + saved + 2, i2, mask=inside)
    tl.store(weight_ptr + saved, w0, mask=inside)
    tl.store(weight_ptr + saved + 1, w1, mask=inside)
    tl.store(weight_ptr + saved + 2, w2, mask=inside)
    feat = feat_ptr + cloud * sf_b
    for first in range(0, channels, BLOCK_C):
        cols = first + tl.arange(0, BLOCK_C)
        mask = inside[:, None] & (cols < channels)[None, :]
        column = cols[None, :] * sf_c
        acc = w0[:, None] * tl.load(feat + i0[:, None] * sf_n + column, mask=mask, other=0.0).to(tl.float32)
        acc += w1[:, None] * tl.load(feat + i1[:, None] * sf_n + column, mask=mask, other=0.0).to(tl.float32)
        acc += w2[:, None] * tl.load(feat + i2[:, None] * sf_n + column, mask=mask, other=0.0).to(tl.float32)
        out = out_ptr + (cloud * num_points + rows[:, None]) * channels + cols[None, :]
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _interpolate_backward_kernel(grad_out_ptr, index_ptr, weight_ptr, grad_feat_ptr, num_points, num_centers,
                                 channels, sg_b, sg_p, sg_c, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    cloud = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    inside = rows < num_points
    grad_feat = grad_feat_ptr + cloud * num_centers * channels
    for j in range(3):
        saved = (cloud * num_points + rows) * 3 + j
        near = tl.load(index_ptr + saved, mask=inside, other=0)
        weight = tl.load(weight_ptr + saved, mask=inside, other=0.0)
        for first in range(0, channels, BLOCK_C):
            cols = first + tl.arange(0, BLOCK_C)
            mask = inside[:, None] & (cols < channels)[None, :]
            grad = tl.load(grad_out_ptr + cloud * sg_b + rows[:, None] * sg_p + cols[None, :] * sg_c,
                           mask=mask, other=0.0).to(tl.float32)
            tl.atomic_add(grad_feat + near[:, None] * channels + cols[None, :], grad * weight[:, None],
                          mask=mask & (weight[:, None] > 0))


def _blocks(num_points: int, channels: int) -> tuple[int, int]:
    return min(64, pow2_at_least(num_points)), channel_block(channels)


class _InterpolateFeatures(torch.autograd.Function):
    @staticmethod
    def forward(ctx, points, centers, features, eps):
        batch, num_points, _ = points.shape
        num_centers, channels = features.shape[1:]
        out = torch.empty(batch, num_points, channels, dtype=features.dtype, device=features.device)
        index = torch.empty(batch, num_points, 3, dtype=torch.int64, device=features.device)
        weight = torch.empty(batch, num_points, 3, dtype=torch.float32, device=features.device)
        block_p, block_c = _blocks(num_points, channels)
        grid = (triton.cdiv(num_points, block_p), batch)
        _interpolate_forward_kernel[grid](points, centers, features, out, index, weight, num_points, num_centers,
                                          channels, eps, *points.stride(), *centers.stride(), *features.stride(),
                                          BLOCK_P=block_p, BLOCK_C=block_c)
        ctx.save_for_backward(index, weight)
        ctx.shape = (num_centers, channels, features.dtype)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        index, weight = ctx.saved_tensors
        num_centers, channels, dtype = ctx.shape
        batch, num_points, _ = index.shape
        grad_feat = torch.zeros(batch, num_centers, channels, dtype=torch.float32, device=grad_out.device)
        block_p, block_c = _blocks(num_points, channels)
        grid = (triton.cdiv(num_points, block_p), batch)
        _interpolate_backward_kernel[grid](grad_out, index, weight, grad_feat, num_points, num_centers, channels,
                                           *grad_out.stride(), BLOCK_P=block_p, BLOCK_C=block_c)
        return None, None, grad_feat.to(dtype), None


def interpolate_features(points: torch.Tensor, centers: torch.Tensor, features: torch.Tensor,
                         eps: float = 1e-8) -> torch.Tensor:
    """Inverse-distance weighted mean of the features of the 3 nearest centres (see the reference's).

    Args:
        points: ``[B, P, 3]`` float; centers: ``[B, N, 3]`` float; features: ``[B, N, C]``
            float32/float16/bfloat16, any strides.
        eps: added to every distance.

    Returns:
        ``[B, P, C]`` in the dtype of ``features`` (float32 inside); gradients flow to ``features`` only.
    """
    check_float("features", features)
    return _InterpolateFeatures.apply(points.detach(), centers.detach(), features, float(eps))


__all__ = ["interpolate_features"]
