"""The 3D-to-any virtual projection as a module, on the fused ops (paper §2.2, DESIGN.md §1.2)."""

from __future__ import annotations

import torch
from torch import nn

from . import ops
from .config import Any2PointConfig
from .coordinates import voxel_ids
from .geometry import Geometry, ProjectionSpec, voxel_grid_size


def build_geometry(centers: torch.Tensor, pe_table: torch.Tensor, spec: ProjectionSpec,
                   voxel_size: float) -> tuple[torch.Tensor, Geometry]:
    """The averaged PE and the bucket geometry of the token centres, with the fused ops.

    Compute it once per forward and pass the :class:`~any2point_fast.geometry.Geometry` to every
    adapter. Same result as :func:`any2point_fast.reference.build_geometry` (bucket ids and
    segments identical), on the backend selected in :mod:`any2point_fast.ops`.

    Args:
        centers: ``[B, N, 3]`` token centres.
        pe_table: the source model's PE, ``[L, C]`` (1D) or ``[Gh, Gw, C]`` (2D).
        spec: the views/lines and bucket sizes (``ProjectionSpec.from_config(config)``).
        voxel_size: voxel side of the 3D baseline branch (``config.voxel_size``).

    Returns:
        The averaged PE ``[B, N, C]`` (Eq. 2) and the :class:`Geometry` of views and voxels.
    """
    pe, buckets = ops.project_pe(centers, pe_table, spec)
    views = ops.bucket_sort(buckets, spec.buckets_per_view(pe_table.shape[0]))
    voxels = ops.bucket_sort(voxel_ids(centers, voxel_size), voxel_grid_size(voxel_size) ** 3)
    return pe, Geometry(views=views, voxels=voxels)


class VirtualProjection(nn.Module):
    """Token centres → averaged source-model PE and the bucket geometry, once per forward.

    Holds the source model's frozen PE table as a buffer: ``[L, C]`` for a 1D model or
    ``[Gh, Gw, C]`` for a 2D one (rows × cols of its patch grid).

    Args:
        config: views, bucket sizes and voxel size (``pe_kind`` must match the table's rank).
        pe_table: the frozen PE table; it is copied, detached, and not saved in ``state_dict``.
    """

    def __init__(self, config: Any2PointConfig, pe_table: torch.Tensor):
        super().__init__()
        expected = 2 if config.pe_kind == "1d" else 3
        if pe_table.dim() != expected:
            raise ValueError(f"a {config.pe_kind} projection needs a PE table of rank {expected} "
                             f"({'[L, C]' if expected == 2 else '[Gh, Gw, C]'}), got shape {tuple(pe_table.shape)}")
        self.spec = ProjectionSpec.from_config(config)
        self.voxel_size = config.voxel_size
        # frozen and derived from the backbone: not part of checkpoints
        self.register_buffer("pe_table", pe_table.detach().clone(), persistent=False)

    def forward(self, centers: torch.Tensor) -> tuple[torch.Tensor, Geometry]:
        """``centers``: ``[B, N, 3]`` → PE ``[B, N, C]`` (table dtype) and the :class:`Geometry`."""
        return build_geometry(centers, self.pe_table, self.spec, self.voxel_size)
