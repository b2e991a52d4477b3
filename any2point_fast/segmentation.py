"""Part segmentation on the unchanged Any2Point encoder (the head the peers use on ShapeNetPart).

points → the encoder of an :class:`~any2point_fast.model.Any2PointModel` or
:class:`~any2point_fast.model.StandInModel` (tokenizer, projection, frozen blocks with adapters;
its classification head removed) → the point tokens of three blocks (evenly spaced: blocks
4/8/12 of a 12-block backbone), each LayerNorm'd → concatenated → propagated to every input
point by :func:`any2point_fast.ops.interpolate_features` (3-NN inverse-distance weights) →
concatenated with the point's xyz and a learned embedding of the shape's category (one-hot →
linear) → a shared per-point MLP → part logits.

Adapter-only checkpoints (:meth:`PartSegmentationModel.save_pretrained`) hold the encoder's trainable
weights and the head's, and record the head (``head``: type ``"partseg"``, blocks, category and part
counts, hidden width, dropout) beside the encoder's config and backbone fingerprint.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import ops
from .checkpoint import (
    ADAPTER_CONFIG_NAME,
    BackboneMismatchError,
    CheckpointError,
    compare_fingerprints,
    fingerprint,
    load_adapter_weights,
    read_adapter_config,
    save_adapter,
)

#: ``model_type`` recorded for the small random stand-in backbone (it has no Hugging Face name).
STAND_IN_TYPE = "stand-in"


def evenly_spaced_blocks(num_blocks: int, count: int = 3) -> tuple[int, ...]:
    """``count`` block indices (0-based) ending at the last block, evenly spaced: 12 blocks → (3, 7, 11).

    Shallow backbones repeat blocks (2 blocks → (0, 0, 1)), so the head's width never changes.
    """
    return tuple(max(0, round(num_blocks * (i + 1) / count) - 1) for i in range(count))


class PartSegmentationHead(nn.Module):
    """Token features of several depths + category → per-point part logits.

    Args:
        width: token width ``C``; num_depths: how many blocks' tokens are given (``D``).
        num_categories, num_parts: categories and parts of all categories (16 / 50 on ShapeNetPart).
        hidden: width of the last hidden layer (the first is twice as wide); dropout after the first.
        category_dim: width of the category embedding.
    """

    def __init__(self, width: int, num_depths: int, num_categories: int, num_parts: int, hidden: int = 256,
                 dropout: float = 0.5, category_dim: int = 64):
        super().__init__()
        self.num_categories = num_categories
        self.norms = nn.ModuleList(nn.LayerNorm(width) for _ in range(num_depths))
        self.category = nn.Linear(num_categories, category_dim)
        self.mlp = nn.Sequential(
            nn.Linear(num_depths * width + category_dim + 3, 2 * hidden), nn.BatchNorm1d(2 * hidden),
            nn.ReLU(inplace=True), nn.Dropout(dropout),
            nn.Linear(2 * hidden, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
            nn.Linear(hidden, num_parts),
        )

    def forward(self, points: torch.Tensor, centers: torch.Tensor, tokens: Sequence[torch.Tensor],
                category: torch.Tensor) -> torch.Tensor:
        """``points`` ``[B, P, 3]``, token ``centers`` ``[B, N, 3]``, ``tokens`` ``D × [B, N, C]``,
        ``category`` ``[B]`` int64 → logits ``[B, P, num_parts]`` (float, the tokens' dtype)."""
        features = torch.cat([norm(t) for norm, t in zip(self.norms, tokens)], dim=-1)
        per_point = ops.interpolate_features(points, centers, features)
        batch, num_points, _ = points.shape
        embedded = self.category(F.one_hot(category, self.num_categories).to(per_point.dtype))
        rows = torch.cat((per_point, embedded[:, None].expand(-1, num_points, -1), points.to(per_point.dtype)), -1)
        return self.mlp(rows.reshape(batch * num_points, -1)).reshape(batch, num_points, -1)


class PartSegmentationModel(nn.Module):
    """An Any2Point encoder with a :class:`PartSegmentationHead` in place of its classification head.

    Args:
        encoder: an ``Any2PointModel`` or ``StandInModel`` (anything with ``encode(points, keep)``
            and ``blocks``); its ``head`` is removed.
        num_categories, num_parts: of the dataset.
        blocks: the block indices whose tokens are used (default :func:`evenly_spaced_blocks`).
        hidden, dropout: of the head's MLP.

    ``forward(points [B, P, 3], category [B] int64) → [B, P, num_parts]`` logits.
    """

    head_type = "partseg"

    def __init__(self, encoder: nn.Module, num_categories: int, num_parts: int,
                 blocks: Sequence[int] | None = None, hidden: int = 256, dropout: float = 0.5):
        super().__init__()
        encoder.head = None
        self.encoder = encoder
        self.num_categories, self.num_parts, self.hidden, self.dropout = num_categories, num_parts, hidden, dropout
        self.blocks = tuple(blocks) if blocks is not None else evenly_spaced_blocks(len(encoder.blocks))
        self.num_prefix_tokens = getattr(encoder, "num_prefix_tokens", 1)
        self.head = PartSegmentationHead(encoder.config.hidden_size, len(self.blocks), num_categories, num_parts,
                                         hidden, dropout)

    @property
    def config(self):
        """The encoder's :class:`~any2point_fast.config.Any2PointConfig`."""
        return self.encoder.config

    @property
    def pe_table(self) -> torch.Tensor:
        """The encoder's frozen PE table."""
        return self.encoder.pe_table

    def forward(self, points: torch.Tensor, category: torch.Tensor) -> torch.Tensor:
        _, centers, kept = self.encoder.encode(points, keep=set(self.blocks))
        tokens = [kept[b][:, self.num_prefix_tokens:] for b in self.blocks]
        return self.head(points, centers, tokens, category)

    # ------------------------------------------------------------------ checkpoints
    def head_config(self) -> dict[str, Any]:
        """What rebuilds the head: ``type`` "partseg", ``blocks``, ``num_categories``, ``num_parts``,
        ``hidden``, ``dropout``."""
        return {"type": self.head_type, "blocks": list(self.blocks), "num_categories": self.num_categories,
                "num_parts": self.num_parts, "hidden": self.hidden, "dropout": self.dropout}

    def adapter_config(self) -> dict[str, Any]:
        """The content of ``adapter_config.json``: the encoder's (an HF encoder's own; for the stand-in,
        ``model_type`` "stand-in" and its fingerprint) with ``head`` = :meth:`head_config`."""
        if hasattr(self.encoder, "adapter_config"):
            encoder = self.encoder.adapter_config()
        else:
            encoder = {"base_model_name_or_path": STAND_IN_TYPE, "model_type": STAND_IN_TYPE, "revision": None,
                       "commit_hash": None, "backbone_fingerprint": _stand_in_fingerprint(self.encoder),
                       "num_prefix_tokens": self.num_prefix_tokens, "config": self.config.to_dict()}
        return {**encoder, "head": self.head_config()}

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write ``adapter_model.safetensors`` (the encoder's trainable weights and BatchNorm buffers, and
        the head's) and ``adapter_config.json`` (:meth:`adapter_config`) into ``save_directory``."""
        save_adapter(self, save_directory, self.adapter_config())

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, *, backbone: str | os.PathLike | nn.Module | None = None,
                        revision: str | None = None, attn_implementation: str | None = "auto",
                        backbone_kwargs: dict[str, Any] | None = None, **overrides: Any) -> PartSegmentationModel:
        """Restore a checkpoint written by :meth:`save_pretrained`.

        An HF encoder is restored as :meth:`Any2PointModel.from_pretrained` restores one (``backbone``,
        ``revision``, ``attn_implementation``, ``backbone_kwargs``, ``overrides`` as there). A stand-in
        checkpoint needs ``backbone``: a :class:`~any2point_fast.model.StandInModel` built as for training
        (same config, layers, heads and seed); its fingerprint and config are checked.

        Raises:
            CheckpointError: a file is missing or malformed, or the checkpoint holds another head type.
            BackboneMismatchError: the backbone differs from the one the checkpoint was trained on.
        """
        from .model import Any2PointModel

        directory = Path(directory)
        saved = read_adapter_config(directory, head_type=cls.head_type)
        head = _checked_head(directory / ADAPTER_CONFIG_NAME, saved["head"])
        if saved["model_type"] == STAND_IN_TYPE:
            encoder = _stand_in_encoder(directory, saved, backbone)
        else:
            encoder = Any2PointModel._from_adapter_checkpoint(
                directory, backbone, None, None, revision, attn_implementation, dict(backbone_kwargs or {}),
                overrides, head_type=cls.head_type, load_weights=False)
        model = cls(encoder, head["num_categories"], head["num_parts"], head["blocks"], head["hidden"],
                    head["dropout"])
        load_adapter_weights(model, directory)
        return model


def _stand_in_fingerprint(encoder: nn.Module) -> dict[str, Any]:
    return fingerprint(encoder.pe_table, encoder.config.hidden_size, len(encoder.blocks))


def _checked_head(path: Path, head: dict[str, Any]) -> dict[str, Any]:
    """The ``head`` of a partseg ``adapter_config.json`` with every field of :meth:`PartSegmentationModel.head_config`
    of the right kind; a CheckpointError naming ``path`` otherwise."""
    kinds = {"blocks": list, "num_categories": int, "num_parts": int, "hidden": int, "dropout": (int, float)}
    bad = [key for key, kind in kinds.items() if not isinstance(head.get(key), kind) or isinstance(head.get(key), bool)]
    if not bad and not all(isinstance(b, int) for b in head["blocks"]):
        bad = ["blocks"]
    if bad:
        raise CheckpointError(f"{path}: the partseg head lacks or has malformed {bad} (found {head!r})")
    return head


def _stand_in_encoder(directory: Path, saved: dict[str, Any], backbone: nn.Module | None) -> nn.Module:
    """The stand-in encoder given as ``backbone`` for a stand-in checkpoint, checked against it."""
    from .config import Any2PointConfig, ConfigError
    from .model import StandInModel

    if not isinstance(backbone, StandInModel):
        raise CheckpointError(f"{directory} was trained on a stand-in backbone, which is not stored: pass "
                              "backbone=StandInModel(config, num_layers, num_heads, seed) built as for training")
    problems = compare_fingerprints(saved["backbone_fingerprint"], _stand_in_fingerprint(backbone))
    if problems:
        raise BackboneMismatchError(f"the stand-in given differs from the one the checkpoint in {str(directory)!r} "
                                    "was trained on: " + "; ".join(problems))
    try:
        config = Any2PointConfig.from_dict(saved["config"])
    except (ConfigError, TypeError) as error:
        raise CheckpointError(f"{directory / ADAPTER_CONFIG_NAME}: invalid 'config' ({error})") from error
    differ = [f"{key} {value!r} saved, {getattr(backbone.config, key)!r} given"
              for key, value in vars(config).items() if getattr(backbone.config, key) != value]
    if differ:
        raise CheckpointError(f"{directory / ADAPTER_CONFIG_NAME}: the stand-in's config differs: " + "; ".join(differ))
    return backbone


__all__ = ["PartSegmentationHead", "PartSegmentationModel", "evenly_spaced_blocks"]
