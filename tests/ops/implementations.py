"""The implementations of the tokenizer's sampling ops that can run here, for the per-op tests.

Triton runs under ``TRITON_INTERPRET=1`` on the CPU (``tests/conftest.py`` sets it before
anything imports triton) or compiled on a GPU.
"""

from __future__ import annotations

import pytest
import torch

from any2point_fast import torch_ops
from any2point_fast.torch_ops import native
from any2point_fast.torch_ops import sampling as torch_sampling


def triton_device() -> torch.device:
    """Where the Triton kernels run here, or a skip."""
    triton = pytest.importorskip("triton")
    if torch.cuda.is_available():
        return torch.device("cuda")
    if not triton.knobs.runtime.interpret:
        pytest.skip("no GPU, and triton was imported before TRITON_INTERPRET=1 was set")
    return torch.device("cpu")


def farthest_point_sample_implementations() -> dict:
    """``name -> (function, device)`` of every farthest point sampling that can run here."""
    found = {"torch, stepwise": (torch_sampling._farthest_point_sample_stepwise, torch.device("cpu"))}
    if native.available(torch.device("cpu")):
        found["torch, compiled"] = (torch_ops.farthest_point_sample, torch.device("cpu"))
    return found
