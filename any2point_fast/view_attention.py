"""``ViewAttention``: the per-view ``LN_j`` and ``Attn_j`` of the guided adapter (paper §2.3; DESIGN.md §1.4).

One LayerNorm and one small attention (``C → D → C``, ``D = heads · head_dim``, 12 = 6 × 2 in
the published recipes) per view ``j``, shared by the adapters of all blocks of a model: build it
once and pass it to every :class:`~any2point_fast.Any2PointAdapter`. It holds parameters only;
the adapter runs them through :func:`any2point_fast.ops.neighborhood_attention_pool`.
"""

from __future__ import annotations

import torch
from torch import nn


class ViewAttention(nn.Module):
    """The ``M`` views' LayerNorm and bucket-local attention weights, stacked per view.

    Args:
        hidden_size: ``C``, the backbone width.
        num_views: ``M``.
        attn_dim: ``D``, the attention width.
        num_heads: heads of the attention (``D`` divisible by it).

    Attributes:
        ln_weight, ln_bias: ``[M, C]``, LayerNorm affine (ones, zeros).
        qkv_weight: ``[M, 3D, C]``, ``qkv_bias``: ``[M, 3D]``; ``out_weight``: ``[M, C, D]``,
            ``out_bias``: ``[M, C]``; weights drawn from ``N(0, 0.02²)``, biases zero.
    """

    def __init__(self, hidden_size: int, num_views: int, attn_dim: int, num_heads: int):
        super().__init__()
        if attn_dim % num_heads:
            raise ValueError(f"attn_dim={attn_dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.ln_weight = nn.Parameter(torch.ones(num_views, hidden_size))
        self.ln_bias = nn.Parameter(torch.zeros(num_views, hidden_size))
        self.qkv_weight = nn.Parameter(0.02 * torch.randn(num_views, 3 * attn_dim, hidden_size))
        self.qkv_bias = nn.Parameter(torch.zeros(num_views, 3 * attn_dim))
        self.out_weight = nn.Parameter(0.02 * torch.randn(num_views, hidden_size, attn_dim))
        self.out_bias = nn.Parameter(torch.zeros(num_views, hidden_size))

    def weights(self) -> tuple[torch.Tensor, ...]:
        """``(ln_weight, ln_bias, qkv_weight, qkv_bias, out_weight, out_bias)``: the argument order of
        :func:`~any2point_fast.ops.neighborhood_attention_pool`."""
        return self.ln_weight, self.ln_bias, self.qkv_weight, self.qkv_bias, self.out_weight, self.out_bias

    def extra_repr(self) -> str:
        views, channels = self.ln_weight.shape
        attn_dim = self.out_weight.shape[2]
        return f"hidden_size={channels}, num_views={views}, attn_dim={attn_dim}, num_heads={self.num_heads}"


__all__ = ["ViewAttention"]
