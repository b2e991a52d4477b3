"""``ViewAttention``: the shared per-view weights, laid out as the oracle's and as the op reads them."""

from __future__ import annotations

import pytest
import torch

from any2point_fast import Any2PointConfig, ViewAttention, ops
from any2point_fast import reference as R
from any2point_fast.geometry import ProjectionSpec
from tests.tolerances import assert_close_to_reference


def test_shapes_and_initial_values():
    attention = ViewAttention(hidden_size=20, num_views=3, attn_dim=12, num_heads=6)
    shapes = {name: tuple(p.shape) for name, p in attention.named_parameters()}
    assert shapes == {"ln_weight": (3, 20), "ln_bias": (3, 20), "qkv_weight": (3, 36, 20), "qkv_bias": (3, 36),
                      "out_weight": (3, 20, 12), "out_bias": (3, 20)}
    assert torch.equal(attention.ln_weight, torch.ones(3, 20))
    for bias in (attention.ln_bias, attention.qkv_bias, attention.out_bias):
        assert torch.equal(bias, torch.zeros_like(bias))
    for weight in (attention.qkv_weight, attention.out_weight):
        assert 0.01 < weight.std() < 0.03
    assert attention.weights() == (attention.ln_weight, attention.ln_bias, attention.qkv_weight, attention.qkv_bias,
                                   attention.out_weight, attention.out_bias)
    assert "num_heads=6" in repr(attention)


def test_heads_must_divide_the_width():
    with pytest.raises(ValueError, match="divisible"):
        ViewAttention(20, 3, attn_dim=12, num_heads=5)


def test_the_oracles_layout_and_the_ops_argument_order():
    """Same state dict and seeded values as the oracle's module; its ``weights()`` fed to the op give
    what the oracle's give to the oracle's function."""
    torch.manual_seed(0)
    oracle = R.ViewAttention(24, 4, 12, 6)
    torch.manual_seed(0)
    ours = ViewAttention(24, 4, 12, 6)
    assert list(ours.state_dict()) == list(oracle.state_dict())
    for name, value in oracle.state_dict().items():
        assert torch.equal(ours.state_dict()[name], value), name
    with torch.no_grad():
        for p in oracle.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    ours.load_state_dict(oracle.state_dict())
    config = Any2PointConfig.preset("vision", hidden_size=24, num_views=4)
    centers, tokens = torch.randn(2, 30, 3), torch.randn(2, 30, 24)
    _, geometry = R.build_geometry(centers, torch.zeros(*config.pe_grid, 24), ProjectionSpec.from_config(config),
                                   config.voxel_size)
    expected = R.neighborhood_attention_pool(tokens, geometry.views, *oracle.weights(), oracle.num_heads, "max+mean")
    with ops.use_backend("torch"):
        pooled = ops.neighborhood_attention_pool(tokens, geometry.views, *ours.weights(), ours.num_heads, "max+mean")
    assert not torch.allclose(expected, R.segment_pool(tokens.reshape(-1, 24).repeat(4, 1),
                                                       geometry.views.segment_ids.flatten(),
                                                       geometry.views.num_segments, "max+mean"), atol=1e-3)
    assert_close_to_reference(pooled, expected)
