"""Adapter-only checkpoints of the part-segmentation model: the head type, blocks, counts and weights
survive a save/load on the stand-in and on a tiny HF BERT; head types are not mixed up."""

from __future__ import annotations

import json
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from any2point_fast.checkpoint import ADAPTER_CONFIG_NAME, BackboneMismatchError, CheckpointError  # noqa: E402
from any2point_fast.config import Any2PointConfig  # noqa: E402
from any2point_fast.model import StandInModel  # noqa: E402
from any2point_fast.segmentation import PartSegmentationModel  # noqa: E402

from .test_partseg import TINY  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def stand_in(seed: int = 0, init: int = 0) -> StandInModel:
    """The stand-in encoder of width 32, 3 blocks; ``seed`` fixes its frozen part, ``init`` its trainable one."""
    torch.manual_seed(init)
    return StandInModel(Any2PointConfig.preset("language", **TINY), num_layers=3, num_heads=2, seed=seed)


def trained(model: PartSegmentationModel, points: torch.Tensor, steps: int = 2) -> PartSegmentationModel:
    """``model`` after a few AdamW steps on ``points`` ``[B, P, 3]`` (weights and BatchNorm statistics
    away from their initial values), in eval mode."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    category = torch.arange(points.shape[0]) % model.num_categories
    parts = torch.arange(points.shape[1]).expand(points.shape[0], -1) % model.num_parts
    for _ in range(steps):
        logits = model(points, category)
        torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), parts.reshape(-1)).backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


def test_stand_in_seg_checkpoint_round_trip(tmp_path):
    points = torch.randn(2, 64, 3, generator=torch.Generator().manual_seed(0))
    model = trained(PartSegmentationModel(stand_in(), 4, 10, blocks=(0, 2, 2), hidden=16, dropout=0.3), points)
    category = torch.tensor([1, 3])
    with torch.no_grad():
        expected = model(points, category)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / ADAPTER_CONFIG_NAME).read_text())
    assert saved["head"] == {"type": "partseg", "blocks": [0, 2, 2], "num_categories": 4, "num_parts": 10,
                             "hidden": 16, "dropout": 0.3}
    assert saved["model_type"] == "stand-in"

    restored = PartSegmentationModel.from_pretrained(tmp_path, backbone=stand_in(init=7)).eval()
    assert restored.blocks == (0, 2, 2) and restored.head.mlp[-1].out_features == 10
    with torch.no_grad():
        assert torch.equal(restored(points, category), expected)
    fresh = PartSegmentationModel(stand_in(init=7), 4, 10, blocks=(0, 2, 2), hidden=16).eval()
    with torch.no_grad():
        assert not torch.allclose(fresh(points, category), expected)  # the equality above comes from the file


def test_stand_in_seg_checkpoint_refuses_a_missing_or_other_stand_in(tmp_path):
    PartSegmentationModel(stand_in(), 4, 10, hidden=16).save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="trained on a stand-in backbone"):
        PartSegmentationModel.from_pretrained(tmp_path)
    with pytest.raises(BackboneMismatchError, match="PE values differ"):
        PartSegmentationModel.from_pretrained(tmp_path, backbone=stand_in(seed=1))
    other = StandInModel(Any2PointConfig.preset("language", **{**TINY, "knn_k": 4}), num_layers=3, num_heads=2)
    with pytest.raises(CheckpointError, match="config differs: knn_k 8 saved, 4 given"):
        PartSegmentationModel.from_pretrained(tmp_path, backbone=other)


def test_malformed_seg_head_is_refused(tmp_path):
    PartSegmentationModel(stand_in(), 4, 10, hidden=16).save_pretrained(tmp_path)
    path = tmp_path / ADAPTER_CONFIG_NAME
    saved = json.loads(path.read_text())
    path.write_text(json.dumps({**saved, "head": {**saved["head"], "num_parts": "10"}}))
    with pytest.raises(CheckpointError, match=r"adapter_config\.json: the partseg head .* \['num_parts'\]"):
        PartSegmentationModel.from_pretrained(tmp_path, backbone=stand_in())
    path.write_text(json.dumps({**saved, "head": {"type": "detection"}}))
    with pytest.raises(CheckpointError, match="'type' is one of"):
        PartSegmentationModel.from_pretrained(tmp_path, backbone=stand_in())


# ------------------------------------------------------------------------------------ HF backbone
@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    pytest.importorskip("transformers")
    from .test_backbones import save_tiny_backbone

    return save_tiny_backbone("bert", tmp_path_factory.mktemp("tiny_bert") / "bert")


def bert_seg_model(bert_dir, init: int = 0) -> PartSegmentationModel:
    from any2point_fast.model import Any2PointModel

    from .test_backbones import SMALL_CONFIG

    torch.manual_seed(init)
    encoder = Any2PointModel.from_pretrained(bert_dir, num_classes=3, **SMALL_CONFIG)
    return PartSegmentationModel(encoder, 3, 7, hidden=16)


def test_bert_seg_checkpoint_round_trip_and_head_types(bert_dir, tmp_path):
    from any2point_fast.model import Any2PointModel

    from .test_backbones import SMALL_CONFIG

    points = torch.randn(2, 256, 3, generator=torch.Generator().manual_seed(1))
    model = trained(bert_seg_model(bert_dir), points)
    category = torch.tensor([2, 0])
    with torch.no_grad():
        expected = model(points, category)
    model.save_pretrained(tmp_path / "seg")
    saved = json.loads((tmp_path / "seg" / ADAPTER_CONFIG_NAME).read_text())
    assert saved["head"]["type"] == "partseg" and saved["head"]["blocks"] == [0, 0, 1]
    assert saved["model_type"] == "bert"

    torch.manual_seed(123)  # a fresh trainable init differs; everything must come from the file
    restored = PartSegmentationModel.from_pretrained(tmp_path / "seg").eval()
    assert isinstance(restored, PartSegmentationModel) and restored.num_parts == 7
    with torch.no_grad():
        assert torch.equal(restored(points, category), expected)

    # a seg checkpoint is not a classifier, and a classifier checkpoint not a seg model
    with pytest.raises(CheckpointError, match="holds a partseg head, not a classification one: load it with "
                                              "PartSegmentationModel.from_pretrained"):
        Any2PointModel.from_pretrained(tmp_path / "seg")
    classifier = Any2PointModel.from_pretrained(bert_dir, num_classes=3, **SMALL_CONFIG)
    classifier.save_pretrained(tmp_path / "cls")
    assert json.loads((tmp_path / "cls" / ADAPTER_CONFIG_NAME).read_text())["head"] == {"type": "classification"}
    with pytest.raises(CheckpointError, match="holds a classification head, not a partseg one: load it with "
                                              "Any2PointModel.from_pretrained"):
        PartSegmentationModel.from_pretrained(tmp_path / "cls")
    # the classifier still loads as before, and so does a checkpoint saved before head types were recorded
    path = tmp_path / "cls" / ADAPTER_CONFIG_NAME
    path.write_text(json.dumps({k: v for k, v in json.loads(path.read_text()).items() if k != "head"}))
    clouds = points[:, :256]
    with torch.no_grad():
        torch.testing.assert_close(Any2PointModel.from_pretrained(tmp_path / "cls").eval()(clouds),
                                   classifier.eval()(clouds), rtol=0, atol=0)
