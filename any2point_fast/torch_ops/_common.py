"""Small helpers shared by the torch ops."""

from __future__ import annotations

import functools
import warnings
import weakref
from collections.abc import Callable, Hashable
from typing import Any

import torch


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 if any input is float64 (gradcheck), float32 otherwise (float16/bfloat16 included)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def exclusive_cumsum(counts: torch.Tensor) -> torch.Tensor:
    """``[0, c0, c0 + c1, ...]`` without the total: the start of every run of ``counts``."""
    return counts.cumsum(0) - counts


def grad_as(grad: torch.Tensor | None, like: torch.Tensor, needed: bool) -> torch.Tensor | None:
    """``grad`` in ``like``'s dtype, or ``None`` where autograd does not need it."""
    return grad.to(like.dtype) if needed and grad is not None else None


def without_autocast(method):
    """Run an autograd ``Function``'s ``forward``/``backward`` with autocast off.

    The ops choose their compute dtype themselves (:func:`compute_dtype`) and return the input
    dtype; autocast would recast some of their matmuls to float16/bfloat16 and mix dtypes.
    """

    @functools.wraps(method)
    def wrapper(ctx, *args):
        device = next((a.device.type for a in args if isinstance(a, torch.Tensor)), "cpu")
        with torch.autocast(device_type=device, enabled=False):
            return method(ctx, *args)

    return wrapper


def linear_pool_weights(counts: torch.Tensor, pooling: str, dtype: torch.dtype) -> torch.Tensor:
    """Weight of a segment's row sum in its pooled row: ``1/n`` (mean); ``2`` for a singleton under
    ``max + mean`` (its maximum is its only row, so it joins the linear part); empty segments 1."""
    weights = 1 / counts.clamp_min(1).to(dtype)
    return weights.masked_fill_(counts == 1, 2.0) if pooling == "max+mean" else weights


#: Bookkeeping of :func:`derived_from`, by ``id`` of its tensor; an entry goes when its tensor does.
_DERIVED: dict[int, dict] = {}


def derived_from(ids: torch.Tensor, key: Hashable, build: Callable[[], Any], *others: torch.Tensor) -> Any:
    """``build()`` once per ``ids`` tensor object, then the same value while ``ids`` and ``others``
    (index tensors) hold the same values as then (compared every call, a pass over small integer
    tensors: a change in place is seen whichever way it was made): the integer bookkeeping of an op
    whose index tensors every block of a model passes again (the segment ids of one geometry). Kept
    as long as ``ids`` lives: what ``build`` returns must not refer to ``ids`` (a view of it
    included), or neither would ever be freed. Under inference mode it is built every time (what it
    builds there could not be saved for a later backward)."""
    if torch.is_inference_mode_enabled() or ids.is_inference():
        return build()
    cache = _DERIVED.get(id(ids))
    if cache is None:
        cache = _DERIVED[id(ids)] = {}
        weakref.finalize(ids, _DERIVED.pop, id(ids), None)
    entry = cache.get(key)
    if entry is None or not all(kept.shape == now.shape and torch.equal(kept, now)
                                for kept, now in zip(entry[0], (ids, *others))):
        entry = cache[key] = ([tensor.clone() for tensor in (ids, *others)], build())
    return entry[1]


def csr_offsets(counts: torch.Tensor) -> torch.Tensor:
    """``[0, c0, c0 + c1, ..., Σ c]``: where every row of a CSR matrix with ``counts`` entries per row starts."""
    return torch.cat((counts.new_zeros(1), counts.cumsum(0)))


def csr(counts: torch.Tensor, columns: torch.Tensor, values: torch.Tensor, num_columns: int) -> torch.Tensor:
    """Sparse CSR ``[len(counts), num_columns]`` matrix with ``counts[r]`` entries in row ``r``
    (``columns`` and ``values`` listed row after row; a column may repeat in a row: its entries add)."""
    crow = csr_offsets(counts)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta", category=UserWarning)
        return torch.sparse_csr_tensor(crow, columns, values, size=(len(counts), num_columns),
                                       check_invariants=False)


def csr_mm(matrix: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
    """``matrix @ dense`` for a sparse CSR ``matrix``: ``addmm`` into a new tensor with ``beta = 0``,
    some 3× faster on the CPU than ``torch.mm``, which takes another route for a CSR operand."""
    out = dense.new_empty(matrix.shape[0], dense.shape[1])
    return torch.addmm(out, matrix, dense, beta=0, out=out)


def count_ones(mask: torch.Tensor) -> int:
    """Number of ones in a 0/1 float mask: its float32 sum, exact below 2^24 elements and some 50×
    faster than ``count_nonzero`` on the CPU; ``count_nonzero`` above."""
    return int(mask.sum()) if mask.numel() < 2**24 else int(torch.count_nonzero(mask))


def segment_max(values: torch.Tensor, segment_ids: torch.Tensor, num_segments: int) -> torch.Tensor:
    """``[S, C]`` maxima of the rows ``values`` ``[T, C]`` per segment (``−inf`` for an empty one);
    one ``scatter_reduce``, several times faster on the CPU than ``segment_reduce`` on long segments."""
    maxima = values.new_full((num_segments, values.shape[1]), float("-inf"))
    return maxima.scatter_reduce_(0, segment_ids[:, None].expand_as(values), values, "amax")


def max_gradient_shares(g_max: torch.Tensor, at_max: torch.Tensor, local: torch.Tensor,
                        out: torch.Tensor | None = None) -> torch.Tensor:
    """Gradient ``[T, C]`` of rows from that of their segments' maxima ``g_max`` ``[S, C]``.

    ``at_max`` ``[T, C]`` is the 0/1 float mask of the rows equal to their segment's maximum
    (``local`` ``[T]``: their segment): rows tied for a maximum share its gradient equally.
    Float masks, not bool ones: several times faster to make and apply on the CPU.
    """
    if count_ones(at_max) != g_max.numel():  # a maximum attained twice
        g_max = g_max / torch.zeros_like(g_max).index_add_(0, local, at_max)
    return torch.index_select(g_max, 0, local, out=out).mul_(at_max)
