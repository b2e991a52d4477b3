"""Test-time voting for classification: the logits of ``N`` augmented passes, averaged (how the peers
report "with voting" results)."""

from __future__ import annotations

import torch
from torch import nn


def augment_batch(points: torch.Tensor, generator: torch.Generator, scale: tuple[float, float] = (0.9, 1.1),
                  shift: float = 0.2) -> torch.Tensor:
    """Every cloud of ``[B, P, 3]`` scaled by its own factor in ``scale`` and shifted by its own offset in
    ``[-shift, shift]³``, drawn from ``generator`` (on the CPU) → ``[B, P, 3]``."""
    batch = points.shape[0]
    factor = scale[0] + (scale[1] - scale[0]) * torch.rand(batch, 1, 1, generator=generator)
    offset = shift * (2 * torch.rand(batch, 1, 3, generator=generator) - 1)
    return points * factor.to(points) + offset.to(points)


def vote_logits(model: nn.Module, points: torch.Tensor, votes: int, generator: torch.Generator) -> torch.Tensor:
    """Mean of ``model``'s logits ``[B, K]`` over ``votes`` passes, each on :func:`augment_batch` of ``points``."""
    total = None
    for _ in range(votes):
        logits = model(augment_batch(points, generator)).float()
        total = logits if total is None else total + logits
    return total / votes


__all__ = ["augment_batch", "vote_logits"]
