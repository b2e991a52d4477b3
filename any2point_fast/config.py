"""Configuration of an Any2Point model: one dataclass, three published recipes as presets.

The recipes follow DESIGN.md §1 and the paper's §3.1:

=========  ==========  ================  ============  =====  ======  =========
preset     source      PE geometry       buckets       voxel  c       camera d
=========  ==========  ================  ============  =====  ======  =========
language   CLIP text   1D, L = 77        segment 2     0.08   0.3     --
vision     DINOv2      2D 37×37 grid,    patch 26 px   0.16   0.7     1.6
                       518×518 canvas
audio      AST         2D 12×101 grid,   patch 16 px   0.16   0.5     1.4
                       192×304 canvas
=========  ==========  ================  ============  =====  ======  =========
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal

Modality = Literal["language", "vision", "audio"]
Pooling = Literal["mean", "max+mean"]

#: Number of published PointCLIP views; views/lines are taken from this list in order.
MAX_VIEWS = 6


class ConfigError(ValueError):
    """An :class:`Any2PointConfig` field is out of range or inconsistent with another."""


@dataclass
class Any2PointConfig:
    """Every hyper-parameter of the Any2Point method (DESIGN.md §1).

    Build one from a preset and override what differs::

        cfg = Any2PointConfig.preset("vision", num_classes=40, knn_k=32)

    Geometry of the source model's position embedding (PE):

    - ``pe_kind="1d"``: a table ``[pe_length, C]``; tokens are projected onto ``num_views``
      lines and grouped in segments of ``segment_length`` PE positions.
    - ``pe_kind="2d"``: a grid ``[pe_grid[0], pe_grid[1], C]`` (rows × cols) laid over a canvas
      of ``canvas_size = (H, W)`` pixels; tokens are projected onto ``num_views`` perspective
      views and grouped by ``patch_size``-pixel patches of the canvas.

    Frozen means frozen: by default (``backbone_dropout=False``) the frozen backbone layers stay in
    eval mode whatever ``model.train()`` says, so their own dropout, attention dropout and
    drop-path are off and a frozen layer computes the same function in training and evaluation.
    ``backbone_dropout=True`` keeps the backbone's own regularisation in training (its config's
    rates). The tokenizer's, adapters' and head's dropout/BatchNorm follow ``train()`` as usual.
    """

    modality: Modality = "language"
    hidden_size: int = 768
    num_classes: int = 15

    # 3D tokenizer (light Point-PN)
    num_points: int = 1024
    num_tokens: int = 128
    tokenizer_dim: int = 96
    tokenizer_stages: int = 3
    tokenizer_bottleneck: int = 8
    knn_k: int = 81
    pos_alpha: float = 1000.0
    pos_beta: float = 100.0

    #: Hugging Face backbones: LayerNorm the point tokens to the typical norm of the backbone's own
    #: input embeddings (word rows, or patch-conv outputs), so the frozen PE and first block see
    #: inputs of the scale they were trained on (affine, trainable; the stand-in ignores it).
    token_norm: bool = True

    # 3D-to-any virtual projection
    num_views: int = 6
    pe_kind: Literal["1d", "2d"] = "1d"
    pe_length: int = 77
    segment_length: float = 2.0
    pe_grid: tuple[int, int] = (37, 37)
    canvas_size: tuple[int, int] = (518, 518)
    patch_size: int = 26
    camera_distance: float = 1.6
    pe_every_block: bool = True

    # any-to-3D guided adapter
    adapter_rank: int = 16
    adapter_scale: float = 0.3
    attn_dim: int = 12
    attn_heads: int = 6
    pooling: Pooling = "mean"
    voxel_size: float = 0.08
    ensemble_coef: float = 0.3

    # classification head
    head_hidden: int = 256
    head_dropout: float = 0.5

    # frozen backbone
    backbone_dropout: bool = False

    def __post_init__(self) -> None:
        self.pe_grid = tuple(self.pe_grid)
        self.canvas_size = tuple(self.canvas_size)
        self._validate()

    # ------------------------------------------------------------------ presets
    @classmethod
    def preset(cls, name: str, **overrides: Any) -> Any2PointConfig:
        """The published recipe ``name`` ("language", "vision" or "audio") with ``overrides``."""
        recipes = {
            "language": dict(
                modality="language", pe_kind="1d", pe_length=77, segment_length=2.0,
                voxel_size=0.08, ensemble_coef=0.3, pooling="mean",
            ),
            "vision": dict(
                modality="vision", pe_kind="2d", pe_grid=(37, 37), canvas_size=(518, 518),
                patch_size=26, camera_distance=1.6, voxel_size=0.16, ensemble_coef=0.7,
                pooling="max+mean",
            ),
            "audio": dict(
                modality="audio", pe_kind="2d", pe_grid=(12, 101), canvas_size=(192, 304),
                patch_size=16, camera_distance=1.4, voxel_size=0.16, ensemble_coef=0.5,
                pooling="max+mean",
            ),
        }
        if name not in recipes:
            raise ConfigError(f"unknown preset {name!r}; expected one of {sorted(recipes)}")
        return cls(**{**recipes[name], **overrides})

    def replace(self, **changes: Any) -> Any2PointConfig:
        """A validated copy with ``changes`` applied."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable fields (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Any2PointConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown config keys {unknown}")
        return cls(**data)

    # ----------------------------------------------------------------- geometry
    @property
    def token_counts(self) -> tuple[int, ...]:
        """Points kept after each tokenizer stage: halves per stage, the last stage gives N."""
        sizes = [max(self.num_tokens, self.num_points >> (s + 1)) for s in range(self.tokenizer_stages)]
        sizes[-1] = self.num_tokens
        return tuple(sizes)

    @property
    def tokenizer_out_dim(self) -> int:
        """Channels after the last stage (they double each stage)."""
        return self.tokenizer_dim * 2**self.tokenizer_stages

    @property
    def buckets_per_view(self) -> int:
        """Buckets of one view of one cloud: line segments (1D) or canvas patches (2D)."""
        if self.pe_kind == "1d":
            return math.ceil(self.pe_length / self.segment_length)
        h, w = self.canvas_size
        return math.ceil(h / self.patch_size) * math.ceil(w / self.patch_size)

    # --------------------------------------------------------------- validation
    def _validate(self) -> None:
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ConfigError(message)

        positive_ints = (
            "hidden_size", "num_classes", "num_points", "num_tokens", "tokenizer_dim",
            "tokenizer_stages", "tokenizer_bottleneck", "knn_k", "pe_length", "patch_size",
            "adapter_rank", "attn_dim", "attn_heads", "head_hidden",
        )
        for name in positive_ints:
            value = getattr(self, name)
            need(isinstance(value, int) and not isinstance(value, bool) and value > 0,
                 f"{name} must be a positive int, got {value!r}")
        need(self.modality in ("language", "vision", "audio"),
             f"modality must be 'language', 'vision' or 'audio', got {self.modality!r}")
        need(self.pe_kind in ("1d", "2d"), f"pe_kind must be '1d' or '2d', got {self.pe_kind!r}")
        need(self.pooling in ("mean", "max+mean"),
             f"pooling must be 'mean' or 'max+mean', got {self.pooling!r}")
        need(1 <= self.num_views <= MAX_VIEWS,
             f"num_views must be in 1..{MAX_VIEWS} (the published views), got {self.num_views}")
        need(self.num_tokens <= self.num_points,
             f"num_tokens ({self.num_tokens}) cannot exceed num_points ({self.num_points})")
        need(self.attn_dim % self.attn_heads == 0,
             f"attn_dim ({self.attn_dim}) must be divisible by attn_heads ({self.attn_heads})")
        need(self.attn_dim // self.attn_heads <= 64,
             f"attention head dim {self.attn_dim // self.attn_heads} exceeds 64")
        need(self.segment_length > 0, f"segment_length must be > 0, got {self.segment_length}")
        need(0 < self.voxel_size <= 2, f"voxel_size must be in (0, 2], got {self.voxel_size}")
        need(self.camera_distance > 1,
             f"camera_distance must be > 1 (the cloud fills the unit sphere), got {self.camera_distance}")
        need(0 <= self.head_dropout < 1, f"head_dropout must be in [0, 1), got {self.head_dropout}")
        need(isinstance(self.token_norm, bool), f"token_norm must be a bool, got {self.token_norm!r}")
        need(isinstance(self.backbone_dropout, bool), f"backbone_dropout must be a bool, got {self.backbone_dropout!r}")
        need(len(self.pe_grid) == 2 and all(isinstance(g, int) and g > 0 for g in self.pe_grid),
             f"pe_grid must be two positive ints (rows, cols), got {self.pe_grid!r}")
        need(len(self.canvas_size) == 2 and all(isinstance(g, int) and g > 1 for g in self.canvas_size),
             f"canvas_size must be two ints > 1 (H, W), got {self.canvas_size!r}")
