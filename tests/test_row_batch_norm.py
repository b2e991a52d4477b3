"""``RowBatchNorm``: ``nn.BatchNorm1d`` over rows, and a single training row normalised with the running statistics."""

from __future__ import annotations

import torch
from torch import nn

from any2point_fast.row_batch_norm import RowBatchNorm


def _pair(seed: int = 0) -> tuple[RowBatchNorm, nn.BatchNorm1d]:
    torch.manual_seed(seed)
    plain = nn.BatchNorm1d(5)
    with torch.no_grad():
        for tensor in (plain.weight, plain.bias, plain.running_mean):
            tensor.copy_(torch.randn(5))
        plain.running_var.copy_(torch.rand(5) + 0.5)
    row = RowBatchNorm(5)
    row.load_state_dict(plain.state_dict())
    return row, plain


def test_several_rows_are_batch_norm_in_training_and_evaluation():
    row, plain = _pair()
    rows = torch.randn(7, 5, generator=torch.Generator().manual_seed(1)) * 3 + 1
    for training in (True, False):
        row.train(training), plain.train(training)
        torch.testing.assert_close(row(rows), plain(rows), atol=0, rtol=0)
    for name, buffer in plain.state_dict().items():
        assert torch.equal(row.state_dict()[name], buffer), name
    assert int(row.num_batches_tracked) == 1


def test_a_single_training_row_uses_the_running_statistics_and_leaves_them():
    row, plain = _pair(2)
    before = {name: tensor.clone() for name, tensor in row.state_dict().items()}
    one = torch.randn(1, 5, generator=torch.Generator().manual_seed(3))
    out = row.train()(one)
    expected = (one - plain.running_mean) / (plain.running_var + plain.eps).sqrt() * plain.weight + plain.bias
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(out, plain.eval()(one), atol=0, rtol=0)
    for name, tensor in row.state_dict().items():
        assert torch.equal(tensor, before[name]), name
    out.sum().backward()
    assert row.weight.grad.abs().sum() > 0 and row.bias.grad.abs().sum() > 0


def test_same_state_dict_as_batch_norm_and_converts_to_sync_batch_norm():
    row, plain = _pair()
    assert list(row.state_dict()) == list(plain.state_dict())
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(nn.Sequential(row))
    assert type(synced[0]) is nn.SyncBatchNorm
