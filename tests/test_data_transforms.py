"""Point-cloud transforms: invariants, bounds, determinism, and the paper's recipes."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from any2point_fast.data import (
    Compose,
    Jitter,
    NormalizeUnitSphere,
    RandomRotateGravity,
    RandomScale,
    RandomTranslate,
    Resample,
    recipe_transforms,
)


def cloud(count=500, seed=0, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(count, 3, generator=generator) * torch.tensor([1.0, 2.0, 0.5]) + 3).to(dtype)


def seeded(seed=0):
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------------
# NormalizeUnitSphere


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_normalize_centres_and_scales_to_unit_sphere(dtype):
    points = cloud(dtype=dtype)
    out = NormalizeUnitSphere()(points)
    assert out.dtype == dtype
    torch.testing.assert_close(out.mean(dim=0), torch.zeros(3, dtype=dtype), atol=1e-6, rtol=0)
    torch.testing.assert_close(out.norm(dim=1).max(), torch.tensor(1.0, dtype=dtype))
    # Only a translation and a uniform scale: pairwise distance ratios are kept.
    ratio = (out[0] - out[1]).norm() / (points[0] - points[1]).norm()
    torch.testing.assert_close((out[2] - out[3]).norm() / (points[2] - points[3]).norm(), ratio)


@pytest.mark.parametrize("value", [0.0, 0.1, -7.3, 1234.567])
@pytest.mark.parametrize("count", [1, 3, 1000])
def test_normalize_degenerate_cloud_gives_zeros(value, count):
    out = NormalizeUnitSphere()(torch.full((count, 3), value))
    assert torch.equal(out, torch.zeros(count, 3))


def test_normalize_tiny_but_real_cloud_is_scaled_up():
    out = NormalizeUnitSphere()(cloud() * 1e-6)
    torch.testing.assert_close(out.norm(dim=1).max(), torch.tensor(1.0))


def test_transforms_do_not_modify_their_input():
    points = cloud()
    original = points.clone()
    for transform in [
        NormalizeUnitSphere(),
        RandomScale(),
        RandomTranslate(),
        RandomRotateGravity(),
        Jitter(),
        Resample(100),
    ]:
        transform(points)
    assert torch.equal(points, original)


# ---------------------------------------------------------------------------------------------
# Random rigid / affine transforms


@pytest.mark.parametrize("axis", ["x", "y", "z"])
def test_rotation_about_gravity_keeps_that_coordinate_and_norms(axis):
    points = cloud()
    up = "xyz".index(axis)
    out = RandomRotateGravity(axis, generator=seeded(1))(points)
    torch.testing.assert_close(out[:, up], points[:, up], atol=1e-6, rtol=0)
    torch.testing.assert_close(out.norm(dim=1), points.norm(dim=1))
    assert not torch.allclose(out, points, atol=1e-3)  # it did rotate


def test_rotation_angles_cover_the_circle():
    point = torch.tensor([[1.0, 0.0, 0.0]])
    rotate = RandomRotateGravity("y", generator=seeded(2))
    angles = torch.stack([torch.atan2(p[0, 2], p[0, 0]) for p in (rotate(point) for _ in range(400))])
    histogram = torch.histc(angles, bins=4, min=-math.pi, max=math.pi)
    assert (histogram > 60).all()  # ~100 per quadrant


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 2**31), st.sampled_from(["x", "y", "z"]))
def test_rotation_is_a_proper_rotation(seed, axis):
    points = torch.eye(3)
    matrix = RandomRotateGravity(axis, generator=seeded(seed))(points)  # rows: images of e_i
    torch.testing.assert_close(matrix @ matrix.T, torch.eye(3), atol=1e-6, rtol=0)
    assert torch.det(matrix) == pytest.approx(1.0, abs=1e-6)


def test_uniform_scale_is_one_factor_within_bounds():
    points = cloud()
    factors = []
    scale = RandomScale(0.9, 1.1, generator=seeded(3))
    for _ in range(200):
        ratio = scale(points) / points
        torch.testing.assert_close(ratio, ratio[:1, :1].expand_as(ratio))
        factors.append(ratio[0, 0])
    factors = torch.stack(factors)
    assert factors.min() >= 0.9 and factors.max() <= 1.1
    assert factors.min() < 0.92 and factors.max() > 1.08  # the whole range is used


def test_per_axis_scale_differs_per_axis():
    points = cloud()
    ratio = RandomScale(0.5, 2.0, per_axis=True, generator=seeded(4))(points) / points
    torch.testing.assert_close(ratio, ratio[:1].expand_as(ratio))
    assert ratio[0].unique().numel() == 3
    assert ((ratio >= 0.5) & (ratio <= 2.0)).all()


def test_translate_is_one_offset_within_bounds():
    points = cloud()
    translate = RandomTranslate(0.2, generator=seeded(5))
    offsets = torch.stack([(translate(points) - points)[0] for _ in range(200)])
    for _ in range(3):
        offset = translate(points) - points
        torch.testing.assert_close(offset, offset[:1].expand_as(offset), atol=1e-6, rtol=0)
    assert offsets.abs().max() <= 0.2 + 1e-6
    assert offsets.abs().max() > 0.18


def test_jitter_is_clipped_and_has_the_right_spread():
    points = torch.zeros(20000, 3)
    noise = Jitter(sigma=0.01, clip=0.05, generator=seeded(6))(points)
    assert noise.abs().max() <= 0.05
    assert noise.std().item() == pytest.approx(0.01, rel=0.05)
    clipped = Jitter(sigma=1.0, clip=0.05, generator=seeded(6))(points)
    assert clipped.abs().max() == pytest.approx(0.05)


def test_generators_make_random_transforms_reproducible():
    points = cloud()
    for make in [RandomScale, RandomTranslate, RandomRotateGravity, Jitter]:
        first, second = make(generator=seeded(7))(points), make(generator=seeded(7))(points)
        assert torch.equal(first, second)
        assert not torch.equal(first, make(generator=seeded(8))(points))


def test_global_rng_is_used_without_a_generator():
    points = cloud()
    torch.manual_seed(9)
    first = Jitter()(points)
    torch.manual_seed(9)
    assert torch.equal(first, Jitter()(points))


@pytest.mark.parametrize(
    "make",
    [
        lambda: RandomScale(1.2, 1.1),
        lambda: RandomScale(0.0, 1.1),
        lambda: RandomTranslate(-1),
        lambda: RandomRotateGravity("w"),
        lambda: Jitter(sigma=-1),
        lambda: Resample(0),
        lambda: Resample(10, mode="fps"),
    ],
)
def test_invalid_parameters_are_rejected(make):
    with pytest.raises(ValueError, match="expected"):
        make()


# ---------------------------------------------------------------------------------------------
# Resample and Compose


def test_random_resample_without_replacement_when_enough_points():
    points = torch.arange(300, dtype=torch.float32)[:, None].expand(300, 3)
    out = Resample(200, generator=seeded(10))(points)
    assert out.shape == (200, 3)
    assert out[:, 0].unique().numel() == 200  # distinct rows
    assert not torch.equal(out, points[:200])  # a random subset, not the first rows


def test_random_resample_with_replacement_when_too_few_points():
    points = torch.arange(10, dtype=torch.float32)[:, None].expand(10, 3)
    out = Resample(64, generator=seeded(11))(points)
    assert out.shape == (64, 3)
    assert set(out[:, 0].tolist()) <= set(range(10))


def test_first_resample_is_deterministic_and_cyclic():
    points = cloud(count=10)
    torch.testing.assert_close(Resample(4, mode="first")(points), points[:4], rtol=0, atol=0)
    assert torch.equal(Resample(25, mode="first")(points), torch.cat([points, points, points[:5]]))


def test_resample_of_an_empty_cloud_is_an_error():
    with pytest.raises(ValueError, match="empty"):
        Resample(4)(torch.zeros(0, 3))


def test_compose_applies_in_order():
    points = cloud()
    composed = Compose([Resample(8, mode="first"), lambda p: p * 2, lambda p: p + 1])
    assert torch.equal(composed(points), points[:8] * 2 + 1)


# ---------------------------------------------------------------------------------------------
# Recipes


@pytest.mark.parametrize("dataset", ["scanobjectnn", "modelnet40", "modelnet40_h5", "modelnet40_resampled"])
def test_eval_recipe_is_first_points_then_normalisation(dataset):
    points = cloud(count=2048)
    out = recipe_transforms(dataset, train=False, num_points=1024)(points)
    torch.testing.assert_close(out, NormalizeUnitSphere()(points[:1024]))


def test_train_recipes_follow_the_paper():
    scan = recipe_transforms("scanobjectnn", train=True, num_points=512).transforms
    modelnet = recipe_transforms("modelnet40", train=True, num_points=512).transforms
    kinds = [type(t) for t in scan]
    assert kinds == [Resample, NormalizeUnitSphere, RandomRotateGravity, RandomScale, RandomTranslate]
    assert scan[2].axis == "y"
    assert [type(t) for t in modelnet] == [Resample, NormalizeUnitSphere, RandomScale, RandomTranslate]
    for steps in (scan, modelnet):
        scale = next(t for t in steps if isinstance(t, RandomScale))
        assert (scale.low, scale.high, scale.per_axis) == (0.9, 1.1, False)
        assert steps[0].mode == "random" and steps[0].num_points == 512


def test_train_recipe_output_bounds():
    points = cloud(count=2048)
    recipe = recipe_transforms("scanobjectnn", train=True, num_points=1024, generator=seeded(12))
    for _ in range(20):
        out = recipe(points)
        assert out.shape == (1024, 3)
        # unit sphere, scaled by at most 1.1, shifted by at most 0.2 per axis
        assert (out.norm(dim=1) <= 1.1 + 0.2 * math.sqrt(3) + 1e-5).all()


def test_unknown_recipe_is_an_error():
    with pytest.raises(ValueError, match="no recipe for dataset 'shapenet'"):
        recipe_transforms("shapenet", train=True)
