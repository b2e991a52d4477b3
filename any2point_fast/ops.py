"""The fused ops, one function each, dispatched to ``triton | torch | reference``.

Every backend module exposes the same functions with the same signatures (those of
:mod:`any2point_fast.reference`). The backend is chosen by :func:`set_backend`, the
``ANY2POINT_BACKEND`` environment variable, or ``auto``: Triton for CUDA tensors when it
imports, the fused PyTorch path otherwise. A backend that cannot run an input is refused with
the reasons of every backend tried.
"""

from __future__ import annotations

import contextlib
import importlib
import os
from collections.abc import Iterator
from types import ModuleType

import torch

from .geometry import ProjectionSpec, Segments

BACKENDS = ("auto", "triton", "torch", "reference")
_MODULES = {"reference": "any2point_fast.reference", "torch": "any2point_fast.torch_ops",
            "triton": "any2point_fast.kernels"}


class BackendError(RuntimeError):
    """No backend can run the requested op on these inputs."""


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


def _load(name: str) -> ModuleType | str:
    """The backend's module, or why it cannot be imported."""
    try:
        return importlib.import_module(_MODULES[name])
    except ImportError as error:
        return f"cannot import {_MODULES[name]}: {error}"


def not_supported_reasons(name: str, op: str, device: torch.device) -> list[str]:
    """Why backend ``name`` cannot run ``op`` on ``device`` (empty when it can)."""
    module = _load(name)
    if isinstance(module, str):
        return [module]
    if not hasattr(module, op):
        return [f"{name} has no {op}"]
    if name == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return [f"tensors on {device.type}; triton runs on CUDA, or on CPU under TRITON_INTERPRET=1"]
    return []


def available_backends(device: torch.device | str = "cpu") -> dict[str, list[str]]:
    """Every concrete backend and why it is unavailable for ``device`` (``[]`` = available)."""
    device = torch.device(device)
    return {name: not_supported_reasons(name, "bucket_sort", device) for name in BACKENDS[1:]}


def _resolve(op: str, device: torch.device):
    """The implementation of ``op`` chosen by the current backend for tensors on ``device``."""
    if _backend == "auto":
        candidates = ("triton", "torch", "reference") if device.type == "cuda" else ("torch", "reference")
    else:
        candidates = (_backend,)
    refusals = []
    for name in candidates:
        reasons = not_supported_reasons(name, op, device)
        if not reasons:
            return getattr(_load(name), op)
        refusals.append(f"  {name}: " + "; ".join(reasons))
    raise BackendError(f"no backend can run {op} on {device} (backend {_backend!r}):\n" + "\n".join(refusals))


def project_pe(centers: torch.Tensor, pe_table: torch.Tensor,
               spec: ProjectionSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Averaged PE ``[B, N, C]`` and bucket ids ``[M, B, N]``; see :func:`reference.project_pe`."""
    return _resolve("project_pe", centers.device)(centers, pe_table, spec)


def bucket_sort(bucket_ids: torch.Tensor, num_buckets: int) -> Segments:
    """Non-empty segments of ``[V, B, N]`` bucket ids; see :func:`reference.bucket_sort`."""
    return _resolve("bucket_sort", bucket_ids.device)(bucket_ids, num_buckets)


def segment_pool(values: torch.Tensor, segment_ids: torch.Tensor, num_segments: int, pooling: str) -> torch.Tensor:
    """``[T, C]`` rows pooled into ``[S, C]``; see :func:`reference.segment_pool`."""
    return _resolve("segment_pool", values.device)(values, segment_ids, num_segments, pooling)


def neighborhood_attention_pool(x: torch.Tensor, segments: Segments, ln_weight: torch.Tensor, ln_bias: torch.Tensor,
                                qkv_weight: torch.Tensor, qkv_bias: torch.Tensor, out_weight: torch.Tensor,
                                out_bias: torch.Tensor, num_heads: int, pooling: str,
                                eps: float = 1e-5) -> torch.Tensor:
    """Bucket-local attention + pooling per view → ``[S, C]``; see :func:`reference.neighborhood_attention_pool`."""
    return _resolve("neighborhood_attention_pool", x.device)(
        x, segments, ln_weight, ln_bias, qkv_weight, qkv_bias, out_weight, out_bias, num_heads, pooling, eps
    )


def ensemble_propagate(x: torch.Tensor, base_rows: torch.Tensor, base_ids: torch.Tensor, view_rows: torch.Tensor,
                       view_ids: torch.Tensor, coef: float) -> torch.Tensor:
    """``x + c · Σ_j w_ij F_ij`` → ``[B, N, C]``; see :func:`reference.ensemble_propagate`."""
    return _resolve("ensemble_propagate", x.device)(x, base_rows, base_ids, view_rows, view_ids, coef)


__all__ = [
    "BACKENDS", "BackendError", "available_backends", "bucket_sort", "ensemble_propagate", "get_backend",
    "neighborhood_attention_pool", "not_supported_reasons", "project_pe", "segment_pool",
    "set_backend", "use_backend",
]
