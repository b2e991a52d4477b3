"""3-nearest-neighbour inverse-distance interpolation of token features onto points (the
segmentation head's feature propagation, as in PointNet++)."""

from __future__ import annotations

import torch

from .sampling import knn


def interpolate_features(points: torch.Tensor, centers: torch.Tensor, features: torch.Tensor,
                         eps: float = 1e-8) -> torch.Tensor:
    """Features at ``points``: the inverse-distance weighted mean of the features of the 3 nearest centres.

    ``w_j = 1 / (d_j + eps)`` with ``d_j`` the Euclidean distance to the ``j``-th nearest centre
    (``min(3, N)`` of them), normalised to sum to 1 over them. The neighbours and weights are
    constants: gradients flow to ``features`` only.

    Args:
        points: ``[B, P, 3]`` float query positions.
        centers: ``[B, N, 3]`` float token centres.
        features: ``[B, N, C]`` float token features.
        eps: added to every distance (a point on a centre takes that centre's features).

    Returns:
        ``[B, P, C]`` in the dtype of ``features`` (computed in float32).
    """
    k = min(3, centers.shape[1])
    index = knn(points, centers, k)  # [B, P, k]
    dist = torch.cdist(points.detach().float(), centers.detach().float())  # dense [B, P, N]: the oracle
    weight = 1.0 / (torch.gather(dist, 2, index) + eps)
    weight = weight / weight.sum(-1, keepdim=True)
    dense = torch.zeros_like(dist).scatter_(2, index, weight)  # [B, P, N], k non-zeros per row
    return (dense @ features.float()).to(features.dtype)
