import pytest
import torch

from any2point_fast import Any2PointConfig, ReferenceModel


def small_config(preset: str, **overrides) -> Any2PointConfig:
    return Any2PointConfig.preset(preset, hidden_size=64, knn_k=16, **overrides)


@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("preset", ["language", "vision"])
def test_forward_backward_on_1024_point_clouds(preset, batch):
    model = ReferenceModel(small_config(preset), num_layers=2)
    points = torch.randn(batch, 1024, 3, generator=torch.Generator().manual_seed(batch))
    if batch == 1:
        model.eval()  # BatchNorm cannot train on a single cloud's pooled head row
    logits = model(points)
    assert logits.shape == (batch, 15) and torch.isfinite(logits).all()
    logits.logsumexp(dim=1).sum().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.tokenizer.stages[0].mlp[0].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("preset", ["language", "audio"])
def test_changing_one_cloud_leaves_the_others_unchanged_in_eval_mode(preset):
    model = ReferenceModel(small_config(preset), num_layers=2).eval()
    points = torch.randn(4, 1024, 3, generator=torch.Generator().manual_seed(7))
    changed = points.clone()
    changed[2] = changed[2].flip(0) * 2 + 1
    with torch.no_grad():
        before, after = model(points), model(changed)
    torch.testing.assert_close(after[[0, 1, 3]], before[[0, 1, 3]], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(after[2], before[2])


def test_token_count_is_configurable_and_the_frozen_backbone_is_seeded():
    cfg = small_config("language", num_points=512, num_tokens=64)
    a, b = ReferenceModel(cfg, num_layers=1, seed=3), ReferenceModel(cfg, num_layers=1, seed=3)
    assert torch.equal(a.pe_table, b.pe_table) and torch.equal(a.blocks[0].qkv.weight, b.blocks[0].qkv.weight)
    tokens, centers = a.tokenizer(torch.randn(2, 512, 3))
    assert tokens.shape == (2, 64, 64) and centers.shape == (2, 64, 3)
