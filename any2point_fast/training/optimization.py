"""How a run optimises (paper §3.1): AdamW on the trainable parameters only, no weight decay on
norms, biases and prefix tokens, the adapters' and prefix tokens' learning rate scaled by
``train.adapter_lr_scale``; a per-step cosine schedule after a linear warm-up; a GradScaler for fp16."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..model import parameter_part
from .run_config import TrainConfig


def parameter_groups(model: nn.Module, weight_decay: float,
                     adapter_lr_scale: float = 1.0) -> list[dict[str, Any]]:
    """AdamW groups of the trainable parameters: with and without weight decay (none on norms, biases
    and prefix tokens), each split into the parts the frozen backbone surrounds (adapters, the shared
    view attention, prefix tokens: ``lr_scale = adapter_lr_scale``) and the rest (``lr_scale = 1``).
    Empty groups are left out; the first group has ``lr_scale`` 1 where any does."""
    no_decay: set[int] = set()
    for module in model.modules():
        if isinstance(module, (_BatchNorm, nn.LayerNorm, nn.GroupNorm)) or "Norm" in type(module).__name__:
            no_decay.update(id(p) for p in module.parameters(recurse=False))
    groups: dict[tuple[float, float], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        leaf = name.rsplit(".", 1)[-1]
        skip = (p.ndim <= 1 or id(p) in no_decay or leaf.endswith("bias") or leaf.startswith(("ln_", "norm"))
                or "cls" in leaf or "pos_embed" in leaf)
        inside = parameter_part(name) in ("adapters", "prefix tokens")
        key = (adapter_lr_scale if inside else 1.0, 0.0 if skip else weight_decay)
        groups.setdefault(key, []).append(p)
    order = sorted(groups, key=lambda key: (key[0] != 1.0, key[1] == 0.0))
    return [{"params": groups[key], "weight_decay": key[1], "lr_scale": key[0]} for key in order]


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
    groups = parameter_groups(model, cfg.weight_decay, cfg.adapter_lr_scale)
    for group in groups:
        group["lr"] = cfg.lr * group["lr_scale"]
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, warmup_steps, total_steps, cfg.min_lr / cfg.lr)
    )
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
    return optimizer, scheduler, scaler


__all__ = ["build_optimizer", "lr_factor", "parameter_groups"]
