"""Triton kernels of the fused ops, installed as ``any2point_fast.kernels``.

Every op is layered like Liger-Kernel: ``@triton.jit`` kernels → a launcher → a
``torch.autograd.Function`` (ops with a backward) → a function with exactly the signature of
its :mod:`any2point_fast.reference` oracle, which is what :mod:`any2point_fast.ops` dispatches to.
Runs on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (how it is tested).

Imports nothing from the library except the shared layout types of
:mod:`any2point_fast.geometry`, the coordinate maths of :mod:`any2point_fast.coordinates` and, for
``neighborhood_aggregate``, the torch path's float64 moments of BN2 (small ``[H, H]`` products on
``[R, H]`` rows that are no kernel's job) and its autocast guard.
"""

from .aggregation import neighborhood_aggregate
from .attention import neighborhood_attention_pool
from .buckets import bucket_sort
from .ensemble import ensemble_propagate
from .interpolation import interpolate_features
from .norm import batch_norm_gelu
from .pooling import segment_pool
from .projection import project_pe
from .sampling import farthest_point_sample

__all__ = [
    "batch_norm_gelu", "bucket_sort", "ensemble_propagate", "farthest_point_sample", "interpolate_features",
    "neighborhood_aggregate", "neighborhood_attention_pool", "project_pe", "segment_pool",
]
