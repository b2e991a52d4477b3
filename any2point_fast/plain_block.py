"""``PlainBlock``: the pre-LN transformer layer of the stand-in backbone (:class:`~any2point_fast.StandInModel`).

A small randomly initialised, frozen transformer stands in for a pretrained one (DESIGN.md §1.3)
so that the whole method runs without a download. The stand-in model runs a block in two parts,
because the guided adapter goes between its FFN and the residual sum:
``h = x + Attn(LN1(x))`` (:meth:`PlainBlock.attention`), then ``adapter(h, MLP(LN2(h)))``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PlainBlock(nn.Module):
    """A pre-LN transformer block of width ``C``: bidirectional multi-head attention over the tokens
    of each cloud, then a GELU MLP of width ``mlp_ratio · C``.

    Args:
        hidden_size: ``C``.
        num_heads: attention heads (``C`` divisible by it).
        mlp_ratio: MLP width over ``C``.
    """

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: int = 4):
        super().__init__()
        self.num_heads = num_heads
        self.norm1 = nn.LayerNorm(hidden_size)
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.proj = nn.Linear(hidden_size, hidden_size)
        self.norm2 = nn.LayerNorm(hidden_size)
        inner = mlp_ratio * hidden_size
        self.mlp = nn.Sequential(nn.Linear(hidden_size, inner), nn.GELU(), nn.Linear(inner, hidden_size))

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """``x + Attn(LN1(x))``: ``[B, T, C]`` → ``[B, T, C]``."""
        batch, tokens, channels = x.shape
        qkv = self.qkv(self.norm1(x)).view(batch, tokens, 3, self.num_heads, channels // self.num_heads)
        q, k, v = qkv.transpose(1, 3).unbind(dim=2)  # [B, H, T, d] each
        attended = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj(attended.transpose(1, 2).reshape(batch, tokens, channels))

    def ffn(self, h: torch.Tensor) -> torch.Tensor:
        """``MLP(LN2(h))``: ``[B, T, C]`` → ``[B, T, C]``."""
        return self.mlp(self.norm2(h))


__all__ = ["PlainBlock"]
