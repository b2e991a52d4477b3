"""How a run optimises (paper §3.1): AdamW on the trainable parameters only, no weight decay on
norms, biases and prefix tokens; a per-step cosine schedule after a linear warm-up; a GradScaler
for fp16."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .run_config import TrainConfig


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups of the trainable parameters: decay, and no decay for norms, biases and prefix tokens."""
    no_decay: set[int] = set()
    for module in model.modules():
        if isinstance(module, (_BatchNorm, nn.LayerNorm, nn.GroupNorm)) or "Norm" in type(module).__name__:
            no_decay.update(id(p) for p in module.parameters(recurse=False))
    decay, plain = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        leaf = name.rsplit(".", 1)[-1]
        skip = (p.ndim <= 1 or id(p) in no_decay or leaf.endswith("bias") or leaf.startswith(("ln_", "norm"))
                or "cls" in leaf or "pos_embed" in leaf)
        (plain if skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]


def lr_factor(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """Linear warm-up over ``warmup_steps`` then cosine decay to ``min_ratio`` at ``total_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_optimizer(model: nn.Module, cfg: TrainConfig, warmup_steps: int, total_steps: int,
                    device: torch.device) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR,
                                                   torch.amp.GradScaler]:
    """The optimizer, its per-step schedule (:func:`lr_factor`) and the gradient scaler (enabled for fp16)."""
    optimizer = torch.optim.AdamW(parameter_groups(model, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, warmup_steps, total_steps, cfg.min_lr / cfg.lr)
    )
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
    return optimizer, scheduler, scaler


__all__ = ["build_optimizer", "lr_factor", "parameter_groups"]
