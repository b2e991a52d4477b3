"""The registered implementations of an op that can run here, for the per-op tests.

Every implementation of :mod:`any2point_fast.registry` but the reference (the oracle the others
are compared with) that supports this machine's test device: the torch path's routes on the CPU
(where the compiled kernels build, the compiled one too), and Triton under ``TRITON_INTERPRET=1``
on the CPU (``tests/conftest.py`` sets it before anything imports triton) or compiled on a GPU.
Tests reach each route through its registered options, never by patching module globals.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import NamedTuple

import pytest
import torch

from any2point_fast import registry
from any2point_fast.torch_ops import native


class Runnable(NamedTuple):
    """An implementation with its bound function and the device its test inputs go to."""

    name: str
    fn: Callable
    device: torch.device
    implementation: registry.Implementation


def triton_device() -> torch.device:
    """Where the Triton kernels run here, or a skip."""
    triton = pytest.importorskip("triton")
    if torch.cuda.is_available():
        return torch.device("cuda")
    if not triton.knobs.runtime.interpret:
        pytest.skip("no GPU, and triton was imported before TRITON_INTERPRET=1 was set")
    return torch.device("cpu")


def _device(impl: registry.Implementation) -> torch.device:
    if impl.backend == "triton":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device("cpu")


def runnable(op: str) -> dict[str, Runnable]:
    """``name -> Runnable`` of every implementation of ``op`` but the reference that runs here.

    Where the compiled CPU kernels fail to build (``ANY2POINT_NATIVE`` not ``0``), that is an
    error, not a skip: :func:`require_compiled` says so in its own test.
    """
    found = {}
    for impl in registry.implementations(op):
        device = _device(impl)
        if impl.backend != "reference" and not impl.supports(device):
            found[impl.name] = Runnable(impl.name, impl.function(), device, impl)
    return found


def names(op: str) -> list[str]:
    """The names of :func:`runnable`, for ``pytest.mark.parametrize``."""
    return list(runnable(op))


def with_route(name: str, **changes) -> Callable:
    """``neighborhood_attention_pool`` of the torch route ``name`` with some of its
    :class:`~any2point_fast.torch_ops.attention.Route` fields changed (its tile size, when it saves argmaxes)."""
    impl = runnable("neighborhood_attention_pool")[name].implementation
    route = dataclasses.replace(impl.options["route"], **changes)
    return dataclasses.replace(impl, options={"route": route}).function()


def require_compiled() -> None:
    """Skip where the user turned the compiled kernels off; anywhere else they must build."""
    if os.environ.get(native.ENV_VAR, "").strip() == "0":
        pytest.skip(f"{native.ENV_VAR}=0: compiled kernels turned off")
    assert native.available(torch.device("cpu")), "the compiled CPU kernels did not build (see the warning)"
