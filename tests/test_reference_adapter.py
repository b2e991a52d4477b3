import pytest
import torch

from any2point_fast import Any2PointConfig
from any2point_fast.geometry import ProjectionSpec
from any2point_fast.reference import (
    ReferenceAdapter,
    ReferenceModel,
    build_geometry,
    ensemble_propagate,
    ensemble_weights,
    segment_pool,
)

VALUES = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 0.0], [7.0, 8.0]])
IDS = torch.tensor([0, 0, 1, 0])


def test_segment_pool_on_hand_made_buckets():
    mean = torch.tensor([[11 / 3, 14 / 3], [5.0, 0.0]])
    torch.testing.assert_close(segment_pool(VALUES, IDS, 2, "mean"), mean)
    torch.testing.assert_close(segment_pool(VALUES, IDS, 2, "max+mean"), mean + torch.tensor([[7.0, 8.0], [5.0, 0.0]]))


def test_max_pool_ties_share_the_gradient_equally():
    values = torch.tensor([[2.0], [2.0], [1.0]], requires_grad=True)
    segment_pool(values, torch.tensor([0, 0, 0]), 1, "max+mean").sum().backward()
    torch.testing.assert_close(values.grad, torch.tensor([[1 / 3 + 1 / 2], [1 / 3 + 1 / 2], [1 / 3]]))


def test_propagation_with_one_view_adds_its_row():
    x = torch.zeros(1, 4, 2)
    base_rows = torch.tensor([[1.0, 1.0]])
    view_rows = VALUES
    out = ensemble_propagate(x, base_rows, torch.zeros(1, 4, dtype=torch.long), view_rows, IDS[None, None], 0.5)
    torch.testing.assert_close(out[0], 0.5 * VALUES[IDS])


def test_ensemble_weights_hand_computed_and_normalised():
    base = torch.tensor([[1.0, 0.0]])
    views = torch.tensor([[[1.0, 0.0]], [[0.0, 3.0]], [[-2.0, 0.0]]])  # cos = 1, 0, -1
    torch.testing.assert_close(ensemble_weights(base, views)[:, 0], torch.tensor([1.0, 0.5, 0.0]) / 1.5)
    gen = torch.Generator().manual_seed(0)
    w = ensemble_weights(torch.randn(5, 7, 16, generator=gen), torch.randn(6, 5, 7, 16, generator=gen))
    assert w.min() >= 0 and w.max() <= 1
    torch.testing.assert_close(w.sum(0), torch.ones(5, 7))


def _adapter_inputs(preset: str, seed: int = 0, batch: int = 2, tokens: int = 40):
    cfg = Any2PointConfig.preset(preset, hidden_size=24, attn_dim=12, attn_heads=6)
    gen = torch.Generator().manual_seed(seed)
    centers = torch.randn(batch, tokens, 3, generator=gen)
    hidden = torch.randn(batch, tokens + 1, 24, generator=gen)
    ffn = torch.randn(batch, tokens + 1, 24, generator=gen)
    table = torch.randn((77, 24) if cfg.pe_kind == "1d" else (*cfg.pe_grid, 24), generator=gen)
    return cfg, centers, hidden, ffn, table


@pytest.mark.parametrize("preset", ["language", "vision"])
def test_adapter_is_permutation_equivariant_over_the_tokens_of_a_cloud(preset):
    cfg, centers, hidden, ffn, table = _adapter_inputs(preset)
    torch.manual_seed(0)
    adapter = ReferenceAdapter(cfg).train()
    spec = ProjectionSpec.from_config(cfg)
    out = adapter(hidden, ffn, build_geometry(centers, table, spec, cfg.voxel_size)[1])
    perm = torch.randperm(centers.shape[1])
    full = torch.cat((torch.zeros(1, dtype=torch.long), perm + 1))
    out_p = adapter(hidden[:, full], ffn[:, full], build_geometry(centers[:, perm], table, spec, cfg.voxel_size)[1])
    torch.testing.assert_close(out_p, out[:, full], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out, hidden + ffn, atol=1e-3)  # the adapter did something


def test_cls_token_skips_the_guided_branch():
    cfg, centers, hidden, ffn, table = _adapter_inputs("language")
    adapter = ReferenceAdapter(cfg)
    out = adapter(hidden, ffn, build_geometry(centers, table, ProjectionSpec.from_config(cfg), cfg.voxel_size)[1])
    down = adapter.down(ffn[:, 0])
    expected = hidden[:, 0] + ffn[:, 0] + cfg.adapter_scale * adapter.up(down * torch.sigmoid(1.702 * down))
    torch.testing.assert_close(out[:, 0], expected)


@pytest.mark.parametrize("preset", ["language", "audio"])
def test_gradients_reach_every_trainable_parameter_and_no_frozen_one(preset):
    cfg = Any2PointConfig.preset(preset, hidden_size=48, num_points=256, num_tokens=32, knn_k=8)
    model = ReferenceModel(cfg, num_layers=2)
    logits = model(torch.randn(3, 256, 3, generator=torch.Generator().manual_seed(0)))
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1, 2])).backward()
    trainable = dict((n, p) for n, p in model.named_parameters() if p.requires_grad)
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen and all(n.startswith(("blocks.", "final_norm.")) for n in frozen)
    assert all(model.get_parameter(n).grad is None for n in frozen)
    missing = [n for n, p in trainable.items() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"no gradient reached {missing}"
