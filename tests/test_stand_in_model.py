"""``StandInModel`` (production modules on the ops) against the oracle's ``ReferenceModel``: same state-dict
keys both ways, same seeded frozen backbone, same logits and gradients with the weights copied across."""

from __future__ import annotations

import pytest
import torch

from any2point_fast import Any2PointConfig, ReferenceModel, StandInModel
from tests.tolerances import assert_close_to_reference

pytestmark = pytest.mark.usefixtures("one_thread")

SHIFTS_BEFORE_BATCH_NORM = ("view_attention.out_bias", "head.mlp.0.bias", "head.mlp.4.bias")


def config(preset: str) -> Any2PointConfig:
    return Any2PointConfig.preset(preset, hidden_size=24, num_points=128, num_tokens=32, knn_k=8, num_classes=5,
                                  head_dropout=0.0)


@pytest.mark.parametrize("preset", ["language", "vision"])
def test_state_dict_keys_are_the_oracles_and_load_both_ways(preset):
    ours, oracle = StandInModel(config(preset), num_layers=2, num_heads=2), ReferenceModel(config(preset), 2, 2)
    assert list(ours.state_dict()) == list(oracle.state_dict())
    assert [name for name, _ in ours.named_parameters()] == [name for name, _ in oracle.named_parameters()]
    ours.load_state_dict(oracle.state_dict())
    oracle.load_state_dict(ours.state_dict())
    trainable = [name for name, p in ours.named_parameters() if p.requires_grad]
    assert trainable == [name for name, p in oracle.named_parameters() if p.requires_grad]
    assert not any(name.startswith(("blocks.", "final_norm.")) for name in trainable)


def test_the_same_seed_gives_the_oracles_frozen_backbone():
    ours, oracle = StandInModel(config("vision"), 2, 2, seed=5), ReferenceModel(config("vision"), 2, 2, seed=5)
    frozen = [name for name in oracle.state_dict() if name.startswith(("blocks.", "final_norm.", "pe_table"))]
    assert "pe_table" in frozen and len(frozen) > 3
    for name in frozen:
        assert torch.equal(ours.state_dict()[name], oracle.state_dict()[name]), name
    other = StandInModel(config("vision"), 2, 2, seed=6)
    assert not torch.equal(other.pe_table, ours.pe_table)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("preset", ["language", "audio"])
def test_the_oracles_logits_and_gradients(preset, training):
    oracle = ReferenceModel(config(preset), num_layers=2, num_heads=2, seed=1)
    with torch.no_grad():  # the initial out-projection and BN affine are near identity; make the guided branch matter
        for name, p in oracle.named_parameters():
            if p.requires_grad and name.startswith(("view_attention", "adapters")):
                p.add_(torch.randn_like(p) * 0.2)
    ours = StandInModel(config(preset), num_layers=2, num_heads=2, seed=1)
    ours.load_state_dict(oracle.state_dict())
    # float64 (the ops' float32 parts aside: position codes, distances), so that float32 tolerances
    # test the wiring: in float32, three clouds' BatchNorm backward through three tokenizer stages
    # amplifies the two codes' different summation orders past them
    oracle.double()
    ours.double()
    points = torch.randn(3, 128, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    results = []
    for model in (oracle, ours):
        model.train(training)
        logits = model(points)
        logits.square().sum().backward()
        results.append((logits, {name: p.grad for name, p in model.named_parameters() if p.requires_grad}))
    (expected, expected_grads), (logits, grads) = results
    assert_close_to_reference(logits, expected, torch.float32, scale=10, msg="logits")
    largest = max(grad.abs().max() for grad in expected_grads.values())
    for name, grad in grads.items():
        assert grad is not None and grad.abs().max() > 0, name
        # large gradients relative to their largest entry (float32 sums over many neighbours, in another
        # order); a bias that only shifts what a training-mode BatchNorm centres has a gradient of 0 up to
        # rounding, compared at the scale of the model's gradients
        unit = largest if training and name in SHIFTS_BEFORE_BATCH_NORM else expected_grads[name].abs().max()
        unit = unit.clamp_min(1.0)
        assert_close_to_reference(grad / unit, expected_grads[name] / unit, torch.float32, scale=10,
                                  msg=f"gradient of {name}")
    for name, buffer in ours.named_buffers():  # BatchNorm running statistics
        assert_close_to_reference(buffer.float(), dict(oracle.named_buffers())[name].float(), torch.float32, scale=10,
                                  msg=name)
