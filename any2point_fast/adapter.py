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

from . import bottleneck as fused_bottleneck
from . import ops
from .geometry import Segments
from .reference import ReferenceAdapter
from .reference.adapter import RowBatchNorm


class Any2PointAdapter(ReferenceAdapter):
    """The guided adapter of one block (paper §2.3, Fig. 4) computed with the fused ops.

    A drop-in replacement of :class:`~any2point_fast.reference.ReferenceAdapter`: same
    constructor, parameters and ``state_dict`` (checkpoints load either way), same
    ``forward(hidden, ffn_out, geometry, num_prefix_tokens=1)``. The heavy steps are swapped
    for :mod:`any2point_fast.ops`, so they run on the selected backend:

    - :meth:`pool_views` — bucket-local attention and pooling of every view
      (``ops.neighborhood_attention_pool``): no ``N × N`` attention matrix, no per-view token
      features kept for backward;
    - :meth:`pool_voxels` — pooling of the 3D baseline branch (``ops.segment_pool``);
    - :meth:`normalize` — BatchNorm of the pooled rows, view by view, and GELU
      (``ops.batch_norm_gelu``; the running statistics are updated as ``nn.BatchNorm1d`` does);
    - :meth:`ensemble` — Eq. 3's weighted ensemble and residual (``ops.ensemble_propagate``);

    and :meth:`bottleneck` writes the point tokens of its residual sum contiguous, for the ops
    that read them, with the bottleneck in one autograd node (plain PyTorch on every backend).

    ``view_attention`` (``LN_j`` and ``Attn_j`` of the ``M`` views) is shared by all the blocks
    of a model: build it once and pass it to every adapter.

    Args:
        config: the method's hyper-parameters (:class:`~any2point_fast.Any2PointConfig`).
        view_attention: the shared per-view attention; a new one when omitted.
    """

    def bottleneck(self, hidden: torch.Tensor, ffn_out: torch.Tensor,
                   num_prefix_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``hidden + ffn + s · Up(QuickGELU(Down(ffn)))`` as its prefix ``[B, P, C]`` and its point
        tokens ``[B, N, C]``, both contiguous (slices of the sum would be copied by every op that
        reads them), in one autograd node (:mod:`any2point_fast.bottleneck`); module by module
        under autocast."""
        if not fused_bottleneck.fusable(hidden, ffn_out, self.down, self.up):
            return super().bottleneck(hidden, ffn_out, num_prefix_tokens)
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
        """``GELU(norms[g](rows of group g))`` ``[S, C]`` in one op. Norms other than plain
        :class:`RowBatchNorm` (``SyncBatchNorm``, whose statistics span every rank) go module by module.
        In a region that ``torch.compile`` traces, ``offsets`` (the view offsets of traced segments, or
        ``(0, S)`` for the voxels) are data: the groups' sizes stay tensors, never read on the host."""
        if not _fusable(norms):
            return super().normalize(rows, offsets, norms)
        if torch.compiler.is_compiling():
            offsets = offsets if isinstance(offsets, torch.Tensor) else torch.tensor(offsets, device=rows.device)
            counts = offsets[1:] - offsets[:-1]
            batch = (counts > 1) & self.training  # as RowBatchNorm: one row, running stats
        else:
            counts = [last - first for first, last in zip(offsets[:-1], offsets[1:])]
            batch = tuple(self.training and count > 1 for count in counts)
        out, mean, var = ops.batch_norm_gelu(
            rows, offsets, torch.stack([norm.weight for norm in norms]), torch.stack([norm.bias for norm in norms]),
            torch.stack([norm.running_mean for norm in norms]), torch.stack([norm.running_var for norm in norms]),
            batch, norms[0].eps)
        with torch.no_grad():
            for norm, own, count, batch_mean, batch_var in zip(norms, batch, counts, mean, var):
                if isinstance(own, torch.Tensor):
                    _update_running_stats_where(norm, own, batch_mean, batch_var * count / (count - 1))
                elif own:
                    _update_running_stats(norm, batch_mean, batch_var * count / (count - 1))
        return out


def _fusable(norms) -> bool:
    """Plain :class:`RowBatchNorm` s with affine parameters, running statistics and one ``eps``."""
    return (all(type(norm) is RowBatchNorm and norm.affine and norm.track_running_stats for norm in norms)
            and len({norm.eps for norm in norms}) == 1)


def _update_running_stats(norm: RowBatchNorm, mean: torch.Tensor, unbiased_var: torch.Tensor) -> None:
    """What ``nn.BatchNorm1d`` does to its buffers in a training step (``momentum=None``: cumulative average)."""
    norm.num_batches_tracked.add_(1)
    factor = 1 / norm.num_batches_tracked.item() if norm.momentum is None else norm.momentum
    norm.running_mean.lerp_(mean.to(norm.running_mean.dtype), factor)
    norm.running_var.lerp_(unbiased_var.to(norm.running_var.dtype), factor)


def _update_running_stats_where(norm: RowBatchNorm, own: torch.Tensor, mean: torch.Tensor,
                                unbiased_var: torch.Tensor) -> None:
    """:func:`_update_running_stats` where the 0-d bool ``own`` holds, the buffers unchanged elsewhere,
    without reading a tensor on the host (traced code)."""
    norm.num_batches_tracked.add_(own.long())
    factor = 1 / norm.num_batches_tracked.clamp_min(1) if norm.momentum is None else norm.momentum
    for buffer, value in ((norm.running_mean, mean), (norm.running_var, unbiased_var)):
        buffer.copy_(torch.where(own, buffer.lerp(value.to(buffer.dtype), factor), buffer))


__all__ = ["Any2PointAdapter"]
