"""``RowBatchNorm``: BatchNorm over rows ``[S, C]`` that also takes a single row in training.

The adapter normalises pooled bucket and voxel rows, and the classification head one row per
cloud; either can be a single row in a training step (one non-empty bucket in a whole batch, a
batch of one cloud), where batch statistics are undefined and ``nn.BatchNorm1d`` raises.

Also the running-statistics update of a BatchNorm module whose rows a fused op normalised
(:func:`update_running_stats`; :func:`update_running_stats_where` inside traced code).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RowBatchNorm(nn.BatchNorm1d):
    """``nn.BatchNorm1d`` over ``[S, C]`` rows; a single row in training is normalised with the
    running statistics, as in evaluation mode, and leaves them (and ``num_batches_tracked``) unchanged.

    Same parameters, buffers and ``state_dict`` as ``nn.BatchNorm1d``;
    ``nn.SyncBatchNorm.convert_sync_batchnorm`` turns it into a plain ``SyncBatchNorm``, whose
    statistics span every rank.
    """

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        """``[S, C]`` → ``[S, C]``."""
        if self.training and rows.shape[0] == 1:
            return F.batch_norm(rows, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0,
                                self.eps)
        return super().forward(rows)


def update_running_stats(norm: nn.modules.batchnorm._BatchNorm, mean: torch.Tensor,
                         unbiased_var: torch.Tensor) -> None:
    """What ``nn.BatchNorm1d`` does to its buffers in a training step whose batch had ``mean`` and
    ``unbiased_var`` ``[C]`` (``momentum=None``: cumulative average); for fused ops that normalise
    without the module."""
    norm.num_batches_tracked.add_(1)
    factor = 1 / norm.num_batches_tracked.item() if norm.momentum is None else norm.momentum
    norm.running_mean.lerp_(mean.to(norm.running_mean.dtype), factor)
    norm.running_var.lerp_(unbiased_var.to(norm.running_var.dtype), factor)


def update_running_stats_where(norm: nn.modules.batchnorm._BatchNorm, own: torch.Tensor, mean: torch.Tensor,
                               unbiased_var: torch.Tensor) -> None:
    """:func:`update_running_stats` where the 0-d bool ``own`` holds, the buffers unchanged elsewhere,
    without reading a tensor on the host (traced code)."""
    norm.num_batches_tracked.add_(own.long())
    factor = 1 / norm.num_batches_tracked.clamp_min(1) if norm.momentum is None else norm.momentum
    for buffer, value in ((norm.running_mean, mean), (norm.running_var, unbiased_var)):
        buffer.copy_(torch.where(own, buffer.lerp(value.to(buffer.dtype), factor), buffer))


__all__ = ["RowBatchNorm", "update_running_stats", "update_running_stats_where"]
