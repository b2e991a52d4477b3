"""``ClassificationHead``: ``[CLS]`` and max-pooled point tokens → class logits (DESIGN.md §1.5)."""

from __future__ import annotations

import torch
from torch import nn

from .config import Any2PointConfig
from .row_batch_norm import RowBatchNorm


class ClassificationHead(nn.Module):
    """``[CLS] ‖ max_i token_i`` ``[B, 2C]`` → Linear, BN, ReLU, dropout (twice, ``head_hidden`` wide)
    → Linear → ``[B, num_classes]``.

    The BatchNorms are :class:`RowBatchNorm`: a training batch of one cloud is normalised with the
    running statistics.

    Args:
        config: ``hidden_size`` (``C``), ``head_hidden``, ``head_dropout`` and ``num_classes``.
    """

    def __init__(self, config: Any2PointConfig):
        super().__init__()
        width, hidden, drop = config.hidden_size, config.head_hidden, config.head_dropout
        layers: list[nn.Module] = []
        for fan_in in (2 * width, hidden):
            layers += [nn.Linear(fan_in, hidden), RowBatchNorm(hidden), nn.ReLU(inplace=True), nn.Dropout(drop)]
        self.mlp = nn.Sequential(*layers, nn.Linear(hidden, config.num_classes))

    def forward(self, x: torch.Tensor, num_prefix_tokens: int = 1) -> torch.Tensor:
        """``x``: ``[B, P + N, C]`` final-normed tokens, ``P`` prefix tokens first (the first one
        is ``[CLS]``) → logits ``[B, num_classes]``."""
        cls, points = x[:, 0], x[:, num_prefix_tokens:]
        return self.mlp(torch.cat((cls, points.amax(dim=1)), dim=-1))


__all__ = ["ClassificationHead"]
