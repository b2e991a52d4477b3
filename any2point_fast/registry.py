"""The op registry: every implementation of every fused op, what it supports, and the choice.

Each :class:`Implementation` names its op, its backend (the :func:`any2point_fast.set_backend`
name it belongs to), the module holding the function (imported on first use: Triton only where
it is chosen or listed), the explicit arguments that make it one route of that function (the
torch path's ``compiled`` kernels or plain PyTorch, its flash or tiled attention), the device
types and input dtypes it runs, a further check, and a priority. :func:`choose` takes, among the
implementations a backend allows, the one of highest priority whose :meth:`Implementation.supports`
gives no reason; ``auto`` allows every implementation registered for automatic choice on the
tensors' device (Triton on CUDA, then the compiled CPU kernels, plain PyTorch, the reference).
A backend with no implementation of an op (Triton has no ``knn``) falls back, for that op only,
to ``auto``'s choice. When nothing fits, :class:`BackendError` lists every implementation tried
and why it refused.

Only this module (besides tests and benchmarks) names :mod:`any2point_fast.reference` as a
runnable implementation.
"""

from __future__ import annotations

import functools
import importlib
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType, ModuleType
from typing import Any

import torch

#: The concrete backends, in the order ``auto`` prefers them on CUDA.
BACKENDS = ("triton", "torch", "reference")
#: Every fused op, in the order of a forward pass.
OPS = ("farthest_point_sample", "knn", "neighborhood_aggregate", "project_pe", "bucket_sort",
       "neighborhood_attention_pool", "segment_pool", "batch_norm_gelu", "ensemble_propagate", "interpolate_features")

FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
TRITON_FLOATS = (torch.float16, torch.bfloat16, torch.float32)


class BackendError(RuntimeError):
    """No backend can run the requested op on these inputs."""


@functools.cache
def _load(module: str) -> ModuleType | str:
    """The module, or why it cannot be imported."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        return f"cannot import {module}: {error}"


@dataclass(frozen=True)
class Implementation:
    """One implementation of one op.

    Attributes:
        op: the op's name (one of :data:`OPS`); the function of that name in ``module``.
        name: unique among the op's implementations, e.g. ``"torch-compiled"``.
        backend: the backend it belongs to (one of :data:`BACKENDS`).
        module: the module holding the function.
        devices: device types it runs tensors on (``None``: any).
        auto_devices: device types on which ``auto`` may choose it (``None``: any).
        dtypes: dtypes of the op's main tensor it accepts (the points, rows, tokens or ids).
        priority: higher is preferred.
        options: keyword arguments bound to the function: the route it takes.
        check: ``device -> reasons`` for conditions beyond the device type (empty when it runs).
    """

    op: str
    name: str
    backend: str
    module: str
    devices: tuple[str, ...] | None
    auto_devices: tuple[str, ...] | None
    dtypes: tuple[torch.dtype, ...]
    priority: int
    options: Mapping[str, Any] = field(default_factory=dict)
    check: Callable[[torch.device], list[str]] | None = None

    def supports(self, device: torch.device, dtype: torch.dtype | None = None) -> list[str]:
        """Why this implementation cannot run inputs on ``device`` of ``dtype`` (empty when it can;
        ``dtype=None``: any dtype it accepts)."""
        if self.devices is not None and device.type not in self.devices:
            return [f"runs on {' or '.join(self.devices)}, not {device.type}"]
        if dtype is not None and dtype not in self.dtypes:
            return [f"takes {', '.join(str(d).removeprefix('torch.') for d in self.dtypes)}, not "
                    f"{str(dtype).removeprefix('torch.')}"]
        module = _load(self.module)
        if isinstance(module, str):
            return [module]
        return self.check(device) if self.check is not None else []

    def function(self) -> Callable:
        """The callable, with this implementation's options bound (call :meth:`supports` first)."""
        fn = getattr(_load(self.module), self.op)
        return functools.partial(fn, **self.options) if self.options else fn


_REGISTRY: dict[str, list[Implementation]] = {op: [] for op in OPS}


def register(implementation: Implementation) -> Implementation:
    """Add an implementation to the registry (its name must be new for its op)."""
    existing = _REGISTRY[implementation.op]
    if any(impl.name == implementation.name for impl in existing):
        raise ValueError(f"{implementation.op} already has an implementation named {implementation.name!r}")
    existing.append(implementation)
    existing.sort(key=lambda impl: -impl.priority)
    return implementation


def implementations(op: str) -> list[Implementation]:
    """Every implementation of ``op``, highest priority first."""
    return list(_REGISTRY[op])


def candidates(op: str, backend: str, device: torch.device) -> list[Implementation]:
    """The implementations of ``op`` that ``backend`` allows on ``device``, highest priority first: its
    own, or, where it has none of ``op``, those of ``auto``."""
    if backend != "auto":
        own = [impl for impl in _REGISTRY[op] if impl.backend == backend]
        if own:
            return own
    return [impl for impl in _REGISTRY[op] if impl.auto_devices is None or device.type in impl.auto_devices]


def choose(op: str, backend: str, device: torch.device, dtype: torch.dtype | None = None) -> Implementation:
    """The implementation of ``op`` that runs inputs on ``device`` of ``dtype`` under ``backend``."""
    refusals = []
    for impl in candidates(op, backend, device):
        reasons = impl.supports(device, dtype)
        if not reasons:
            return impl
        refusals.append(f"  {impl.name}: " + "; ".join(reasons))
    raise BackendError(f"no backend can run {op} on {device} (backend {backend!r}):\n" + "\n".join(refusals))


def support_table(device: torch.device | str = "cpu") -> dict[str, dict[str, list[str]]]:
    """``op -> implementation -> reasons`` it cannot run on ``device`` (``[]``: it can)."""
    device = torch.device(device)
    return {op: {impl.name: impl.supports(device) for impl in _REGISTRY[op]} for op in OPS}


def format_support_table(device: torch.device | str = "cpu") -> str:
    """:func:`support_table` as lines ``op  implementation  yes | no: reasons``, the chosen ``auto`` one marked."""
    device = torch.device(device)
    lines = []
    for op, row in support_table(device).items():
        runnable = [impl for impl in candidates(op, "auto", device) if not row[impl.name]]
        for name, reasons in row.items():
            state = "no: " + "; ".join(reasons) if reasons else "yes"
            mark = " (auto)" if runnable and runnable[0].name == name else ""
            lines.append(f"{op:<28} {name:<16} {state}{mark}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ the catalogue
def _triton_runs(device: torch.device) -> list[str]:
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return [f"tensors on {device.type}; triton runs on CUDA, or on CPU under TRITON_INTERPRET=1"]
    return []


def _compiled_runs(device: torch.device) -> list[str]:
    from .torch_ops import native

    if native.available(device):
        return []
    return [f"the compiled CPU kernels are off ({native.ENV_VAR}=0) or did not build (see the warning)"]


def _flash_runs(device: torch.device) -> list[str]:
    from .torch_ops.attention import FLASH_ON_CPU

    return [] if FLASH_ON_CPU else ["this PyTorch has no CPU flash attention"]


def _register_catalogue() -> None:
    from .torch_ops.attention import Route

    everywhere = None
    triton_ops = ("project_pe", "bucket_sort", "segment_pool", "neighborhood_attention_pool", "batch_norm_gelu",
                  "ensemble_propagate", "farthest_point_sample", "interpolate_features", "neighborhood_aggregate")
    compiled_ops = ("segment_pool", "batch_norm_gelu", "ensemble_propagate", "farthest_point_sample",
                    "neighborhood_aggregate")
    for op in OPS:
        ids = op == "bucket_sort"
        floats, triton_floats = ((torch.int64, torch.int32),) * 2 if ids else (FLOATS, TRITON_FLOATS)
        if op in ("farthest_point_sample", "knn"):
            triton_floats = FLOATS  # coordinates are read as float32
        if op in triton_ops:
            register(Implementation(op, "triton", "triton", "any2point_fast.kernels", ("cuda", "cpu"), ("cuda",),
                                    triton_floats, 30, check=_triton_runs))
        if op in compiled_ops:
            register(Implementation(op, "torch-compiled", "torch", "any2point_fast.torch_ops", ("cpu",), everywhere,
                                    floats, 20, MappingProxyType({"compiled": True}), _compiled_runs))
        if op == "neighborhood_attention_pool":
            register(Implementation(op, "torch-compiled", "torch", "any2point_fast.torch_ops", ("cpu",), everywhere,
                                    floats, 20, MappingProxyType({"route": Route(compiled=True, flash=False)}),
                                    _compiled_runs))
            register(Implementation(op, "torch-flash", "torch", "any2point_fast.torch_ops", ("cpu",), everywhere,
                                    floats, 15, MappingProxyType({"route": Route(compiled=False, flash=True)}),
                                    _flash_runs))
            register(Implementation(op, "torch-tiled", "torch", "any2point_fast.torch_ops", everywhere, everywhere,
                                    floats, 10, MappingProxyType({"route": Route(compiled=False, flash=False)})))
        else:
            plain = MappingProxyType({"compiled": False}) if op in compiled_ops else MappingProxyType({})
            register(Implementation(op, "torch", "torch", "any2point_fast.torch_ops", everywhere, everywhere, floats,
                                    10, plain))
        register(Implementation(op, "reference", "reference", "any2point_fast.reference", everywhere, everywhere,
                                floats, 0))


_register_catalogue()

__all__ = ["BACKENDS", "OPS", "BackendError", "Implementation", "candidates", "choose", "format_support_table",
           "implementations", "register", "support_table"]
