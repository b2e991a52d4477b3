"""Farthest point sampling in one launch: a program per cloud runs the whole greedy loop.

Each program keeps its cloud's running minimum distances in a ``[B, P]`` float32 scratch tensor
and walks the points a block at a time per sample, updating them and carrying the farthest point
so far (ties to the lowest index, like ``argmax``). Distances are ``(dx² + dy²) + dz²`` in
float32, as the reference forms them. k-nearest neighbours have no Triton kernel: the op
registry runs the torch path's blocked ranking on CUDA tensors too.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import pow2_at_least, tmax


@triton.jit
def _farthest_point_sample_kernel(xyz_ptr, nearest_ptr, picked_ptr, num_points, num_samples,
                                  BLOCK: tl.constexpr):
    cloud = tl.program_id(0).to(tl.int64)
    xyz = xyz_ptr + cloud * num_points * 3
    nearest = nearest_ptr + cloud * num_points
    last = tl.full((), 0, tl.int32)
    for s in range(1, num_samples):
        cx = tl.load(xyz + last * 3)
        cy = tl.load(xyz + last * 3 + 1)
        cz = tl.load(xyz + last * 3 + 2)
        best = tl.full((), float("-inf"), tl.float32)
        best_index = tl.full((), 0, tl.int32)
        for first in range(0, num_points, BLOCK):
            offsets = first + tl.arange(0, BLOCK)
            inside = offsets < num_points
            dx = tl.load(xyz + offsets * 3, mask=inside, other=0.0) - cx
            dy = tl.load(xyz + offsets * 3 + 1, mask=inside, other=0.0) - cy
            dz = tl.load(xyz + offsets * 3 + 2, mask=inside, other=0.0) - cz
            dist = (dx * dx + dy * dy) + dz * dz
            m = tl.minimum(tl.load(nearest + offsets, mask=inside, other=float("-inf")), dist)
            m = tl.where(inside, m, float("-inf"))
            tl.store(nearest + offsets, m, mask=inside)
            block_best = tmax(m, 0)
            block_index = tl.argmax(m, 0).to(tl.int32) + first
            farther = block_best > best
            best_index = tl.where(farther, block_index, best_index)
            best = tl.where(farther, block_best, best)
        tl.store(picked_ptr + cloud * num_samples + s, best_index.to(tl.int64))
        last = best_index
        tl.debug_barrier()


def farthest_point_sample(xyz: torch.Tensor, num_samples: int) -> torch.Tensor:
    """``[B, P, 3]`` float clouds → ``[B, S]`` int64 indices of their greedy farthest points, one
    program per cloud (see :func:`any2point_fast.reference.farthest_point_sample`)."""
    batch, num_points, _ = xyz.shape
    if not 0 < num_samples <= num_points:
        raise ValueError(f"cannot sample {num_samples} of {num_points} points")
    xyz = xyz.detach().float().contiguous()
    picked = torch.zeros(batch, num_samples, dtype=torch.long, device=xyz.device)
    nearest = torch.full((batch, num_points), float("inf"), device=xyz.device)
    block = min(2048, pow2_at_least(num_points))
    _farthest_point_sample_kernel[(batch,)](xyz, nearest, picked, num_points, num_samples, BLOCK=block,
                                            num_warps=8 if block >= 1024 else 4)
    return picked


__all__ = ["farthest_point_sample"]
