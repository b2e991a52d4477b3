"""``RowBatchNorm``: BatchNorm over rows ``[S, C]`` that also takes a single row in training.

The adapter normalises pooled bucket and voxel rows, and the classification head one row per
cloud; either can be a single row in a training step (one non-empty bucket in a whole batch, a
batch of one cloud), where batch statistics are undefined and ``nn.BatchNorm1d`` raises.
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


__all__ = ["RowBatchNorm"]
