"""3-NN inverse-distance interpolation on the torch path: the blocked kNN ranking (no ``[B, P, N]``
distances), then one weighted row gather per neighbour; backward is the gathers' scatter-add."""

from __future__ import annotations

import torch

from ._common import compute_dtype
from .sampling import knn


def _rows(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``values[b, index[b, p]]``: ``[B, N, C]`` rows picked by ``[B, P]`` → ``[B, P, C]``."""
    return torch.gather(values, 1, index[..., None].expand(-1, -1, values.shape[-1]))


def interpolate_features(points: torch.Tensor, centers: torch.Tensor, features: torch.Tensor,
                         eps: float = 1e-8) -> torch.Tensor:
    """Inverse-distance weighted mean of the features of the 3 nearest centres (see the reference's).

    Args:
        points: ``[B, P, 3]`` float; centers: ``[B, N, 3]`` float; features: ``[B, N, C]`` float,
            contiguous or not.
        eps: added to every distance.

    Returns:
        ``[B, P, C]`` in the dtype of ``features`` (float32 inside, float64 for float64 inputs);
        gradients flow to ``features`` only.
    """
    dtype = compute_dtype(features)
    k = min(3, centers.shape[1])
    index = knn(points, centers, k)  # [B, P, k]
    p, c = points.detach().to(dtype), centers.detach().to(dtype)
    weight = torch.stack([1.0 / ((_rows(c, index[..., j]) - p).norm(dim=-1) + eps) for j in range(k)], -1)
    weight = weight / weight.sum(-1, keepdim=True)
    values = features.to(dtype)
    out = _rows(values, index[..., 0]) * weight[..., 0, None]
    for j in range(1, k):
        out = out + _rows(values, index[..., j]) * weight[..., j, None]
    return out.to(features.dtype)


__all__ = ["interpolate_features"]
