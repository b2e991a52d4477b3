"""The fused sorted-bucket algorithm in PyTorch: the production path on CPU.

Every function has the name and signature of its oracle in :mod:`any2point_fast.reference`
and returns the same values (within ``tests/tolerances.py``; :func:`bucket_sort` bitwise). What
differs is how they are computed, the same way as the Triton kernels:

- tokens are visited in the sorted order of :class:`~any2point_fast.geometry.Segments`, so every
  bucket is a contiguous run; pooled sums are sparse CSR products (a matrix row per bucket),
  pooled maxima one ``scatter_reduce`` (on the CPU, ``max + mean`` pools in one compiled kernel
  of :mod:`.native`, which keeps the item holding each maximum, for the views and the voxels,
  and the pooling goes backward in another);
- attention runs inside each bucket only: on the CPU a small compiled C++ kernel takes short
  buckets of one length a SIMD vector of buckets at a time and long ones a bucket at a time
  (:mod:`.native`, built on first use); where it cannot build, buckets are
  batched by length, short ones exactly (no padding), long ones padded to a length class and
  handed to PyTorch's fused CPU flash attention, so no ``N × N`` tensor per cloud is ever
  allocated;
- the ensemble's gathers and scatters of table rows are sparse products, or on the CPU the
  compiled row products of :mod:`.native`;
- ``batch_norm_gelu`` normalises the pooled rows group by group and applies GELU in two passes
  over the rows forward (statistics, output) and two backward (a compiled kernel on the CPU, the
  same formulas in PyTorch elsewhere), saving its input rows and ``[G, C]`` statistics (and, on
  the CPU, GELU's slope ``[S, C]``, so that backward evaluates no erf);
- ``neighborhood_attention_pool`` and ``ensemble_propagate`` are autograd Functions that keep
  for backward the tokens (and their normalised ``x̂``, ``[B·N, C]``, shared by the views),
  small per-token tensors (``D = 12`` attention channels, ``M`` weights) and per-bucket rows
  (the pooled maxima, or the items holding them), and recompute the rest; no ``[M, B·N, C]``
  tensor exists in forward or backward;
- ``neighborhood_aggregate`` (a tokenizer stage's MLP over every neighbour and max over them)
  goes a chunk of centres at a time in three passes forward and two backward, keeping ``[B·S·k, H]``
  hidden rows and the argmax of the max, never the ``[B·S·k, 2C]`` rows of the whole batch.

Inputs may be float16/bfloat16 (computed in float32, returned in the input dtype), float32, or
float64 (computed in float64, for ``gradcheck``), contiguous or not.
"""

from .aggregation import neighborhood_aggregate
from .attention import neighborhood_attention_pool
from .buckets import bucket_sort
from .ensemble import ensemble_propagate
from .interpolation import interpolate_features
from .norm import batch_norm_gelu
from .pooling import segment_pool
from .projection import project_pe
from .sampling import farthest_point_sample, knn

__all__ = ["batch_norm_gelu", "bucket_sort", "ensemble_propagate", "farthest_point_sample", "interpolate_features",
           "knn", "neighborhood_aggregate", "neighborhood_attention_pool", "project_pe", "segment_pool"]
