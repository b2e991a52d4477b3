"""``any2point_fast.bottleneck``: QuickGELU, and the module-by-module path beside the fused node
(the fused node against the oracle adapter's bottleneck is in ``test_adapter.py``)."""

from __future__ import annotations

import torch
from torch import nn

from any2point_fast.bottleneck import QUICK_GELU_K, bottleneck, fusable, quick_gelu


def test_quick_gelu_is_clips():
    x = torch.linspace(-6, 6, 101, dtype=torch.float64)
    assert QUICK_GELU_K == 1.702
    torch.testing.assert_close(quick_gelu(x), x / (1 + torch.exp(-1.702 * x)))
    torch.testing.assert_close(quick_gelu(x), nn.functional.gelu(x), atol=0.03, rtol=0)  # its approximation


def test_fused_and_module_by_module_agree():
    gen = torch.Generator().manual_seed(0)
    down, up = nn.Linear(8, 3), nn.Linear(3, 8)
    hidden, ffn = torch.randn(2, 6, 8, generator=gen), torch.randn(2, 6, 8, generator=gen)
    assert fusable(hidden, ffn, down, up)
    prefix, tokens = bottleneck(hidden, ffn, down, up, 0.3, 2)
    expected = hidden + ffn + 0.3 * up(quick_gelu(down(ffn)))
    assert tokens.grad_fn.name() == "_BottleneckBackward"
    torch.testing.assert_close(torch.cat((prefix, tokens), dim=1), expected)
    mixed = hidden.double()  # inputs of two dtypes: not fusable, computed module by module
    assert not fusable(mixed, ffn, down, up)
    prefix, tokens = bottleneck(mixed, ffn, down, up, 0.3, 2)
    assert tokens.grad_fn.name() != "_BottleneckBackward" and tokens.dtype == torch.float64
    torch.testing.assert_close(torch.cat((prefix, tokens), dim=1), expected.double())
