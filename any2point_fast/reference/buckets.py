"""Grouping tokens into non-empty buckets: the oracle of the ``bucket_sort`` op."""

from __future__ import annotations

import torch

from ..geometry import Geometry, ProjectionSpec, Segments, voxel_grid_size
from .projection import project_pe, voxel_ids


def bucket_sort(bucket_ids: torch.Tensor, num_buckets: int) -> Segments:
    """Group items by ``(view, cloud, bucket)`` into the non-empty segments.

    Args:
        bucket_ids: ``[V, B, N]`` int64 per-cloud bucket ids in ``[0, num_buckets)``.
        num_buckets: buckets per view and cloud.

    Returns:
        The :class:`~any2point_fast.geometry.Segments` of the ``V·B·N`` items.
    """
    views, batch, _ = bucket_ids.shape
    device = bucket_ids.device
    group = torch.arange(views, device=device)[:, None] * batch + torch.arange(batch, device=device)
    keys = (group[:, :, None] * num_buckets + bucket_ids).flatten()
    unique_keys, inverse, counts = torch.unique(keys, return_inverse=True, return_counts=True)
    view_of_segment = unique_keys // (batch * num_buckets)
    view_offsets = torch.searchsorted(view_of_segment, torch.arange(views + 1, device=device))
    return Segments(
        segment_ids=inverse.reshape(bucket_ids.shape),
        perm=torch.argsort(keys, stable=True),
        offsets=torch.cat((counts.new_zeros(1), counts.cumsum(0))),
        view_offsets=tuple(view_offsets.tolist()),
        max_len=int(counts.max()),
    )


def build_geometry(centers: torch.Tensor, pe_table: torch.Tensor, spec: ProjectionSpec,
                   voxel_size: float) -> tuple[torch.Tensor, Geometry]:
    """Everything the blocks need of the token centres, computed once per forward.

    Args:
        centers: ``[B, N, 3]`` token centres.
        pe_table: the source model's PE, ``[L, C]`` or ``[Gh, Gw, C]``.

    Returns:
        The averaged PE ``[B, N, C]`` (Eq. 2) and the :class:`Geometry` of views and voxels.
    """
    pe, buckets = project_pe(centers, pe_table, spec)
    views = bucket_sort(buckets, spec.buckets_per_view(pe_table.shape[0]))
    voxels = bucket_sort(voxel_ids(centers, voxel_size), voxel_grid_size(voxel_size) ** 3)
    return pe, Geometry(views=views, voxels=voxels)
