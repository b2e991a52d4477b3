"""The model of a run: one mapping from the run config to :class:`Any2PointConfig` fields, the same for a
stand-in and a Hugging Face backbone, for classification and part segmentation (the checkpoint
evaluation rebuilds its model through the same :func:`build_model`)."""

from __future__ import annotations

import dataclasses

import pytest

from any2point_fast.config import Any2PointConfig, ConfigError
from any2point_fast.training.model_factory import build_model, model_overrides

from .test_train import save_tiny_backbone, tiny


def encoder_config(model) -> Any2PointConfig:
    """The Any2PointConfig of a classifier, or of a part-segmentation model's encoder."""
    return getattr(model, "encoder", model).config


@pytest.mark.parametrize("task", ["classification", "partseg"])
@pytest.mark.parametrize("model_type, preset", [("bert", "language"), ("vit", "vision")])
def test_a_run_gives_a_stand_in_and_a_hugging_face_model_the_same_config(tmp_path, model_type, preset, task):
    from any2point_fast.model import BACKBONE_FIELDS

    directory = save_tiny_backbone(model_type, tmp_path / model_type)  # hidden 32, like tiny()'s stand-in
    run = tiny(f"model.preset={preset}", f"model.task={task}", "model.knn_k=4", "model.adapter_rank=4",
               "data.num_points=48")
    stand_in = encoder_config(build_model(run, 5, num_parts=7))
    hugging_face = encoder_config(build_model(run.with_overrides([f"model.backbone={directory}"]), 5, num_parts=7))
    shared = [f.name for f in dataclasses.fields(Any2PointConfig) if f.name not in BACKBONE_FIELDS]
    assert {name: getattr(hugging_face, name) for name in shared} == {name: getattr(stand_in, name) for name in shared}
    expected = Any2PointConfig.preset(preset, **model_overrides(run, 5))
    assert stand_in == expected
    assert (expected.num_points, expected.num_classes, expected.knn_k, expected.adapter_rank) == (48, 5, 4, 4)
    assert expected.modality == preset and expected.num_tokens == 16  # the preset, then the run's overrides


@pytest.mark.parametrize("backbone", ["stand-in", "bert"])
def test_model_fields_contradicting_the_data_are_refused_for_every_backbone(tmp_path, backbone):
    name = backbone if backbone == "stand-in" else str(save_tiny_backbone(backbone, tmp_path / backbone))
    with pytest.raises(ConfigError, match=r"model.num_points=32 contradicts the data \(num_points = 64\)"):
        build_model(tiny(f"model.backbone={name}", "model.num_points=32"), 5)
    with pytest.raises(ConfigError, match=r"model.num_classes=7 contradicts the data \(num_classes = 5\)"):
        build_model(tiny(f"model.backbone={name}", "model.num_classes=7"), 5)
    agreeing = build_model(tiny(f"model.backbone={name}", "model.num_points=64", "model.num_classes=5"), 5)
    assert (agreeing.config.num_points, agreeing.config.num_classes) == (64, 5)
