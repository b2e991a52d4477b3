"""The geometry ops under bfloat16 autocast give their float32 results: projected positions,
bucket ids and neighbours are never computed from coordinates rounded to half precision; nor is
the tokenizer's neighbourhood aggregation (BatchNorm statistics over every neighbour)."""

from __future__ import annotations

import pytest
import torch

from any2point_fast import Any2PointConfig, ops
from any2point_fast.geometry import ProjectionSpec
from tests.ops.test_neighborhood_aggregate import aggregate, make_case


@pytest.mark.parametrize("preset", ["language", "vision"])
@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_project_pe_ignores_autocast(preset, backend):
    config = Any2PointConfig.preset(preset, hidden_size=32, num_tokens=64, num_points=128)
    spec = ProjectionSpec.from_config(config)
    gen = torch.Generator().manual_seed(0)
    centers = torch.randn(3, 64, 3, generator=gen) * 0.7
    shape = (config.pe_length, 32) if config.pe_kind == "1d" else (*config.pe_grid, 32)
    table = torch.randn(shape, generator=gen)
    with ops.use_backend(backend):
        pe, buckets = ops.project_pe(centers, table, spec)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            pe_autocast, buckets_autocast = ops.project_pe(centers, table, spec)
    assert torch.equal(buckets_autocast, buckets)
    assert pe_autocast.dtype == torch.float32 and torch.equal(pe_autocast, pe)


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_knn_ignores_autocast(backend):
    gen = torch.Generator().manual_seed(1)
    points = torch.randn(2, 500, 3, generator=gen) * 10
    query = points[:, :100] + 1e-3 * torch.randn(2, 100, 3, generator=gen)
    with ops.use_backend(backend):
        expected = ops.knn(query, points, 8)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            found = ops.knn(query, points, 8)
    assert torch.equal(found, expected)


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_neighborhood_aggregate_ignores_autocast(backend):
    """The stage's MLP runs in float32 under autocast: its BatchNorm statistics over every neighbour
    and the max over them are those of float32, and so are the gradients."""
    case = make_case(2, 30, 6, 5, 4, 2, False, seed=0)
    results = []
    for enabled in (False, True):
        inputs = [t.clone().requires_grad_() for t in case.inputs]
        with ops.use_backend(backend), torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
            out, *stats = aggregate(ops.neighborhood_aggregate, case, inputs, True)
        out.square().sum().backward()
        results.append((out, stats, [t.grad for t in inputs]))
    (out, stats, grads), (out_autocast, stats_autocast, grads_autocast) = results
    assert out_autocast.dtype == torch.float32 and torch.equal(out_autocast, out)
    assert all(torch.equal(a, b) for a, b in zip(stats_autocast, stats))
    assert all(torch.equal(a, b) for a, b in zip(grads_autocast, grads))
