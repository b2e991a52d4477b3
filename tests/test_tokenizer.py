"""The tokenizer on the fused ops (``any2point_fast.tokenizer``) against the reference's, weights
copied across: tokens, centres, gradients and BatchNorm statistics, in train and eval mode."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from any2point_fast import Any2PointConfig
from any2point_fast import reference as R
from any2point_fast import tokenizer as T
from any2point_fast.model import StandInModel
from tests.tolerances import assert_close_to_reference

pytestmark = pytest.mark.usefixtures("one_thread")


def twins(config: Any2PointConfig, seed: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(seed)
    reference = R.PointTokenizer(config).double()
    fused = T.PointTokenizer(config).double()
    fused.load_state_dict(reference.state_dict())
    return reference, fused


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**31 - 1), batch=st.integers(2, 3), points=st.sampled_from((64, 96)),
       tokens=st.sampled_from((8, 16)), k=st.integers(1, 12), dim=st.sampled_from((6, 8)),
       hidden=st.sampled_from((48, 64)), train=st.booleans(), scale=st.sampled_from((1e-3, 1.0, 1e3)))
def test_the_fused_tokenizer_computes_the_reference(seed, batch, points, tokens, k, dim, hidden, train, scale):
    config = Any2PointConfig(hidden_size=hidden, tokenizer_dim=dim, num_tokens=tokens, num_points=points, knn_k=k,
                             tokenizer_bottleneck=2)
    reference, fused = twins(config, seed)
    reference.train(train)
    fused.train(train)
    gen = torch.Generator().manual_seed(seed)
    xyz = torch.randn(batch, points, 3, generator=gen, dtype=torch.float64) * scale
    x_ref, x_fused = xyz.clone().requires_grad_(), xyz.clone().requires_grad_()
    (tokens_ref, centres_ref), (tokens_fused, centres_fused) = reference(x_ref), fused(x_fused)
    assert torch.equal(centres_fused, centres_ref)
    assert_close_to_reference(tokens_fused, tokens_ref, torch.float32)
    upstream = torch.randn(tokens_ref.shape, generator=gen, dtype=torch.float64)
    (tokens_ref * upstream).sum().backward()
    (tokens_fused * upstream).sum().backward()
    for (name, p_ref), p_fused in zip(reference.named_parameters(), fused.parameters()):
        assert_close_to_reference(p_fused.grad, p_ref.grad, torch.float32, scale=10.0, msg=name)
    # compared relative to the largest gradient (1/scale through the offsets' normalisation by their spread)
    largest = x_ref.grad.abs().max()
    assert_close_to_reference(x_fused.grad / largest, x_ref.grad / largest, torch.float32, scale=10.0)
    fused_state = fused.state_dict()
    for name, value in reference.state_dict().items():  # BatchNorm's running statistics included
        assert_close_to_reference(fused_state[name].double(), value.double(), torch.float32, msg=name)


def test_state_dicts_load_both_ways():
    config = Any2PointConfig(hidden_size=64, tokenizer_dim=8, num_tokens=16, num_points=64, knn_k=8)
    reference, fused = twins(config, 0)
    assert list(fused.state_dict()) == list(reference.state_dict())
    R.PointTokenizer(config).load_state_dict(fused.state_dict())


def test_the_stand_in_model_runs_the_fused_tokenizer():
    config = Any2PointConfig(hidden_size=64, tokenizer_dim=8, num_tokens=16, num_points=64, knn_k=8)
    assert type(StandInModel(config, num_layers=1).tokenizer) is T.PointTokenizer


def test_batchnorm_flags_decide_not_the_stage_flag():
    """``model.eval()`` then ``bn.train()`` (recomputing BatchNorm statistics, e.g. precise BN): the
    stages use and update batch statistics exactly as the reference's BatchNorm modules do."""
    config = Any2PointConfig(hidden_size=64, tokenizer_dim=8, num_tokens=16, num_points=64, knn_k=8)
    reference, fused = twins(config, 3)
    for module in (reference, fused):
        module.eval()
        for norm in module.modules():
            if isinstance(norm, torch.nn.BatchNorm1d):
                norm.train()
                norm.reset_running_stats()
                norm.momentum = None
    xyz = torch.randn(2, 64, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    with torch.no_grad():
        assert_close_to_reference(fused(xyz)[0], reference(xyz)[0], torch.float32)
    fused_state = fused.state_dict()
    for name, value in reference.state_dict().items():
        assert_close_to_reference(fused_state[name].double(), value.double(), torch.float32, msg=name)
    assert fused_state["stages.0.mlp.1.num_batches_tracked"] == 1
    fused.stages[0].mlp[1].eval()
    with pytest.raises(ValueError, match="both be in training or both in evaluation"):
        fused(xyz)
