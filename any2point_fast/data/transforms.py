"""Point-cloud transforms and the paper's augmentation recipes.

Every transform is a callable taking a float tensor ``[P, 3]`` and returning a new float
tensor ``[P', 3]`` of the same dtype and device (``P' == P`` except for :class:`Resample`);
inputs are never modified in place. Random transforms draw from ``generator`` when one is
given and from torch's global RNG otherwise (which DataLoader seeds per worker; a generator
object is copied into every worker as is, so workers would then repeat each other).
"""

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

Transform = Callable[[Tensor], Tensor]
_AXES = {"x": 0, "y": 1, "z": 2}


def _rand(shape: tuple[int, ...], generator: torch.Generator | None, like: Tensor) -> Tensor:
    """Uniform [0, 1) samples drawn on the generator's device, returned like ``like``."""
    device = generator.device if generator is not None else like.device
    return torch.rand(shape, generator=generator, device=device).to(like)


def _randn(shape: tuple[int, ...], generator: torch.Generator | None, like: Tensor) -> Tensor:
    """Standard normal samples drawn on the generator's device, returned like ``like``."""
    device = generator.device if generator is not None else like.device
    return torch.randn(shape, generator=generator, device=device).to(like)


@dataclass
class Compose:
    """Apply ``transforms`` in order."""

    transforms: Sequence[Transform]

    def __call__(self, points: Tensor) -> Tensor:
        for transform in self.transforms:
            points = transform(points)
        return points


@dataclass
class NormalizeUnitSphere:
    """Centre the cloud on its mean and scale it so the largest norm is 1.

    A degenerate cloud (all points equal up to float rounding) becomes all zeros.
    """

    def __call__(self, points: Tensor) -> Tensor:
        centred = points - points.mean(dim=0, keepdim=True)
        radius = centred.norm(dim=1).max()
        # Rounding in the mean leaves identical points a few ulps apart: treat that as zero.
        rounding = 16 * torch.finfo(points.dtype).eps * points.abs().max()
        if radius <= rounding:
            return torch.zeros_like(points)
        return centred / radius


@dataclass
class RandomScale:
    """Multiply by a factor drawn uniformly in ``[low, high]`` (one per axis if ``per_axis``)."""

    low: float = 0.9
    high: float = 1.1
    per_axis: bool = False
    generator: torch.Generator | None = None

    def __post_init__(self) -> None:
        if not 0 < self.low <= self.high:
            raise ValueError(f"expected 0 < low <= high, got low={self.low}, high={self.high}")

    def __call__(self, points: Tensor) -> Tensor:
        shape = (1, 3) if self.per_axis else (1, 1)
        factor = self.low + (self.high - self.low) * _rand(shape, self.generator, points)
        return points * factor


@dataclass
class RandomTranslate:
    """Add one offset per axis drawn uniformly in ``[-shift, shift]``."""

    shift: float = 0.2
    generator: torch.Generator | None = None

    def __post_init__(self) -> None:
        if self.shift < 0:
            raise ValueError(f"expected shift >= 0, got {self.shift}")

    def __call__(self, points: Tensor) -> Tensor:
        return points + self.shift * (2 * _rand((1, 3), self.generator, points) - 1)


@dataclass
class RandomRotateGravity:
    """Rotate by an angle drawn uniformly in ``[0, 2π)`` about the gravity axis.

    ``axis`` names the up axis ("y" for ScanObjectNN); that coordinate is left unchanged.
    """

    axis: str = "y"
    generator: torch.Generator | None = None

    def __post_init__(self) -> None:
        if self.axis not in _AXES:
            raise ValueError(f"expected axis in {sorted(_AXES)}, got {self.axis!r}")

    def __call__(self, points: Tensor) -> Tensor:
        angle = 2 * math.pi * _rand((), self.generator, points)
        cos, sin = torch.cos(angle), torch.sin(angle)
        up = _AXES[self.axis]
        a, b = (up + 1) % 3, (up + 2) % 3  # the rotated plane, right-handed about `up`
        rotation = torch.eye(3, dtype=points.dtype, device=points.device)
        rotation[a, a], rotation[a, b], rotation[b, a], rotation[b, b] = cos, -sin, sin, cos
        return points @ rotation.T


@dataclass
class Jitter:
    """Add per-coordinate gaussian noise of std ``sigma``, clipped to ``[-clip, clip]``."""

    sigma: float = 0.01
    clip: float = 0.05
    generator: torch.Generator | None = None

    def __post_init__(self) -> None:
        if self.sigma < 0 or self.clip < 0:
            raise ValueError(f"expected sigma, clip >= 0, got {self.sigma}, {self.clip}")

    def __call__(self, points: Tensor) -> Tensor:
        noise = self.sigma * _randn(tuple(points.shape), self.generator, points)
        return points + noise.clamp(-self.clip, self.clip)


@dataclass
class Resample:
    """Return exactly ``num_points`` points.

    ``mode="random"``: a random subset without replacement when the cloud has enough points,
    a draw with replacement otherwise. ``mode="first"`` (deterministic, for evaluation): the
    first ``num_points`` points, the cloud repeated cyclically when it is shorter.
    """

    num_points: int
    mode: str = "random"
    generator: torch.Generator | None = None

    def __post_init__(self) -> None:
        if self.num_points < 1:
            raise ValueError(f"expected num_points >= 1, got {self.num_points}")
        if self.mode not in ("random", "first"):
            raise ValueError(f"expected mode 'random' or 'first', got {self.mode!r}")

    def __call__(self, points: Tensor) -> Tensor:
        count = len(points)
        if count == 0:
            raise ValueError("cannot resample an empty point cloud")
        if self.mode == "first":
            index = torch.arange(self.num_points, device=points.device) % count
        else:
            device = self.generator.device if self.generator is not None else points.device
            if count >= self.num_points:
                index = torch.randperm(count, generator=self.generator, device=device)
                index = index[: self.num_points]
            else:
                size = (self.num_points,)
                index = torch.randint(count, size, generator=self.generator, device=device)
        return points[index.to(points.device)]


# Dataset name -> whether its training recipe rotates about the gravity axis.
_RECIPE_ROTATES = {
    "scanobjectnn": True,
    "modelnet40": False,
    "modelnet40_h5": False,
    "modelnet40_resampled": False,
}


def recipe_transforms(
    dataset: str,
    train: bool,
    num_points: int = 1024,
    generator: torch.Generator | None = None,
) -> Compose:
    """The paper's pipeline (§3.1) for ``dataset``, producing ``[num_points, 3]`` clouds.

    Evaluation: first ``num_points`` points, then unit-sphere normalisation (no voting).
    Training: random subset, normalisation, then random scaling 0.9–1.1 and translation
    (±0.2); ScanObjectNN adds a random rotation about its gravity axis (y).
    """
    if dataset not in _RECIPE_ROTATES:
        known = sorted(_RECIPE_ROTATES)
        raise ValueError(f"no recipe for dataset {dataset!r}, expected one of {known}")
    if not train:
        return Compose([Resample(num_points, mode="first"), NormalizeUnitSphere()])
    steps: list[Transform] = [Resample(num_points, generator=generator), NormalizeUnitSphere()]
    if _RECIPE_ROTATES[dataset]:
        steps.append(RandomRotateGravity("y", generator=generator))
    steps += [RandomScale(0.9, 1.1, generator=generator), RandomTranslate(0.2, generator=generator)]
    return Compose(steps)
