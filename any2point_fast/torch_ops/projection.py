"""``project_pe``: the PE interpolation and view average of all views in one weighted gather.

Positions and bucket ids come from :mod:`any2point_fast.coordinates` (a few ``[M, B, N]``
tensors, evaluated as DESIGN.md §1.2 writes them: a one-ulp difference would move tokens across
bucket borders, and bucket ids must equal the reference's exactly — the Triton kernel makes the
same choice). The heavy part, ``(1/M) Σ_j PE(p_ij)`` over ``C`` channels, is one ``embedding_bag``
over the ``2M`` (1D) or ``4M`` (2D) table rows that interpolate each token, weighted by the
interpolation weights — or, for a short table, one GEMM of the ``[B·N, L]`` interpolation
matrix with the table: no ``[M, B, N, C]`` per-view PE is formed. It is computed in float32
(float64 for a float64 table) and rounded once to the table dtype; the reference rounds every
view's PE before averaging, which differs for float16/bfloat16 tables by that rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..coordinates import canvas_buckets, canvas_positions, line_buckets, line_positions
from ..geometry import ProjectionSpec
from ._common import compute_dtype

#: A table of at most this many rows per interpolation row of a token (2M in 1D, 4M in 2D) is
#: applied as a dense interpolation matrix (one GEMM, ~30× the flop rate of a weighted gather on
#: a CPU); a longer one by the weighted gather, whose cost does not grow with the table.
DENSE_TABLE_ROWS_PER_BAG_ROW = 16


def _neighbours(pos: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Lower/upper integer neighbours of ``pos ∈ [0, size−1]`` and the upper weight."""
    lower = pos.floor().clamp(0, size - 1)
    upper = (lower + 1).clamp(max=size - 1)
    return lower.long(), upper.long(), pos - lower


def project_pe(centers: torch.Tensor, pe_table: torch.Tensor,
               spec: ProjectionSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Averaged virtual-projection PE (Eq. 2) and per-view bucket ids.

    Args:
        centers: ``[B, N, 3]`` token centres.
        pe_table: ``[L, C]`` (1D) or ``[Gh, Gw, C]`` (2D) frozen PE of the source model.
        spec: the views and bucket sizes.

    Returns:
        ``pe``: ``[B, N, C]`` of ``pe_table``'s dtype; ``bucket_ids``: ``[M, B, N]`` int64,
        identical to the reference's.
    """
    batch, tokens, _ = centers.shape
    if spec.kind == "1d":
        length = pe_table.shape[0]
        u = line_positions(centers, spec.views, length)
        lower, upper, w = _neighbours(u, length)
        rows = torch.stack((lower, upper), dim=-1)  # [M, B, N, 2]
        weights = torch.stack((1 - w, w), dim=-1)
        table = pe_table
        buckets = line_buckets(u, spec.segment_length, spec.buckets_per_view(length))
    else:
        (gh, gw, _), (height, width) = pe_table.shape, spec.canvas_size
        rc = canvas_positions(centers, spec.views, spec.canvas_size, spec.camera_distance)
        y0, y1, wy = _neighbours(rc[..., 0] / (height - 1) * (gh - 1), gh)
        x0, x1, wx = _neighbours(rc[..., 1] / (width - 1) * (gw - 1), gw)
        rows = torch.stack((y0 * gw + x0, y0 * gw + x1, y1 * gw + x0, y1 * gw + x1), dim=-1)
        weights = torch.stack(((1 - wy) * (1 - wx), (1 - wy) * wx, wy * (1 - wx), wy * wx), dim=-1)
        table = pe_table.reshape(gh * gw, -1)
        buckets = canvas_buckets(rc, spec.canvas_size, spec.patch_size)
    dtype = compute_dtype(pe_table)
    # token-major bags: the 2M (4M) interpolation rows of every token
    bags = rows.permute(1, 2, 0, 3).reshape(batch * tokens, -1)
    # the view average folded into the [B·N, 2M] weights: no pass over the [B·N, C] output
    bag_weights = weights.permute(1, 2, 0, 3).reshape(batch * tokens, -1).to(dtype) / spec.num_views
    if table.shape[0] <= DENSE_TABLE_ROWS_PER_BAG_ROW * bags.shape[1]:
        # a short table: the [B·N, L] interpolation matrix times the table is one GEMM
        interpolation = bag_weights.new_zeros(batch * tokens, table.shape[0]).scatter_add_(1, bags, bag_weights)
        pe = torch.mm(interpolation, table.to(dtype))
    else:
        pe = F.embedding_bag(bags, table.to(dtype), per_sample_weights=bag_weights, mode="sum")
    return pe.view(batch, tokens, -1).to(pe_table.dtype), buckets
