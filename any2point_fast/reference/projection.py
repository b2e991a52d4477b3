"""3D-to-any virtual projection (paper §2.2, Eq. 1–2; DESIGN.md §1.2), literally.

Nothing is rendered: every token centre gets, per view ``j``, a position in the source
model's own PE space — a scalar ``u_ij ∈ [0, L−1]`` on a 1D line or a pixel ``(row, col)`` on a
2D canvas — from which its PE is interpolated and its bucket read.

Deviations from the published code (each pinned by a test in ``tests/test_reference_published_diffs.py``):

- PE interpolation is exact at integer positions; the published code gives them a zero PE
  (both weights vanish when ``floor == ceil``);
- positions are clamped into the table/canvas instead of wrapped with ``%``;
- the 1D min–max range is taken per cloud and line, not over the whole batch, so one cloud's
  PE does not depend on the other clouds of the batch;
- a degenerate cloud (all centres equal) maps to the middle instead of dividing by zero.
"""

from __future__ import annotations

import torch

from ..geometry import ProjectionSpec, voxel_grid_size


def normalize_cloud(xyz: torch.Tensor) -> torch.Tensor:
    """Centre every cloud on its mean and scale it into the unit sphere.

    Args:
        xyz: ``[B, N, 3]`` float.

    Returns:
        ``[B, N, 3]`` float32; an all-equal cloud becomes all zeros.
    """
    xyz = xyz.float()
    centred = xyz - xyz.mean(dim=1, keepdim=True)
    radius = centred.norm(dim=-1).amax(dim=1)
    # all points equal: ``xyz − mean`` is a rounding residue of order eps·|xyz|, not a shape
    residue = 8 * torch.finfo(torch.float32).eps * xyz.abs().amax(dim=(1, 2))
    degenerate = radius <= residue
    centred = torch.where(degenerate[:, None, None], torch.zeros_like(centred), centred)
    return centred / torch.where(degenerate, torch.ones_like(radius), radius)[:, None, None]


def line_coordinates(xyz: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
    """Eq. 1: ``t_ij = v_j · (p_i − mean p)``, ``[B, N, 3]`` × ``[M, 3]`` → ``[M, B, N]`` float32."""
    centred = xyz.float() - xyz.float().mean(dim=1, keepdim=True)
    return torch.einsum("mc,bnc->mbn", directions.to(centred), centred)


def view_coordinates(xyz: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """``q = R_j p`` of the normalised cloud, ``[B, N, 3]`` × ``[M, 3, 3]`` → ``[M, B, N, 3]`` float32."""
    return torch.einsum("mij,bnj->mbni", rotations.to(xyz.device, torch.float32), normalize_cloud(xyz))


def line_positions(xyz: torch.Tensor, directions: torch.Tensor, length: int) -> torch.Tensor:
    """Eq. 1 with per-cloud min–max normalisation: positions ``u ∈ [0, L−1]`` on each line.

    Args:
        xyz: ``[B, N, 3]`` token centres.
        directions: ``[M, 3]`` unit line directions.
        length: ``L``, the 1D PE table length.

    Returns:
        ``[M, B, N]`` float32. A line on which every token projects to the same value maps
        all of them to ``(L−1)/2``.
    """
    t = line_coordinates(xyz, directions)
    lo, hi = t.amin(dim=2, keepdim=True), t.amax(dim=2, keepdim=True)
    span = hi - lo
    degenerate = span <= 0
    u = (t - lo) / torch.where(degenerate, torch.ones_like(span), span) * (length - 1)
    return torch.where(degenerate, torch.full_like(u, (length - 1) / 2), u)


def canvas_positions(xyz: torch.Tensor, rotations: torch.Tensor, canvas_size: tuple[int, int],
                     camera_distance: float) -> torch.Tensor:
    """PointCLIP-style perspective projection of the normalised cloud onto ``M`` canvases.

    ``q = R_j p`` (``p`` in the unit sphere), ``x = q_x / (q_z + d)``, ``y = q_y / (q_z + d)``,
    then ``col = (x + 1)/2 · (W − 1)``, ``row = (y + 1)/2 · (H − 1)``, clamped to the canvas.

    Args:
        xyz: ``[B, N, 3]`` token centres.
        rotations: ``[M, 3, 3]`` view rotations.
        canvas_size: ``(H, W)``.

    Returns:
        ``[M, B, N, 2]`` float32 ``(row, col)`` pixel positions.
    """
    height, width = canvas_size
    q = view_coordinates(xyz, rotations)
    depth = q[..., 2] + camera_distance
    col = ((q[..., 0] / depth + 1) / 2 * (width - 1)).clamp(0, width - 1)
    row = ((q[..., 1] / depth + 1) / 2 * (height - 1)).clamp(0, height - 1)
    return torch.stack((row, col), dim=-1)


def _lerp_coords(pos: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Lower/upper integer neighbours of ``pos ∈ [0, size−1]`` and the upper weight."""
    lower = pos.floor().clamp(0, size - 1)
    upper = (lower + 1).clamp(max=size - 1)
    return lower.long(), upper.long(), (pos - lower)[..., None]


def interpolate_pe_1d(table: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Linear interpolation of a ``[L, C]`` table at positions ``u`` (any shape) → ``[..., C]``.

    Exact at integer positions: ``table[k]`` at ``u = k``.
    """
    lower, upper, w = _lerp_coords(u, table.shape[0])
    return (table[lower].float() * (1 - w) + table[upper].float() * w).to(table.dtype)


def interpolate_pe_2d(grid: torch.Tensor, rc: torch.Tensor, canvas_size: tuple[int, int]) -> torch.Tensor:
    """Bilinear (align-corners) interpolation of a ``[Gh, Gw, C]`` grid at canvas pixels.

    Pixel ``(0, 0)`` maps to ``grid[0, 0]`` and ``(H−1, W−1)`` to ``grid[Gh−1, Gw−1]``.

    Args:
        rc: ``[..., 2]`` ``(row, col)`` canvas positions.

    Returns:
        ``[..., C]`` of ``grid``'s dtype.
    """
    (gh, gw, _), (height, width) = grid.shape, canvas_size
    gy = rc[..., 0] / (height - 1) * (gh - 1)
    gx = rc[..., 1] / (width - 1) * (gw - 1)
    y0, y1, wy = _lerp_coords(gy, gh)
    x0, x1, wx = _lerp_coords(gx, gw)
    g = grid.float()
    top = g[y0, x0] * (1 - wx) + g[y0, x1] * wx
    bottom = g[y1, x0] * (1 - wx) + g[y1, x1] * wx
    return (top * (1 - wy) + bottom * wy).to(grid.dtype)


def project_pe(centers: torch.Tensor, pe_table: torch.Tensor,
               spec: ProjectionSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Averaged virtual-projection PE (Eq. 2) and per-view bucket ids.

    Args:
        centers: ``[B, N, 3]`` token centres.
        pe_table: ``[L, C]`` (1D) or ``[Gh, Gw, C]`` (2D) frozen PE of the source model.
        spec: the views and bucket sizes.

    Returns:
        ``pe``: ``[B, N, C]`` of ``pe_table``'s dtype, ``(1/M) Σ_j PE(p_ij)``;
        ``bucket_ids``: ``[M, B, N]`` int64 in ``[0, spec.buckets_per_view(L))``, per cloud.
    """
    if spec.kind == "1d":
        length = pe_table.shape[0]
        u = line_positions(centers, spec.views, length)
        per_view = interpolate_pe_1d(pe_table, u).float()
        buckets = (u / spec.segment_length).floor().long().clamp(0, spec.buckets_per_view(length) - 1)
    else:
        rc = canvas_positions(centers, spec.views, spec.canvas_size, spec.camera_distance)
        per_view = interpolate_pe_2d(pe_table, rc, spec.canvas_size).float()
        height, width = spec.canvas_size
        rows = -(-height // spec.patch_size)
        cols = -(-width // spec.patch_size)
        by = (rc[..., 0] / spec.patch_size).floor().long().clamp(0, rows - 1)
        bx = (rc[..., 1] / spec.patch_size).floor().long().clamp(0, cols - 1)
        buckets = by * cols + bx
    return per_view.mean(dim=0).to(pe_table.dtype), buckets


def voxel_ids(centers: torch.Tensor, voxel_size: float) -> torch.Tensor:
    """Voxel of every token centre on the normalised cloud (the 3D baseline branch's grouping).

    Args:
        centers: ``[B, N, 3]``.

    Returns:
        ``[1, B, N]`` int64 per-cloud voxel ids in ``[0, G³)``, ``G = voxel_grid_size(voxel_size)``.
    """
    grid = voxel_grid_size(voxel_size)
    cell = ((normalize_cloud(centers) + 1) / voxel_size).floor().long().clamp(0, grid - 1)
    return ((cell[..., 0] * grid + cell[..., 1]) * grid + cell[..., 2])[None]
