"""``ClassificationHead``: ``[CLS] ‖ max-pooled tokens`` through the 256-256 MLP, against the oracle's head."""

from __future__ import annotations

import pytest
import torch

from any2point_fast import Any2PointConfig
from any2point_fast.head import ClassificationHead
from any2point_fast.reference.model import ClassificationHead as ReferenceHead
from any2point_fast.row_batch_norm import RowBatchNorm

CONFIG = Any2PointConfig.preset("vision", hidden_size=16, head_hidden=32, num_classes=5)


def _twins(seed: int = 0) -> tuple[ClassificationHead, ReferenceHead]:
    torch.manual_seed(seed)
    ours = ClassificationHead(CONFIG)
    torch.manual_seed(seed)
    oracle = ReferenceHead(CONFIG)
    return ours, oracle


def test_layers_state_dict_and_seeded_weights_are_the_oracles():
    ours, oracle = _twins()
    assert [type(m).__name__ for m in ours.mlp] == [type(m).__name__ for m in oracle.mlp]
    assert sum(type(m) is RowBatchNorm for m in ours.mlp) == 2 and ours.mlp[-1].out_features == 5
    assert ours.mlp[3].p == CONFIG.head_dropout
    assert list(ours.state_dict()) == list(oracle.state_dict())
    for name, value in oracle.state_dict().items():
        assert torch.equal(ours.state_dict()[name], value), name


@pytest.mark.parametrize("prefix", [1, 2])
@pytest.mark.parametrize("batch", [1, 6])
def test_the_oracles_logits_and_gradients(batch, prefix):
    ours, oracle = _twins(1)
    ours.eval(), oracle.eval()  # dropout off; BatchNorm in training mode is checked below
    x = torch.randn(batch, prefix + 9, 16, generator=torch.Generator().manual_seed(2))
    results = []
    for head in (ours, oracle):
        leaf = x.clone().requires_grad_()
        logits = head(leaf, prefix)
        logits.square().sum().backward()
        results.append((logits, leaf.grad))
    (logits, grad), (expected, expected_grad) = results
    assert logits.shape == (batch, 5)
    torch.testing.assert_close(logits, expected)
    torch.testing.assert_close(grad, expected_grad)
    assert grad[:, 1:prefix].abs().sum() == 0  # prefix tokens after [CLS] are not read
    assert ((grad[:, prefix:] != 0).sum(dim=1) == 1).all()  # the max pool: one token per channel and cloud


def test_a_training_batch_of_one_cloud_uses_the_running_statistics():
    ours, _ = _twins()
    ours.train()
    for module in ours.mlp:
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    x = torch.randn(1, 5, 16)
    torch.testing.assert_close(ours(x), ours.eval()(x))
    assert all(int(m.num_batches_tracked) == 0 for m in ours.mlp if isinstance(m, RowBatchNorm))
