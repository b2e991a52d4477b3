"""``project_pe``: every implementation gives the reference's bucket ids exactly and its PE within tolerance."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from any2point_fast import reference as R
from any2point_fast.config import Any2PointConfig
from any2point_fast.geometry import ProjectionSpec, line_directions, view_rotations
from tests.ops.cases import budget, property_settings, strided
from tests.ops.implementations import names, runnable, triton_device
from tests.tolerances import assert_close_to_reference

OP = "project_pe"


def random_spec(gen: torch.Generator, kind: str, views: int) -> ProjectionSpec:
    """Lines or views of the published recipes (up to 6), random ones beyond; canvases and patches of every recipe."""
    if kind == "1d":
        directions = line_directions(views) if views <= 6 else torch.nn.functional.normalize(
            torch.randn(views, 3, generator=gen), dim=1)
        return ProjectionSpec("1d", directions, segment_length=float(torch.randint(1, 4, (), generator=gen)))
    if views <= 6:
        rotations = view_rotations(views)
    else:
        rotations = torch.linalg.qr(torch.randn(views, 3, 3, generator=gen, dtype=torch.float64))[0].float()
    canvas = ((518, 518), (192, 304), (40, 24))[int(torch.randint(0, 3, (), generator=gen))]
    patch = int(torch.randint(4, 27, (), generator=gen))
    return ProjectionSpec("2d", rotations, canvas_size=canvas, patch_size=patch, camera_distance=1.4)


def centers_of(cloud: str, batch: int, tokens: int, gen: torch.Generator) -> torch.Tensor:
    """``[B, N, 3]``: random, on a lattice (positions exactly on bucket borders), one cloud collapsed to a
    point, or duplicated points."""
    if cloud == "lattice":
        return torch.randint(-3, 4, (batch, tokens, 3), generator=gen) * 0.25
    centers = torch.randn(batch, tokens, 3, generator=gen) * 2 + 0.5
    if cloud == "degenerate":
        centers[0] = centers[0, :1]
    elif cloud == "duplicates":
        centers = centers[:, torch.randint(0, tokens, (tokens,), generator=gen)]
    return centers


@pytest.mark.parametrize("name", names(OP))
def test_matches_the_reference(name):
    impl = runnable(OP)[name]
    bound = budget(impl)

    @property_settings(impl)
    @given(seed=st.integers(0, 2**31 - 1), kind=st.sampled_from(("1d", "2d")), views=st.integers(1, 8),
           batch=st.integers(1, bound.max_batch), tokens=st.integers(1, min(bound.max_tokens, 200)),
           channels=st.sampled_from((1, 8, 36, 100)), dtype=st.sampled_from(bound.dtypes),
           cloud=st.sampled_from(("normal", "lattice", "degenerate", "duplicates")), noncontiguous=st.booleans())
    def check(seed, kind, views, batch, tokens, channels, dtype, cloud, noncontiguous):
        gen = torch.Generator().manual_seed(seed)
        spec = random_spec(gen, kind, views)
        centers = centers_of(cloud, batch, tokens, gen).to(impl.device)
        if noncontiguous:
            centers = strided(centers)
        shape = (77, channels) if kind == "1d" else (int(torch.randint(2, 15, (), generator=gen)), 11, channels)
        table = torch.randn(shape, generator=gen).to(impl.device, dtype)
        pe, buckets = impl.fn(centers, table, spec)
        ref_pe, ref_buckets = R.project_pe(centers, table, spec)
        assert buckets.dtype == torch.int64 and torch.equal(buckets, ref_buckets)
        assert pe.dtype == dtype
        assert_close_to_reference(pe, ref_pe, dtype)

    check()


@pytest.mark.parametrize("name", names(OP))
@pytest.mark.parametrize("preset", ["language", "vision", "audio"])
def test_the_published_recipes(name, preset):
    impl = runnable(OP)[name]
    gen = torch.Generator().manual_seed(0)
    config = Any2PointConfig.preset(preset)
    spec = ProjectionSpec.from_config(config)
    centers = (torch.randn(2, 40, 3, generator=gen) * 3 + 1).to(impl.device)
    shape = (config.pe_length, 8) if config.pe_kind == "1d" else (*config.pe_grid, 8)
    table = torch.randn(shape, generator=gen).to(impl.device)
    pe, buckets = impl.fn(centers, table, spec)
    ref_pe, ref_buckets = R.project_pe(centers, table, spec)
    assert torch.equal(buckets, ref_buckets)
    assert_close_to_reference(pe, ref_pe, torch.float32)


def test_triton_has_no_backward():
    device = triton_device()
    from any2point_fast import kernels

    table = torch.randn(77, 8, device=device, requires_grad=True)
    with pytest.raises(NotImplementedError):
        kernels.project_pe(torch.randn(1, 4, 3, device=device), table, ProjectionSpec("1d", line_directions(2)))
