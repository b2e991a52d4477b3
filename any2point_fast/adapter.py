"""``Any2PointAdapter``: the any-to-3D guided adapter of one block, on the fused ops.

The adapter goes after the FFN of every frozen block of your backbone (DESIGN.md §1.4)::

    from any2point_fast import Any2PointAdapter, Any2PointConfig, VirtualProjection, ViewAttention

    config = Any2PointConfig.preset("vision", hidden_size=768)
    projection = VirtualProjection(config, pe_table)  # your model's [Gh, Gw, C] patch PE grid
    shared = ViewAttention(768, config.num_views, config.attn_dim, config.attn_heads)
    adapters = nn.ModuleList(Any2PointAdapter(config, shared) for _ in blocks)

    pe, geometry = projection(centers)  # once per forward; centers [B, N, 3]
    for block, adapter in zip(blocks, adapters):
        h = x + block.attn(block.norm1(x))
        x = adapter(h, block.mlp(block.norm2(h)), geometry)  # replaces ``x = h + ffn(h)``

``hidden`` and ``ffn_out`` are ``[B, P + N, C]`` with ``P`` prefix tokens (``[CLS]``, default 1)
that skip the guided branch. The backend of the fused ops follows :mod:`any2point_fast.ops`
(``ops.set_backend("torch")``, ``with ops.use_backend("reference"): ...``, or the
``ANY2POINT_BACKEND`` environment variable; ``auto`` by default).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import bottleneck as fused_bottleneck
from . import ops
from .config import Any2PointConfig
from .geometry import Geometry, Segments
from .row_batch_norm import RowBatchNorm, update_running_stats, update_running_stats_where
from .validation import check_adapter_inputs
from .view_attention import ViewAttention


class Any2PointAdapter(nn.Module):
    """The guided adapter of one block (paper §2.3, Fig. 4) computed with the fused ops.

    ``forward(hidden, ffn_out, geometry, num_prefix_tokens=1)`` returns the block output:

    1. :meth:`bottleneck`: ``x = hidden + ffn + s · Up(QuickGELU(Down(ffn)))``, written as its
       prefix and its point tokens, contiguous, in one autograd node
       (:mod:`any2point_fast.bottleneck`; module by module under autocast);
    2. per view ``j``, ``F_j = GELU(BN_j(pool_bucket(x + Attn_j(LN_j(x)))))``: :meth:`pool_views`
       (``ops.neighborhood_attention_pool``: no ``N × N`` attention matrix, no per-view token
       features kept for backward), then :meth:`normalize` (``ops.batch_norm_gelu``, view by view;
       the running statistics are updated as ``nn.BatchNorm1d`` does);
    3. the 3D baseline, ``B = GELU(BN(pool_voxel(x)))``: :meth:`pool_voxels` (``ops.segment_pool``)
       and :meth:`normalize`;
    4. :meth:`ensemble`: ``x ← x + c · Σ_j w_ij F_ij`` (Eq. 3, ``ops.ensemble_propagate``), the
       pooled rows propagated to their tokens; the prefix tokens (``[CLS]``) skip steps 2–4.

    Same parameters and ``state_dict`` keys as :class:`any2point_fast.reference.ReferenceAdapter`,
    the oracle it is tested against (checkpoints load either way).

    ``view_attention`` (``LN_j`` and ``Attn_j`` of the ``M`` views) is shared by all the blocks
    of a model: build it once and pass it to every adapter.

    Args:
        config: the method's hyper-parameters (:class:`~any2point_fast.Any2PointConfig`).
        view_attention: the shared per-view attention; a new one when omitted.
    """

    def __init__(self, config: Any2PointConfig, view_attention: ViewAttention | None = None):
        super().__init__()
        width = config.hidden_size
        self.scale, self.coef, self.pooling = config.adapter_scale, config.ensemble_coef, config.pooling
        self.down = nn.Linear(width, config.adapter_rank)
        self.up = nn.Linear(config.adapter_rank, width)
        for linear in (self.down, self.up):
            nn.init.trunc_normal_(linear.weight, std=0.02)
            nn.init.zeros_(linear.bias)
        if view_attention is None:
            view_attention = ViewAttention(width, config.num_views, config.attn_dim, config.attn_heads)
        self.view_attention = view_attention
        self.view_norms = nn.ModuleList(RowBatchNorm(width) for _ in range(config.num_views))
        self.voxel_norm = RowBatchNorm(width)

    def bottleneck(self, hidden: torch.Tensor, ffn_out: torch.Tensor,
                   num_prefix_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``hidden + ffn + s · Up(QuickGELU(Down(ffn)))`` ``[B, P + N, C]`` as its prefix ``[B, P, C]``
        and its point tokens ``[B, N, C]`` (see :func:`any2point_fast.bottleneck.bottleneck`)."""
        return fused_bottleneck.bottleneck(hidden, ffn_out, self.down, self.up, self.scale, num_prefix_tokens)

    def pool_views(self, tokens: torch.Tensor, segments: Segments) -> torch.Tensor:
        """``[B, N, C]`` tokens → ``[S, C]`` pooled rows of ``t_j = x + Attn_j(LN_j(x))`` per bucket."""
        return ops.neighborhood_attention_pool(tokens, segments, *self.view_attention.weights(),
                                               self.view_attention.num_heads, self.pooling)

    def pool_voxels(self, tokens: torch.Tensor, segments: Segments) -> torch.Tensor:
        """``[B, N, C]`` tokens → ``[Sv, C]`` pooled rows of every voxel."""
        # the flattened ids as one tensor object per geometry: the op derives its sort order once for it
        ids = segments.derived("flat segment ids", segments.segment_ids.flatten)
        return ops.segment_pool(tokens.reshape(-1, tokens.shape[-1]), ids, segments.num_segments, self.pooling)

    def ensemble(self, tokens, base_rows, base_ids, view_rows, view_ids) -> torch.Tensor:
        """``tokens + c · Σ_j w_ij F_ij`` (Eq. 3), ``[B, N, C]``."""
        return ops.ensemble_propagate(tokens, base_rows, base_ids, view_rows, view_ids, self.coef)

    def normalize(self, rows: torch.Tensor, offsets: tuple[int, ...] | torch.Tensor, norms) -> torch.Tensor:
        """``GELU(norms[g](rows of group g))`` ``[S, C]``, group ``g`` the rows ``offsets[g] … offsets[g + 1] − 1``,
        in one op. Norms other than plain :class:`RowBatchNorm` (``SyncBatchNorm``, whose statistics
        span every rank) go module by module. In a region that ``torch.compile`` traces, ``offsets`` (the
        view offsets of traced segments, or ``(0, S)`` for the voxels) are data: the groups' sizes stay
        tensors, never read on the host (plain norms only)."""
        if torch.compiler.is_compiling() and _fusable(norms):
            offsets = offsets if isinstance(offsets, torch.Tensor) else torch.tensor(offsets, device=rows.device)
            counts = offsets[1:] - offsets[:-1]
            training = torch.tensor([norm.training for norm in norms], device=rows.device)
            batch = (counts > 1) & training  # as RowBatchNorm: one row, running stats
        else:
            counts = [last - first for first, last in zip(offsets[:-1], offsets[1:])]
            if not _fusable(norms):
                # split, not slices: the backward of G slices would zero-fill G full-size [S, C] gradients
                return F.gelu(torch.cat([norm(group) for group, norm in zip(rows.split(counts), norms)]))
            # as RowBatchNorm: each norm's own mode decides (`model.eval()` then `norm.train()` recomputes
            # statistics); one row takes the running statistics
            batch = tuple(norm.training and count > 1 for norm, count in zip(norms, counts))
        out, mean, var = ops.batch_norm_gelu(
            rows, offsets, torch.stack([norm.weight for norm in norms]), torch.stack([norm.bias for norm in norms]),
            torch.stack([norm.running_mean for norm in norms]), torch.stack([norm.running_var for norm in norms]),
            batch, norms[0].eps)
        with torch.no_grad():
            for norm, own, count, batch_mean, batch_var in zip(norms, batch, counts, mean, var):
                if isinstance(own, torch.Tensor):
                    update_running_stats_where(norm, own, batch_mean, batch_var * count / (count - 1))
                elif own:
                    update_running_stats(norm, batch_mean, batch_var * count / (count - 1))
        return out

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


def _fusable(norms) -> bool:
    """Plain :class:`RowBatchNorm` s with affine parameters, running statistics and one ``eps``."""
    return (all(type(norm) is RowBatchNorm and norm.affine and norm.track_running_stats for norm in norms)
            and len({norm.eps for norm in norms}) == 1)


__all__ = ["Any2PointAdapter"]
