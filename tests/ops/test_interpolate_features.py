"""``interpolate_features``: every implementation gives the reference's values and feature gradients
(float32 / float16, non-contiguous inputs), from fixed hand-computed cases up to random clouds."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from any2point_fast import ops, torch_ops
from any2point_fast import reference as R
from any2point_fast.validation import InputError
from tests.ops.implementations import triton_device
from tests.tolerances import assert_close_to_reference

PROPERTY = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
#: Relative gap between the 3rd and 4th nearest centre below which a draw is skipped: there the
#: implementations may rank the two differently (rounding), which changes the neighbour, not a bug.
TIE_MARGIN = 1e-3


def implementations() -> dict:
    """``name -> (function, device)`` of every implementation that can run here (Triton under the interpreter)."""
    found = {"torch": (torch_ops.interpolate_features, torch.device("cpu"))}
    try:
        device = triton_device()
    except pytest.skip.Exception:
        return found
    from any2point_fast import kernels

    found["triton"] = (kernels.interpolate_features, device)
    return found


def third_neighbour_margin(points: torch.Tensor, centers: torch.Tensor) -> float:
    """Smallest relative gap between the 3rd and 4th nearest centre distances of any point (inf if N <= 3)."""
    if centers.shape[1] <= 3:
        return float("inf")
    dist = torch.cdist(points.double(), centers.double()).sort(dim=-1).values
    return float(((dist[..., 3] - dist[..., 2]) / dist[..., 3].clamp_min(1e-12)).min())


def draw(seed: int, batch: int, num_points: int, num_centers: int, channels: int, dtype: torch.dtype,
         contiguous: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    points = torch.randn(batch, num_points, 3, generator=gen)
    centers = torch.randn(batch, num_centers, 3, generator=gen)
    features = torch.randn(batch, num_centers, channels, generator=gen).to(dtype)
    if not contiguous:  # points and centres as every other column of wider rows (features: in the test)
        points = torch.stack((points, -points), dim=-1).flatten(2)[..., ::2]
        centers = torch.stack((centers, -centers), dim=-1).flatten(2)[..., ::2]
        assert not points.is_contiguous() and not centers.is_contiguous()
    return points, centers, features


def test_values_by_hand():
    """Centres at distance 1, 2, 4 from the point (and one farther): weights 1, 1/2, 1/4, normalised."""
    points = torch.zeros(1, 1, 3)
    centers = torch.tensor([[[1.0, 0, 0], [0, 2, 0], [0, 0, -4], [9, 9, 9]]])
    features = torch.tensor([[[1.0, 0], [0, 1], [4, 4], [100, 100]]])
    w = torch.tensor([1, 1 / 2, 1 / 4]) / (1 + 1 / 2 + 1 / 4)
    expected = torch.tensor([[[w[0] + 4 * w[2], w[1] + 4 * w[2]]]])
    torch.testing.assert_close(R.interpolate_features(points, centers, features), expected)
    for name, (fn, device) in implementations().items():
        got = fn(points.to(device), centers.to(device), features.to(device)).cpu()
        torch.testing.assert_close(got, expected, msg=name)


@pytest.mark.parametrize("name", list(implementations()))
def test_a_point_on_a_centre_takes_its_features(name):
    fn, device = implementations()[name]
    gen = torch.Generator().manual_seed(3)
    centers, features = torch.randn(2, 10, 3, generator=gen), torch.randn(2, 10, 5, generator=gen)
    got = fn(centers.to(device), centers.to(device), features.to(device)).cpu()
    torch.testing.assert_close(got, features, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", list(implementations()))
@pytest.mark.parametrize("num_centers", [1, 2])
def test_fewer_than_three_centres(name, num_centers):
    fn, device = implementations()[name]
    gen = torch.Generator().manual_seed(4)
    points, centers = torch.randn(2, 7, 3, generator=gen), torch.randn(2, num_centers, 3, generator=gen)
    features = torch.randn(2, num_centers, 4, generator=gen)
    expected = R.interpolate_features(points, centers, features)
    if num_centers == 1:
        torch.testing.assert_close(expected, features.expand(-1, 7, -1))
    torch.testing.assert_close(fn(points.to(device), centers.to(device), features.to(device)).cpu(), expected)


@pytest.mark.parametrize("name", list(implementations()))
@PROPERTY
@given(seed=st.integers(0, 2**31 - 1), batch=st.integers(1, 3), num_points=st.integers(1, 70),
       num_centers=st.integers(1, 40), channels=st.sampled_from((1, 5, 36, 70)),
       dtype=st.sampled_from((torch.float32, torch.float16)), contiguous=st.booleans())
def test_values_and_feature_gradients_match_the_reference(name, seed, batch, num_points, num_centers, channels,
                                                          dtype, contiguous):
    fn, device = implementations()[name]
    points, centers, features = draw(seed, batch, num_points, num_centers, channels, dtype, contiguous)
    assume(third_neighbour_margin(points, centers) > TIE_MARGIN)
    grad_out = torch.randn(batch, num_points, channels, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)

    ref_features = features.detach().clone().requires_grad_(True)
    expected = R.interpolate_features(points, centers, ref_features)
    expected.float().backward(grad_out.float())

    mine = features.detach().to(device).requires_grad_(True)
    # every other channel of wider rows when not contiguous
    given_features = mine if contiguous else torch.stack((mine, -mine), dim=-1).flatten(2)[..., ::2]
    got = fn(points.to(device), centers.to(device), given_features)
    assert got.dtype == dtype and got.shape == (batch, num_points, channels)
    got.backward(grad_out.to(device))
    assert_close_to_reference(got.cpu(), expected, dtype, msg="values")
    assert mine.grad.dtype == dtype
    assert_close_to_reference(mine.grad.cpu(), ref_features.grad, dtype, scale=4.0, msg="feature gradients")


def test_the_op_dispatches_to_the_selected_backend():
    gen = torch.Generator().manual_seed(5)
    points, centers, features = torch.randn(2, 30, 3, generator=gen), torch.randn(2, 12, 3, generator=gen), \
        torch.randn(2, 12, 8, generator=gen)
    expected = R.interpolate_features(points, centers, features)
    for backend in ("reference", "torch"):
        with ops.use_backend(backend):
            torch.testing.assert_close(ops.interpolate_features(points, centers, features), expected)


def test_no_dense_distance_tensor_on_the_torch_path():
    """At P = 8192 points and N = 2048 centres, nothing near the ``[B, P, N]`` distances is allocated."""
    from tests.test_memory import allocation_sizes

    gen = torch.Generator().manual_seed(6)
    points, centers = torch.randn(1, 8192, 3, generator=gen), torch.randn(1, 2048, 3, generator=gen)
    features = torch.randn(1, 2048, 4, generator=gen)
    dense = 8192 * 2048 * 4
    assert max(allocation_sizes(lambda: torch_ops.interpolate_features(points, centers, features))) < dense // 2
    assert max(allocation_sizes(lambda: R.interpolate_features(points, centers, features))) >= dense


@pytest.mark.parametrize(("points", "centers", "features", "match"), [
    ((2, 5, 2), (2, 4, 3), (2, 4, 6), r"points must be float \[B, P, 3\]"),
    ((2, 5, 3), (2, 4, 3), (2, 3, 6), r"features must be float \[B, N, C\] = \[2, 4, C\]"),
    ((1, 5, 3), (2, 4, 3), (2, 4, 6), "one batch"),
])
def test_bad_inputs_are_refused_before_any_kernel(points, centers, features, match):
    with pytest.raises(InputError, match=match):
        ops.interpolate_features(torch.zeros(points), torch.zeros(centers), torch.zeros(features))
