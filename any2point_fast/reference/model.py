"""``ReferenceModel``: tokenizer + virtual projection + a small frozen plain transformer + adapters + head.

The plain pre-LN transformer stands in for a pretrained backbone (DESIGN.md §1.3) so that the
whole method can be run and tested without any download; its weights and PE table are
random and frozen, as a real backbone's would be.
"""

from __future__ import annotations

from collections.abc import Collection

import torch
import torch.nn.functional as F
from torch import nn

from ..config import Any2PointConfig
from ..geometry import Geometry, ProjectionSpec
from ..validation import check_points
from .adapter import ReferenceAdapter, RowBatchNorm, ViewAttention
from .buckets import build_geometry
from .tokenizer import PointTokenizer


class PlainBlock(nn.Module):
    """A pre-LN transformer block: ``h = x + Attn(LN1(x))``, ``ffn = MLP(LN2(h))``."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: int = 4):
        super().__init__()
        self.num_heads = num_heads
        self.norm1 = nn.LayerNorm(hidden_size)
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.proj = nn.Linear(hidden_size, hidden_size)
        self.norm2 = nn.LayerNorm(hidden_size)
        self.mlp = nn.Sequential(
            nn.Linear(hidden_size, mlp_ratio * hidden_size), nn.GELU(), nn.Linear(mlp_ratio * hidden_size, hidden_size)
        )

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """``x + Attn(LN1(x))``, bidirectional, over the tokens of each cloud. ``[B, T, C]``."""
        batch, tokens, channels = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(batch, tokens, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(batch, tokens, channels)
        return x + self.proj(attended)

    def ffn(self, h: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.norm2(h))


class ClassificationHead(nn.Module):
    """``[CLS]`` ‖ max-pooled tokens ``[B, 2C]`` → MLP 256-256 with BN and dropout → ``[B, classes]``.

    A training batch of one cloud is normalised with the running statistics (:class:`RowBatchNorm`).
    """

    def __init__(self, config: Any2PointConfig):
        super().__init__()
        hidden, drop = config.head_hidden, config.head_dropout
        self.mlp = nn.Sequential(
            nn.Linear(2 * config.hidden_size, hidden), RowBatchNorm(hidden), nn.ReLU(inplace=True), nn.Dropout(drop),
            nn.Linear(hidden, hidden), RowBatchNorm(hidden), nn.ReLU(inplace=True), nn.Dropout(drop),
            nn.Linear(hidden, config.num_classes),
        )

    def forward(self, x: torch.Tensor, num_prefix_tokens: int = 1) -> torch.Tensor:
        """``x``: ``[B, P + N, C]`` after the final norm → logits ``[B, num_classes]``."""
        return self.mlp(torch.cat((x[:, 0], x[:, num_prefix_tokens:].amax(dim=1)), dim=-1))


class ReferenceModel(nn.Module):
    """The whole Any2Point method on a small frozen plain transformer, all in reference code.

    Args:
        config: the method's hyper-parameters (``hidden_size`` is the stand-in's width).
        num_layers, num_heads: size of the stand-in transformer.
        seed: seeds the frozen stand-in weights and PE table, so two models built with the same
            seed share their "pretrained" backbone.
    """

    def __init__(self, config: Any2PointConfig, num_layers: int = 4, num_heads: int = 4, seed: int = 0):
        super().__init__()
        self.config = config
        c = config.hidden_size
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.blocks = nn.ModuleList(PlainBlock(c, num_heads) for _ in range(num_layers))
            self.final_norm = nn.LayerNorm(c)
            shape = (config.pe_length, c) if config.pe_kind == "1d" else (*config.pe_grid, c)
            self.register_buffer("pe_table", torch.randn(shape) * 0.02)
        for p in [*self.blocks.parameters(), *self.final_norm.parameters()]:
            p.requires_grad_(False)
        self.spec = ProjectionSpec.from_config(config)
        self.tokenizer = PointTokenizer(config)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c))
        self.cls_pos = nn.Parameter(torch.randn(1, 1, c) * 0.02)
        self.view_attention = ViewAttention(c, config.num_views, config.attn_dim, config.attn_heads)
        self.adapters = nn.ModuleList(ReferenceAdapter(config, self.view_attention) for _ in range(num_layers))
        self.head = ClassificationHead(config)

    def geometry(self, centers: torch.Tensor) -> tuple[torch.Tensor, Geometry]:
        """Averaged PE ``[B, N, C]`` and the bucket geometry of the token centres ``[B, N, 3]``."""
        return build_geometry(centers, self.pe_table, self.spec, self.config.voxel_size)

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        """``points``: ``[B, P, 3]`` float → logits ``[B, num_classes]``."""
        return self.head(self.encode(points)[0])

    def encode(self, points: torch.Tensor, keep: Collection[int] = ()) -> tuple[torch.Tensor, torch.Tensor,
                                                                                dict[int, torch.Tensor]]:
        """``points`` ``[B, P, 3]`` → final-normed tokens ``[B, 1 + N, C]`` (``[CLS]`` first), token
        centres ``[B, N, 3]``, and the output ``[B, 1 + N, C]`` of every block index in ``keep``."""
        tokens, centers = self.tokenizer(check_points(points, self.config.num_points))
        pe, geometry = self.geometry(centers)
        batch = tokens.shape[0]
        pos = torch.cat((self.cls_pos.expand(batch, -1, -1), pe.to(tokens.dtype)), dim=1)
        x = torch.cat((self.cls_token.expand(batch, -1, -1), tokens), dim=1)
        kept = {}
        for index, (block, adapter) in enumerate(zip(self.blocks, self.adapters)):
            if index == 0 or self.config.pe_every_block:
                x = x + pos
            h = block.attention(x)
            x = adapter(h, block.ffn(h), geometry)
            if index in keep:
                kept[index] = x
        return self.final_norm(x), centers, kept
