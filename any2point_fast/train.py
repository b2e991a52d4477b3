"""Training and evaluation of a point-cloud classifier: the paper's recipe (§3.1), resumable, multi-GPU.

The loop trains any ``nn.Module`` mapping points ``[B, P, 3]`` to logits ``[B, classes]``; which
model is built is decided in one place, :func:`build_model`. A run is described by a
:class:`RunConfig` with three sections, each a dataclass whose every field can be overridden
(``any2point-fast train --set train.lr=1e-3 model.knn_k=16``):

- ``model`` (:class:`ModelSettings`): the backbone (``"stand-in"`` or a Hugging Face id/path),
  the Any2Point preset and any :class:`~any2point_fast.config.Any2PointConfig` field;
- ``data`` (:class:`DataSettings`): the dataset, its points per cloud and augmentation;
- ``train`` (:class:`TrainConfig`): optimisation, precision, determinism, checkpoints.

What the loop does (DESIGN.md; paper §3.1): AdamW on the trainable parameters only (no weight
decay on norms, biases and ``[CLS]`` tokens); a per-step cosine schedule after a linear
warm-up; gradient accumulation and norm clipping; fp32, bf16 or fp16 (CUDA, with a
GradScaler) autocast; evaluation (overall and mean-class accuracy) every ``eval_every``
epochs; the best checkpoint tracked; one JSON line per epoch in ``metrics.jsonl``.

Reproducibility and resume: the shuffle order of epoch ``e`` is a function of ``(seed, e)``
(a seeded :class:`~torch.utils.data.DistributedSampler`, also with one process), the
augmentation of an item a function of ``(seed, e, index)``, and every RNG state is saved in
the checkpoint, so a run killed and resumed ends with the same weights as one that was not
(bitwise in ``deterministic`` CPU mode). Checkpoints are safetensors + JSON, never pickle; see
:mod:`any2point_fast.train_state`.

Several processes: launch with ``torchrun``; when ``WORLD_SIZE > 1`` the process group is
initialised from its environment variables (NCCL on CUDA, gloo on CPU), the model wrapped in
``DistributedDataParallel``, data sharded by a seeded ``DistributedSampler``, and only rank 0
logs and writes files. BatchNorm becomes SyncBatchNorm on NCCL; on gloo (CPU) it stays a
per-process BatchNorm whose running statistics DDP broadcasts from rank 0 at every step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import random
import sys
import time
import types
import typing
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from . import __version__, ops
from .atomic_io import atomic_write_bytes
from .config import Any2PointConfig, ConfigError
from .data.cached import CachedItems
from .partseg import (
    TASKS,
    PartItems,
    build_part_items,
    describe_test,
    evaluate_parts,
    format_result,
    model_outputs,
    primary_metric,
)
from .train_state import (
    CheckpointError,
    capture_rng_state,
    flatten_optimizer_state,
    load_checkpoint,
    point,
    prune_checkpoints,
    read_manifest,
    remove_stale_temporaries,
    resolve_pointer,
    restore_rng_state,
    save_checkpoint,
    unflatten_optimizer_state,
)
from .voting import vote_logits

STAND_IN = "stand-in"
METRICS_FILE = "metrics.jsonl"
#: Evaluation results written to ``metrics.jsonl`` (as ``test_<name>``).
_RECORDED = ("acc", "mean_class_acc", "loss", "instance_miou", "class_miou")
CONFIG_FILE = "config.yaml"
Precision = Literal["fp32", "bf16", "fp16"]


# =============================================================================================== configs
def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """``value`` converted to the field type ``annotation`` (YAML and ``--set`` give strings for ``1e-3``)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, where)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(errors[0] if errors else f"{where}: cannot be None")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: expected one of {list(args)}, got {value!r}")
        return value
    if annotation is bool:
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "on", "off", "1", "0"):
            return value.lower() in ("true", "yes", "on", "1")
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"{where}: expected an integer, got {value!r}") from None
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    if origin is tuple or annotation is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        if args and args[-1] is not Ellipsis:
            return tuple(_coerce(v, a, where) for v, a in zip(value, args, strict=False))
        return tuple(value)
    if origin is dict or annotation is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    return value


def _from_mapping(cls: type, data: dict[str, Any], section: str) -> Any:
    """Build dataclass ``cls`` from ``data``, coercing each value; unknown keys are an error."""
    if not isinstance(data, dict):
        raise ConfigError(f"{section}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{section}: unknown keys {unknown}; known keys: {sorted(names)}")
    return cls(**{k: _coerce(v, hints[k], f"{section}.{k}") for k, v in data.items()})


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    return value


@dataclass
class TrainConfig:
    """How to train. Defaults are the paper's recipe (§3.1) except the number of data workers.

    Optimisation: ``epochs``, ``batch_size`` (per process), AdamW ``lr``/``weight_decay``/``betas``,
    ``warmup_epochs`` of linear warm-up then a per-step cosine decay to ``min_lr``,
    ``grad_clip`` (max global grad norm; 0 disables), ``label_smoothing``, ``grad_accum_steps``
    (micro-batches per optimizer step).

    Execution: ``precision`` ("fp32" | "bf16" | "fp16"; bf16 autocast on CPU or CUDA, fp16 only on
    CUDA with a GradScaler), ``device`` ("auto" = the local CUDA device if any, else CPU),
    ``backend`` of the adapter ops (``any2point_fast.ops.set_backend``), ``num_threads`` (CPU
    threads; 0 keeps PyTorch's default), ``num_workers`` of the DataLoader.

    Reproducibility: ``seed`` (model init, data order, augmentation, dropout), ``deterministic``
    (``torch.use_deterministic_algorithms(True)``, cuDNN deterministic, ``CUBLAS_WORKSPACE_CONFIG``).

    Progress (rank 0): ``progress`` turns on a tqdm bar when stderr is a terminal and, when stdout
    is not one (output redirected to a file), a line ``epoch 1/12 step 40/125 loss 1.234 acc
    56.2% 12.3 samples/s`` every ``progress_every_steps`` optimizer steps and every
    ``progress_every_s`` seconds (0 turns either off; loss and accuracy: this epoch's so far, on this
    process). The per-epoch line gives training, evaluation and checkpoint seconds separately.

    Evaluation and checkpoints: ``eval_every`` epochs (the last epoch is always evaluated),
    ``eval_batch_size`` (default ``batch_size``), ``save_every_steps`` (0: at the end of each
    epoch only), ``keep_checkpoints`` (newest kept besides ``best``).

    Early stops (a run stopped by these can be resumed as if it had been killed):
    ``stop_after_epoch`` / ``stop_after_steps`` stop once that many epochs / optimizer steps of
    the whole run are done, after writing a checkpoint.
    """

    epochs: int = 300
    batch_size: int = 32
    lr: float = 5e-4
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_epochs: float = 10.0
    min_lr: float = 0.0
    grad_clip: float = 10.0
    label_smoothing: float = 0.0
    grad_accum_steps: int = 1
    precision: Precision = "fp32"
    device: str = "auto"
    backend: str = "auto"
    num_threads: int = 0
    num_workers: int = 4
    seed: int = 0
    deterministic: bool = False
    eval_every: int = 1
    eval_batch_size: int | None = None
    save_every_steps: int = 0
    keep_checkpoints: int = 1
    sync_batchnorm: bool = True
    find_unused_parameters: bool = False
    progress: bool = True
    progress_every_steps: int = 0
    progress_every_s: float = 30.0
    stop_after_epoch: int | None = None
    stop_after_steps: int | None = None

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)
        positive = ("epochs", "batch_size", "grad_accum_steps", "eval_every", "keep_checkpoints")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.batch_size < 2:
            raise ConfigError("train.batch_size must be >= 2 (BatchNorm needs two samples per batch)")
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise ConfigError(f"train.precision must be 'fp32', 'bf16' or 'fp16', got {self.precision!r}")
        if self.backend not in ops.BACKENDS:
            raise ConfigError(f"train.backend must be one of {list(ops.BACKENDS)}, got {self.backend!r}")
        if self.lr <= 0 or self.weight_decay < 0 or self.min_lr < 0 or self.warmup_epochs < 0:
            raise ConfigError("train.lr must be > 0 and weight_decay, min_lr, warmup_epochs >= 0")
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError(f"train.label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"train.betas must be two numbers in [0, 1), got {self.betas}")
        for name in ("num_threads", "num_workers", "save_every_steps", "grad_clip", "progress_every_steps",
                     "progress_every_s"):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name} must be >= 0, got {getattr(self, name)}")


@dataclass
class ModelSettings:
    """Which model to train.

    ``backbone``: ``"stand-in"`` (a small random frozen transformer of ``layers`` blocks,
    ``heads`` heads and width ``hidden_size``, seeded by ``backbone_seed``: no download) or a
    Hugging Face model id/path (``facebook/dinov2-base``, ...). ``preset``: the Any2Point recipe
    ("language" | "vision" | "audio"). ``backbone_config``: Hugging Face backbones only: changes
    to the backbone's own config applied when it is loaded (``hidden_dropout_prob: 0.0``; a
    mapping changes a sub-config: ``text_config: {dropout: 0.0}``); a key the config does not
    have is an error. ``overrides``: :class:`Any2PointConfig` fields; in a YAML
    file or ``--set`` they are written directly in the section (``model.knn_k=16``).
    ``task``: the head, ``"classification"`` or ``"partseg"`` (part segmentation, see
    :mod:`any2point_fast.segmentation`: a part dataset, per-point loss, mIoU evaluation).
    ``num_points`` and ``num_classes`` come from the data section unless given; an override
    set to ``null`` is removed (``--set model.hidden_size=null`` when switching a stand-in recipe
    to a Hugging Face backbone, whose width is its own).

    :meth:`to_dict` (the saved ``config.yaml``) lists the keys that apply to the backbone: no
    ``layers``/``heads``/``backbone_seed`` for a Hugging Face one, no ``backbone_config`` for the stand-in.
    """

    backbone: str = STAND_IN
    preset: str = "language"
    task: str = "classification"
    layers: int = 4
    heads: int = 4
    backbone_seed: int = 0
    backbone_config: dict[str, Any] = field(default_factory=dict)
    overrides: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ConfigError(f"model.task must be one of {list(TASKS)}, got {self.task!r}")
        known = {f.name for f in dataclasses.fields(Any2PointConfig)}
        unknown = sorted(set(self.overrides) - known)
        if unknown:
            raise ConfigError(f"model: unknown keys {unknown}; model keys are {sorted(_MODEL_KEYS)} "
                              f"and the Any2PointConfig fields {sorted(known)}")
        hints = typing.get_type_hints(Any2PointConfig)
        self.overrides = {k: _coerce(v, hints[k], f"model.{k}") for k, v in self.overrides.items() if v is not None}
        if self.backbone == STAND_IN and self.backbone_config:
            raise ConfigError(f"model.backbone_config {self.backbone_config} changes a Hugging Face backbone's "
                              "config; the stand-in has none (use model.layers/heads/hidden_size, or "
                              "--set model.backbone_config={} to drop it)")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelSettings:
        if not isinstance(data, dict):
            raise ConfigError(f"model: expected a mapping, got {data!r}")
        own = {k: v for k, v in data.items() if k in _MODEL_KEYS}
        if own.get("backbone_config", {}) is None:
            own["backbone_config"] = {}
        overrides = {**data.get("overrides", {}), **{k: v for k, v in data.items() if k not in _MODEL_KEYS}}
        return _from_mapping(cls, {**own, "overrides": overrides}, "model")

    def to_dict(self) -> dict[str, Any]:
        """The section as written in a recipe: the keys of this kind of backbone, then the overrides."""
        skip = {"overrides", *(_HF_ONLY_KEYS if self.backbone == STAND_IN else _STAND_IN_ONLY_KEYS)}
        own = {k: v for k, v in dataclasses.asdict(self).items() if k not in skip}
        return _jsonable({**own, **self.overrides})


_STAND_IN_ONLY_KEYS = ("layers", "heads", "backbone_seed")
_HF_ONLY_KEYS = ("backbone_config",)
_MODEL_KEYS = {"backbone", "preset", "task", *_STAND_IN_ONLY_KEYS, *_HF_ONLY_KEYS}

# data.augment "auto": the recipe of recipe_transforms() each dataset trains with.
_AUGMENT_RECIPES = {
    "synthetic": "scanobjectnn",  # random pose about the gravity axis, like ScanObjectNN
    "scanobjectnn": "scanobjectnn",
    "modelnet40_h5": "modelnet40",
    "modelnet40_resampled": "modelnet40",
    "folder": "modelnet40",
}


@dataclass
class DataSettings:
    """Which data: ``dataset`` (a name of ``any2point_fast.data.DATASETS``) under ``root``.

    ``num_points`` per cloud; ``augment``: "auto" (the paper's recipe for the dataset),
    "scanobjectnn" or "modelnet40" (that recipe), or "none" (first points, normalised);
    ``cache``: keep the raw clouds in memory after the first read (per process/worker);
    ``options``: constructor options of both splits (``variant`` of ScanObjectNN, ``seed`` of
    the synthetic set, ...), ``train_options`` / ``test_options`` of one split only
    (``num_samples`` of the synthetic set).

    Splits: ``train_split`` / ``test_split`` are split names (``<root>/<class>/<split>/`` for the
    folder dataset). ``test_split: null`` holds out a seeded stratified ``test_ratio`` of each
    class of the train split as the test set (never trained on); the folder dataset does so by
    itself when its class folders have no ``<train_split>/`` subfolder (a flat
    ``<root>/<class>/*`` layout, also selected by ``train_split: null``).
    ``limit_per_class``: train on at most that many seeded random clouds per class (null: all).
    ``split_seed`` seeds both selections (not ``train.seed``: runs of several seeds share them).
    """

    dataset: str = "synthetic"
    root: str | None = None
    num_points: int = 1024
    augment: str = "auto"
    cache: bool = False
    train_split: str | None = "train"
    test_split: str | None = "test"
    test_ratio: float = 0.2
    split_seed: int = 0
    limit_per_class: int | None = None
    options: dict[str, Any] = field(default_factory=dict)
    train_options: dict[str, Any] = field(default_factory=dict)
    test_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.num_points < 1:
            raise ConfigError(f"data.num_points must be >= 1, got {self.num_points}")
        if not 0 < self.test_ratio < 1:
            raise ConfigError(f"data.test_ratio must be in (0, 1), got {self.test_ratio}")
        if self.limit_per_class is not None and self.limit_per_class < 1:
            raise ConfigError(f"data.limit_per_class must be >= 1 or null (all), got {self.limit_per_class}")
        if self.train_split is None and self.dataset != "folder":
            raise ConfigError(f"data.train_split: null (a flat folder) is for the folder dataset; "
                              f"dataset {self.dataset!r} needs a split name")
        if self.test_split is None and self.test_options:
            raise ConfigError("data.test_options cannot apply: with data.test_split null the test set is "
                              "held out of the train split (use data.options or data.train_options)")
        if self.augment not in ("auto", "none", "scanobjectnn", "modelnet40"):
            raise ConfigError(f"data.augment must be 'auto', 'none', 'scanobjectnn' or 'modelnet40', "
                              f"got {self.augment!r}")


@dataclass
class RunConfig:
    """A whole run: ``model``, ``data`` and ``train`` sections (what a recipe YAML file holds)."""

    model: ModelSettings = field(default_factory=ModelSettings)
    data: DataSettings = field(default_factory=DataSettings)
    train: TrainConfig = field(default_factory=TrainConfig)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        """From the nested mapping of a YAML file; missing keys take their defaults, unknown ones fail."""
        data = data or {}
        if not isinstance(data, dict):
            raise ConfigError(f"a run config is a mapping with sections model, data, train; got {data!r}")
        unknown = sorted(set(data) - {"model", "data", "train"})
        if unknown:
            raise ConfigError(f"unknown config sections {unknown}; expected model, data, train")
        return cls(
            model=ModelSettings.from_dict(data.get("model") or {}),
            data=_from_mapping(DataSettings, data.get("data") or {}, "data"),
            train=_from_mapping(TrainConfig, data.get("train") or {}, "train"),
        )

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model.to_dict(), "data": _jsonable(dataclasses.asdict(self.data)),
                "train": _jsonable(dataclasses.asdict(self.train))}

    def with_overrides(self, assignments: list[str]) -> RunConfig:
        """A copy with ``section.key=value`` assignments applied (values parsed as YAML)."""
        return RunConfig.from_dict(apply_overrides(self.to_dict(), assignments))


def recipe_keys() -> dict[str, list[str]]:
    """Every key a recipe (or ``--set``) may give, by section, as ``section.key=default``.

    Read from the dataclasses, so the list cannot drift from them. A key with a fixed set of
    values shows it (``train.precision=fp32 {fp32|bf16|fp16}``). The model section lists its own
    keys, then every :class:`Any2PointConfig` field without a default (the preset gives them).
    """
    def entries(cls: type, section: str, skip: tuple[str, ...] = ()) -> list[str]:
        hints = typing.get_type_hints(cls)
        out = []
        for f in dataclasses.fields(cls):
            if f.name in skip:
                continue
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            choices = typing.get_args(hints[f.name]) if typing.get_origin(hints[f.name]) is Literal else ()
            out.append(f"{section}.{f.name}={_yaml_text(default)}" + (f" {{{'|'.join(choices)}}}" if choices else ""))
        return out

    model_fields = [f"model.{f.name}" for f in dataclasses.fields(Any2PointConfig)]
    return {"model": entries(ModelSettings, "model", ("overrides",)) + model_fields,
            "data": entries(DataSettings, "data"), "train": entries(TrainConfig, "train")}


def _yaml_text(value: Any) -> str:
    """``value`` as it is written in YAML or ``--set`` (``null``, ``true``, ``[0.9, 0.999]``, ``{}``)."""
    return value if isinstance(value, str) else json.dumps(_jsonable(value), separators=(",", ":"))


def parse_value(text: str) -> Any:
    """A ``--set`` value: YAML scalars/lists (``16``, ``1e-3``, ``true``, ``null``, ``[1, 2]``), else the text."""
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(data: dict[str, Any], assignments: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` assignments to a nested mapping (a copy), creating sub-mappings as needed."""
    data = json.loads(json.dumps(data))
    for assignment in assignments:
        key, sep, text = assignment.partition("=")
        parts = key.strip().split(".")
        if not sep or len(parts) < 2 or not all(parts):
            raise ConfigError(f"bad override {assignment!r}: expected section.key=value, e.g. train.lr=1e-3")
        node = data
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"bad override {assignment!r}: {part} is not a section")
            node = child
        node[parts[-1]] = parse_value(text)
    return data


def model_config(run: RunConfig, num_classes: int) -> Any2PointConfig:
    """The :class:`Any2PointConfig` of the stand-in model: preset + overrides + data-derived fields."""
    overrides = dict(run.model.overrides)
    for name, value in (("num_points", run.data.num_points), ("num_classes", num_classes)):
        if overrides.setdefault(name, value) != value:
            raise ConfigError(f"model.{name}={overrides[name]} contradicts the data ({name} = {value})")
    return Any2PointConfig.preset(run.model.preset, **overrides)


# ================================================================================================ model
def build_model(run: RunConfig, num_classes: int, num_parts: int | None = None) -> nn.Module:
    """The model of ``run``: the one place models are built. A classifier (points ``[B, P, 3]`` →
    logits), or with ``model.task: partseg`` a :class:`~any2point_fast.segmentation.PartSegmentationModel`
    of ``num_classes`` categories and ``num_parts`` parts on the same encoder."""
    model = _build_classifier(run, num_classes)
    if run.model.task == "partseg":
        from .segmentation import PartSegmentationModel

        return PartSegmentationModel(model, num_classes, num_parts, hidden=model.config.head_hidden,
                                     dropout=model.config.head_dropout)
    return model


def _build_classifier(run: RunConfig, num_classes: int) -> nn.Module:
    spec = run.model
    if spec.backbone == STAND_IN:
        config = model_config(run, num_classes)
        from .model import StandInModel

        return StandInModel(config, num_layers=spec.layers, num_heads=spec.heads, seed=spec.backbone_seed)
    # ---- Hugging Face backbones: the single place they are built -------------------------------------
    try:
        from .model import Any2PointModel
    except ImportError as error:
        raise RuntimeError(f"HF backbones need any2point_fast.model (backbone {spec.backbone!r}): {error}") from error
    overrides = dict(spec.overrides)
    overrides.setdefault("num_points", run.data.num_points)
    loading = {"config": backbone_hf_config(spec.backbone, spec.backbone_config)} if spec.backbone_config else {}
    return Any2PointModel.from_pretrained(spec.backbone, num_classes=num_classes, config=spec.preset,
                                          backbone_kwargs=loading, **overrides)


def describe_projection(model: nn.Module) -> str | None:
    """One line on what the built model's virtual projection uses (None for a model without one).

    1D: the PE table the lines are mapped onto and the positions they span; 2D: the PE grid laid
    over the canvas. Read from the model's config and PE table, as the forward pass uses them.
    """
    config, table = getattr(model, "config", None), getattr(model, "pe_table", None)
    if not isinstance(config, Any2PointConfig) or table is None:
        return None
    if config.pe_kind == "1d":
        length = table.shape[0]
        return (f"projection: 1D, {config.num_views} lines through the cloud, each mapped onto positions "
                f"0..{length - 1} of a {length}-row PE table (model.pe_length {config.pe_length}); segments of "
                f"{config.segment_length:g} positions, {config.buckets_per_view} buckets per line")
    rows, cols = table.shape[:2]
    height, width = config.canvas_size
    return (f"projection: 2D, {config.num_views} views onto a {height}x{width} (HxW) canvas over a {rows}x{cols} "
            f"PE grid (model.pe_grid), camera distance {config.camera_distance:g}; patches of "
            f"{config.patch_size} px, {config.buckets_per_view} buckets per view")


def backbone_hf_config(name: str, changes: dict[str, Any]) -> Any:
    """The Hugging Face config of backbone ``name`` with ``changes`` (``model.backbone_config``) applied."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(name)
    _change_config(config, changes, "model.backbone_config")
    return config


def _change_config(config: Any, changes: dict[str, Any], where: str) -> None:
    """Set ``changes`` on an HF config; a mapping value changes the sub-config of that name."""
    from transformers import PretrainedConfig

    keys = set(config.to_dict()) | set(getattr(config, "attribute_map", {}))
    for key, value in changes.items():
        if key not in keys:
            public = sorted(k for k in keys if not k.startswith("_"))
            raise ConfigError(f"{where}.{key}: the backbone's {type(config).__name__} has no key {key!r}; "
                              f"its keys: {', '.join(public)}")
        current = getattr(config, key)
        if isinstance(current, PretrainedConfig):
            if not isinstance(value, dict):
                raise ConfigError(f"{where}.{key}: a sub-config, expected a mapping of its keys, got {value!r}")
            _change_config(current, value, f"{where}.{key}")
            continue
        numeric = isinstance(current, (int, float)) and not isinstance(current, bool)
        if numeric and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ConfigError(f"{where}.{key}: expected a number like the backbone's {current!r}, got {value!r}")
        setattr(config, key, value)


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """What a checkpoint stores of ``model``: trainable parameters and BatchNorm buffers (detached)."""
    model = _unwrap(model)
    names = {name for name, p in model.named_parameters() if p.requires_grad}
    for module_name, module in model.named_modules():
        if isinstance(module, _BatchNorm):
            names.update(f"{module_name}.{b}".lstrip(".") for b, _ in module.named_buffers(recurse=False))
    state = model.state_dict(keep_vars=False)
    return {name: state[name].detach() for name in sorted(names)}


def load_trainable_state(model: nn.Module, tensors: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Load :func:`trainable_state` tensors into ``model``; keys must match exactly."""
    model = _unwrap(model)
    expected = set(trainable_state(model))
    missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if missing or unexpected:
        raise CheckpointError(f"{source}: does not match the model (missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}); was it trained with another model config?")
    model.load_state_dict(tensors, strict=False)


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


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


# ================================================================================================= data
def _mix(*parts: Any) -> int:
    """A 63-bit seed derived from ``parts`` (stable across processes and Python versions)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


class EpochItems(CachedItems):
    """A dataset addressed by ``(epoch, index)``: the augmentation of an item depends on nothing else.

    The raw clouds come from ``base`` (built without transform); ``transform`` draws from one
    generator, reseeded from ``(seed, epoch, index)`` before each item, so items are identical in
    any worker, in any order, before and after a resume.
    """

    def __init__(self, base: Dataset, transform: Callable[[torch.Tensor], torch.Tensor], generator: torch.Generator,
                 seed: int, cache: bool = False):
        super().__init__(base, cache)
        self.transform, self.generator, self.seed = transform, generator, seed
        self.classes = list(base.classes)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        points, label = self._raw(index)
        self.generator.manual_seed(_mix(self.seed, epoch, index))
        return self.transform(points), label


def build_datasets(data: DataSettings, seed: int = 0, log: Callable[[str], None] | None = None,
                   task: str = "classification") -> tuple[EpochItems, EpochItems] | tuple[PartItems, PartItems]:
    """The train and test sets of ``data``: ``(points [P, 3], label)`` items with the recipe's transforms
    (``task="partseg"``: ``(points, category, parts [P])`` items, see :class:`~any2point_fast.partseg.PartItems`).

    ``log`` receives one line per selection made (a held-out test set, a training subset).
    """
    if task == "partseg":
        return build_part_items(data.dataset, data.root, (data.train_split, data.test_split), data.num_points,
                                ({**data.options, **data.train_options}, {**data.options, **data.test_options}),
                                seed, _mix, data.cache, data.test_ratio, data.split_seed)
    from .data import build_train_test
    from .data.transforms import Compose, NormalizeUnitSphere, Resample, recipe_transforms

    if data.dataset != "synthetic" and not data.root:
        raise ConfigError(f"dataset {data.dataset!r} needs its folder: --set data.root=/path/to/data")
    recipe = _AUGMENT_RECIPES.get(data.dataset, "modelnet40") if data.augment == "auto" else data.augment
    # Generated sets are made at the target size; file sets keep every point for random subsets.
    raw_points = data.num_points if data.dataset == "synthetic" else None
    sets = build_train_test(
        data.dataset, data.root, data.train_split, data.test_split, raw_points, options=data.options,
        train_options=data.train_options, test_options=data.test_options, test_ratio=data.test_ratio,
        split_seed=data.split_seed, limit_per_class=data.limit_per_class,
    )
    for note in sets.notes if log is not None else ():
        log(f"data: {note}")
    items = []
    for base, split, train in ((sets.train, data.train_split or "train", True),
                               (sets.test, data.test_split or "test", False)):
        generator = torch.Generator()
        if recipe == "none" or not train:
            transform = Compose([Resample(data.num_points, mode="first"), NormalizeUnitSphere()])
        else:
            transform = recipe_transforms(recipe, train=True, num_points=data.num_points, generator=generator)
        items.append(EpochItems(base, transform, generator, seed=_mix(seed, split), cache=data.cache))
    return items[0], items[1]


def _seed_worker(worker_id: int) -> None:
    """Seed a DataLoader worker's NumPy and ``random`` from its torch seed (drawn from the loader's generator)."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def _loader(items: EpochItems, keys: list, batch_size: int, workers: int, seed: int, drop_last: bool,
            pin: bool) -> DataLoader:
    generator = torch.Generator()
    generator.manual_seed(seed)
    return DataLoader(items, batch_size=batch_size, sampler=keys, drop_last=drop_last, num_workers=workers,
                      worker_init_fn=_seed_worker, generator=generator, pin_memory=pin)


# ========================================================================================= distributed
@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None
    owns_group: bool = False

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_pref: str = "auto") -> DistInfo:
    """Join the torchrun process group when ``WORLD_SIZE > 1`` (NCCL with CUDA, gloo otherwise)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device_pref in ("auto", "cuda")
    owns = False
    if not dist.is_initialized():
        if use_cuda:
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if use_cuda else "gloo", init_method="env://")
        owns = True
    return DistInfo(dist.get_rank(), dist.get_world_size(), local, dist.get_backend(), owns)


def _device(pref: str, info: DistInfo) -> torch.device:
    if pref == "auto":
        pref = "cuda" if torch.cuda.is_available() else "cpu"
    if pref == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("train.device='cuda' but CUDA is not available")
        return torch.device("cuda", info.local_rank)
    return torch.device(pref)


def _all_reduce(values: list[float], info: DistInfo, device: torch.device) -> list[float]:
    if not info.distributed:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


@contextlib.contextmanager
def _runtime(cfg: TrainConfig, device: torch.device) -> Iterator[None]:
    """Process-wide settings for the run (backend, threads, determinism), restored afterwards."""
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark, torch.get_num_threads())
    try:
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        if cfg.deterministic:
            if device.type == "cuda":
                os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True, warn_only=False)
            torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
        with ops.use_backend(cfg.backend):
            yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[2], saved[3]
        torch.set_num_threads(saved[4])


# =========================================================================================== evaluation
@torch.no_grad()
def evaluate(model: nn.Module, items: EpochItems, num_classes: int, batch_size: int, device: torch.device,
             precision: str = "fp32", info: DistInfo | None = None, num_workers: int = 0,
             votes: int = 1) -> dict[str, float]:
    """Overall accuracy, mean-class accuracy and loss of ``model`` on ``items`` (sharded over ranks);
    on :class:`~any2point_fast.partseg.PartItems` the metrics of :func:`~any2point_fast.partseg.evaluate_parts`.
    ``votes > 1``: classification logits averaged over that many augmented passes (:mod:`~any2point_fast.voting`,
    seeded: the same votes every time)."""
    info = info or DistInfo()
    model = _unwrap(model)
    was_training = model.training
    model.eval()
    correct = torch.zeros(num_classes, dtype=torch.float64)
    total = torch.zeros(num_classes, dtype=torch.float64)
    loss_sum = 0.0
    keys = list(range(info.rank, len(items), info.world_size))
    loader = _loader(items, keys, batch_size, num_workers, 0, drop_last=False, pin=device.type == "cuda")
    if isinstance(items, PartItems):
        def shares(scores) -> None:
            if info.distributed:
                gathered = [None] * info.world_size
                dist.all_gather_object(gathered, scores.shape_ious)
                scores.shape_ious = [sum((g[c] for g in gathered), []) for c in range(len(scores.shape_ious))]

        metrics = evaluate_parts(model, loader, items, device, lambda: _autocast(device, precision), shares)
        model.train(was_training)
        return metrics
    vote_generator = torch.Generator().manual_seed(_mix("votes", info.rank))
    for points, labels in loader:
        points, labels = points.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with _autocast(device, precision):
            logits = model(points) if votes == 1 else vote_logits(model, points, votes, vote_generator)
        loss_sum += F.cross_entropy(logits.float(), labels, reduction="sum").item()
        hits = (logits.argmax(dim=1) == labels).double().cpu()
        labels = labels.cpu()
        correct.index_add_(0, labels, hits)
        total.index_add_(0, labels, torch.ones_like(hits))
    model.train(was_training)
    stats = _all_reduce([*correct.tolist(), *total.tolist(), loss_sum], info, device)
    correct, total = torch.tensor(stats[:num_classes]), torch.tensor(stats[num_classes:2 * num_classes])
    seen = total > 0
    count = float(total.sum())
    return {
        "acc": float(correct.sum() / max(count, 1.0)),
        "mean_class_acc": float((correct[seen] / total[seen]).mean()) if seen.any() else 0.0,
        "loss": stats[-1] / max(count, 1.0),
        "samples": count,
    }


def _autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def format_accuracy(acc: float) -> str:
    """The final line of a classification run and of ``eval``: ``test accuracy: 93.4%``."""
    return format_result({"acc": acc})


def load_run_config(path: str | Path) -> RunConfig:
    """The run config stored in a checkpoint (a checkpoint directory or a run directory)."""
    return RunConfig.from_dict(read_manifest(path)["run_config"])


def evaluate_checkpoint(path: str | Path, overrides: list[str] | None = None, votes: int = 1) -> dict[str, float]:
    """Rebuild the model of a checkpoint, load its weights and evaluate it on its test split
    (classification: with ``votes`` augmented passes averaged)."""
    run = load_run_config(path).with_overrides(overrides or [])
    checkpoint = load_checkpoint(path, with_state=False)
    info = DistInfo()
    device = _device(run.train.device, info)
    with _runtime(run.train, device):
        _, test_set = build_datasets(run.data, run.train.seed, task=run.model.task)
        num_classes = len(test_set.classes)
        torch.manual_seed(run.train.seed)
        model = build_model(run, num_classes, getattr(test_set, "num_parts", None))
        load_trainable_state(model, checkpoint.model, str(checkpoint.path))
        model.to(device)
        metrics = evaluate(model, test_set, num_classes, run.train.eval_batch_size or run.train.batch_size, device,
                           run.train.precision, info, run.train.num_workers, votes)
    return {**metrics, "epoch": checkpoint.manifest.get("epoch"), "step": checkpoint.manifest.get("step")}


# ============================================================================================= training
@dataclass
class TrainResult:
    """What :func:`train` returns (on every rank)."""

    output_dir: Path
    model: nn.Module
    epoch: int
    step: int
    stopped: bool
    final: dict[str, float] | None
    best_acc: float
    best_epoch: int
    elapsed_s: float


@dataclass
class _Progress:
    """Counters saved in checkpoints: where the run is and what the current epoch has seen."""

    epoch: int = 0  # epochs completed
    batch_in_epoch: int = 0  # micro-batches of epoch `epoch` already trained
    step: int = 0  # optimizer steps done
    loss_sum: float = 0.0
    correct: float = 0.0
    seen: float = 0.0
    best_acc: float = -1.0  # of the primary metric: accuracy, or instance mIoU (partseg)
    best_epoch: int = 0
    elapsed_s: float = 0.0


def _resolve_output(output_dir: str | Path | None, info: DistInfo) -> Path:
    """``output_dir``, or ``runs/<timestamp>`` chosen by rank 0 and shared with the others."""
    if output_dir is None:
        chosen = [time.strftime("runs/%Y%m%d-%H%M%S")]
        if info.distributed:
            dist.broadcast_object_list(chosen, src=0)
        output_dir = chosen[0]
    return Path(output_dir)


def _read_metrics(path: Path, upto_epoch: int) -> list[str]:
    """The epoch lines of ``metrics.jsonl`` for epochs ``<= upto_epoch`` (what a resumed run keeps)."""
    if not path.is_file():
        return []
    kept = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            record = json.loads(line)
            if record.get("type") == "epoch" and record.get("epoch", math.inf) <= upto_epoch:
                kept.append(line)
    return kept


def train(run: RunConfig, output_dir: str | Path | None = None, resume: str | Path | None = None, *,
          log: Callable[[str], None] = print, on_step: Callable[[int, float], None] | None = None,
          datasets: tuple[Dataset, Dataset] | None = None) -> TrainResult:
    """Train ``run``; write ``config.yaml``, ``metrics.jsonl`` and checkpoints under ``output_dir``.

    Args:
        run: the run's config.
        output_dir: where everything goes (default ``runs/<timestamp>``).
        resume: a checkpoint (or run) directory to continue from; the weights, optimizer,
            scheduler, scaler, RNG states, data position and metrics so far are restored.
        log: receives the human-readable lines (rank 0 only).
        on_step: called after every optimizer step with ``(step, loss of that step)`` on every rank.
        datasets: ``(train, test)`` sets addressed like :class:`EpochItems` to use instead of the
            ``data`` section's (the few-shot episodes).

    Returns:
        A :class:`TrainResult`; ``final`` holds the last evaluation (None when stopped early).
    """
    cfg = run.train
    info = init_distributed(cfg.device)
    say = log if info.is_main else (lambda _line: None)
    try:
        device = _device(cfg.device, info)
        if cfg.precision == "fp16" and device.type != "cuda":
            raise ConfigError("train.precision='fp16' needs CUDA; use 'bf16' or 'fp32' on CPU")
        with _runtime(cfg, device):
            return _train(run, info, device, _resolve_output(output_dir, info), resume, say, on_step, datasets)
    finally:
        if info.owns_group:
            dist.destroy_process_group()


def _train(run: RunConfig, info: DistInfo, device: torch.device, out: Path, resume: str | Path | None,
           say: Callable[[str], None], on_step: Callable[[int, float], None] | None,
           datasets: tuple[Dataset, Dataset] | None = None) -> TrainResult:
    cfg = run.train
    checkpoint = load_checkpoint(resume) if resume is not None else None

    # ---- data and model (seeded: every rank builds the same initial weights) ----
    random.seed(cfg.seed)
    np.random.seed(cfg.seed % 2**32)
    torch.manual_seed(cfg.seed)
    train_set, test_set = datasets or build_datasets(run.data, cfg.seed, say, run.model.task)
    if cfg.num_workers:  # workers are started every epoch: give them a filled cache to copy
        train_set.preload()
        test_set.preload()
    num_classes = len(train_set.classes)
    per_rank = math.ceil(len(train_set) / info.world_size)
    micro_per_epoch = per_rank // cfg.batch_size
    if micro_per_epoch < 1:
        raise ConfigError(f"the training set ({len(train_set)} items over {info.world_size} process(es)) "
                          f"is smaller than one batch ({cfg.batch_size})")
    steps_per_epoch = math.ceil(micro_per_epoch / cfg.grad_accum_steps)
    total_steps = cfg.epochs * steps_per_epoch
    warmup_steps = round(cfg.warmup_epochs * steps_per_epoch)

    model = build_model(run, num_classes, getattr(train_set, "num_parts", None))
    if checkpoint is not None:
        load_trainable_state(model, checkpoint.model, str(checkpoint.path))
    sync_bn = info.distributed and info.backend == "nccl" and cfg.sync_batchnorm
    if sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_train, n_all = sum(p.numel() for p in trainable), sum(p.numel() for p in model.parameters())
    net: nn.Module = model
    if info.distributed:
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=cfg.find_unused_parameters,
        )

    optimizer = torch.optim.AdamW(parameter_groups(model, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, warmup_steps, total_steps, cfg.min_lr / cfg.lr)
    )
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)

    progress = _Progress()
    if checkpoint is not None:
        manifest = checkpoint.manifest
        optimizer.load_state_dict(unflatten_optimizer_state(manifest["optimizer"], checkpoint.state))
        scheduler.load_state_dict(manifest["scheduler"])
        if manifest.get("scaler"):
            scaler.load_state_dict(manifest["scaler"])
        progress = _Progress(**manifest["progress"])
        if manifest.get("world_size") == info.world_size:
            rank_tensors = {k.split(".", 1)[1]: v for k, v in checkpoint.state.items()
                            if k.startswith(f"rank{info.rank}.")}
            restore_rng_state(rank_tensors, manifest["rng"][info.rank], device)
        else:
            warnings.warn(f"resuming a {manifest.get('world_size')}-process run with {info.world_size} "
                          "processes: data order and RNG streams differ from the original run", stacklevel=2)

    checkpoints_dir = out / "checkpoints"
    metrics_path = out / METRICS_FILE
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(out, checkpoints_dir)
        _write_config(out / CONFIG_FILE, run)
        kept = []
        if checkpoint is not None:  # the metrics of the epochs the checkpoint has seen, from its own run
            kept = _read_metrics(find_run_dir(checkpoint.path) / METRICS_FILE, progress.epoch)
        atomic_write_bytes(metrics_path, "".join(line + "\n" for line in kept).encode())
        say(f"output: {out}")
        say(f"model: {run.model.backbone}, {num_classes} classes; trainable params: {n_train:,} || "
            f"all params: {n_all:,} || trainable%: {100 * n_train / max(n_all, 1):.2f}")
        projection = describe_projection(model)
        if projection is not None:
            say(projection)
        say(f"data: {run.data.dataset}, {len(train_set)} train / {len(test_set)} test clouds of "
            f"{run.data.num_points} points; {steps_per_epoch} steps/epoch, {cfg.epochs} epochs")
        say(f"device: {device} x {info.world_size} process(es)"
            + (f" ({info.backend}; BatchNorm {'synchronised' if sync_bn else 'per process'})"
               if info.distributed else "")
            + f", precision {cfg.precision}, ops backend {cfg.backend}"
            + (", deterministic" if cfg.deterministic else ""))
        if checkpoint is not None:
            say(f"resumed from {checkpoint.path} (epoch {progress.epoch}, step {progress.step})")

    def save(best: bool) -> None:
        rng_tensors, rng_json = capture_rng_state(device)
        gathered = [(rng_tensors, rng_json)]
        if info.distributed:
            gathered = [None] * info.world_size
            dist.all_gather_object(gathered, ({k: v.cpu() for k, v in rng_tensors.items()}, rng_json))
        if not info.is_main:
            return
        opt_tensors, opt_structure = flatten_optimizer_state(optimizer.state_dict())
        state = dict(opt_tensors)
        for rank, (tensors, _) in enumerate(gathered):
            state.update({f"rank{rank}.{k}": v for k, v in tensors.items()})
        manifest = {
            "epoch": progress.epoch, "step": progress.step, "world_size": info.world_size,
            "progress": dataclasses.asdict(progress), "run_config": run.to_dict(),
            "optimizer": opt_structure, "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler.is_enabled() else None,
            "rng": [structure for _, structure in gathered],
            "versions": {"any2point_fast": __version__, "torch": torch.__version__},
        }
        name = f"step-{progress.step:08d}-epoch-{progress.epoch:04d}"
        if progress.batch_in_epoch:
            name += f"-batch-{progress.batch_in_epoch:06d}"
        directory = save_checkpoint(checkpoints_dir, name, trainable_state(model), state, manifest)
        point(out, "latest", directory)
        if best:
            point(out, "best", directory)
        prune_checkpoints(out, checkpoints_dir, cfg.keep_checkpoints)

    eval_batch = cfg.eval_batch_size or cfg.batch_size
    last_eval: dict[str, float] | None = None
    started = time.perf_counter() - progress.elapsed_s
    show_bar = cfg.progress and info.is_main and sys.stderr.isatty()
    lines = _ProgressLines(say, cfg.progress_every_steps, cfg.progress_every_s,
                           enabled=cfg.progress and info.is_main and not sys.stdout.isatty())

    while progress.epoch < cfg.epochs:
        epoch = progress.epoch
        if progress.batch_in_epoch == 0:  # fresh epoch: its RNG stream is a function of (seed, epoch, rank)
            torch.manual_seed(_mix(cfg.seed, "epoch", epoch, info.rank))
            progress.loss_sum = progress.correct = progress.seen = 0.0
        sampler = DistributedSampler(train_set, num_replicas=info.world_size, rank=info.rank, shuffle=True,
                                     seed=cfg.seed, drop_last=False)
        sampler.set_epoch(epoch)
        order = list(sampler)[: micro_per_epoch * cfg.batch_size]
        skip = progress.batch_in_epoch * cfg.batch_size
        keys = [(epoch, index) for index in order[skip:]]
        loader = _loader(train_set, keys, cfg.batch_size, cfg.num_workers, _mix(cfg.seed, "loader", epoch, info.rank),
                         drop_last=True, pin=device.type == "cuda")
        net.train()
        epoch_start, epoch_samples, saving_s = time.perf_counter(), 0, 0.0
        lines.start()
        bar = _bar(show_bar, micro_per_epoch, progress.batch_in_epoch, f"epoch {epoch + 1}/{cfg.epochs}")
        stop = False
        group_loss = 0.0
        for points, *targets in loader:
            b = progress.batch_in_epoch
            group_start = b - b % cfg.grad_accum_steps
            group_size = min(cfg.grad_accum_steps, micro_per_epoch - group_start)
            closes_group = b + 1 == group_start + group_size
            points = points.to(device, non_blocking=True)
            targets = [t.to(device, non_blocking=True) for t in targets]
            sync = contextlib.nullcontext() if closes_group or not info.distributed else net.no_sync()
            with sync:
                with _autocast(device, cfg.precision):
                    logits, labels = model_outputs(net, points, targets)  # per cloud, or per point (partseg)
                    loss = criterion(logits.float(), labels)
                scaler.scale(loss / group_size).backward()
            loss_value = loss.item()
            group_loss += loss_value / group_size
            progress.loss_sum += loss_value * len(labels)
            progress.correct += (logits.argmax(dim=1) == labels).sum().item()
            progress.seen += len(labels)
            progress.batch_in_epoch += 1
            epoch_samples += len(points) * info.world_size
            if closes_group:
                if cfg.grad_clip:
                    scaler.unscale_(optimizer)
                    nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                progress.step += 1
                if on_step is not None:
                    on_step(progress.step, group_loss)
                group_loss = 0.0
            rate = epoch_samples / max(time.perf_counter() - epoch_start - saving_s, 1e-9)
            step_in_epoch = math.ceil(progress.batch_in_epoch / cfg.grad_accum_steps)
            if closes_group and step_in_epoch < steps_per_epoch:  # the epoch's own line follows its last step
                lines.after_step(f"epoch {epoch + 1}/{cfg.epochs} step {step_in_epoch}/{steps_per_epoch}",
                                 step_in_epoch, progress.loss_sum / progress.seen, progress.correct / progress.seen,
                                 rate)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss_value:.3f}", acc=f"{progress.correct / progress.seen:.1%}",
                                samples_s=f"{rate:.0f}", refresh=False)
            if closes_group and progress.batch_in_epoch < micro_per_epoch:
                stop = cfg.stop_after_steps is not None and progress.step >= cfg.stop_after_steps
                if stop or (cfg.save_every_steps and progress.step % cfg.save_every_steps == 0):
                    progress.elapsed_s = time.perf_counter() - started
                    save_start = time.perf_counter()
                    save(best=False)
                    saving_s += time.perf_counter() - save_start
                if stop:
                    break
        if bar is not None:
            bar.close()
        if stop:
            say(f"stopped after step {progress.step} (train.stop_after_steps); resume with --resume {out}")
            return _result(out, model, progress, False, None, stopped=True)

        # ---- end of epoch: metrics, evaluation, checkpoint ----
        if info.distributed:  # one set of BatchNorm running statistics: rank 0's (what is saved)
            for buffer in model.buffers():
                dist.broadcast(buffer, src=0)
        train_stats = _all_reduce([progress.loss_sum, progress.correct, progress.seen], info, device)
        progress.epoch, progress.batch_in_epoch = epoch + 1, 0
        train_s = time.perf_counter() - epoch_start - saving_s
        record: dict[str, Any] = {
            "type": "epoch", "epoch": progress.epoch, "step": progress.step,
            "lr": optimizer.param_groups[0]["lr"],
            "train_loss": train_stats[0] / max(train_stats[2], 1), "train_acc": train_stats[1] / max(train_stats[2], 1),
            "epoch_time_s": train_s, "samples_per_s": epoch_samples / max(train_s, 1e-9),
        }
        is_best = False
        if progress.epoch % cfg.eval_every == 0 or progress.epoch == cfg.epochs:
            eval_start = time.perf_counter()
            last_eval = evaluate(net, test_set, num_classes, eval_batch, device, cfg.precision, info, cfg.num_workers)
            record["eval_time_s"] = time.perf_counter() - eval_start
            record.update({f"test_{k}": v for k, v in last_eval.items() if k in _RECORDED})
            if primary_metric(last_eval) > progress.best_acc:
                progress.best_acc, progress.best_epoch, is_best = primary_metric(last_eval), progress.epoch, True
            record.update(best_test_acc=progress.best_acc, best_epoch=progress.best_epoch)
        progress.elapsed_s = time.perf_counter() - started
        record["elapsed_s"] = progress.elapsed_s
        save_start = time.perf_counter()
        save(best=is_best)
        record["checkpoint_time_s"] = saving_s + time.perf_counter() - save_start
        if info.is_main:
            _append_line(metrics_path, record)
            line = (f"epoch {progress.epoch}/{cfg.epochs}  loss {record['train_loss']:.4f}  "
                    f"train acc {100 * record['train_acc']:.1f}%")
            if "eval_time_s" in record:
                line += "  " + describe_test(last_eval)
            say(line + f"  lr {record['lr']:.2e}  {record['samples_per_s']:.0f} samples/s  " + _epoch_seconds(record))
        stop_epoch = cfg.stop_after_epoch is not None and progress.epoch >= cfg.stop_after_epoch
        stop_step = cfg.stop_after_steps is not None and progress.step >= cfg.stop_after_steps
        if (stop_epoch or stop_step) and progress.epoch < cfg.epochs:
            say(f"stopped after epoch {progress.epoch} (train.stop_after_*); resume with --resume {out}")
            return _result(out, model, progress, False, None, stopped=True)

    if last_eval is None:  # resumed a finished run: evaluate the final weights again
        last_eval = evaluate(net, test_set, num_classes, eval_batch, device, cfg.precision, info, cfg.num_workers)
    if info.is_main:
        _append_line(metrics_path, {
            "type": "final", "epoch": progress.epoch, "step": progress.step,
            **{f"test_{k}": v for k, v in last_eval.items() if k in _RECORDED}, "best_test_acc": progress.best_acc,
            "best_epoch": progress.best_epoch, "elapsed_s": progress.elapsed_s,
        })
        if "table" in last_eval:
            say(last_eval["table"])
        say(f"best test {'instance mIoU' if 'instance_miou' in last_eval else 'accuracy'} "
            f"{100 * progress.best_acc:.1f}% at epoch {progress.best_epoch}; "
            f"final checkpoint {out / 'latest'}; {progress.elapsed_s:.0f} s")
    return _result(out, model, progress, True, last_eval, stopped=False)


def _result(out: Path, model: nn.Module, progress: _Progress, finished: bool, final: dict | None,
            stopped: bool) -> TrainResult:
    return TrainResult(out, model, progress.epoch, progress.step, stopped, final if finished else None,
                       progress.best_acc, progress.best_epoch, progress.elapsed_s)


def _epoch_seconds(record: dict[str, Any]) -> str:
    """``train 41.2 s, eval 12.0 s, checkpoint 0.3 s``: where an epoch's time went (eval when it ran)."""
    parts = [f"train {record['epoch_time_s']:.1f} s"]
    if "eval_time_s" in record:
        parts.append(f"eval {record['eval_time_s']:.1f} s")
    parts.append(f"checkpoint {record['checkpoint_time_s']:.1f} s")
    return ", ".join(parts)


class _ProgressLines:
    """Progress lines for logs that are not a terminal: one every ``every_steps`` steps of an epoch
    and whenever ``every_s`` seconds have passed since the last one (or since the epoch began)."""

    def __init__(self, say: Callable[[str], None], every_steps: int, every_s: float, enabled: bool):
        self.say, self.every_steps, self.every_s, self.enabled = say, every_steps, every_s, enabled
        self.last = time.perf_counter()

    def start(self) -> None:
        self.last = time.perf_counter()

    def after_step(self, where: str, step_in_epoch: int, loss: float, acc: float, rate: float) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        due_step = self.every_steps and step_in_epoch % self.every_steps == 0
        due_time = self.every_s and now - self.last >= self.every_s
        if due_step or due_time:
            self.last = now
            self.say(f"{where} loss {loss:.3f} acc {100 * acc:.1f}% {rate:.1f} samples/s")


def _bar(show: bool, total: int, initial: int, desc: str):
    if not show:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, leave=False, dynamic_ncols=True, file=sys.stderr)


def _append_line(path: Path, record: dict[str, Any]) -> None:
    """Append one JSON line (the metrics file is rewritten atomically only on resume)."""
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record, sort_keys=True) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def _write_config(path: Path, run: RunConfig) -> None:
    import yaml

    atomic_write_bytes(path, yaml.safe_dump(run.to_dict(), sort_keys=False).encode())


def find_run_dir(path: str | Path) -> Path:
    """The run directory of a checkpoint path: a run directory itself, or ``<run>/checkpoints/<name>``."""
    path = Path(path)
    if resolve_pointer(path, "latest") is not None or (path / CONFIG_FILE).is_file():
        return path
    resolved = path.resolve()
    if resolved.parent.name == "checkpoints":
        return resolved.parent.parent
    return resolved.parent


__all__ = [
    "CheckpointError", "DataSettings", "DistInfo", "EpochItems", "ModelSettings", "RunConfig",
    "TrainConfig", "TrainResult", "apply_overrides", "build_datasets", "build_model", "evaluate",
    "evaluate_checkpoint", "find_run_dir", "format_accuracy", "init_distributed", "load_run_config",
    "load_trainable_state", "lr_factor", "model_config", "parameter_groups", "parse_value", "recipe_keys", "train",
    "trainable_state",
]
