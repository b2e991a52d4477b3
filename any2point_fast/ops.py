"""The fused ops, one function each, dispatched through the op registry.

Every implementation takes the signature of its oracle in :mod:`any2point_fast.reference`. The
backend is chosen by :func:`set_backend`, the ``ANY2POINT_BACKEND`` environment variable, or
``auto``; :mod:`any2point_fast.registry` then picks, per op and per call, the implementation of
highest priority that the backend allows and that supports the inputs' device and dtype (``auto``:
Triton for CUDA tensors when it imports, then the torch path's compiled CPU kernels, plain
PyTorch, the reference). A backend with no implementation of an op falls back, for that op, to
``auto``'s choice; one whose implementations all refuse the inputs raises :class:`BackendError`
with the reasons of every implementation tried. Inputs are validated here, before any choice.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

from . import custom_ops, registry
from .geometry import ProjectionSpec, Segments
from .registry import BackendError
from .validation import InputError, check_segments

BACKENDS = ("auto", *registry.BACKENDS)


def _checked(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; expected one of {BACKENDS}")
    return name


_backend = _checked(os.environ.get("ANY2POINT_BACKEND", "auto"))


def set_backend(name: str) -> None:
    """Select the backend of every op: ``"auto"``, ``"triton"``, ``"torch"`` or ``"reference"``."""
    global _backend
    _backend = _checked(name)


def get_backend() -> str:
    """The selected backend name (possibly ``"auto"``)."""
    return _backend


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Context manager selecting a backend for the ops called inside it."""
    previous = get_backend()
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def _unavailable(own: list[registry.Implementation], device: torch.device) -> list[str]:
    """``[]`` if one of ``own`` runs on ``device``, else every reason they give (each once)."""
    reasons = [impl.supports(device) for impl in own]
    return [] if not all(reasons) else list(dict.fromkeys(reason for some in reasons for reason in some))


def not_supported_reasons(name: str, op: str, device: torch.device) -> list[str]:
    """Why backend ``name`` cannot run ``op`` on ``device`` with an implementation of its own
    (empty when one of them can)."""
    own = [impl for impl in registry.implementations(op) if impl.backend == name]
    return _unavailable(own, torch.device(device)) if own else [f"{name} has no {op}"]


def available_backends(device: torch.device | str = "cpu") -> dict[str, list[str]]:
    """Every concrete backend and why it is unavailable for ``device`` (``[]`` = available: some
    implementation of it runs there; an op it lacks falls back to ``auto``'s choice). The table
    op × implementation is :func:`any2point_fast.registry.support_table`."""
    device = torch.device(device)
    return {name: _unavailable([impl for op in registry.OPS for impl in registry.implementations(op)
                                if impl.backend == name], device) for name in registry.BACKENDS}


def chosen(op: str, device: torch.device | str, dtype: torch.dtype | None = None) -> registry.Implementation:
    """The implementation the current backend runs ``op`` with for inputs on ``device`` of ``dtype``."""
    return registry.choose(op, _backend, torch.device(device), dtype)


def _run(op: str, main: torch.Tensor, device: torch.device | None, *args):
    """``op`` on the implementation chosen for its main input ``main``; inside a region that
    ``torch.compile`` traces, as its custom op (:mod:`any2point_fast.custom_ops`), which makes the
    same choice when it runs."""
    if torch.compiler.is_compiling():
        return custom_ops.call(op, _backend, *args)
    return chosen(op, device or main.device, main.dtype).function()(*args)


def _same_device(op: str, **tensors: torch.Tensor) -> torch.device:
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        raise InputError(f"{op}: all tensors must be on one device, got " +
                         ", ".join(f"{name} on {d}" for name, d in devices.items()))
    return next(iter(devices.values()))


def _expect_shape(op: str, name: str, t: torch.Tensor, shape: tuple[int, ...]) -> None:
    if tuple(t.shape) != shape:
        raise InputError(f"{op}: {name} must have shape {list(shape)}, got {list(t.shape)}")


def project_pe(centers: torch.Tensor, pe_table: torch.Tensor,
               spec: ProjectionSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Averaged PE ``[B, N, C]`` and bucket ids ``[M, B, N]``; see :func:`reference.project_pe`."""
    if centers.dim() != 3 or centers.shape[-1] != 3 or not centers.is_floating_point():
        raise InputError(f"project_pe: centers must be float [B, N, 3], got {list(centers.shape)} {centers.dtype}")
    rank = 2 if spec.kind == "1d" else 3
    if pe_table.dim() != rank:
        raise InputError(f"project_pe: a {spec.kind} projection needs a PE table of rank {rank}, "
                         f"got shape {list(pe_table.shape)}")
    device = _same_device("project_pe", centers=centers, pe_table=pe_table)
    # positions decide buckets: never rounded to autocast's half precision
    with torch.autocast(device.type, enabled=False):
        return _run("project_pe", pe_table, device, centers, pe_table, spec)


def bucket_sort(bucket_ids: torch.Tensor, num_buckets: int) -> Segments:
    """Non-empty segments of ``[V, B, N]`` bucket ids; see :func:`reference.bucket_sort`."""
    if bucket_ids.dim() != 3 or bucket_ids.dtype != torch.int64:
        raise InputError(f"bucket_sort: bucket ids must be int64 [V, B, N], got {list(bucket_ids.shape)} "
                         f"{bucket_ids.dtype}")
    return _run("bucket_sort", bucket_ids, None, bucket_ids, num_buckets)


def segment_pool(values: torch.Tensor, segment_ids: torch.Tensor, num_segments: int, pooling: str) -> torch.Tensor:
    """``[T, C]`` rows pooled into ``[S, C]``; see :func:`reference.segment_pool`."""
    if values.dim() != 2 or segment_ids.shape != values.shape[:1]:
        raise InputError(f"segment_pool: values must be [T, C] with segment ids [T], got {list(values.shape)} "
                         f"and {list(segment_ids.shape)}")
    device = _same_device("segment_pool", values=values, segment_ids=segment_ids)
    return _run("segment_pool", values, device, values, segment_ids, num_segments, pooling)


def neighborhood_attention_pool(x: torch.Tensor, segments: Segments, ln_weight: torch.Tensor, ln_bias: torch.Tensor,
                                qkv_weight: torch.Tensor, qkv_bias: torch.Tensor, out_weight: torch.Tensor,
                                out_bias: torch.Tensor, num_heads: int, pooling: str,
                                eps: float = 1e-5) -> torch.Tensor:
    """Bucket-local attention + pooling per view → ``[S, C]``; see :func:`reference.neighborhood_attention_pool`."""
    op = "neighborhood_attention_pool"
    if x.dim() != 3:
        raise InputError(f"{op}: x must be [B, N, C], got {list(x.shape)}")
    batch, tokens, channels = x.shape
    check_segments(segments, batch, tokens, f"{op}: the segments")
    views, width = segments.num_views, qkv_weight.shape[1] // 3
    expected = {"ln_weight": (ln_weight, (views, channels)), "ln_bias": (ln_bias, (views, channels)),
                "qkv_weight": (qkv_weight, (views, 3 * width, channels)), "qkv_bias": (qkv_bias, (views, 3 * width)),
                "out_weight": (out_weight, (views, channels, width)), "out_bias": (out_bias, (views, channels))}
    for name, (t, shape) in expected.items():
        _expect_shape(op, name, t, shape)
    if width % num_heads:
        raise InputError(f"{op}: attention width {width} is not divisible by num_heads={num_heads}")
    device = _same_device(op, x=x, segment_ids=segments.segment_ids, qkv_weight=qkv_weight)
    return _run(op, x, device, x, segments, ln_weight, ln_bias, qkv_weight, qkv_bias, out_weight, out_bias, num_heads,
                pooling, eps)


def batch_norm_gelu(rows: torch.Tensor, offsets: tuple[int, ...] | torch.Tensor, weight: torch.Tensor,
                    bias: torch.Tensor, running_mean: torch.Tensor, running_var: torch.Tensor,
                    batch: tuple[bool, ...] | torch.Tensor,
                    eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``GELU(BN_g(rows))`` per group of rows → ``[S, C]``, and the statistics used; see
    :func:`reference.batch_norm_gelu`. In a region that ``torch.compile`` traces, ``offsets`` may be a
    ``[G + 1]`` int64 tensor and ``batch`` a ``[G]`` bool one (the view offsets of traced segments are
    data): their values are then not checked."""
    op = "batch_norm_gelu"
    if rows.dim() != 2:
        raise InputError(f"{op}: rows must be [S, C], got {list(rows.shape)}")
    traced = isinstance(offsets, torch.Tensor)
    if not traced:
        offsets, batch = tuple(int(o) for o in offsets), tuple(bool(b) for b in batch)
    groups = len(offsets) - 1
    if not traced and (groups < 0 or offsets[0] != 0 or offsets[-1] != rows.shape[0]
                       or list(offsets) != sorted(offsets)):
        raise InputError(f"{op}: offsets must rise from 0 to the {rows.shape[0]} rows, got {list(offsets)}")
    if len(batch) != groups:
        raise InputError(f"{op}: batch needs one flag per group ({groups}), got {len(batch)}")
    for name, t in (("weight", weight), ("bias", bias), ("running_mean", running_mean), ("running_var", running_var)):
        _expect_shape(op, name, t, (groups, rows.shape[1]))
    small = [] if traced else [g for g, own in enumerate(batch) if own and offsets[g + 1] - offsets[g] < 2]
    if small:
        raise InputError(f"{op}: groups {small} have fewer than 2 rows and cannot use their own statistics")
    device = _same_device(op, rows=rows, weight=weight, bias=bias, running_mean=running_mean, running_var=running_var)
    return _run(op, rows, device, rows, offsets, weight, bias, running_mean, running_var, batch, eps)


def ensemble_propagate(x: torch.Tensor, base_rows: torch.Tensor, base_ids: torch.Tensor, view_rows: torch.Tensor,
                       view_ids: torch.Tensor, coef: float) -> torch.Tensor:
    """``x + c · Σ_j w_ij F_ij`` → ``[B, N, C]``; see :func:`reference.ensemble_propagate`."""
    op = "ensemble_propagate"
    if x.dim() != 3:
        raise InputError(f"{op}: x must be [B, N, C], got {list(x.shape)}")
    _expect_shape(op, "base_ids", base_ids, tuple(x.shape[:2]))
    if view_ids.dim() != 3 or view_ids.shape[1:] != x.shape[:2]:
        raise InputError(f"{op}: view_ids must be [M, B, N] = [M, {x.shape[0]}, {x.shape[1]}], "
                         f"got {list(view_ids.shape)}")
    for name, rows in (("base_rows", base_rows), ("view_rows", view_rows)):
        if rows.dim() != 2 or rows.shape[1] != x.shape[2]:
            raise InputError(f"{op}: {name} must be [S, {x.shape[2]}], got {list(rows.shape)}")
    device = _same_device(op, x=x, base_rows=base_rows, base_ids=base_ids, view_rows=view_rows, view_ids=view_ids)
    return _run(op, x, device, x, base_rows, base_ids, view_rows, view_ids, coef)


def _check_points(op: str, name: str, xyz: torch.Tensor) -> None:
    if xyz.dim() != 3 or xyz.shape[-1] != 3 or not xyz.is_floating_point():
        raise InputError(f"{op}: {name} must be float [B, P, 3], got {list(xyz.shape)} {xyz.dtype}")


def farthest_point_sample(xyz: torch.Tensor, num_samples: int) -> torch.Tensor:
    """``[B, S]`` int64 indices of ``S`` greedy farthest points of ``[B, P, 3]`` clouds, from point 0;
    see :func:`reference.farthest_point_sample`."""
    _check_points("farthest_point_sample", "xyz", xyz)
    if not 0 < num_samples <= xyz.shape[1]:
        raise InputError(f"farthest_point_sample: cannot sample {num_samples} of {xyz.shape[1]} points")
    return _run("farthest_point_sample", xyz, None, xyz, num_samples)


def knn(query: torch.Tensor, points: torch.Tensor, k: int) -> torch.Tensor:
    """``[B, S, k]`` int64 indices of the ``k`` nearest of ``[B, P, 3]`` points to every one of
    ``[B, S, 3]`` queries, nearest first; see :func:`reference.knn`."""
    _check_points("knn", "query", query)
    _check_points("knn", "points", points)
    if query.shape[0] != points.shape[0]:
        raise InputError(f"knn: query and points need one batch, got {query.shape[0]} and {points.shape[0]} clouds")
    if not 0 < k <= points.shape[1]:
        raise InputError(f"knn: k = {k} neighbours requested from {points.shape[1]} points")
    device = _same_device("knn", query=query, points=points)
    with torch.autocast(device.type, enabled=False):  # distances in float32 whatever autocast says
        return _run("knn", query, device, query, points, k)


def neighborhood_aggregate(feat: torch.Tensor, offsets: torch.Tensor, centre_index: torch.Tensor,
                           neighbour_index: torch.Tensor, weight1: torch.Tensor, norm1_weight: torch.Tensor,
                           norm1_bias: torch.Tensor, norm1_mean: torch.Tensor, norm1_var: torch.Tensor,
                           weight2: torch.Tensor, norm2_weight: torch.Tensor, norm2_bias: torch.Tensor,
                           norm2_mean: torch.Tensor, norm2_var: torch.Tensor, training: bool, eps: float,
                           alpha: float, beta: float) -> tuple[torch.Tensor, ...]:
    """A tokenizer stage's neighbourhoods through the residual bottleneck MLP, max-pooled → ``[B, S, 2C]``,
    and the statistics its two BatchNorms used; see :func:`reference.neighborhood_aggregate`.

    Runs in the inputs' precision (float32 for the tokenizer) whatever autocast says: the
    BatchNorms' statistics over ``B·S·k`` rows and the max over neighbours are not rounded to half
    precision."""
    op = "neighborhood_aggregate"
    if feat.dim() != 3 or not feat.is_floating_point():
        raise InputError(f"{op}: feat must be float [B, P, C], got {list(feat.shape)} {feat.dtype}")
    batch, _, channels = feat.shape
    if neighbour_index.dim() != 3 or neighbour_index.shape[0] != batch or neighbour_index.dtype != torch.int64:
        raise InputError(f"{op}: neighbour_index must be int64 [B, S, k] with B = {batch}, got "
                         f"{list(neighbour_index.shape)} {neighbour_index.dtype}")
    samples, k = neighbour_index.shape[1:]
    hidden, dim = weight1.shape[0], 2 * channels
    _expect_shape(op, "centre_index", centre_index, (batch, samples))
    _expect_shape(op, "offsets", offsets, (batch, samples, k, 3))
    expected = {"weight1": (weight1, (hidden, dim)), "weight2": (weight2, (dim, hidden)),
                "norm1_weight": (norm1_weight, (hidden,)), "norm1_bias": (norm1_bias, (hidden,)),
                "norm1_mean": (norm1_mean, (hidden,)), "norm1_var": (norm1_var, (hidden,)),
                "norm2_weight": (norm2_weight, (dim,)), "norm2_bias": (norm2_bias, (dim,)),
                "norm2_mean": (norm2_mean, (dim,)), "norm2_var": (norm2_var, (dim,))}
    for name, (t, shape) in expected.items():
        _expect_shape(op, name, t, shape)
    if training and samples * k < 2:
        raise InputError(f"{op}: batch statistics need more than one row, got {batch}·{samples}·{k}")
    device = _same_device(op, feat=feat, offsets=offsets, centre_index=centre_index, neighbour_index=neighbour_index,
                          weight1=weight1, weight2=weight2)
    with torch.autocast(device.type, enabled=False):
        return _run(op, feat, device, feat, offsets, centre_index, neighbour_index, weight1, norm1_weight,
                    norm1_bias, norm1_mean, norm1_var, weight2, norm2_weight, norm2_bias, norm2_mean, norm2_var,
                    training, eps, alpha, beta)


def interpolate_features(points: torch.Tensor, centers: torch.Tensor, features: torch.Tensor,
                         eps: float = 1e-8) -> torch.Tensor:
    """``[B, P, C]`` features at ``[B, P, 3]`` points: the inverse-distance weighted mean of the ``[B, N, C]``
    features of the 3 nearest of ``[B, N, 3]`` centres; see :func:`reference.interpolate_features`."""
    op = "interpolate_features"
    _check_points(op, "points", points)
    _check_points(op, "centers", centers)
    if features.dim() != 3 or features.shape[:2] != centers.shape[:2] or not features.is_floating_point():
        raise InputError(f"{op}: features must be float [B, N, C] = [{centers.shape[0]}, {centers.shape[1]}, C], "
                         f"got {list(features.shape)} {features.dtype}")
    if points.shape[0] != centers.shape[0]:
        raise InputError(f"{op}: points and centers need one batch, got {points.shape[0]} and "
                         f"{centers.shape[0]} clouds")
    device = _same_device(op, points=points, centers=centers, features=features)
    return _run(op, features, device, points, centers, features, eps)


__all__ = [
    "BACKENDS", "BackendError", "available_backends", "batch_norm_gelu", "bucket_sort", "chosen", "ensemble_propagate",
    "farthest_point_sample", "get_backend", "interpolate_features", "knn", "neighborhood_aggregate",
    "neighborhood_attention_pool", "not_supported_reasons", "project_pe", "segment_pool", "set_backend", "use_backend",
]
