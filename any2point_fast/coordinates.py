"""Where the token centres land: line and canvas positions, bucket ids and voxel ids (DESIGN.md §1.2, §1.4).

The small ``[M, B, N]``-sized front half of the virtual projection, shared by the torch path and
the Triton launcher (which takes the coordinates and does the rest in its kernel). Bucket ids
must equal the oracle's exactly, and a one-ulp difference in a position moves a token across a
bucket border on lattice-like clouds, so every formula here is evaluated in the order DESIGN.md
§1.2 writes it, in float32, with the same torch reductions and products
(``mean``, ``einsum`` → one BLAS product per view, ``amin``/``amax``) as
:mod:`any2point_fast.reference.projection`, an independent transcription the tests compare with
bit for bit.
"""

from __future__ import annotations

import torch

from .geometry import voxel_grid_size


def unit_sphere(xyz: torch.Tensor) -> torch.Tensor:
    """Every cloud centred on its mean and scaled so that its farthest point is at radius 1.

    Args:
        xyz: ``[B, N, 3]`` float.

    Returns:
        ``[B, N, 3]`` float32; a cloud whose points are all equal (its spread below the rounding
        residue of the subtraction) becomes all zeros.
    """
    points = xyz.float()
    offsets = points - points.mean(dim=1, keepdim=True)
    radius = offsets.norm(dim=-1).amax(dim=1)
    residue = 8 * torch.finfo(torch.float32).eps * points.abs().amax(dim=(1, 2))
    flat = radius <= residue
    offsets = torch.where(flat[:, None, None], torch.zeros_like(offsets), offsets)
    return offsets / torch.where(flat, torch.ones_like(radius), radius)[:, None, None]


def line_coordinates(xyz: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
    """Eq. 1, ``t_ij = v_j · (p_i − mean p)``: ``[B, N, 3]`` centres × ``[M, 3]`` directions → ``[M, B, N]`` float32."""
    points = xyz.float()
    offsets = points - points.mean(dim=1, keepdim=True)
    return torch.einsum("mc,bnc->mbn", directions.to(offsets), offsets)


def view_coordinates(xyz: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """``q = R_j p`` of the unit-sphere cloud: ``[B, N, 3]`` × ``[M, 3, 3]`` → ``[M, B, N, 3]`` float32."""
    return torch.einsum("mij,bnj->mbni", rotations.to(xyz.device, torch.float32), unit_sphere(xyz))


def line_positions(xyz: torch.Tensor, directions: torch.Tensor, length: int) -> torch.Tensor:
    """``u_ij ∈ [0, L−1]``: Eq. 1 min–max normalised per cloud and line.

    Args:
        xyz: ``[B, N, 3]`` token centres.
        directions: ``[M, 3]`` unit line directions.
        length: ``L``, the 1D PE table's length.

    Returns:
        ``[M, B, N]`` float32; on a line where all tokens of a cloud coincide, ``(L−1)/2``.
    """
    t = line_coordinates(xyz, directions)
    low, high = t.amin(dim=2, keepdim=True), t.amax(dim=2, keepdim=True)
    span = high - low
    flat = span <= 0
    u = (t - low) / torch.where(flat, torch.ones_like(span), span) * (length - 1)
    return torch.where(flat, torch.full_like(u, (length - 1) / 2), u)


def canvas_positions(xyz: torch.Tensor, rotations: torch.Tensor, canvas_size: tuple[int, int],
                     camera_distance: float) -> torch.Tensor:
    """Perspective projection of the unit-sphere cloud onto ``M`` canvases of ``(H, W)`` pixels.

    ``x = q_x / (q_z + d)``, ``y = q_y / (q_z + d)``; ``col = (x + 1)/2 · (W − 1)``,
    ``row = (y + 1)/2 · (H − 1)``, each clamped inside the canvas.

    Args:
        xyz: ``[B, N, 3]`` token centres.
        rotations: ``[M, 3, 3]`` view rotations.
        canvas_size: ``(H, W)``.
        camera_distance: ``d``.

    Returns:
        ``[M, B, N, 2]`` float32 ``(row, col)``.
    """
    height, width = canvas_size
    q = view_coordinates(xyz, rotations)
    depth = q[..., 2] + camera_distance
    col = ((q[..., 0] / depth + 1) / 2 * (width - 1)).clamp(0, width - 1)
    row = ((q[..., 1] / depth + 1) / 2 * (height - 1)).clamp(0, height - 1)
    return torch.stack((row, col), dim=-1)


def line_buckets(u: torch.Tensor, segment_length: float, num_buckets: int) -> torch.Tensor:
    """The segment of length ``segment_length`` holding each line position ``u`` (any shape), int64 in
    ``[0, num_buckets)``."""
    return (u / segment_length).floor().long().clamp(0, num_buckets - 1)


def canvas_buckets(rc: torch.Tensor, canvas_size: tuple[int, int], patch_size: int) -> torch.Tensor:
    """Patch of ``patch_size`` pixels holding each ``[..., 2]`` ``(row, col)`` canvas position → ``[...]``
    int64, row-major over the ``ceil(H/p) × ceil(W/p)`` patches."""
    height, width = canvas_size
    rows, cols = -(-height // patch_size), -(-width // patch_size)
    row = (rc[..., 0] / patch_size).floor().long().clamp(0, rows - 1)
    col = (rc[..., 1] / patch_size).floor().long().clamp(0, cols - 1)
    return row * cols + col


def voxel_ids(centers: torch.Tensor, voxel_size: float) -> torch.Tensor:
    """Voxel of every token centre in the unit-sphere cloud's ``[-1, 1]³`` cube (the 3D baseline branch).

    Args:
        centers: ``[B, N, 3]``.
        voxel_size: the voxel side.

    Returns:
        ``[1, B, N]`` int64 per-cloud ids in ``[0, G³)``, ``G = voxel_grid_size(voxel_size)``,
        x-major.
    """
    grid = voxel_grid_size(voxel_size)
    cell = ((unit_sphere(centers) + 1) / voxel_size).floor().long().clamp(0, grid - 1)
    return ((cell[..., 0] * grid + cell[..., 1]) * grid + cell[..., 2])[None]


__all__ = ["canvas_buckets", "canvas_positions", "line_buckets", "line_coordinates", "line_positions",
           "unit_sphere", "view_coordinates", "voxel_ids"]
