"""The part-segmentation model: one training step (forward + per-point loss + backward + AdamW),
on the stand-in backbone at the partseg-synthetic recipe's shape (width 96, 3 blocks, B = 16,
P = 512, N = 64), every available backend. ``--quick``: tiny shapes."""

from __future__ import annotations

import torch

from any2point_fast.config import Any2PointConfig
from any2point_fast.model import StandInModel
from any2point_fast.segmentation import PartSegmentationModel

from .conftest import device


def build(quick: bool) -> tuple[PartSegmentationModel, torch.Tensor, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    sizes = dict(hidden_size=32, num_points=64, num_tokens=16, knn_k=8, tokenizer_dim=4) if quick else \
        dict(hidden_size=96, num_points=512, num_tokens=64, knn_k=16, tokenizer_dim=12)
    config = Any2PointConfig.preset("language", tokenizer_bottleneck=2, head_hidden=128, num_classes=4, **sizes)
    model = PartSegmentationModel(StandInModel(config, num_layers=3, num_heads=4), 4, 10, hidden=128).to(device())
    batch = 2 if quick else 16
    gen = torch.Generator().manual_seed(1)
    points = torch.randn(batch, config.num_points, 3, generator=gen).to(device())
    category = torch.randint(0, 4, (batch,), generator=gen).to(device())
    parts = torch.randint(0, 10, (batch, config.num_points), generator=gen).to(device())
    return model, points, category, parts


def test_segmentation_training_step(measure, backend, quick):
    model, points, category, parts = build(quick)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3, weight_decay=0.05)
    model.train()

    def step() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        logits = model(points, category)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), parts.reshape(-1))
        loss.backward()
        optimizer.step()
        return loss.detach()

    loss = measure(step, rounds=3, group="partseg:train-step", case=f"stand-in B={points.shape[0]} "
                   f"P={points.shape[1]}", backend=backend, mode="forward+backward", samples=points.shape[0])
    assert torch.isfinite(loss)
