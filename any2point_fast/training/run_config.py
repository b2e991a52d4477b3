"""The schema of a run: what a recipe YAML file (and ``--set``) may say, checked when it is read.

A run is described by a :class:`RunConfig` with three sections, each a dataclass whose every
field can be overridden (``any2point-fast train --set train.lr=1e-3 model.knn_k=16``):

- ``model`` (:class:`ModelSettings`): the backbone (``"stand-in"`` or a Hugging Face id/path),
  the Any2Point preset and any :class:`~any2point_fast.config.Any2PointConfig` field;
- ``data`` (:class:`DataSettings`): the dataset, its points per cloud and augmentation;
- ``train`` (:class:`TrainConfig`): optimisation, precision, determinism, checkpoints.

How the model section becomes an :class:`~any2point_fast.config.Any2PointConfig` is decided in
one place, :func:`any2point_fast.training.model_factory.model_overrides`.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .. import ops
from ..config import Any2PointConfig, ConfigError
from ..partseg import TASKS
from ..train_state import read_manifest
from .overrides import apply_overrides, coerce, from_mapping, jsonable, yaml_text

STAND_IN = "stand-in"
Precision = Literal["fp32", "bf16", "fp16"]


@dataclass
class TrainConfig:
    """How to train. Defaults are the paper's recipe (§3.1) except the number of data workers.

    Optimisation: ``epochs``, ``batch_size`` (per process), AdamW ``lr``/``weight_decay``/``betas``,
    ``warmup_epochs`` of linear warm-up then a per-step cosine decay to ``min_lr``,
    ``adapter_lr_scale`` (the learning rate of the adapters, their shared view attention and the
    prefix tokens is ``lr × adapter_lr_scale``: these sit inside the frozen backbone, whose
    pretrained MiniLM layers pass them gradients ~20× larger than random layers do, and AdamW's steps do
    not shrink with that gain, so at the tokenizer's learning rate they move the pretrained model's
    function much further per step; 0.1 did not help on the transfer benchmark, see README),
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
    adapter_lr_scale: float = 1.0
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
        if not self.adapter_lr_scale > 0:
            raise ConfigError(f"train.adapter_lr_scale must be > 0, got {self.adapter_lr_scale}")
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
    ``num_points`` and ``num_classes`` come from the data (given here, they must agree with it,
    whatever the backbone: see :func:`~any2point_fast.training.model_factory.model_overrides`); an override
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
        self.overrides = {k: coerce(v, hints[k], f"model.{k}") for k, v in self.overrides.items() if v is not None}
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
        return from_mapping(cls, {**own, "overrides": overrides}, "model")

    def to_dict(self) -> dict[str, Any]:
        """The section as written in a recipe: the keys of this kind of backbone, then the overrides."""
        skip = {"overrides", *(_HF_ONLY_KEYS if self.backbone == STAND_IN else _STAND_IN_ONLY_KEYS)}
        own = {k: v for k, v in dataclasses.asdict(self).items() if k not in skip}
        return jsonable({**own, **self.overrides})


_STAND_IN_ONLY_KEYS = ("layers", "heads", "backbone_seed")
_HF_ONLY_KEYS = ("backbone_config",)
_MODEL_KEYS = {"backbone", "preset", "task", *_STAND_IN_ONLY_KEYS, *_HF_ONLY_KEYS}


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
            data=from_mapping(DataSettings, data.get("data") or {}, "data"),
            train=from_mapping(TrainConfig, data.get("train") or {}, "train"),
        )

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model.to_dict(), "data": jsonable(dataclasses.asdict(self.data)),
                "train": jsonable(dataclasses.asdict(self.train))}

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
            out.append(f"{section}.{f.name}={yaml_text(default)}" + (f" {{{'|'.join(choices)}}}" if choices else ""))
        return out

    model_fields = [f"model.{f.name}" for f in dataclasses.fields(Any2PointConfig)]
    return {"model": entries(ModelSettings, "model", ("overrides",)) + model_fields,
            "data": entries(DataSettings, "data"), "train": entries(TrainConfig, "train")}


def load_run_config(path: str | Path) -> RunConfig:
    """The run config stored in a checkpoint (a checkpoint directory or a run directory)."""
    return RunConfig.from_dict(read_manifest(path)["run_config"])


__all__ = ["DataSettings", "ModelSettings", "Precision", "RunConfig", "STAND_IN", "TrainConfig", "load_run_config",
           "recipe_keys"]
