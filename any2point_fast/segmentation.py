"""Part segmentation on the unchanged Any2Point encoder (the head the peers use on ShapeNetPart).

points → the encoder of an :class:`~any2point_fast.model.Any2PointModel` or
:class:`~any2point_fast.model.StandInModel` (tokenizer, projection, frozen blocks with adapters;
its classification head removed) → the point tokens of three blocks (evenly spaced: blocks
4/8/12 of a 12-block backbone), each LayerNorm'd → concatenated → propagated to every input
point by :func:`any2point_fast.ops.interpolate_features` (3-NN inverse-distance weights) →
concatenated with the point's xyz and a learned embedding of the shape's category (one-hot →
linear) → a shared per-point MLP → part logits.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import ops


def evenly_spaced_blocks(num_blocks: int, count: int = 3) -> tuple[int, ...]:
    """``count`` block indices (0-based) ending at the last block, evenly spaced: 12 blocks → (3, 7, 11).

    Shallow backbones repeat blocks (2 blocks → (0, 0, 1)), so the head's width never changes.
    """
    return tuple(max(0, round(num_blocks * (i + 1) / count) - 1) for i in range(count))


class PartSegmentationHead(nn.Module):
    """Token features of several depths + category → per-point part logits.

    Args:
        width: token width ``C``; num_depths: how many blocks' tokens are given (``D``).
        num_categories, num_parts: categories and parts of all categories (16 / 50 on ShapeNetPart).
        hidden: width of the last hidden layer (the first is twice as wide); dropout after the first.
        category_dim: width of the category embedding.
    """

    def __init__(self, width: int, num_depths: int, num_categories: int, num_parts: int, hidden: int = 256,
                 dropout: float = 0.5, category_dim: int = 64):
        super().__init__()
        self.num_categories = num_categories
        self.norms = nn.ModuleList(nn.LayerNorm(width) for _ in range(num_depths))
        self.category = nn.Linear(num_categories, category_dim)
        self.mlp = nn.Sequential(
            nn.Linear(num_depths * width + category_dim + 3, 2 * hidden), nn.BatchNorm1d(2 * hidden),
            nn.ReLU(inplace=True), nn.Dropout(dropout),
            nn.Linear(2 * hidden, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
            nn.Linear(hidden, num_parts),
        )

    def forward(self, points: torch.Tensor, centers: torch.Tensor, tokens: Sequence[torch.Tensor],
                category: torch.Tensor) -> torch.Tensor:
        """``points`` ``[B, P, 3]``, token ``centers`` ``[B, N, 3]``, ``tokens`` ``D × [B, N, C]``,
        ``category`` ``[B]`` int64 → logits ``[B, P, num_parts]`` (float, the tokens' dtype)."""
        features = torch.cat([norm(t) for norm, t in zip(self.norms, tokens)], dim=-1)
        per_point = ops.interpolate_features(points, centers, features)
        batch, num_points, _ = points.shape
        embedded = self.category(F.one_hot(category, self.num_categories).to(per_point.dtype))
        rows = torch.cat((per_point, embedded[:, None].expand(-1, num_points, -1), points.to(per_point.dtype)), -1)
        return self.mlp(rows.reshape(batch * num_points, -1)).reshape(batch, num_points, -1)


class PartSegmentationModel(nn.Module):
    """An Any2Point encoder with a :class:`PartSegmentationHead` in place of its classification head.

    Args:
        encoder: an ``Any2PointModel`` or ``StandInModel`` (anything with ``encode(points, keep)``
            and ``blocks``); its ``head`` is removed.
        num_categories, num_parts: of the dataset.
        blocks: the block indices whose tokens are used (default :func:`evenly_spaced_blocks`).
        hidden, dropout: of the head's MLP.

    ``forward(points [B, P, 3], category [B] int64) → [B, P, num_parts]`` logits.
    """

    head_type = "partseg"

    def __init__(self, encoder: nn.Module, num_categories: int, num_parts: int,
                 blocks: Sequence[int] | None = None, hidden: int = 256, dropout: float = 0.5):
        super().__init__()
        encoder.head = None
        self.encoder = encoder
        self.blocks = tuple(blocks) if blocks is not None else evenly_spaced_blocks(len(encoder.blocks))
        self.num_prefix_tokens = getattr(encoder, "num_prefix_tokens", 1)
        self.head = PartSegmentationHead(encoder.config.hidden_size, len(self.blocks), num_categories, num_parts,
                                         hidden, dropout)

    @property
    def config(self):
        """The encoder's :class:`~any2point_fast.config.Any2PointConfig`."""
        return self.encoder.config

    @property
    def pe_table(self) -> torch.Tensor:
        """The encoder's frozen PE table."""
        return self.encoder.pe_table

    def forward(self, points: torch.Tensor, category: torch.Tensor) -> torch.Tensor:
        _, centers, kept = self.encoder.encode(points, keep=set(self.blocks))
        tokens = [kept[b][:, self.num_prefix_tokens:] for b in self.blocks]
        return self.head(points, centers, tokens, category)


__all__ = ["PartSegmentationHead", "PartSegmentationModel", "evenly_spaced_blocks"]
