"""The 3D tokenizer on the fused ops (DESIGN.md §1.1): a light Point-PN.

raw xyz ``[B, P, 3]`` → per-point Linear+BN+ReLU embedding → stages of farthest point sampling
(:func:`ops.farthest_point_sample`), k nearest neighbours (:func:`ops.knn`) and the aggregation of
each neighbourhood (:func:`ops.neighborhood_aggregate`), channels doubling per stage → tokens
``[B, N, hidden_size]`` and centres ``[B, N, 3]``.

Parameter names match :class:`any2point_fast.reference.PointTokenizer`, so that state dicts load
both ways (the property tests copy weights across).
"""

from __future__ import annotations

import torch
from torch import nn

from . import ops
from .config import Any2PointConfig
from .row_batch_norm import update_running_stats


def _rows_of(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``values[b, index[b, ...]]``: ``[B, P, C]`` rows picked by ``[B, *S]`` → ``[B, *S, C]``,
    as one ``index_select`` over the flattened batch."""
    batch, num_points, channels = values.shape
    offsets = torch.arange(batch, device=index.device).view(-1, *([1] * (index.dim() - 1))) * num_points
    flat = values.reshape(batch * num_points, channels).index_select(0, (index + offsets).reshape(-1))
    return flat.view(*index.shape, channels)


class GroupingStage(nn.Module):
    """One stage: ``S`` centres by farthest point sampling, their ``k`` nearest points, and the
    aggregation of each neighbourhood.

    A neighbour's feature and its centre's (``2·C_in`` channels) plus the position code of its
    offset (divided by the standard deviation of all offsets of its cloud) pass a residual
    bottleneck MLP (BatchNorm over every neighbour of the batch) and are max-pooled over the ``k``,
    in one op (:func:`ops.neighborhood_aggregate`); the BatchNorms' running statistics are updated
    here, as ``nn.BatchNorm1d`` updates them.
    """

    def __init__(self, in_dim: int, num_samples: int, k: int, bottleneck: int, alpha: float, beta: float):
        super().__init__()
        self.out_dim, self.num_samples, self.k = 2 * in_dim, num_samples, k
        hidden = max(1, self.out_dim // bottleneck)
        self.mlp = nn.Sequential(
            nn.Linear(self.out_dim, hidden, bias=False),
            nn.BatchNorm1d(hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, self.out_dim, bias=False),
            nn.BatchNorm1d(self.out_dim),
        )
        self.alpha, self.beta = alpha, beta

    def forward(self, xyz: torch.Tensor, feat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B, P, 3]``, ``[B, P, C]`` → centres ``[B, S, 3]``, features ``[B, S, 2C]``."""
        batch, num_points, _ = feat.shape
        k = min(self.k, num_points)
        centre_index = ops.farthest_point_sample(xyz, self.num_samples)  # [B, S]
        centres = _rows_of(xyz, centre_index)
        neighbour_index = ops.knn(centres, xyz, k)  # [B, S, k]
        offsets = _rows_of(xyz, neighbour_index) - centres.unsqueeze(2)
        spread = offsets.reshape(batch, -1).float().std(dim=1).to(offsets.dtype)
        offsets = offsets / (spread.view(batch, 1, 1, 1) + 1e-5)
        linear1, norm1, _, linear2, norm2 = self.mlp
        # the BatchNorms' own flags decide, as if they ran as modules: `model.eval()` then `bn.train()`
        # (recomputing BatchNorm statistics) must use and update batch statistics here too
        training = norm1.training
        if norm2.training != training:
            raise ValueError("the two BatchNorms of a tokenizer stage must both be in training or both in "
                             "evaluation mode")
        # training normalises with batch statistics and updates the running ones in place below: the op
        # gets copies, which a compiled backward (it reruns the op's forward) may still read unchanged
        stats = [t.clone() if training else t
                 for t in (norm1.running_mean, norm1.running_var, norm2.running_mean, norm2.running_var)]
        out, mean1, var1, mean2, var2 = ops.neighborhood_aggregate(
            feat, offsets, centre_index, neighbour_index, linear1.weight, norm1.weight, norm1.bias, *stats[:2],
            linear2.weight, norm2.weight, norm2.bias, *stats[2:], training, norm1.eps, self.alpha, self.beta)
        if training:
            rows = neighbour_index.numel()
            with torch.no_grad():
                update_running_stats(norm1, mean1, var1 * rows / (rows - 1))
                update_running_stats(norm2, mean2, var2 * rows / (rows - 1))
        return centres, out


class PointTokenizer(nn.Module):
    """Point-PN-lite: ``[B, P, 3]`` → tokens ``[B, N, hidden_size]`` and centres ``[B, N, 3]``."""

    def __init__(self, config: Any2PointConfig):
        super().__init__()
        self.embed = nn.Sequential(
            nn.Linear(3, config.tokenizer_dim, bias=False),
            nn.BatchNorm1d(config.tokenizer_dim),
            nn.ReLU(inplace=True),
        )
        stages, dim = [], config.tokenizer_dim
        for num_samples in config.token_counts:
            stages.append(GroupingStage(dim, num_samples, config.knn_k, config.tokenizer_bottleneck,
                                        config.pos_alpha, config.pos_beta))
            dim = stages[-1].out_dim
        self.stages = nn.ModuleList(stages)
        self.proj = nn.Identity() if dim == config.hidden_size else nn.Linear(dim, config.hidden_size)

    def forward(self, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B, P, 3]`` float → tokens ``[B, N, hidden_size]``, centres ``[B, N, 3]`` (``points``' dtype)."""
        batch, num_points, _ = points.shape
        # raw coordinates of any scale (1e6 overflows float16) are embedded in float32 whatever
        # autocast says; the embedding's BatchNorm brings the features to O(1)
        with torch.autocast(points.device.type, enabled=False):
            wide = points.to(torch.promote_types(points.dtype, torch.float32))
            feat = self.embed(wide.view(batch * num_points, 3)).view(batch, num_points, -1)
        xyz = points
        for stage in self.stages:
            xyz, feat = stage(xyz, feat)
        return self.proj(feat), xyz


__all__ = ["GroupingStage", "PointTokenizer"]
