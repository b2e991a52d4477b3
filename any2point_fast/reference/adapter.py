"""The any-to-3D guided adapter (paper §2.3, Eq. 3, Fig. 4; DESIGN.md §1.4), literally.

Every function here is the oracle of a fused op in :mod:`any2point_fast.ops`: it computes in
float32 whatever the input dtype, uses dense ``[B, N, N]`` bucket masks for attention, and
returns the input dtype.

Deviations from the published code (each pinned by a test):

- local attention is over the tokens of one cloud; the published frozen block feeds
  ``(B, N+1, C)`` to a sequence-first ``nn.MultiheadAttention``, mixing clouds;
- attention logits are scaled by ``1/sqrt(head_dim)``, not by the 12-channel width;
- BatchNorm statistics are taken over the non-empty buckets only;
- max-pool ties share the gradient equally among the tied tokens (``scatter_reduce`` "amax").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import Any2PointConfig
from ..geometry import Geometry, Segments
from ..validation import check_adapter_inputs

#: ``k`` of QuickGELU, ``x · sigmoid(k x)``.
QUICK_GELU_K = 1.702


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """CLIP's ``x · sigmoid(1.702 x)``."""
    return x * torch.sigmoid(QUICK_GELU_K * x)


def segment_pool(values: torch.Tensor, segment_ids: torch.Tensor, num_segments: int, pooling: str) -> torch.Tensor:
    """Pool rows into segments: ``mean`` or ``max + mean`` (the two summed).

    Args:
        values: ``[T, C]`` rows.
        segment_ids: ``[T]`` int64 in ``[0, num_segments)``; an empty segment pools to zeros.
        pooling: ``"mean"`` or ``"max+mean"``.

    Returns:
        ``[num_segments, C]`` of ``values``' dtype, computed in float32.
    """
    v = values.float()
    counts = torch.bincount(segment_ids, minlength=num_segments)
    pooled = v.new_zeros(num_segments, v.shape[1]).index_add(0, segment_ids, v) / counts.clamp_min(1)[:, None]
    if pooling == "max+mean":
        # A -inf fill, not zeros with include_self=False: backward counts the fill as a tie
        # whenever a maximum is exactly 0 and would halve that gradient.
        index = segment_ids[:, None].expand_as(v)
        top = v.new_full((num_segments, v.shape[1]), float("-inf")).scatter_reduce(0, index, v, "amax")
        pooled = pooled + top.masked_fill((counts == 0)[:, None], 0.0)
    return pooled.to(values.dtype)


def bucket_attention(x: torch.Tensor, same_bucket: torch.Tensor, ln_weight: torch.Tensor, ln_bias: torch.Tensor,
                     qkv_weight: torch.Tensor, qkv_bias: torch.Tensor, out_weight: torch.Tensor,
                     out_bias: torch.Tensor, num_heads: int, eps: float = 1e-5) -> torch.Tensor:
    """``x + Attn(LN(x))`` with attention restricted by a dense mask, one view.

    Args:
        x: ``[B, N, C]`` float32.
        same_bucket: ``[B, N, N]`` bool, ``True`` where two tokens share a bucket.
        ln_weight, ln_bias: ``[C]``; qkv_weight ``[3D, C]``, qkv_bias ``[3D]``;
        out_weight ``[C, D]``, out_bias ``[C]``; ``D = num_heads · head_dim``.

    Returns:
        ``[B, N, C]`` float32.
    """
    batch, tokens, channels = x.shape
    h = F.layer_norm(x, (channels,), ln_weight.float(), ln_bias.float(), eps)
    qkv = F.linear(h, qkv_weight.float(), qkv_bias.float())
    q, k, v = qkv.reshape(batch, tokens, 3, num_heads, -1).permute(2, 0, 3, 1, 4)  # [B, H, N, d] each
    logits = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    logits = logits.masked_fill(~same_bucket[:, None], float("-inf"))
    attended = (logits.softmax(dim=-1) @ v).transpose(1, 2).reshape(batch, tokens, -1)
    return x + F.linear(attended, out_weight.float(), out_bias.float())


def neighborhood_attention_pool(x: torch.Tensor, segments: Segments, ln_weight: torch.Tensor,
                                ln_bias: torch.Tensor, qkv_weight: torch.Tensor, qkv_bias: torch.Tensor,
                                out_weight: torch.Tensor, out_bias: torch.Tensor, num_heads: int,
                                pooling: str, eps: float = 1e-5) -> torch.Tensor:
    """1D/2D-guided local aggregation: per view, bucket-local attention then bucket pooling.

    ``t_j = x + Attn_j(LN_j(x))`` among the tokens of each bucket of view ``j``, pooled per bucket.

    Args:
        x: ``[B, N, C]`` tokens.
        segments: the ``M`` views' buckets (``segments.segment_ids`` is ``[M, B, N]``).
        ln_weight, ln_bias: ``[M, C]``; qkv_weight ``[M, 3D, C]``; qkv_bias ``[M, 3D]``;
        out_weight ``[M, C, D]``; out_bias ``[M, C]``.
        pooling: ``"mean"`` or ``"max+mean"``.

    Returns:
        ``[S, C]`` pooled rows of every segment, of ``x``'s dtype.
    """
    xf = x.float()
    pooled = []
    for j in range(segments.num_views):
        ids = segments.segment_ids[j]
        t = bucket_attention(xf, ids[:, :, None] == ids[:, None, :], ln_weight[j], ln_bias[j], qkv_weight[j],
                             qkv_bias[j], out_weight[j], out_bias[j], num_heads, eps)
        first, last = segments.view_offsets[j], segments.view_offsets[j + 1]
        pooled.append(segment_pool(t.reshape(-1, t.shape[-1]), ids.flatten() - first, last - first, pooling))
    return torch.cat(pooled).to(x.dtype)


def batch_norm_gelu(rows: torch.Tensor, offsets: tuple[int, ...], weight: torch.Tensor, bias: torch.Tensor,
                    running_mean: torch.Tensor, running_var: torch.Tensor, batch: tuple[bool, ...],
                    eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``GELU(BN_g(rows))`` for every group ``g`` of consecutive rows, each with its own BatchNorm.

    Args:
        rows: ``[S, C]``; group ``g`` is rows ``offsets[g] … offsets[g + 1] − 1`` (``G + 1`` offsets).
        weight, bias: ``[G, C]`` affine parameters of the groups' BatchNorms.
        running_mean, running_var: ``[G, C]`` statistics of the groups not in ``batch``.
        batch: ``G`` bools: group ``g`` normalises with its own statistics (training mode; at
            least two rows), otherwise with ``running_mean[g]``, ``running_var[g]``.

    Returns:
        ``[S, C]`` of ``rows``' dtype, computed in float32; and the ``[G, C]`` float32 mean and
        biased variance each group was normalised with (no gradient), for the running statistics.
    """
    x = rows.float()
    # contiguous parameters: on the CPU, F.batch_norm's backward misreads a strided weight (torch 2.13)
    weight, bias = weight.float().contiguous(), bias.float().contiguous()
    out, means, variances = [], [], []
    for g, own in enumerate(batch):
        group = x[offsets[g]:offsets[g + 1]]
        if own:
            var, mean = torch.var_mean(group.detach(), dim=0, correction=0)
            normed = F.batch_norm(group, None, None, weight[g], bias[g], True, 0.0, eps)
        else:
            mean, var = running_mean[g].float(), running_var[g].float()
            normed = F.batch_norm(group, mean, var, weight[g], bias[g], False, 0.0, eps)
        out.append(F.gelu(normed))
        means.append(mean)
        variances.append(var)
    return torch.cat(out).to(rows.dtype), torch.stack(means), torch.stack(variances)


def ensemble_weights(base: torch.Tensor, views: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Eq. 3's weights ``w_ij = (cos(B_i, F_ij) + 1)/2``, normalised to sum to 1 over ``j``.

    Args:
        base: ``[..., C]`` baseline features ``B_i``.
        views: ``[M, ..., C]`` view features ``F_ij``.

    Returns:
        ``[M, ...]`` float32 weights in ``[0, 1]``; all-zero where every cosine is −1.
    """
    b, f = base.float(), views.float()
    cos = (b * f).sum(-1) / (b.norm(dim=-1) * f.norm(dim=-1)).clamp_min(eps)
    w = (cos + 1) / 2
    return w / w.sum(dim=0).clamp_min(eps)


def ensemble_propagate(x: torch.Tensor, base_rows: torch.Tensor, base_ids: torch.Tensor, view_rows: torch.Tensor,
                       view_ids: torch.Tensor, coef: float) -> torch.Tensor:
    """Adaptive any-to-3D ensemble and residual: ``x + c · Σ_j w_ij F_ij``.

    Args:
        x: ``[B, N, C]`` residual stream of the point tokens.
        base_rows: ``[Sv, C]`` pooled 3D baseline rows; ``base_ids``: ``[B, N]`` row of each token.
        view_rows: ``[S, C]`` pooled view rows; ``view_ids``: ``[M, B, N]`` row of each token per view.
        coef: ``c``.

    Returns:
        ``[B, N, C]`` of ``x``'s dtype.
    """
    base = base_rows.float()[base_ids]
    views = view_rows.float()[view_ids]  # [M, B, N, C]
    out = (ensemble_weights(base, views)[..., None] * views).sum(dim=0)
    return (x.float() + coef * out).to(x.dtype)


class ViewAttention(nn.Module):
    """``LN_j`` and ``Attn_j`` of the ``M`` views (``C → D → C``), shared by all blocks."""

    def __init__(self, hidden_size: int, num_views: int, attn_dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.ln_weight = nn.Parameter(torch.ones(num_views, hidden_size))
        self.ln_bias = nn.Parameter(torch.zeros(num_views, hidden_size))
        self.qkv_weight = nn.Parameter(torch.randn(num_views, 3 * attn_dim, hidden_size) * 0.02)
        self.qkv_bias = nn.Parameter(torch.zeros(num_views, 3 * attn_dim))
        self.out_weight = nn.Parameter(torch.randn(num_views, hidden_size, attn_dim) * 0.02)
        self.out_bias = nn.Parameter(torch.zeros(num_views, hidden_size))

    def weights(self) -> tuple[torch.Tensor, ...]:
        """The six parameter tensors in the argument order of ``neighborhood_attention_pool``."""
        return self.ln_weight, self.ln_bias, self.qkv_weight, self.qkv_bias, self.out_weight, self.out_bias


class RowBatchNorm(nn.BatchNorm1d):
    """``nn.BatchNorm1d`` over rows ``[S, C]`` that also takes a single row in training.

    With one row, batch statistics are undefined (``nn.BatchNorm1d`` raises): a lone pooled
    row, or a batch of one cloud in the head, is normalised as in evaluation mode and the
    running statistics are left unchanged. Same parameters and buffers as ``nn.BatchNorm1d``;
    ``nn.SyncBatchNorm.convert_sync_batchnorm`` turns it into a plain ``SyncBatchNorm``, whose
    statistics span every rank.
    """

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        if rows.shape[0] > 1 or not self.training:
            return super().forward(rows)
        return F.batch_norm(rows, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)


class ReferenceAdapter(nn.Module):
    """The guided adapter of one block, inserted after the FFN (DESIGN.md §1.4).

    ``forward(hidden, ffn_out, geometry)`` returns the block output:

    1. bottleneck: ``x = hidden + ffn + s · Up(QuickGELU(Down(ffn)))``;
    2. per view ``j``: ``F_j = GELU(BN_j(pool_bucket(x + Attn_j(LN_j(x)))))`` propagated to tokens;
    3. baseline: ``B = GELU(BN(pool_voxel(x)))`` propagated to tokens;
    4. ``x ← x + c · Σ_j w_ij F_ij`` (Eq. 3); prefix tokens (``[CLS]``) skip steps 2–4.

    ``view_attention`` is shared by all blocks of a model; pass the same module to each adapter.
    """

    def __init__(self, config: Any2PointConfig, view_attention: ViewAttention | None = None):
        super().__init__()
        c = config.hidden_size
        self.scale, self.coef, self.pooling = config.adapter_scale, config.ensemble_coef, config.pooling
        self.down = nn.Linear(c, config.adapter_rank)
        self.up = nn.Linear(config.adapter_rank, c)
        for linear in (self.down, self.up):
            nn.init.trunc_normal_(linear.weight, std=0.02)
            nn.init.zeros_(linear.bias)
        self.view_attention = view_attention or ViewAttention(c, config.num_views, config.attn_dim, config.attn_heads)
        self.view_norms = nn.ModuleList(RowBatchNorm(c) for _ in range(config.num_views))
        self.voxel_norm = RowBatchNorm(c)

    def bottleneck(self, hidden: torch.Tensor, ffn_out: torch.Tensor,
                   num_prefix_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``x = hidden + ffn + s · Up(QuickGELU(Down(ffn)))`` as its prefix ``[B, P, C]`` and its
        point tokens ``[B, N, C]``."""
        x = hidden + ffn_out + self.scale * self.up(quick_gelu(self.down(ffn_out)))
        return x[:, :num_prefix_tokens], x[:, num_prefix_tokens:]

    def pool_views(self, tokens: torch.Tensor, segments: Segments) -> torch.Tensor:
        return neighborhood_attention_pool(tokens, segments, *self.view_attention.weights(),
                                           self.view_attention.num_heads, self.pooling)

    def pool_voxels(self, tokens: torch.Tensor, segments: Segments) -> torch.Tensor:
        return segment_pool(tokens.reshape(-1, tokens.shape[-1]), segments.segment_ids.flatten(),
                            segments.num_segments, self.pooling)

    def ensemble(self, tokens, base_rows, base_ids, view_rows, view_ids) -> torch.Tensor:
        return ensemble_propagate(tokens, base_rows, base_ids, view_rows, view_ids, self.coef)

    def normalize(self, rows: torch.Tensor, offsets: tuple[int, ...], norms) -> torch.Tensor:
        """``GELU(norms[g](rows of group g))`` ``[S, C]``, group ``g`` the rows ``offsets[g] … offsets[g + 1] − 1``."""
        # split, not slices: the backward of G slices would zero-fill G full-size [S, C] gradients
        groups = rows.split([last - first for first, last in zip(offsets[:-1], offsets[1:])])
        return F.gelu(torch.cat([norm(group) for group, norm in zip(groups, norms)]))

    def forward(self, hidden: torch.Tensor, ffn_out: torch.Tensor, geometry: Geometry,
                num_prefix_tokens: int = 1) -> torch.Tensor:
        """``hidden``, ``ffn_out``: ``[B, P + N, C]`` (``P`` prefix tokens) → ``[B, P + N, C]``."""
        check_adapter_inputs(hidden, ffn_out, geometry, num_prefix_tokens)
        prefix, tokens = self.bottleneck(hidden, ffn_out, num_prefix_tokens)
        views = self.normalize(self.pool_views(tokens, geometry.views), geometry.views.view_offsets,
                               self.view_norms)
        voxels = self.pool_voxels(tokens, geometry.voxels)
        base = self.normalize(voxels, (0, len(voxels)), [self.voxel_norm])
        tokens = self.ensemble(tokens, base, geometry.voxels.segment_ids[0], views, geometry.views.segment_ids)
        return torch.cat((prefix, tokens), dim=1)
