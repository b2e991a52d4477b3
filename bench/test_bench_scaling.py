"""Scaling of the adapter's guided branch in the number of tokens per cloud.

N = 128 … 16384 (B = 1, C = 96, 1D and 2D recipes), forward+backward time and peak memory per
backend. The dense reference needs ``M · heads · N²`` floats of attention logits per block; it is
skipped (recorded as skipped) where that alone would exceed ``REFERENCE_BUDGET`` bytes. Also
N = 4096 with B = 8.
"""

from __future__ import annotations

import pytest
import torch

from .conftest import device
from .workloads import adapter_case, adapter_pair, forward_backward

FULL_SIZES = [(1, n) for n in (128, 512, 1024, 2048, 4096, 8192, 16384)] + [(8, 4096)]
QUICK_SIZES = [(1, 64), (1, 256)]
REFERENCE_BUDGET = 20 * 2**30


def pytest_generate_tests(metafunc):
    if "size" in metafunc.fixturenames:
        quick = metafunc.config.getoption("--quick")
        sizes = QUICK_SIZES if quick else FULL_SIZES
        metafunc.parametrize("size", sizes, ids=[f"B{b}-N{n}" for b, n in sizes])


@pytest.mark.parametrize("recipe", ["language", "vision"])
def test_adapter_scaling(measure, backend, recipe, size):
    batch, tokens = size
    case = adapter_case(recipe, batch=batch, tokens=tokens, hidden=96, device=device())
    dense_bytes = 2 * case.config.num_views * case.config.attn_heads * batch * tokens**2 * 4
    if backend == "reference" and dense_bytes > REFERENCE_BUDGET:
        pytest.skip(f"dense reference needs about {dense_bytes / 2**30:.0f} GiB of attention logits")
    adapter, _ = adapter_pair(case)
    hidden, ffn = case.hidden.clone().requires_grad_(), case.ffn.clone().requires_grad_()
    run = forward_backward(lambda: adapter(hidden, ffn, case.geometry), [hidden, ffn, *adapter.parameters()])
    # the dense reference takes up to two minutes a call from N = 4096 on: one cold timed call (a
    # warm-up would be lost in its noise and double the suite's time); everything else is warmed up
    slow = backend == "reference" and tokens >= 4096
    out = measure(run, rounds=1 if slow else 3, warmup=not slow, group="scaling",
                  case=f"{recipe} B={batch} N={tokens}", backend=backend, mode="forward+backward", recipe=recipe,
                  batch=batch, tokens=tokens)
    assert torch.isfinite(out).all() and torch.isfinite(hidden.grad).all()
