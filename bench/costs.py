"""Analytic bytes moved and floating-point operations of each fused op, for achieved GB/s and TFLOP/s.

The counts are those of an ideal fused kernel on float32 data (4 bytes; ids int64, 8 bytes):
every input read once, every gathered row read once per token that gathers it, every output
written once; small terms (LayerNorm statistics, biases, softmax exponentials) are left out.
Backward reads the forward's inputs again plus the output gradient, writes the input
gradients, and does twice the forward's matmul flops (the usual two products per product).

``T = B·N`` tokens, ``C`` channels, ``M`` views, ``D`` attention width, ``S`` / ``Sv`` view /
voxel segments, ``Σ L²`` the sum over view segments of their squared token counts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .workloads import AdapterCase

F32, I64 = 4, 8

#: Peak DRAM bandwidth (bytes/s) and float32 (non-tensor-core) FLOP/s of known GPUs, by name fragment.
GPU_PEAKS = {
    "H200": (4.8e12, 67e12),
    "H100 PCIe": (2.0e12, 51e12),
    "H100": (3.35e12, 67e12),
    "A100-SXM4-80GB": (2.04e12, 19.5e12),
    "A100": (1.56e12, 19.5e12),
    "L40S": (0.864e12, 91.6e12),
    "A10": (0.6e12, 31.2e12),
}


@dataclass(frozen=True)
class Cost:
    """Bytes moved and flops of one call."""

    bytes: float
    flops: float

    def __add__(self, other: Cost) -> Cost:
        return Cost(self.bytes + other.bytes, self.flops + other.flops)


@dataclass(frozen=True)
class Sizes:
    tokens: int
    channels: int
    views: int
    attn_dim: int
    view_segments: int
    voxel_segments: int
    squared_lengths: int
    pe_corners: int

    @classmethod
    def of(cls, case: AdapterCase) -> Sizes:
        views, voxels, cfg = case.geometry.views, case.geometry.voxels, case.config
        counts = (views.offsets[1:] - views.offsets[:-1]).double()
        return cls(tokens=case.hidden.shape[0] * (case.hidden.shape[1] - 1), channels=case.hidden.shape[-1],
                   views=cfg.num_views, attn_dim=cfg.attn_dim, view_segments=views.num_segments,
                   voxel_segments=voxels.num_segments, squared_lengths=int(counts.square().sum()),
                   pe_corners=2 if cfg.pe_kind == "1d" else 4)


def segment_pool(s: Sizes, backward: bool) -> Cost:
    t, c, sv = s.tokens, s.channels, s.voxel_segments
    forward = Cost(F32 * t * c + I64 * t + F32 * sv * c, 2 * t * c)
    return forward + Cost(F32 * sv * c + F32 * t * c + I64 * t + F32 * t * c, 2 * t * c) if backward else forward


def neighborhood_attention_pool(s: Sizes, backward: bool) -> Cost:
    t, c, m, d = s.tokens, s.channels, s.views, s.attn_dim
    weights = F32 * m * (4 * d * c + 2 * c)
    moved = F32 * t * c + weights + 2 * I64 * m * t + F32 * s.view_segments * c
    flops = m * t * 2 * c * 3 * d + 4 * d * s.squared_lengths + m * t * 2 * d * c
    forward = Cost(moved, flops)
    return forward + Cost(moved + F32 * t * c + weights, 2 * flops) if backward else forward


def batch_norm_gelu(s: Sizes, backward: bool) -> Cost:
    rows = s.view_segments * s.channels
    forward = Cost(2 * F32 * rows, 10 * rows)  # the statistics, the normalisation and the GELU polynomial
    return forward + Cost(3 * F32 * rows, 20 * rows) if backward else forward


def ensemble_propagate(s: Sizes, backward: bool) -> Cost:
    t, c, m = s.tokens, s.channels, s.views
    moved = 2 * F32 * t * c + F32 * (m + 1) * t * c + I64 * (m + 1) * t
    forward = Cost(moved, 6 * m * t * c)
    return forward + Cost(moved + F32 * (m + 1) * t * c, 12 * m * t * c) if backward else forward


def project_pe(s: Sizes) -> Cost:
    t, c, m = s.tokens, s.channels, s.views
    return Cost(F32 * 3 * t + F32 * m * t * s.pe_corners * c + F32 * t * c + I64 * m * t, 2 * m * t * s.pe_corners * c)


def bucket_sort(s: Sizes) -> Cost:
    return Cost(3 * I64 * s.views * s.tokens + I64 * s.view_segments, 0.0)


def op_cost(op: str, case: AdapterCase, mode: str) -> Cost:
    """The analytic :class:`Cost` of ``op`` on ``case`` in ``mode`` (``forward`` or ``forward+backward``)."""
    sizes, backward = Sizes.of(case), mode == "forward+backward"
    differentiable = {"segment_pool": segment_pool, "neighborhood_attention_pool": neighborhood_attention_pool,
                      "batch_norm_gelu": batch_norm_gelu, "ensemble_propagate": ensemble_propagate}
    if op in differentiable:
        return differentiable[op](sizes, backward)
    return {"project_pe": project_pe, "bucket_sort": bucket_sort}[op](sizes)


def device_peaks(device: torch.device) -> tuple[float, float] | None:
    """``(bytes/s, FLOP/s)`` peaks of a known CUDA device, ``None`` elsewhere."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peaks for fragment, peaks in GPU_PEAKS.items() if fragment in name), None)
