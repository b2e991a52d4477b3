"""``Any2PointModel``: a frozen Hugging Face transformer as a 3D point-cloud classifier (DESIGN.md §1).

points → tokenizer → virtual projection (PE + bucket geometry, once per forward) → the backbone's
own encoder layers, each wrapped PEFT-style in an :class:`Any2PointBlock` that keeps the layer
as ``base_layer`` and runs the guided adapter after its FFN → the backbone's final norm → head.

The backbone is loaded by ``transformers`` itself (``AutoConfig``/``AutoModel``, offline from a
local directory as well as from the Hub cache), described by a :mod:`~any2point_fast.backbones`
spec, stripped of its embedding layer and frozen. Only the tokenizer, the ``[CLS]`` token(s) and
position(s), the adapters (with the shared view attention) and the head train, and only they are
saved by :meth:`Any2PointModel.save_pretrained`.
"""

from __future__ import annotations

import os
from collections.abc import Collection
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .adapter import Any2PointAdapter
from .attention import resolve_attn_implementation, set_attention_implementation
from .backbones import BackboneSpec, get_backbone_spec, get_path, set_path
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
from .config import Any2PointConfig, ConfigError
from .geometry import Geometry, ProjectionSpec
from .head import ClassificationHead
from .plain_block import PlainBlock
from .projection import build_geometry
from .tokenizer import PointTokenizer
from .validation import check_points
from .view_attention import ViewAttention

#: Fields describing the backbone rather than the method: always taken from the backbone; an
#: explicit ``pe_length`` (1D) keeps the first positions, an explicit ``pe_grid`` (2D) resamples
#: the grid with the model's own interpolation, and ``hidden_size`` must match.
BACKBONE_FIELDS = ("hidden_size", "pe_kind", "pe_length", "pe_grid")

#: ``backbone_kwargs`` that are also given to the ``AutoConfig`` probe (all of them go to ``AutoModel``).
_HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "trust_remote_code", "subfolder")


class Any2PointBlock(nn.Module):
    """One frozen backbone layer (``base_layer``, untouched) with the guided adapter after its FFN.

    ``forward(x) = O(adapter(h, F(h)))`` with ``h = A(x)``: the attention, FFN and output parts of
    the layer as its :class:`~any2point_fast.backbones.BackboneSpec` describes them (pre-LN:
    ``O`` is the identity; post-LN: ``O`` is the layer's output LayerNorm).

    Unless ``backbone_dropout`` is set, ``base_layer`` stays in eval mode under ``train()`` (its
    dropout, attention dropout and drop-path off: the frozen layer is deterministic); the adapter
    follows ``train()``.
    """

    def __init__(self, base_layer: nn.Module, adapter: nn.Module, spec: BackboneSpec,
                 backbone_dropout: bool = False):
        super().__init__()
        self.base_layer = base_layer
        self.adapter = adapter
        self.spec = spec
        self.backbone_dropout = backbone_dropout

    def train(self, mode: bool = True) -> Any2PointBlock:
        super().train(mode)
        if not self.backbone_dropout:
            self.base_layer.train(False)
        return self

    def forward(self, x: torch.Tensor, geometry: Geometry, num_prefix_tokens: int = 1) -> torch.Tensor:
        h = self.spec.attention_part(self.base_layer, x)
        out = self.adapter(h, self.spec.ffn_part(self.base_layer, h), geometry, num_prefix_tokens)
        return self.spec.output_part(self.base_layer, out)

    def extra_repr(self) -> str:
        return f"spec={self.spec.name!r}, norm_placement={self.spec.norm_placement!r}"


def resolve_config(spec: BackboneSpec, root: nn.Module, config: Any2PointConfig | str | None,
                   explicit: dict[str, Any]) -> Any2PointConfig:
    """The :class:`Any2PointConfig` of a backbone: ``config`` (a preset name, a config, or ``None``
    for the spec's modality preset), then ``explicit`` field overrides, then the backbone's own
    width and PE geometry (see :data:`BACKBONE_FIELDS`).
    """
    if config is None:
        base = Any2PointConfig.preset(spec.modality)
    elif isinstance(config, str):
        base = Any2PointConfig.preset(config)
    elif isinstance(config, Any2PointConfig):
        base = config
    else:
        raise TypeError(f"config must be None, a preset name or an Any2PointConfig, got {type(config).__name__}")
    hf_config = root.config
    width = int(hf_config.hidden_size)
    if explicit.get("hidden_size", width) != width:
        raise ConfigError(f"hidden_size={explicit['hidden_size']} does not match the backbone's width {width}")
    if explicit.get("pe_kind", spec.pe.kind) != spec.pe.kind:
        raise ConfigError(f"pe_kind={explicit['pe_kind']!r}: {spec.name} has a {spec.pe.kind} PE")
    derived: dict[str, Any] = {"hidden_size": width, "pe_kind": spec.pe.kind}
    if spec.pe.kind == "1d":
        derived["pe_length"] = explicit.get("pe_length", spec.pe.native_length(root, hf_config))
    else:
        derived["pe_grid"] = tuple(explicit.get("pe_grid", spec.pe.native_grid(hf_config)))
    rest = {k: v for k, v in explicit.items() if k not in BACKBONE_FIELDS}
    return base.replace(**rest, **derived)


def load_backbone(name_or_path: str | os.PathLike, revision: str | None = None,
                  attn_implementation: str | None = "auto", **kwargs: Any) -> nn.Module:
    """Load a supported HF model with ``AutoConfig``/``AutoModel`` (refusing unsupported ones before
    any weight is read). ``kwargs`` go to ``AutoModel.from_pretrained``: loading options
    (``cache_dir``, ``local_files_only``, ...) and config overrides (e.g. ``hidden_dropout_prob=0.0``)."""
    from transformers import AutoConfig, AutoModel

    name = str(name_or_path)
    hub = {k: kwargs[k] for k in _HUB_KWARGS if k in kwargs}
    get_backbone_spec(AutoConfig.from_pretrained(name, revision=revision, **hub).model_type)
    return AutoModel.from_pretrained(name, revision=revision,
                                     attn_implementation=resolve_attn_implementation(attn_implementation), **kwargs)


class Any2PointModel(nn.Module):
    """Tokenizer + virtual projection + frozen HF backbone with one adapter per block + head.

    Build it with :meth:`from_pretrained` (a model id/directory, or a directory written by
    :meth:`save_pretrained`), or wrap an already loaded ``transformers`` model::

        backbone = AutoModel.from_pretrained("facebook/dinov2-base")
        model = Any2PointModel(backbone, num_classes=15)

    The wrapped model is modified in place: its embedding layer (and pooler) is removed, every
    weight frozen, and each encoder layer replaced by an :class:`Any2PointBlock` holding it.
    Like any module it starts in training mode, but the frozen layers do not follow it: they stay
    in eval mode (their own dropout, attention dropout and drop-path off, so a frozen layer is the
    same function in training and evaluation). ``backbone_dropout=True`` (a config field; CLI
    ``--set model.backbone_dropout=true``) keeps the backbone's own regularisation in training
    (0.1 in BERT-family configs, 0 in CLIP/ViT/DINOv2/AST).
    For mixed precision keep the float32 weights and use ``torch.autocast`` (the attention then
    takes the xformers path on CUDA).

    Args:
        backbone: a loaded HF model whose ``config.model_type`` has a registered spec (task
            models are unwrapped through ``base_model``; a full CLIP model gives its text tower).
        config: ``None`` (the spec's modality preset), a preset name, or an :class:`Any2PointConfig`.
            Its width and PE geometry are replaced by the backbone's (see :data:`BACKBONE_FIELDS`).
        num_classes: classes of the head (an override like any other).
        attn_implementation: ``"auto"`` (xformers on CUDA fp16/bf16, SDPA elsewhere), ``"xformers"``,
            ``"sdpa"``, ``"eager"``, or any name registered with transformers.
        name_or_path, revision: provenance of the backbone, recorded in adapter checkpoints
            (default: the backbone config's ``name_or_path``).
        **overrides: :class:`Any2PointConfig` fields.

    Attributes:
        config: the resolved :class:`Any2PointConfig`.
        spec: the backbone's :class:`~any2point_fast.backbones.BackboneSpec`.
        backbone: the encoder root (``BertModel``, ``ViTModel``, CLIP's ``text_model``, ...).
        pe_table: frozen PE, ``[L, C]`` or ``[Gh, Gw, C]`` float32 (non-persistent buffer).
        num_prefix_tokens: learnable prefix tokens before the point tokens (``[CLS]``; DeiT/AST: 2).
    """

    def __init__(self, backbone: nn.Module, config: Any2PointConfig | str | None = None, *,
                 num_classes: int | None = None, attn_implementation: str | None = "auto",
                 name_or_path: str | os.PathLike | None = None, revision: str | None = None, **overrides: Any):
        super().__init__()
        spec = get_backbone_spec(backbone.config.model_type)
        root = spec.encoder_root(backbone)
        if get_path(root, spec.embeddings) is None:
            raise ValueError("this backbone has no embedding layer: it is already wrapped by an Any2PointModel")
        explicit = dict(overrides)
        if num_classes is not None:
            explicit["num_classes"] = num_classes
        cfg = resolve_config(spec, root, config, explicit)
        self.config = cfg
        self.spec = spec
        self.num_prefix_tokens = spec.num_prefix_tokens
        self.backbone_info = {
            "base_model_name_or_path": str(name_or_path or backbone.config.name_or_path or ""),
            "model_type": backbone.config.model_type,
            "revision": revision,
            "commit_hash": getattr(backbone.config, "_commit_hash", None),
        }
        c, prefix = cfg.hidden_size, spec.num_prefix_tokens

        # Trainable parts. `view_attention` is registered first so that its canonical (deduplicated)
        # parameter names are `view_attention.*`, although every adapter holds it too.
        self.view_attention = ViewAttention(c, cfg.num_views, cfg.attn_dim, cfg.attn_heads)
        self.tokenizer = PointTokenizer(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, prefix, c))
        self.cls_pos = nn.Parameter(torch.randn(1, prefix, c) * 0.02)

        # Frozen parts read from the backbone before its embedding layer is dropped.
        pe = spec.pe.extract(root, root.config, length=cfg.pe_length if cfg.pe_kind == "1d" else None,
                             grid=cfg.pe_grid if cfg.pe_kind == "2d" else None)
        self.register_buffer("pe_table", pe, persistent=False)
        bias = torch.zeros(c)
        if spec.input_bias is not None:
            bias = get_path(root, spec.input_bias).weight[0].detach().float().clone()
        self.register_buffer("input_bias", bias, persistent=False)
        # point tokens at the norm of the backbone's own input tokens (LN output norm = weight · sqrt(C))
        self.input_scale = spec.input_scale(root) if cfg.token_norm else None
        self.token_norm = nn.LayerNorm(c) if self.input_scale else nn.Identity()
        if self.input_scale:
            nn.init.constant_(self.token_norm.weight, self.input_scale / c ** 0.5)
            nn.init.zeros_(self.token_norm.bias)
        self.input_norm = get_path(root, spec.input_norm) if spec.input_norm else nn.Identity()
        self.input_norm.requires_grad_(False)

        self.attn_implementation = set_attention_implementation(root, attn_implementation)
        root.requires_grad_(False)
        set_path(root, spec.embeddings, None)
        for path in spec.drop:
            parent, _, attr = path.rpartition(".")
            if getattr(get_path(root, parent), attr, None) is not None:
                set_path(root, path, None)
        self.backbone = root
        layers = spec.layer_list(root)
        for index, layer in enumerate(layers):
            layers[index] = Any2PointBlock(layer, Any2PointAdapter(cfg, self.view_attention), spec,
                                           backbone_dropout=cfg.backbone_dropout)
        self.head = ClassificationHead(cfg)
        self.projection = ProjectionSpec.from_config(cfg)
        self.train()

    # ------------------------------------------------------------------ structure
    @property
    def blocks(self) -> nn.ModuleList:
        """The :class:`Any2PointBlock` of every encoder layer, in order."""
        return self.spec.layer_list(self.backbone)

    @property
    def adapters(self) -> list[nn.Module]:
        """The adapter of every block (they share :attr:`view_attention`)."""
        return [block.adapter for block in self.blocks]

    @property
    def final_norm(self) -> nn.Module:
        norm = get_path(self.backbone, self.spec.final_norm) if self.spec.final_norm else None
        return nn.Identity() if norm is None else norm

    # ------------------------------------------------------------------ forward
    def geometry(self, centers: torch.Tensor) -> tuple[torch.Tensor, Geometry]:
        """Averaged PE ``[B, N, C]`` and the bucket geometry of the token centres ``[B, N, 3]``."""
        return build_geometry(centers, self.pe_table, self.projection, self.config.voxel_size)

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        """``points``: ``[B, P, 3]`` float → logits ``[B, num_classes]``."""
        return self.head(self.encode(points)[0], self.num_prefix_tokens)

    def encode(self, points: torch.Tensor, keep: Collection[int] = ()) -> tuple[torch.Tensor, torch.Tensor,
                                                                                dict[int, torch.Tensor]]:
        """``points`` ``[B, P, 3]`` → final-normed tokens ``[B, prefix + N, C]`` (prefix tokens first),
        token centres ``[B, N, 3]``, and the output ``[B, prefix + N, C]`` of every block index in ``keep``."""
        tokens, centers = self.tokenizer(check_points(points, self.config.num_points))
        tokens = self.token_norm(tokens)
        pe, geometry = self.geometry(centers)
        batch = tokens.shape[0]
        pos = torch.cat((self.cls_pos.expand(batch, -1, -1), pe.to(tokens.dtype)), dim=1)
        x = torch.cat((self.cls_token.expand(batch, -1, -1), tokens), dim=1)
        kept = {}
        for index, block in enumerate(self.blocks):
            if index == 0:
                x = self.input_norm(x + pos + self.input_bias.to(x.dtype))
            elif self.config.pe_every_block:
                x = x + pos
            x = block(x, geometry, self.num_prefix_tokens)
            if index in keep:
                kept[index] = x
        return self.final_norm(x), centers, kept

    # ------------------------------------------------------------------ parameters
    def _group(self, name: str) -> str:
        if name.startswith(("tokenizer.", "token_norm.")):
            return "tokenizer"
        if name.startswith("head."):
            return "head"
        if name in ("cls_token", "cls_pos"):
            return "prefix tokens"
        if name.startswith("view_attention.") or ".adapter." in name:
            return "adapters"
        return "other"

    def trainable_parameter_groups(self) -> dict[str, int]:
        """Trainable parameter counts by part: tokenizer, adapters (incl. the shared view attention),
        prefix tokens ([CLS] and its position), head (shared tensors counted once)."""
        groups = dict.fromkeys(("tokenizer", "adapters", "prefix tokens", "head"), 0)
        for name, param in self.named_parameters():
            if param.requires_grad:
                group = self._group(name)
                groups[group] = groups.get(group, 0) + param.numel()
        return groups

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """``(trainable, all)`` parameter counts (PEFT's name; shared tensors counted once)."""
        params = list(self.parameters())
        return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)

    def print_trainable_parameters(self) -> None:
        """``trainable params: X || all params: Y || trainable%: Z``, then the split by part."""
        trainable, total = self.get_nb_trainable_parameters()
        percent = 100 * trainable / total
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {percent:.4f}")
        for group, count in self.trainable_parameter_groups().items():
            print(f"  {group}: {count:,d}")

    # ------------------------------------------------------------------ checkpoints
    def backbone_fingerprint(self) -> dict[str, Any]:
        """What an adapter checkpoint records to recognise this backbone (see :func:`checkpoint.fingerprint`)."""
        return fingerprint(self.pe_table, self.config.hidden_size, len(self.blocks))

    def adapter_config(self) -> dict[str, Any]:
        """The content of ``adapter_config.json``."""
        return {**self.backbone_info, "backbone_fingerprint": self.backbone_fingerprint(),
                "num_prefix_tokens": self.num_prefix_tokens, "config": self.config.to_dict()}

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write ``adapter_model.safetensors`` (trainable weights + BatchNorm buffers, shared tensors
        once) and ``adapter_config.json`` (config, backbone provenance and fingerprint)."""
        save_adapter(self, save_directory, self.adapter_config())

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, num_classes: int | None = None,
                        config: Any2PointConfig | str | None = None, *,
                        backbone: str | os.PathLike | nn.Module | None = None, revision: str | None = None,
                        attn_implementation: str | None = "auto",
                        backbone_kwargs: dict[str, Any] | None = None, **overrides: Any) -> Any2PointModel:
        """Wrap a pretrained HF model, or restore an adapter checkpoint onto a freshly loaded backbone.

        Args:
            name_or_path: an HF model id or local directory (loaded with ``AutoModel``), or a
                directory written by :meth:`save_pretrained` (it holds ``adapter_config.json``).
            num_classes, config, **overrides: as in :class:`Any2PointModel`. For an adapter
                checkpoint the saved config is used; ``config`` must be ``None`` and overrides
                must keep the saved weights' shapes.
            backbone: adapter checkpoints only: the backbone to restore onto — a model id/path or a
                loaded HF model — instead of the one named in the checkpoint.
            revision: Hub revision of the backbone (recorded in checkpoints).
            attn_implementation: see :class:`Any2PointModel`.
            backbone_kwargs: extra ``AutoModel.from_pretrained`` keywords (``cache_dir``, ...).

        Raises:
            UnsupportedBackboneError: the architecture has no spec (lists the supported ones).
            BackboneMismatchError: the backbone differs from the one the adapters were trained on.
            CheckpointError: an adapter checkpoint file is missing, truncated, modified or malformed (names the file).
        """
        backbone_kwargs = dict(backbone_kwargs or {})
        if (Path(name_or_path) / ADAPTER_CONFIG_NAME).is_file():
            return cls._from_adapter_checkpoint(Path(name_or_path), backbone, num_classes, config, revision,
                                                attn_implementation, backbone_kwargs, overrides)
        if backbone is not None:
            raise ValueError(f"backbone= is for restoring an adapter checkpoint, but {str(name_or_path)!r} "
                             f"holds no {ADAPTER_CONFIG_NAME}")
        hf_model = load_backbone(name_or_path, revision=revision, attn_implementation=attn_implementation,
                                 **backbone_kwargs)
        return cls(hf_model, config, num_classes=num_classes, attn_implementation=attn_implementation,
                   name_or_path=name_or_path, revision=revision, **overrides)

    @classmethod
    def _from_adapter_checkpoint(cls, directory: Path, backbone, num_classes, config, revision, attn_implementation,
                                 backbone_kwargs, overrides, head_type: str = "classification",
                                 load_weights: bool = True) -> Any2PointModel:
        """The model of an adapter checkpoint whose head is ``head_type``; its weights are loaded only with
        ``load_weights`` (a wrapping model, e.g. a part-segmentation one, loads them itself)."""
        saved = read_adapter_config(directory, head_type)
        if config is not None:
            raise ConfigError("config= cannot be combined with an adapter checkpoint (its saved config is used); "
                              "pass field overrides as keywords")
        try:
            saved_config = Any2PointConfig.from_dict(saved["config"])
        except (ConfigError, TypeError) as error:
            raise CheckpointError(f"{directory / ADAPTER_CONFIG_NAME}: invalid 'config' ({error})") from error
        if isinstance(backbone, nn.Module):
            hf_model, name = backbone, None
        else:
            name = str(backbone) if backbone is not None else saved["base_model_name_or_path"]
            revision = revision if backbone is not None else (revision or saved.get("revision"))
            hf_model = load_backbone(name, revision=revision, attn_implementation=attn_implementation,
                                     **backbone_kwargs)
        found = _probe_fingerprint(hf_model, saved_config)
        problems = compare_fingerprints(saved["backbone_fingerprint"], found)
        if problems:
            raise BackboneMismatchError(
                f"the adapters in {str(directory)!r} were trained on {saved['model_type']} backbone "
                f"{saved['base_model_name_or_path']!r}, which differs from the backbone given "
                f"({hf_model.config.model_type} {str(name or hf_model.config.name_or_path)!r}): " + "; ".join(problems)
            )
        geometry = "pe_length" if saved_config.pe_kind == "1d" else "pe_grid"
        explicit = {"hidden_size": saved_config.hidden_size, geometry: getattr(saved_config, geometry), **overrides}
        model = cls(hf_model, saved_config, num_classes=num_classes, attn_implementation=attn_implementation,
                    name_or_path=name or saved["base_model_name_or_path"], revision=revision, **explicit)
        if load_weights:
            load_adapter_weights(model, directory)
        return model


def _probe_fingerprint(hf_model: nn.Module, saved: Any2PointConfig) -> dict[str, Any] | str:
    """The fingerprint an unwrapped HF model would have under ``saved``'s PE geometry, or why it has none."""
    spec = get_backbone_spec(hf_model.config.model_type)
    root = spec.encoder_root(hf_model)
    if spec.pe.kind != saved.pe_kind:
        return f"{spec.name} has a {spec.pe.kind} PE, the checkpoint a {saved.pe_kind} one"
    try:
        pe = spec.pe.extract(root, root.config, length=saved.pe_length if saved.pe_kind == "1d" else None,
                             grid=saved.pe_grid if saved.pe_kind == "2d" else None)
    except ConfigError as error:
        return str(error)
    return fingerprint(pe, int(root.config.hidden_size), len(spec.layer_list(root)))


class StandInModel(nn.Module):
    """The whole method on a small random frozen plain transformer standing in for a pretrained
    backbone (DESIGN.md §1.3), on the fused ops: no download needed, and its ops follow
    :func:`any2point_fast.ops.set_backend`.

    tokenizer → virtual projection (PE + bucket geometry, once per forward) → ``num_layers``
    frozen :class:`~any2point_fast.plain_block.PlainBlock` s, each with an
    :class:`~any2point_fast.Any2PointAdapter` after its FFN → final norm → head. Same parameters,
    ``state_dict`` keys and seeded frozen weights as the oracle's
    :class:`any2point_fast.reference.ReferenceModel`, so checkpoints and weights copy across.

    Args:
        config: the method's hyper-parameters (``hidden_size`` is the stand-in's width).
        num_layers, num_heads: size of the stand-in transformer.
        seed: seeds the frozen stand-in weights and PE table, so two models built with the same
            seed share their "pretrained" backbone.

    Attributes:
        pe_table: frozen PE, ``[L, C]`` or ``[Gh, Gw, C]`` float32 (a buffer).
    """

    def __init__(self, config: Any2PointConfig, num_layers: int = 4, num_heads: int = 4, seed: int = 0):
        super().__init__()
        self.config = config
        width = config.hidden_size
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.blocks = nn.ModuleList(PlainBlock(width, num_heads) for _ in range(num_layers))
            self.final_norm = nn.LayerNorm(width)
            shape = (config.pe_length, width) if config.pe_kind == "1d" else (*config.pe_grid, width)
            self.register_buffer("pe_table", 0.02 * torch.randn(shape))
        self.blocks.requires_grad_(False)
        self.final_norm.requires_grad_(False)
        self.spec = ProjectionSpec.from_config(config)
        self.tokenizer = PointTokenizer(config)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.cls_pos = nn.Parameter(0.02 * torch.randn(1, 1, width))
        self.view_attention = ViewAttention(width, config.num_views, config.attn_dim, config.attn_heads)
        self.adapters = nn.ModuleList(Any2PointAdapter(config, self.view_attention) for _ in range(num_layers))
        self.head = ClassificationHead(config)

    def geometry(self, centers: torch.Tensor) -> tuple[torch.Tensor, Geometry]:
        """Averaged PE ``[B, N, C]`` and the bucket geometry of the token centres ``[B, N, 3]``."""
        return build_geometry(centers, self.pe_table, self.spec, self.config.voxel_size)

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        """``points``: ``[B, P, 3]`` float → logits ``[B, num_classes]``."""
        return self.head(self.encode(points)[0])

    def encode(self, points: torch.Tensor, keep: Collection[int] = ()) -> tuple[torch.Tensor, torch.Tensor,
                                                                                dict[int, torch.Tensor]]:
        """``points`` ``[B, P, 3]`` → final-normed tokens ``[B, 1 + N, C]`` (``[CLS]`` first), token
        centres ``[B, N, 3]``, and the output ``[B, 1 + N, C]`` of every block index in ``keep``."""
        tokens, centers = self.tokenizer(check_points(points, self.config.num_points))
        pe, geometry = self.geometry(centers)
        batch = tokens.shape[0]
        pos = torch.cat((self.cls_pos.expand(batch, -1, -1), pe.to(tokens.dtype)), dim=1)
        x = torch.cat((self.cls_token.expand(batch, -1, -1), tokens), dim=1)
        kept = {}
        for index, (block, adapter) in enumerate(zip(self.blocks, self.adapters)):
            if index == 0 or self.config.pe_every_block:
                x = x + pos
            h = block.attention(x)
            x = adapter(h, block.ffn(h), geometry)
            if index in keep:
                kept[index] = x
        return self.final_norm(x), centers, kept


__all__ = ["Any2PointBlock", "Any2PointModel", "StandInModel", "BACKBONE_FIELDS", "load_backbone", "resolve_config"]
