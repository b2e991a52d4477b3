"""How far draws are from the discontinuities of max pooling, for property tests to skip the close ones."""

from __future__ import annotations

import math

import torch

from any2point_fast import reference
from any2point_fast.geometry import Segments


def min_max_margin(x: torch.Tensor, segments: Segments, weights: list[torch.Tensor], num_heads: int) -> float:
    """Smallest relative gap between a bucket's largest ``t_j`` value and the next one (0 for a tie).

    Max-pooling gradients jump where two tokens swap places; a fast path and the reference
    round differently (by ~1e-7), so property tests skip draws whose top two values are that
    close; exact ties are tested on their own, with inputs that make them exact in every backend.

    Args:
        x: ``[B, N, C]`` tokens; ``weights``: the six ``[M, ...]`` view-attention parameters.
    """
    margin = math.inf
    for j in range(segments.num_views):
        ids = segments.segment_ids[j]
        w = [p.detach()[j].float() for p in weights]
        t = reference.adapter.bucket_attention(x.detach().float(), ids[:, :, None] == ids[:, None, :], *w, num_heads)
        t, flat = t.reshape(-1, t.shape[-1]), ids.flatten()
        index = flat[:, None].expand_as(t)
        empty = torch.full((segments.num_segments, t.shape[1]), float("-inf"), device=t.device)
        top = empty.scatter_reduce(0, index, t, "amax")
        at_top = t == top[flat]
        num_top = torch.zeros_like(top).scatter_add_(0, index, at_top.float())
        second = empty.scatter_reduce(0, index, t.masked_fill(at_top, float("-inf")), "amax")
        gap = torch.where(num_top > 1, 0.0, (top - second) / top.abs().clamp_min(1))
        shared = torch.bincount(flat, minlength=segments.num_segments) > 1
        if bool(shared.any()):
            margin = min(margin, float(gap[shared].min()))
    return margin
