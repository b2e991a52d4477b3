"""``farthest_point_sample``: every implementation picks exactly the reference's points, ties included."""

from __future__ import annotations

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from any2point_fast import ops
from any2point_fast import reference as R
from any2point_fast.validation import InputError
from tests.ops.cases import budget, property_settings
from tests.ops.implementations import names, runnable, triton_device

OP = "farthest_point_sample"
LAYOUTS = ("normal", "grid ties", "all equal", "duplicated", "tiny", "huge", "far away")


def cloud(seed: int, batch: int, points: int, layout: str, dtype: torch.dtype) -> torch.Tensor:
    """``[B, P, 3]`` clouds: random, on a coarse integer grid (many exactly tied distances), one
    point repeated, every point twice, at scale 1e-4 or 1e4, or a million units from the origin."""
    gen = torch.Generator().manual_seed(seed)
    xyz = torch.randn(batch, points, 3, generator=gen, dtype=torch.float64)
    if layout == "grid ties":
        xyz = torch.randint(-2, 3, (batch, points, 3), generator=gen).double()
    elif layout == "all equal":
        xyz = xyz[:, :1].expand(-1, points, -1)
    elif layout == "duplicated":
        xyz = xyz[:, torch.arange(points) // 2]
    elif layout == "tiny":
        xyz = xyz * 1e-4
    elif layout == "huge":
        xyz = xyz * 1e4
    elif layout == "far away":
        xyz = xyz + 1e6
    return xyz.to(dtype).contiguous()


@pytest.mark.parametrize("name", names(OP))
def test_every_implementation_picks_the_reference_points(name):
    impl = runnable(OP)[name]
    bound = budget(impl)
    triton = impl.implementation.backend == "triton"
    dtypes = (torch.float32,) if triton else (torch.float32, torch.float16, torch.float64)

    @property_settings(impl)
    @given(seed=st.integers(0, 2**31 - 1), batch=st.integers(1, bound.max_batch + (not triton)),
           points=st.integers(1, 40 if triton else 300), fraction=st.floats(0.0, 1.0),
           layout=st.sampled_from(LAYOUTS), dtype=st.sampled_from(dtypes))
    def check(seed, batch, points, fraction, layout, dtype):
        assume(dtype != torch.float16 or layout not in ("huge", "far away"))  # beyond float16's range
        # (interpreted Triton: a sample loop of at most 12 steps)
        samples = max(1, round(fraction * (min(points, 12) if triton else points)))
        xyz = cloud(seed, batch, points, layout, dtype)
        picked = impl.fn(xyz.to(impl.device), samples)
        assert picked.dtype == torch.int64 and picked.tolist() == R.farthest_point_sample(xyz, samples).tolist()

    check()


def test_triton_walks_clouds_wider_than_one_block():
    """Points past the first block (2048) are candidates too; the farthest one is picked there."""
    from any2point_fast import kernels

    device = triton_device()
    xyz = cloud(3, 2, 2100, "normal", torch.float32)
    xyz[1, 2090] = 50.0
    picked = kernels.farthest_point_sample(xyz.to(device), 3)
    assert picked.tolist() == R.farthest_point_sample(xyz, 3).tolist() and picked[1, 1].item() == 2090


def test_a_non_contiguous_cloud_gives_the_same_points():
    xyz = cloud(0, 3, 64, "normal", torch.float32)
    strided = xyz.transpose(0, 1).contiguous().transpose(0, 1)
    assert not strided.is_contiguous()
    assert ops.farthest_point_sample(strided, 20).tolist() == R.farthest_point_sample(xyz, 20).tolist()


@pytest.mark.parametrize(("shape", "samples", "match"), [
    ((2, 10, 2), 4, r"xyz must be float \[B, P, 3\]"),
    ((2, 10, 3), 11, "cannot sample 11 of 10 points"),
    ((2, 10, 3), 0, "cannot sample 0 of 10 points"),
])
def test_bad_inputs_are_refused_before_any_kernel(shape, samples, match):
    with pytest.raises(InputError, match=match):
        ops.farthest_point_sample(torch.zeros(shape), samples)
