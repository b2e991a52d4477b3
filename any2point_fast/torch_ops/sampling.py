"""The tokenizer's sampling ops on the torch path: farthest point sampling and k-nearest neighbours.

``farthest_point_sample`` runs the whole greedy loop of every cloud in one compiled CPU call
(:mod:`.native`, a cloud per thread); elsewhere (CUDA without Triton, or no compiler) it steps in
PyTorch, a few batched ops per sample. ``knn`` ranks the points of a block of queries at a time,
so no ``[B, S, P]`` distance tensor exists for large ``P``: at most :data:`KNN_BLOCK_ELEMENTS`
distances are alive at once.
"""

from __future__ import annotations

import torch

from . import native

#: Distances ``[B, rows, P]`` ranked at once by :func:`knn` (16 MiB in float32).
KNN_BLOCK_ELEMENTS = 1 << 22


def farthest_point_sample(xyz: torch.Tensor, num_samples: int, *, compiled: bool | None = None) -> torch.Tensor:
    """``[B, P, 3]`` float clouds → ``[B, S]`` int64 indices of their greedy farthest points (see
    :func:`any2point_fast.reference.farthest_point_sample`); distances in float32 whatever the dtype.
    ``compiled``: the whole loop in one compiled CPU call (:mod:`.native`), or (``False``) a few
    batched PyTorch ops per sample; ``None``: compiled wherever the kernels run."""
    batch, num_points, _ = xyz.shape
    if not 0 < num_samples <= num_points:
        raise ValueError(f"cannot sample {num_samples} of {num_points} points")
    xyz = xyz.detach().float().contiguous()
    if native.resolve(compiled, xyz.device):
        return native.ops().farthest_point_sample(xyz, num_samples)
    picked = xyz.new_zeros(batch, num_samples, dtype=torch.long)
    nearest = xyz.new_full((batch, num_points), float("inf"))
    for s in range(1, num_samples):
        centre = torch.gather(xyz, 1, picked[:, s - 1, None, None].expand(-1, 1, 3))
        torch.minimum(nearest, (xyz - centre).square().sum(-1), out=nearest)
        picked[:, s] = nearest.argmax(dim=1)
    return picked


def knn(query: torch.Tensor, points: torch.Tensor, k: int, block_elements: int = KNN_BLOCK_ELEMENTS) -> torch.Tensor:
    """Indices of the ``k`` nearest ``points`` of every query point, nearest first.

    Args:
        query: ``[B, S, 3]`` float.
        points: ``[B, P, 3]`` float, ``k <= P``.
        block_elements: distances ranked at once (``B × rows × P``, at least one query row).

    Returns:
        ``[B, S, k]`` int64 indices into ``P``.
    """
    batch, num_queries, _ = query.shape
    num_points = points.shape[1]
    if not 0 < k <= num_points:
        raise ValueError(f"k = {k} neighbours requested from {num_points} points")
    q, p = query.detach().float(), points.detach().float()
    p_t = p.transpose(1, 2)
    p_norms = p.square().sum(-1)[:, None, :]
    out = torch.empty(batch, num_queries, k, dtype=torch.long, device=query.device)
    rows = max(1, block_elements // max(1, batch * num_points))
    for first in range(0, num_queries, rows):
        block = q[:, first:first + rows]
        dist = block.square().sum(-1, keepdim=True) + p_norms - 2 * block @ p_t
        out[:, first:first + rows] = dist.topk(k, dim=-1, largest=False, sorted=True).indices
    return out


__all__ = ["KNN_BLOCK_ELEMENTS", "farthest_point_sample", "knn"]
