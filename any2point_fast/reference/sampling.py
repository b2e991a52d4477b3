"""Farthest point sampling and k-nearest neighbours (DESIGN.md §1.1)."""

from __future__ import annotations

import torch


def farthest_point_sample(xyz: torch.Tensor, num_samples: int) -> torch.Tensor:
    """Greedy farthest point sampling, starting from point 0 of every cloud.

    Each step picks the point with the largest squared distance to the points picked so far;
    ties go to the lowest index (``argmax`` semantics), so the result is deterministic.

    Args:
        xyz: ``[B, P, 3]`` float coordinates.
        num_samples: ``S <= P`` points to keep.

    Returns:
        ``[B, S]`` int64 indices into ``P``.
    """
    batch, num_points, _ = xyz.shape
    if not 0 < num_samples <= num_points:
        raise ValueError(f"cannot sample {num_samples} of {num_points} points")
    xyz = xyz.float()
    picked = torch.zeros(batch, num_samples, dtype=torch.long, device=xyz.device)
    min_dist = torch.full((batch, num_points), float("inf"), device=xyz.device)
    last = torch.zeros(batch, dtype=torch.long, device=xyz.device)
    rows = torch.arange(batch, device=xyz.device)
    for s in range(1, num_samples):
        d = ((xyz - xyz[rows, last][:, None]) ** 2).sum(-1)
        min_dist = torch.minimum(min_dist, d)
        last = min_dist.argmax(dim=1)
        picked[:, s] = last
    return picked


def knn(query: torch.Tensor, points: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` nearest ``points`` of every query point, nearest first.

    Args:
        query: ``[B, S, 3]`` float.
        points: ``[B, P, 3]`` float, ``k <= P``.

    Returns:
        ``[B, S, k]`` int64 indices into ``P``.
    """
    if not 0 < k <= points.shape[1]:
        raise ValueError(f"k = {k} neighbours requested from {points.shape[1]} points")
    q, p = query.float(), points.float()
    # |q|² + |p|² − 2 q·p is exact enough for ranking and avoids a [B, S, P, 3] temporary.
    dist = (q * q).sum(-1, keepdim=True) + (p * p).sum(-1)[:, None, :] - 2 * q @ p.transpose(1, 2)
    return dist.topk(k, dim=-1, largest=False, sorted=True).indices


def gather_points(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``values[b, index[b, ...]]``: ``[B, P, C]`` gathered by ``[B, *S]`` → ``[B, *S, C]``."""
    batch = values.shape[0]
    flat = index.reshape(batch, -1)
    out = torch.gather(values, 1, flat[..., None].expand(-1, -1, values.shape[-1]))
    return out.reshape(*index.shape, values.shape[-1])
