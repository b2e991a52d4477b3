"""The geometry ops under bfloat16 autocast give their float32 results: projected positions,
bucket ids and neighbours are never computed from coordinates rounded to half precision."""

from __future__ import annotations

import pytest
import torch

from any2point_fast import Any2PointConfig, ops
from any2point_fast.geometry import ProjectionSpec


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
