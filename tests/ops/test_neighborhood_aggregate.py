"""``neighborhood_aggregate``: every implementation against the reference: the pooled rows, the
BatchNorm statistics and the gradients of the features, the point coordinates (through the
offsets), the Linear weights and the BatchNorm affine parameters, in training and evaluation mode."""

from __future__ import annotations

from typing import NamedTuple

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from any2point_fast import ops
from any2point_fast import reference as R
from any2point_fast.reference.sampling import gather_points
from any2point_fast.validation import InputError
from tests.ops.cases import budget, property_settings, strided
from tests.ops.implementations import names, runnable
from tests.ops.shapes import RecordShapes
from tests.tolerances import assert_close_to_reference

OP = "neighborhood_aggregate"
ALPHA, BETA, EPS = 1000.0, 100.0, 1e-5
#: The differentiable inputs, in the order of :func:`aggregate`'s arguments.
NAMES = ("feat", "xyz", "weight1", "norm1_weight", "norm1_bias", "weight2", "norm2_weight", "norm2_bias")


class Case(NamedTuple):
    """Inputs of one call: the differentiable ones (:data:`NAMES`), the indices and running statistics."""

    inputs: list[torch.Tensor]
    centre_index: torch.Tensor
    neighbour_index: torch.Tensor
    running: list[torch.Tensor]


def make_case(batch: int, points: int, samples: int, k: int, channels: int, hidden: int, duplicates: bool,
              seed: int) -> Case:
    """Off-centre features, offsets of a few units (so that the position code varies), BatchNorm
    parameters away from identity; neighbours with repeats (``duplicates``) or distinct.

    The points of a cloud differ in every coordinate, also rounded to float16 or bfloat16 (steps of
    0.002 ± 0.0005 apart): two distinct neighbours sharing one (seen in float16) tie in the max at
    the position-code channels of that axis where their hidden rows are dead. Every implementation
    gives a tie's gradient to the first neighbour, but a near-tie may round to a tie in one and not
    in another. Repeated neighbours tie too, harmlessly (the same point either way)."""
    gen = torch.Generator().manual_seed(seed)
    dim = 2 * channels
    feat = 0.5 + torch.randn(batch, points, channels, generator=gen)
    ranks = torch.stack([torch.randperm(points, generator=gen) for _ in range(batch * 3)]).view(batch, 3, points)
    xyz = 0.002 * (ranks.mT - points / 2 + 0.5 * torch.rand(batch, points, 3, generator=gen))
    centre_index = torch.stack([torch.randperm(points, generator=gen)[:samples] for _ in range(batch)])
    if duplicates:
        neighbour_index = torch.randint(0, min(points, 3), (batch, samples, k), generator=gen)
    else:
        neighbour_index = torch.stack([torch.stack([torch.randperm(points, generator=gen)[:k] for _ in range(samples)])
                                       for _ in range(batch)])
    inputs = [feat, xyz, torch.randn(hidden, dim, generator=gen) / dim**0.5,
              1 + 0.3 * torch.randn(hidden, generator=gen), 0.3 * torch.randn(hidden, generator=gen),
              torch.randn(dim, hidden, generator=gen) / hidden**0.5,
              1 + 0.3 * torch.randn(dim, generator=gen), 0.3 * torch.randn(dim, generator=gen)]
    running = [0.3 * torch.randn(hidden, generator=gen), 0.5 + torch.rand(hidden, generator=gen),
               0.3 * torch.randn(dim, generator=gen), 0.5 + torch.rand(dim, generator=gen)]
    return Case(inputs, centre_index, neighbour_index, running)


def aggregate(fn, case: Case, inputs: list[torch.Tensor], training: bool, **options) -> tuple[torch.Tensor, ...]:
    """``fn`` on ``case``'s indices and running statistics with ``inputs`` (:data:`NAMES`); the offsets
    are taken from ``xyz`` here, so that repeated neighbours sum their gradients as in the tokenizer."""
    feat, xyz, weight1, norm1_weight, norm1_bias, weight2, norm2_weight, norm2_bias = inputs
    index = case.neighbour_index.to(xyz.device)
    centres = case.centre_index.to(xyz.device)
    offsets = (gather_points(xyz, index) - gather_points(xyz, centres)[:, :, None]) * 20
    mean1, var1, mean2, var2 = (t.to(xyz.device) for t in case.running)
    return fn(feat, offsets, centres, index, weight1, norm1_weight, norm1_bias, mean1, var1, weight2, norm2_weight,
              norm2_bias, mean2, var2, training, EPS, ALPHA, BETA, **options)


def check(fn, case: Case, dtype: torch.dtype, device: torch.device, training: bool, noncontiguous: bool = False,
          **options) -> None:
    """Values, statistics and gradients of every input against the reference, and bitwise repeatability."""
    def prepare():
        out = []
        for t in case.inputs:
            t = t.to(device, dtype)
            out.append((strided(t) if noncontiguous else t.clone()).requires_grad_())
        return out

    def run(impl, wide: bool = False, **kwargs):
        inputs = prepare()
        if wide:  # the same (rounded) values, computed in float64
            inputs = [t.detach().double().requires_grad_() for t in inputs]
        results = aggregate(impl, case, inputs, training, **kwargs)
        upstream = torch.randn(results[0].shape, generator=torch.Generator().manual_seed(3)).to(device, dtype)
        return results, torch.autograd.grad(results[0], inputs, upstream.to(results[0].dtype))

    (out, *stats), grads = run(fn, **options)
    (out_again, *_), grads_again = run(fn, **options)
    (ref_out, *ref_stats), ref_grads = run(R.neighborhood_aggregate)
    exact = run(R.neighborhood_aggregate, wide=True) if dtype != torch.float64 else None

    def close(actual, expected, which, tolerance, scale=1, msg="", normaliser=None):
        """``actual`` against the oracle in its dtype; where the oracle's own rounding already misses the
        float64 result by more than the tolerance (BatchNorm over a few rows of almost equal values: an
        ill-conditioned case for any float32 code), ``actual`` may miss it by at most 4× as much."""
        normaliser = 1 if normaliser is None else normaliser
        try:
            assert_close_to_reference(actual / normaliser, expected / normaliser, tolerance, scale=scale, msg=msg)
        except AssertionError:
            if exact is None:
                raise
            truth = which(exact).detach()
            own = ((expected.double() - truth) / normaliser).abs().max().item()
            if not ((actual.double() - truth) / normaliser).abs().max().item() <= 4 * own:
                raise

    assert out.dtype == ref_out.dtype == dtype and out.shape == ref_out.shape
    assert out.nan_to_num().equal(out_again.nan_to_num()), "not bitwise repeatable"
    close(out, ref_out, lambda e: e[0][0], dtype, msg="output")
    for i, (name, value, expected) in enumerate(zip(("mean1", "var1", "mean2", "var2"), stats, ref_stats)):
        assert not value.requires_grad
        close(value, expected, lambda e, i=i: e[0][i + 1], dtype, scale=4, msg=name)
    for i, (name, grad, grad_again, ref_grad) in enumerate(zip(NAMES, grads, grads_again, ref_grads)):
        assert grad.dtype == ref_grad.dtype == dtype
        assert grad.nan_to_num().equal(grad_again.nan_to_num()), f"gradient of {name} is not bitwise repeatable"
        if name == "xyz":  # through the position code, computed in float32 whatever the dtype
            largest = ref_grad.abs().max().clamp_min(1e-6)
            tolerance = torch.float32 if dtype == torch.float64 else dtype
            close(grad, ref_grad, lambda e, i=i: e[1][i], tolerance, scale=8, msg=name, normaliser=largest)
        else:
            scale = 16 if name.endswith(("weight1", "weight2", "_weight", "_bias")) else 4
            close(grad, ref_grad, lambda e, i=i: e[1][i], dtype, scale=scale, msg=f"gradient of {name}")


@st.composite
def shapes(draw, max_points: int) -> dict:
    points = draw(st.integers(1, max_points))
    return dict(batch=draw(st.integers(1, 3)), points=points, samples=draw(st.integers(1, points)),
                k=draw(st.integers(1, min(points, 9))), channels=draw(st.sampled_from([1, 3, 4, 6])),
                hidden=draw(st.integers(1, 5)), duplicates=draw(st.booleans()))


@pytest.mark.parametrize("name", names(OP))
def test_matches_the_reference(name):
    impl = runnable(OP)[name]
    bound = budget(impl)

    @property_settings(impl)
    @given(shapes(min(24, bound.max_tokens)), st.sampled_from(bound.dtypes), st.booleans(), st.booleans(),
           st.integers(1, 8), st.integers(0, 2**31 - 1))
    def run(shape, dtype, training, noncontiguous, chunk, seed):
        # one row has no batch statistics; over 2-3 rows BatchNorm's backward is ill-conditioned for any
        # float code (a repeated neighbour gives a channel of no variance): those run in eval mode
        if training and shape["batch"] * shape["samples"] * shape["k"] < 4:
            training = False
        check(impl.fn, make_case(**shape, seed=seed), dtype, impl.device, training, noncontiguous, chunk=chunk)

    run()


@pytest.mark.parametrize("name", names(OP))
@pytest.mark.parametrize("training", [True, False])
def test_float64_and_single_centres(name, training):
    """float64 (the torch path), one centre and one neighbour per cloud, and a chunk of all centres."""
    impl = runnable(OP)[name]
    dtype = torch.float64 if torch.float64 in impl.implementation.dtypes else torch.float32
    check(impl.fn, make_case(2, 7, 1, 1, 3, 2, False, seed=1), dtype, impl.device, training, chunk=1)
    check(impl.fn, make_case(2, 12, 5, 4, 4, 3, True, seed=2), dtype, impl.device, training, chunk=64)


@pytest.mark.parametrize("name", names(OP))
@pytest.mark.parametrize("training", [True, False])
def test_several_blocks(name, training):
    """Widths past one tile of the Triton kernels (``2C = 40`` channels, ``H = 18``), 20 centres of 5
    neighbours (a block of 16 centres and a partial one), and points that are the neighbour of many
    rows (repeated neighbours) or of none."""
    impl = runnable(OP)[name]
    check(impl.fn, make_case(2, 40, 10, 5, 20, 18, True, seed=8), torch.float32, impl.device, training, chunk=5)
    check(impl.fn, make_case(2, 40, 10, 5, 20, 18, False, seed=9), torch.float32, impl.device, training, chunk=5)


@pytest.mark.parametrize("name", names(OP))
def test_no_tensor_of_every_row(name):
    """With chunks of 3 of 40 centres, no tensor of ``B·S·k·2C`` elements (the rows) is made: the
    largest are the hidden rows ``[B·S·k, H]``, ``H = 2C / 8``."""
    impl = runnable(OP)[name]
    case = make_case(2, 48, 20, 8, 8, 2, False, seed=4)
    inputs = [t.to(impl.device).requires_grad_() for t in case.inputs]
    rows = 2 * 20 * 8 * 16

    def forward_backward(fn, **options):
        out = aggregate(fn, case, inputs, True, **options)[0]
        out.sum().backward()

    with RecordShapes() as mode:
        forward_backward(impl.fn, chunk=3)
    assert max(torch.Size(s).numel() for s in mode.shapes) < rows // 4
    with RecordShapes() as mode:  # the check sees the reference's rows
        forward_backward(R.neighborhood_aggregate)
    assert max(torch.Size(s).numel() for s in mode.shapes) >= rows


def test_the_batch_statistics_are_those_of_batch_norm():
    """The statistics returned in training mode are ``nn.BatchNorm1d``'s batch mean and biased
    variance of the hidden rows ``W1 x`` and ``W2 relu(BN1(W1 x))``."""
    case = make_case(2, 10, 4, 3, 3, 2, False, seed=5)
    feat, xyz, weight1, norm1_weight, norm1_bias, weight2, norm2_weight, norm2_bias = case.inputs
    _, mean1, var1, mean2, var2 = aggregate(ops.neighborhood_aggregate, case, case.inputs, True)
    offsets = (gather_points(xyz, case.neighbour_index) - gather_points(xyz, case.centre_index)[:, :, None]) * 20
    rows = torch.cat((gather_points(feat, case.neighbour_index),
                      gather_points(feat, case.centre_index)[:, :, None].expand(-1, -1, 3, -1)), dim=-1)
    rows = (rows + R.tokenizer.sinusoidal_position_code(offsets, 6, ALPHA, BETA)).reshape(-1, 6)
    norm1, norm2 = torch.nn.BatchNorm1d(2, momentum=1.0), torch.nn.BatchNorm1d(6, momentum=1.0)
    for norm, weight, bias in ((norm1, norm1_weight, norm1_bias), (norm2, norm2_weight, norm2_bias)):
        norm.weight.data, norm.bias.data = weight, bias
    hidden = rows @ weight1.T
    mixed = torch.relu(norm1(hidden)) @ weight2.T
    norm2(mixed)
    count = rows.shape[0]
    for mean, var, norm, values in ((mean1, var1, norm1, hidden), (mean2, var2, norm2, mixed)):
        torch.testing.assert_close(mean, norm.running_mean)  # momentum 1: the batch's own
        torch.testing.assert_close(var * count / (count - 1), norm.running_var)
        torch.testing.assert_close(var, values.var(dim=0, correction=0))


@pytest.mark.parametrize("name", [n for n in names(OP) if runnable(OP)[n].implementation.backend == "torch"])
def test_gradcheck(name):
    fn = runnable(OP)[name].fn
    case = make_case(2, 9, 4, 3, 2, 2, True, seed=6)
    feat, _, weight1, norm1_weight, norm1_bias, weight2, norm2_weight, norm2_bias = (t.double() for t in case.inputs)
    xyz = case.inputs[1].double()

    def op(feat, weight1, norm1_weight, norm1_bias, weight2, norm2_weight, norm2_bias):
        return aggregate(fn, case, [feat, xyz, weight1, norm1_weight, norm1_bias, weight2, norm2_weight, norm2_bias],
                         True, chunk=3)[0]

    assert torch.autograd.gradcheck(op, tuple(t.requires_grad_() for t in (
        feat, weight1, norm1_weight, norm1_bias, weight2, norm2_weight, norm2_bias)))


@pytest.mark.parametrize(("change", "match"), [
    (dict(feat=torch.zeros(2, 10)), r"feat must be float \[B, P, C\]"),
    (dict(neighbour_index=torch.zeros(2, 4, 3, dtype=torch.int32)), "neighbour_index must be int64"),
    (dict(centre_index=torch.zeros(2, 5, dtype=torch.int64)), "centre_index must have shape"),
    (dict(weight2=torch.zeros(4, 2)), "weight2 must have shape"),
    (dict(norm1_var=torch.zeros(3)), "norm1_var must have shape"),
])
def test_bad_inputs_are_refused_before_any_kernel(change, match):
    case = make_case(2, 10, 4, 3, 3, 2, False, seed=7)
    feat, xyz, weight1, norm1_weight, norm1_bias, weight2, norm2_weight, norm2_bias = case.inputs
    args = dict(feat=feat, offsets=torch.zeros(2, 4, 3, 3), centre_index=case.centre_index,
                neighbour_index=case.neighbour_index, weight1=weight1, norm1_weight=norm1_weight, norm1_bias=norm1_bias,
                norm1_mean=case.running[0], norm1_var=case.running[1], weight2=weight2, norm2_weight=norm2_weight,
                norm2_bias=norm2_bias, norm2_mean=case.running[2], norm2_var=case.running[3])
    with pytest.raises(InputError, match=match):
        ops.neighborhood_aggregate(**{**args, **change}, training=True, eps=EPS, alpha=ALPHA, beta=BETA)


@pytest.mark.parametrize("name", [n for n in names(OP) if n == "torch-compiled"])
@pytest.mark.parametrize("training", [True, False])
def test_compiled_bits_do_not_depend_on_the_threads(name, training):
    """The compiled kernels cut every reduction into a fixed partition of tiles: one thread and
    three give the same bits (values, statistics, gradients), over tiles of 2 centres of 60."""
    impl = runnable(OP)[name]
    case = make_case(2, 64, 30, 9, 8, 2, False, seed=8)

    def run(threads):
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            inputs = [t.clone().requires_grad_() for t in case.inputs]
            results = aggregate(impl.fn, case, inputs, training, chunk=2)
            return [*results, *torch.autograd.grad(results[0], inputs, torch.ones_like(results[0]))]
        finally:
            torch.set_num_threads(previous)

    for one, three in zip(run(1), run(3)):
        assert one.equal(three)
