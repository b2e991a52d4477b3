"""``bucket_sort``: one stable sort of the ``(view, cloud, bucket)`` keys, offsets by prefix sums."""

from __future__ import annotations

import torch

from ..geometry import Segments


def bucket_sort(bucket_ids: torch.Tensor, num_buckets: int) -> Segments:
    """Group items by ``(view, cloud, bucket)`` into the non-empty segments.

    Same result as :func:`any2point_fast.reference.bucket_sort`, bitwise: a stable sort of the
    keys gives ``perm``; a segment starts wherever the sorted key changes, so a running count of
    the starts numbers the segments in sorted order, and scattering it through ``perm`` gives
    every item its segment.

    Args:
        bucket_ids: ``[V, B, N]`` integer per-cloud bucket ids in ``[0, num_buckets)``.
        num_buckets: buckets per view and cloud.

    Returns:
        The :class:`~any2point_fast.geometry.Segments` of the ``V·B·N`` items.
    """
    views, batch, _ = bucket_ids.shape
    device = bucket_ids.device
    group = torch.arange(views * batch, device=device).view(views, batch, 1)
    keys = (group * num_buckets + bucket_ids.long()).flatten()
    sorted_keys, perm = torch.sort(keys, stable=True)
    is_start = torch.ones_like(sorted_keys, dtype=torch.bool)
    is_start[1:] = sorted_keys[1:] != sorted_keys[:-1]
    starts = is_start.nonzero().squeeze(1)
    segment_of_position = is_start.cumsum(0) - 1
    segment_ids = torch.empty_like(segment_of_position).scatter_(0, perm, segment_of_position)
    offsets = torch.cat((starts, starts.new_full((1,), keys.numel())))
    counts = offsets[1:] - offsets[:-1]
    view_of_segment = sorted_keys[starts] // (batch * num_buckets)
    view_offsets = torch.searchsorted(view_of_segment, torch.arange(views + 1, device=device))
    return Segments(
        segment_ids=segment_ids.view(bucket_ids.shape),
        perm=perm,
        offsets=offsets,
        view_offsets=tuple(view_offsets.tolist()),
        max_len=int(counts.max()),
    )
