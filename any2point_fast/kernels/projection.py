"""``project_pe``: virtual projection, PE interpolation, averaging over views and bucket ids in one pass.

One kernel, ``_project_pe_kernel`` (grid: clouds × token blocks × channel blocks): for every
view, the token's position (1D: min–max normalised ``u ∈ [0, L−1]``; 2D: perspective division
by ``q_z + d``, canvas mapping and clamping), the linear/bilinear (align-corners) interpolation
of the PE table, accumulated over the views in registers and written once as the average; the
programs of the first channel block also write the bucket ids. Everything is float32 in the
reference's formula order with IEEE division (``tl.div_rn``: plain ``/`` is ``div.full.f32``,
up to 2 ulp, on NVIDIA GPUs), and no step on the way to a bucket id has a multiply-add that
could be contracted into an FMA.

Only the linear algebra in front of it — the centroid, the ``3×3``/``3``-vector products
``q = R_j p`` / ``t = v_j·p`` and the per-cloud ``min``/``max``/radius — is left to torch, in
:func:`~any2point_fast.coordinates.line_coordinates` and
:func:`~any2point_fast.coordinates.view_coordinates` (a few ``[M, B, N]``-sized tensors): their
rounding is the BLAS's (``einsum`` → ``mm``) and cannot be reproduced bit for bit in a kernel,
and a one-ulp difference moves tokens across bucket borders on lattice-like clouds, while bucket
ids must equal the reference's exactly.

The PE table is a frozen input: the op has no backward.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from any2point_fast.coordinates import line_coordinates, view_coordinates
from any2point_fast.geometry import ProjectionSpec

from ._common import channel_block, check_float, device_function

_BLOCK_T = 32


@device_function
def _lerp_coords(pos, size):
    """Lower/upper integer neighbours of ``pos`` in ``[0, size − 1]`` and the upper weight."""
    lower = tl.minimum(tl.maximum(tl.floor(pos), 0.0), size - 1.0)
    upper = tl.minimum(lower + 1.0, size - 1.0)
    return lower.to(tl.int64), upper.to(tl.int64), pos - lower


@triton.jit
def _project_pe_kernel(pos_ptr, lohi_ptr, table_ptr, pe_ptr, buckets_ptr, length, batch, channels, num_views,
                       pe_length, segment_length, num_buckets_1d, grid_h, grid_w, height, width, patch, rows, cols,
                       camera_distance, IS_1D: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    b = tl.program_id(0)
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    tmask = t < length
    c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < channels
    mask = tmask[:, None] & cmask[None, :]
    write_buckets = tl.program_id(2) == 0
    acc = tl.full((BLOCK_T, BLOCK_C), 0, tl.float32)
    for v in range(num_views):
        item = (v * batch + b) * length + t
        if IS_1D:
            pos = tl.load(pos_ptr + item, mask=tmask, other=0.0)
            lo = tl.load(lohi_ptr + (v * batch + b) * 2)
            hi = tl.load(lohi_ptr + (v * batch + b) * 2 + 1)
            span = hi - lo
            degenerate = span <= 0
            u = tl.div_rn(pos - lo, tl.where(degenerate, 1.0, span)) * (pe_length - 1.0)
            u = tl.where(degenerate, (pe_length - 1.0) * 0.5, u)
            lower, upper, w = _lerp_coords(u, pe_length)
            w = w[:, None]
            e0 = tl.load(table_ptr + lower[:, None] * channels + c[None, :], mask=mask, other=0.0).to(tl.float32)
            e1 = tl.load(table_ptr + upper[:, None] * channels + c[None, :], mask=mask, other=0.0).to(tl.float32)
            pe = e0 * (1 - w) + e1 * w
            bucket = tl.floor(tl.div_rn(u, segment_length)).to(tl.int64)
            bucket = tl.minimum(tl.maximum(bucket, 0), num_buckets_1d - 1)
        else:
            qx = tl.load(pos_ptr + item * 3, mask=tmask, other=0.0)
            qy = tl.load(pos_ptr + item * 3 + 1, mask=tmask, other=0.0)
            qz = tl.load(pos_ptr + item * 3 + 2, mask=tmask, other=0.0)
            depth = qz + camera_distance
            col = tl.div_rn(tl.div_rn(qx, depth) + 1, 2.0) * (width - 1.0)
            col = tl.minimum(tl.maximum(col, 0.0), width - 1.0)
            row = tl.div_rn(tl.div_rn(qy, depth) + 1, 2.0) * (height - 1.0)
            row = tl.minimum(tl.maximum(row, 0.0), height - 1.0)
            y0, y1, wy = _lerp_coords(tl.div_rn(row, height - 1.0) * (grid_h - 1.0), grid_h)
            x0, x1, wx = _lerp_coords(tl.div_rn(col, width - 1.0) * (grid_w - 1.0), grid_w)
            wx = wx[:, None]
            wy = wy[:, None]
            g00 = tl.load(table_ptr + (y0 * grid_w + x0)[:, None] * channels + c[None, :], mask=mask, other=0.0)
            g01 = tl.load(table_ptr + (y0 * grid_w + x1)[:, None] * channels + c[None, :], mask=mask, other=0.0)
            g10 = tl.load(table_ptr + (y1 * grid_w + x0)[:, None] * channels + c[None, :], mask=mask, other=0.0)
            g11 = tl.load(table_ptr + (y1 * grid_w + x1)[:, None] * channels + c[None, :], mask=mask, other=0.0)
            top = g00.to(tl.float32) * (1 - wx) + g01.to(tl.float32) * wx
            bottom = g10.to(tl.float32) * (1 - wx) + g11.to(tl.float32) * wx
            pe = top * (1 - wy) + bottom * wy
            by = tl.minimum(tl.maximum(tl.floor(tl.div_rn(row, patch)).to(tl.int64), 0), rows - 1)
            bx = tl.minimum(tl.maximum(tl.floor(tl.div_rn(col, patch)).to(tl.int64), 0), cols - 1)
            bucket = by * cols + bx
        # the reference rounds every view's PE to the table dtype before averaging
        acc += pe.to(table_ptr.dtype.element_ty).to(tl.float32)
        if write_buckets:
            tl.store(buckets_ptr + item, bucket, mask=tmask)
    out = acc / num_views
    tl.store(pe_ptr + (b * length + t)[:, None] * channels + c[None, :], out.to(pe_ptr.dtype.element_ty), mask=mask)


def _positions(centers: torch.Tensor, spec: ProjectionSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """``t`` and its per-cloud ``(lo, hi)`` (1D) or ``q = R_j p`` (2D), bit for bit the reference's."""
    if spec.kind == "1d":
        t = line_coordinates(centers, spec.views)
        return t.contiguous(), torch.stack((t.amin(dim=2), t.amax(dim=2)), dim=-1).contiguous()
    q = view_coordinates(centers, spec.views).contiguous()
    return q, q


def project_pe(centers: torch.Tensor, pe_table: torch.Tensor,
               spec: ProjectionSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Averaged virtual-projection PE ``[B, N, C]`` (table dtype) and bucket ids ``[M, B, N]`` int64.

    Same contract as :func:`any2point_fast.reference.project_pe`. Forward only: raises if a
    gradient would be needed for ``pe_table`` or ``centers``.
    """
    check_float("pe_table", pe_table)
    if torch.is_grad_enabled() and (pe_table.requires_grad or centers.requires_grad):
        raise NotImplementedError("the Triton project_pe has no backward; the PE table and centres must be frozen")
    if centers.dim() != 3 or centers.shape[2] != 3:
        raise ValueError(f"centers must be [B, N, 3], got {tuple(centers.shape)}")
    is_1d = spec.kind == "1d"
    if spec.kind not in ("1d", "2d") or pe_table.dim() != (2 if is_1d else 3):
        raise ValueError(f"a {spec.kind!r} projection needs a {'[L, C]' if is_1d else '[Gh, Gw, C]'} table, got "
                         f"{tuple(pe_table.shape)}")
    batch, length, _ = centers.shape
    num_views, channels = spec.num_views, pe_table.shape[-1]
    device = centers.device
    pe = torch.empty(batch, length, channels, dtype=pe_table.dtype, device=device)
    buckets = torch.empty(num_views, batch, length, dtype=torch.int64, device=device)
    if buckets.numel() == 0:
        return pe.zero_(), buckets
    pos, lohi = _positions(centers, spec)
    height, width = spec.canvas_size
    grid_h, grid_w = (1, 1) if is_1d else pe_table.shape[:2]
    block_c = channel_block(channels)
    grid = (batch, triton.cdiv(length, _BLOCK_T), max(1, triton.cdiv(channels, block_c)))
    _project_pe_kernel[grid](
        pos, lohi, pe_table.contiguous(), pe, buckets, length, batch, channels, num_views, pe_table.shape[0],
        float(spec.segment_length), spec.buckets_per_view(pe_table.shape[0]), grid_h, grid_w, height, width,
        float(spec.patch_size), -(-height // spec.patch_size), -(-width // spec.patch_size),
        float(spec.camera_distance), IS_1D=is_1d, BLOCK_T=_BLOCK_T, BLOCK_C=block_c)
    return pe, buckets
