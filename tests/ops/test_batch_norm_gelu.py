"""``batch_norm_gelu``: every implementation against the reference: rows, statistics and gradients."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from any2point_fast import reference as R
from tests.ops.cases import budget, check_op, property_settings, strided
from tests.ops.implementations import names, runnable, triton_device
from tests.tolerances import assert_close_to_reference

OP = "batch_norm_gelu"


@st.composite
def row_groups(draw, max_rows: int) -> tuple[tuple[int, ...], tuple[bool, ...]]:
    """Offsets of 1..8 groups of rows (empty, single and longer ones), and which groups use their
    own statistics (only groups of two rows or more can)."""
    sizes = draw(st.lists(st.one_of(st.integers(0, 2), st.integers(3, max_rows)), min_size=1, max_size=8))
    batch = tuple(draw(st.booleans()) and size > 1 for size in sizes)
    return tuple(itertools.accumulate(sizes, initial=0)), batch


def norm_inputs(offsets: tuple[int, ...], channels: int, gen: torch.Generator) -> list[torch.Tensor]:
    """Rows off-centre and wide (the statistics matter), affine weights, running statistics."""
    groups = len(offsets) - 1
    rows = 2 + 3 * torch.randn(offsets[-1], channels, generator=gen)
    return [rows, 1 + 0.5 * torch.randn(groups, channels, generator=gen),
            0.5 * torch.randn(groups, channels, generator=gen), torch.randn(groups, channels, generator=gen),
            0.5 + torch.rand(groups, channels, generator=gen)]


def check(fn, device, offsets, batch, inputs, running_mean, running_var, dtype, seed):
    """Values and gradients of rows, weight and bias, and the statistics used, against the reference."""
    running_mean, running_var = running_mean.to(device), running_var.to(device)

    def op(rows, weight, bias):
        return fn(rows, offsets, weight, bias, running_mean, running_var, batch)[0]

    def ref_op(rows, weight, bias):
        return R.batch_norm_gelu(rows, offsets, weight, bias, running_mean, running_var, batch)[0]

    check_op(op, ref_op, inputs, ["rows", "weight", "bias"], dtype, grad_scale=4, seed=seed)
    _, mean, var = fn(inputs[0], offsets, *inputs[1:], running_mean, running_var, batch)
    _, ref_mean, ref_var = R.batch_norm_gelu(inputs[0], offsets, *inputs[1:], running_mean, running_var, batch)
    assert mean.dtype == var.dtype == torch.float32 and not mean.requires_grad and not var.requires_grad
    assert_close_to_reference(mean, ref_mean, dtype, msg="mean")
    assert_close_to_reference(var, ref_var, dtype, scale=4, msg="var")
    return mean, var


@pytest.mark.parametrize("name", names(OP))
def test_matches_the_reference(name):
    impl = runnable(OP)[name]
    bound = budget(impl)

    @property_settings(impl)
    @given(row_groups(min(80, bound.max_tokens // 2)), st.sampled_from([1, 8, 36, 96, 100]),
           st.sampled_from(bound.dtypes), st.booleans(), st.booleans(), st.integers(0, 2**31 - 1))
    def run(groups, channels, dtype, noncontiguous, float32_weights, seed):
        offsets, batch = groups
        rows, weight, bias, mean, var = norm_inputs(offsets, channels, torch.Generator().manual_seed(seed))
        rows = rows.to(impl.device, dtype)
        params = [t.to(impl.device, torch.float32 if float32_weights else dtype) for t in (weight, bias)]
        inputs = [(strided(t) if noncontiguous else t.clone()).requires_grad_() for t in (rows, *params)]
        check(impl.fn, impl.device, offsets, batch, inputs, mean, var, dtype, seed)

    run()


@pytest.mark.parametrize("name", names(OP))
def test_hand_made(name):
    """Group 0 (own statistics): rows ±1 around 3 → mean 3, biased var 1, z = ±1/√(1 + eps);
    group 1 (given statistics) is x·rstd·γ + β exactly; group 2 is empty."""
    impl = runnable(OP)[name]
    d = impl.device
    rows = torch.tensor([[2.0], [4.0], [0.5]], device=d)
    out, mean, var = impl.fn(rows, (0, 2, 3, 3), torch.tensor([[1.0], [2.0], [1.0]], device=d),
                             torch.tensor([[0.0], [-1.0], [0.0]], device=d), torch.zeros(3, 1, device=d),
                             torch.full((3, 1), 4.0, device=d), (True, False, False), eps=0.0)
    torch.testing.assert_close(mean.cpu(), torch.tensor([[3.0], [0.0], [0.0]]))
    torch.testing.assert_close(var.cpu(), torch.tensor([[1.0], [4.0], [4.0]]))
    z = torch.tensor([[-1.0], [1.0], [-0.5]])  # group 1: 0.5 · 4^-½ · 2 − 1
    torch.testing.assert_close(out.cpu(), z * 0.5 * (1 + torch.erf(z / math.sqrt(2))))


@pytest.mark.parametrize("name", [n for n in names(OP) if runnable(OP)[n].implementation.backend == "torch"])
def test_gradcheck(name):
    fn = runnable(OP)[name].fn
    offsets, batch = (0, 3, 3, 4, 9), (True, False, False, True)
    rows, weight, bias, running_mean, running_var = (
        t.double() for t in norm_inputs(offsets, 5, torch.Generator().manual_seed(5)))

    def op(rows, weight, bias):
        return fn(rows, offsets, weight, bias, running_mean, running_var, batch)[0]

    assert torch.autograd.gradcheck(op, tuple(t.requires_grad_() for t in (rows, weight, bias)))


@pytest.mark.parametrize(("channels", "dtype"), [(36, torch.float32), (100, torch.float16)])
def test_triton_groups_of_several_blocks(channels, dtype, monkeypatch):
    """Empty, one-row and multi-block (37 rows in blocks of 16) groups, with their own or the given
    statistics, on a strided slice of a wider table; the given statistics come back unchanged."""
    from any2point_fast import kernels

    device = triton_device()
    monkeypatch.setattr("any2point_fast.kernels.norm._BLOCK_ROWS", 16)
    sizes, batch = (0, 1, 3, 0, 37, 5, 2), (False, False, True, False, True, False, True)
    offsets = tuple(itertools.accumulate(sizes, initial=0))
    rows, weight, bias, running_mean, running_var = norm_inputs(offsets, channels, torch.Generator().manual_seed(1))
    inputs = [strided(rows.to(device, dtype)).requires_grad_(), weight.to(device).requires_grad_(),
              bias.to(device).requires_grad_()]
    assert not inputs[0].is_contiguous()
    mean, var = check(kernels.batch_norm_gelu, device, offsets, batch, inputs, running_mean, running_var, dtype,
                      channels)
    for g in (0, 1, 3, 5):  # the given statistics, empty groups included
        assert torch.equal(mean[g].cpu(), running_mean[g]) and torch.equal(var[g].cpu(), running_var[g])
