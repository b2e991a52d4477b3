"""The model of a run, built in one place: a stand-in or Hugging Face backbone, a classifier or a
part-segmentation model, its :class:`~any2point_fast.config.Any2PointConfig` reconciled with the
data by :func:`model_overrides` whichever the backbone."""

from __future__ import annotations

from typing import Any

from torch import nn

from ..config import Any2PointConfig, ConfigError
from .run_config import STAND_IN, RunConfig


def model_overrides(run: RunConfig, num_classes: int) -> dict[str, Any]:
    """The :class:`Any2PointConfig` fields ``run`` sets over its preset (``model.preset``): the ``model``
    section's overrides, ``num_points`` from ``data.num_points`` and ``num_classes`` (the dataset's
    classes, or categories for part segmentation). An override contradicting the data is an error.

    The one mapping from a run config to a model config, for every backbone: the stand-in is
    ``Any2PointConfig.preset(run.model.preset, **fields)``; a Hugging Face backbone takes the same
    fields and then its own width and PE geometry (:data:`any2point_fast.model.BACKBONE_FIELDS`).
    """
    overrides = dict(run.model.overrides)
    for name, value in (("num_points", run.data.num_points), ("num_classes", num_classes)):
        if overrides.setdefault(name, value) != value:
            raise ConfigError(f"model.{name}={overrides[name]} contradicts the data ({name} = {value})")
    return overrides


def build_model(run: RunConfig, num_classes: int, num_parts: int | None = None) -> nn.Module:
    """The model of ``run``: the one place models are built. A classifier (points ``[B, P, 3]`` →
    logits), or with ``model.task: partseg`` a :class:`~any2point_fast.segmentation.PartSegmentationModel`
    of ``num_classes`` categories and ``num_parts`` parts on the same encoder."""
    model = _build_classifier(run, num_classes)
    if run.model.task == "partseg":
        from ..segmentation import PartSegmentationModel

        return PartSegmentationModel(model, num_classes, num_parts, hidden=model.config.head_hidden,
                                     dropout=model.config.head_dropout)
    return model


def _build_classifier(run: RunConfig, num_classes: int) -> nn.Module:
    spec = run.model
    fields = model_overrides(run, num_classes)
    if spec.backbone == STAND_IN:
        config = Any2PointConfig.preset(spec.preset, **fields)
        from ..model import StandInModel

        return StandInModel(config, num_layers=spec.layers, num_heads=spec.heads, seed=spec.backbone_seed)
    # ---- Hugging Face backbones: the single place they are built -------------------------------------
    try:
        from ..model import Any2PointModel
    except ImportError as error:
        raise RuntimeError(f"HF backbones need any2point_fast.model (backbone {spec.backbone!r}): {error}") from error
    loading = {"config": backbone_hf_config(spec.backbone, spec.backbone_config)} if spec.backbone_config else {}
    return Any2PointModel.from_pretrained(spec.backbone, config=spec.preset, backbone_kwargs=loading, **fields)


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


__all__ = ["backbone_hf_config", "build_model", "describe_projection", "model_overrides"]
