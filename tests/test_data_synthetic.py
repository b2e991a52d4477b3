"""SyntheticShapes: determinism, split separation, class coverage, and that classes are distinct."""

import numpy as np
import pytest
import torch

from any2point_fast.data import NormalizeUnitSphere, Resample, SyntheticShapes, sample_surface
from any2point_fast.data.synthetic import SHAPES, generate_shape

NUM_CLASSES = len(SHAPES)


def test_items_have_the_contract_shape_and_every_class():
    dataset = SyntheticShapes("train", num_samples=2 * NUM_CLASSES, num_points=256)
    assert len(dataset) == 2 * NUM_CLASSES
    assert dataset.classes == list(SHAPES) and NUM_CLASSES >= 10
    labels = []
    for index in range(len(dataset)):
        points, label = dataset[index]
        assert points.shape == (256, 3) and points.dtype == torch.float32
        assert label.dtype == torch.int64 and label.shape == ()
        assert torch.isfinite(points).all()
        assert points.std(dim=0).max() > 0.2  # not collapsed (a disk is flat along one axis)
        labels.append(label.item())
    assert labels == [i % NUM_CLASSES for i in range(2 * NUM_CLASSES)]


def radial(points):
    """Distance to the y axis."""
    return np.hypot(points[:, 0], points[:, 2])


def half_axis(points):
    """Half length of a y-axis capsule's core segment: its half height minus its radius."""
    return np.abs(points[:, 1]).max() - radial(points).max()


@pytest.mark.parametrize(
    ("name", "surface_distance"),
    [
        ("sphere", lambda p: np.linalg.norm(p, axis=1)),
        ("torus", lambda p: np.hypot(radial(p) - 1, p[:, 1])),  # distance to the core circle
        ("capsule", lambda p: np.hypot(radial(p), np.maximum(np.abs(p[:, 1]) - half_axis(p), 0))),
        ("disk", lambda p: np.abs(p[:, 1]) + 1),
    ],
)
def test_canonical_shapes_are_the_surfaces_they_claim(name, surface_distance):
    """Before pose and noise, every sample lies at one constant distance from the shape's core,
    up to the polygonal approximation of curved surfaces (24 segments: ~1 % of the size)."""
    rng = np.random.default_rng(0)
    points = sample_surface(SHAPES[name](rng), 2000, rng)
    distance = surface_distance(points)
    assert distance.max() - distance.min() < 0.03, (distance.min(), distance.max())


def test_same_index_gives_the_same_cloud():
    first = SyntheticShapes("train", num_samples=30, seed=4)
    second = SyntheticShapes("train", num_samples=30, seed=4)
    for index in (0, 7, 29):
        assert torch.equal(first[index][0], first[index][0])
        assert torch.equal(first[index][0], second[index][0])
    # An item does not depend on the dataset size or on which items were generated before.
    assert torch.equal(SyntheticShapes("train", num_samples=100, seed=4)[29][0], first[29][0])


def test_seeds_and_splits_give_different_clouds():
    train = SyntheticShapes("train", num_samples=NUM_CLASSES, num_points=128, seed=0)
    other_seed = SyntheticShapes("train", num_samples=NUM_CLASSES, num_points=128, seed=1)
    test = SyntheticShapes("test", num_samples=NUM_CLASSES, num_points=128, seed=0)
    for index in range(NUM_CLASSES):
        cloud = train[index][0]
        assert not torch.allclose(cloud, other_seed[index][0], atol=1e-3)
        assert not torch.allclose(cloud, test[index][0], atol=1e-3)
        assert train[index][1] == test[index][1]  # same class, different instance


def test_rotation_modes_differ_and_are_validated():
    gravity = SyntheticShapes("train", num_samples=NUM_CLASSES, num_points=512, rotation="gravity")
    so3 = SyntheticShapes("train", num_samples=NUM_CLASSES, num_points=512, rotation="so3")
    for index in range(NUM_CLASSES):
        assert not torch.allclose(gravity[index][0], so3[index][0], atol=1e-3)
    with pytest.raises(ValueError, match="expected rotation"):
        SyntheticShapes(rotation="tilt")


def test_gravity_rotation_keeps_the_up_axis():
    # Without the random rotation, a disk lies in the y = 0 plane; rotating about y keeps it
    # there up to noise, outliers, shift and the anisotropic stretch (which leaves y at 0).
    disk = list(SHAPES).index("disk")
    points = generate_shape(disk, 2048, np.random.default_rng(0), "gravity")
    flatness = np.abs(points[:, 1] - np.median(points[:, 1]))
    assert np.quantile(flatness, 0.95) < 0.06
    tilted = generate_shape(disk, 2048, np.random.default_rng(0), "so3")
    assert np.quantile(np.abs(tilted[:, 1] - np.median(tilted[:, 1])), 0.95) > 0.1


def test_transform_is_applied():
    generator = torch.Generator().manual_seed(0)
    transform = NormalizeUnitSphere()
    dataset = SyntheticShapes("test", num_samples=NUM_CLASSES, num_points=300, transform=transform)
    points = dataset[3][0]
    torch.testing.assert_close(points.norm(dim=1).max(), torch.tensor(1.0))
    fewer = SyntheticShapes("test", num_samples=4, num_points=300, transform=Resample(300, generator=generator))
    assert fewer[0][0].shape == (300, 3)


def shape_descriptor(points):
    """Rotation- and scale-invariant: histograms of pairwise and centre distances, PCA spectrum."""
    centred = NormalizeUnitSphere()(points).numpy().astype(np.float64)
    pairwise = np.linalg.norm(centred[:, None] - centred[None], axis=-1)[np.triu_indices(len(centred), 1)]
    radial = np.linalg.norm(centred, axis=1)
    spectrum = np.linalg.eigvalsh(centred.T @ centred)
    return np.concatenate(
        [
            np.histogram(pairwise, bins=24, range=(0, 2))[0] / len(pairwise),
            np.histogram(radial, bins=12, range=(0, 1))[0] / len(radial),
            spectrum / spectrum.sum(),
        ]
    )


def descriptors(dataset):
    """Descriptors [n, 39] and labels [n] of every item."""
    items = [dataset[i] for i in range(len(dataset))]
    return np.stack([shape_descriptor(p) for p, _ in items]), np.array([label.item() for _, label in items])


def test_classes_are_distinguishable():
    """Labels carry shape: 1-nearest-neighbour on invariant descriptors beats chance (1/12) by far,
    with random SO(3) poses. (A small PointNet trained on 3600 clouds reaches ~98 %.)"""
    train = SyntheticShapes("train", num_samples=10 * NUM_CLASSES, num_points=256, rotation="so3")
    test = SyntheticShapes("test", num_samples=5 * NUM_CLASSES, num_points=256, rotation="so3")
    train_x, train_y = descriptors(train)
    test_x, test_y = descriptors(test)
    mean, std = train_x.mean(axis=0), train_x.std(axis=0) + 1e-6
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    nearest = np.linalg.norm(test_x[:, None] - train_x[None], axis=-1).argmin(axis=1)
    accuracy = (train_y[nearest] == test_y).mean()
    assert accuracy > 0.5, accuracy
