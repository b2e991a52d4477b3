"""``Any2PointAdapter`` on the fused ops equals ``ReferenceAdapter``: outputs, every gradient, BN state."""

from __future__ import annotations

import pytest
import torch

from any2point_fast import Any2PointConfig, ops
from any2point_fast.adapter import Any2PointAdapter
from any2point_fast.geometry import ProjectionSpec
from any2point_fast.projection import build_geometry
from any2point_fast.reference import ReferenceAdapter
from any2point_fast.reference import build_geometry as reference_geometry
from tests.tolerances import assert_close_to_reference

PRESETS = ["language", "vision", "audio"]


def make_inputs(preset: str, batch: int = 3, tokens: int = 50, hidden: int = 48, seed: int = 0):
    config = Any2PointConfig.preset(preset, hidden_size=hidden)
    gen = torch.Generator().manual_seed(seed)
    centers = torch.randn(batch, tokens, 3, generator=gen)
    shape = (config.pe_length, hidden) if config.pe_kind == "1d" else (*config.pe_grid, hidden)
    table = torch.randn(shape, generator=gen) * 0.02
    hidden_states = torch.randn(batch, tokens + 1, hidden, generator=gen)
    ffn = torch.randn(batch, tokens + 1, hidden, generator=gen)
    return config, centers, table, hidden_states, ffn


def make_pair(config: Any2PointConfig, seed: int = 0) -> tuple[ReferenceAdapter, Any2PointAdapter]:
    """A reference adapter with non-trivial weights and an ``Any2PointAdapter`` loaded from it."""
    torch.manual_seed(seed)
    ref = ReferenceAdapter(config).train()
    with torch.no_grad():  # the initial out-projection is tiny; make the guided branch matter
        for p in ref.view_attention.parameters():
            p.add_(torch.randn_like(p) * 0.3)
        for norm in [*ref.view_norms, ref.voxel_norm]:
            norm.weight.add_(torch.randn_like(norm.weight) * 0.2)
            norm.bias.add_(torch.randn_like(norm.bias) * 0.2)
    fast = Any2PointAdapter(config).train()
    fast.load_state_dict(ref.state_dict())
    return ref, fast


def forward_backward(adapter, hidden, ffn, geometry, upstream):
    hidden, ffn = hidden.clone().requires_grad_(), ffn.clone().requires_grad_()
    out = adapter(hidden, ffn, geometry)
    params = dict(adapter.named_parameters())
    grads = torch.autograd.grad(out, [hidden, ffn, *params.values()], upstream)
    return out, dict(zip(["hidden", "ffn", *params], grads))


def test_same_parameters_and_state_dict():
    config = Any2PointConfig.preset("vision", hidden_size=48)
    ref, fast = make_pair(config)
    assert list(ref.state_dict()) == list(fast.state_dict())
    assert [p.shape for p in ref.parameters()] == [p.shape for p in fast.parameters()]
    ref.load_state_dict(fast.state_dict())  # checkpoints load either way


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("preset", PRESETS)
def test_adapter_matches_reference_adapter(preset, backend):
    config, centers, table, hidden, ffn = make_inputs(preset)
    _, geometry = reference_geometry(centers, table, ProjectionSpec.from_config(config), config.voxel_size)
    ref, fast = make_pair(config)
    upstream = torch.randn(hidden.shape, generator=torch.Generator().manual_seed(1))
    ref_out, ref_grads = forward_backward(ref, hidden, ffn, geometry, upstream)
    with ops.use_backend(backend):
        out, grads = forward_backward(fast, hidden, ffn, geometry, upstream)
    assert not torch.allclose(ref_out, hidden + ffn, atol=1e-2)  # the adapter did something
    assert_close_to_reference(out, ref_out, msg="output")
    assert set(grads) == set(ref_grads)
    for name, grad in grads.items():
        assert grad.abs().max() > 0, f"no gradient reaches {name}"
        assert_close_to_reference(grad, ref_grads[name], scale=10, msg=f"gradient of {name}")
    for name, buffer in fast.named_buffers():  # BN running statistics
        assert_close_to_reference(buffer.float(), dict(ref.named_buffers())[name].float(), msg=name)


@pytest.mark.parametrize("num_prefix_tokens", [0, 1, 3])
@pytest.mark.parametrize("precision", ["float32", "bfloat16", "autocast"])
def test_bottleneck_matches_reference(num_prefix_tokens, precision):
    """The bottleneck and residual sum in one autograd node, split into contiguous prefix and point
    tokens: the reference's values and gradients, whatever the prefix, in float32 and bfloat16;
    under autocast (a float32 residual beside a bfloat16 FFN output, Down and Up in bfloat16) the
    adapter computes module by module."""
    config = Any2PointConfig.preset("vision", hidden_size=48)
    ref, fast = make_pair(config)
    gen = torch.Generator().manual_seed(3)
    hidden, ffn, upstream = (torch.randn(2, 7 + num_prefix_tokens, 48, generator=gen) for _ in range(3))
    dtype = torch.float32 if precision == "float32" else torch.bfloat16
    if precision == "bfloat16":
        ref, fast = ref.to(dtype), fast.to(dtype)
        hidden = hidden.to(dtype)
    ffn = ffn.to(dtype)
    results = []
    for adapter in (ref, fast):
        h, f = hidden.clone().requires_grad_(), ffn.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "autocast"):
            prefix, tokens = adapter.bottleneck(h, f, num_prefix_tokens)
        out = torch.cat((prefix, tokens), dim=1)
        inputs = [h, f, *adapter.down.parameters(), *adapter.up.parameters()]
        results.append((prefix, tokens, out, torch.autograd.grad(out, inputs, upstream.to(out.dtype))))
    (_, _, ref_out, ref_grads), (prefix, tokens, out, grads) = results
    assert prefix.shape == (2, num_prefix_tokens, 48) and tokens.shape == (2, 7, 48)
    fused = precision != "autocast"
    assert (tokens.grad_fn.name() == "_BottleneckBackward") == fused
    assert not fused or (prefix.is_contiguous() and tokens.is_contiguous())
    assert out.dtype == ref_out.dtype == (torch.float32 if precision == "autocast" else dtype)
    assert_close_to_reference(out, ref_out, dtype, msg="output")
    for name, grad, ref_grad in zip(["hidden", "ffn", "down.weight", "down.bias", "up.weight", "up.bias"],
                                    grads, ref_grads):
        assert grad.dtype == ref_grad.dtype, name
        assert_close_to_reference(grad, ref_grad, dtype, msg=f"gradient of {name}")


@pytest.mark.parametrize("preset", ["language", "vision"])
def test_adapter_eval_mode_and_float16_tokens(preset):
    config, centers, table, hidden, ffn = make_inputs(preset, seed=2)
    _, geometry = reference_geometry(centers, table, ProjectionSpec.from_config(config), config.voxel_size)
    ref, fast = make_pair(config, seed=2)
    ref.eval(), fast.eval()
    with ops.use_backend("torch"), torch.no_grad():
        assert_close_to_reference(fast(hidden, ffn, geometry), ref(hidden, ffn, geometry))
        # float16 tokens through the guided branch: the ops compute in float32, return float16
        tokens = hidden[:, 1:].half()
        pooled = fast.pool_views(tokens, geometry.views)
        assert pooled.dtype == torch.float16
        assert_close_to_reference(pooled, ref.pool_views(tokens, geometry.views), torch.float16)


def test_norms_follow_their_own_mode():
    """``adapter.eval()`` then ``norm.train()`` (recomputing BatchNorm statistics): those norms use and
    update batch statistics, as the reference's modules do; the others keep their running ones."""
    config, centers, table, hidden, ffn = make_inputs("vision", seed=3)
    _, geometry = reference_geometry(centers, table, ProjectionSpec.from_config(config), config.voxel_size)
    ref, fast = make_pair(config, seed=3)
    for adapter in (ref, fast):
        adapter.eval()
        adapter.view_norms[0].train()
        adapter.voxel_norm.train()
    before = {name: t.clone() for name, t in fast.state_dict().items()}
    with ops.use_backend("torch"), torch.no_grad():
        assert_close_to_reference(fast(hidden, ffn, geometry), ref(hidden, ffn, geometry))
    for name, value in fast.state_dict().items():
        if value.is_floating_point():
            assert_close_to_reference(value, ref.state_dict()[name], msg=name)
        else:
            assert torch.equal(value, ref.state_dict()[name]), name
        moved = not torch.equal(value, before[name])
        assert moved == (name.startswith(("view_norms.0.running", "voxel_norm.running", "view_norms.0.num_batches",
                                          "voxel_norm.num_batches"))), name


@pytest.mark.parametrize("preset", PRESETS)
def test_build_geometry_matches_reference(preset):
    config, centers, table, _, _ = make_inputs(preset, batch=4, tokens=90)
    spec = ProjectionSpec.from_config(config)
    ref_pe, ref_geometry = reference_geometry(centers, table, spec, config.voxel_size)
    with ops.use_backend("torch"):
        pe, geometry = build_geometry(centers, table, spec, config.voxel_size)
    assert_close_to_reference(pe, ref_pe)
    for name in ("views", "voxels"):
        a, e = getattr(geometry, name), getattr(ref_geometry, name)
        for field in ("segment_ids", "perm", "offsets"):
            assert torch.equal(getattr(a, field), getattr(e, field)), f"{name}.{field}"
        assert a.view_offsets == e.view_offsets and a.max_len == e.max_len


@pytest.mark.parametrize("preset", ["language", "vision"])
def test_adapter_is_permutation_equivariant_over_the_tokens_of_a_cloud(preset):
    config, centers, table, hidden, ffn = make_inputs(preset, seed=3)
    spec = ProjectionSpec.from_config(config)
    _, fast = make_pair(config, seed=3)
    perm = torch.randperm(centers.shape[1], generator=torch.Generator().manual_seed(4))
    full = torch.cat((torch.zeros(1, dtype=torch.long), perm + 1))  # the [CLS] token stays first
    with ops.use_backend("torch"):
        out = fast(hidden, ffn, build_geometry(centers, table, spec, config.voxel_size)[1])
        out_p = fast(hidden[:, full], ffn[:, full], build_geometry(centers[:, perm], table, spec, config.voxel_size)[1])
    torch.testing.assert_close(out_p, out[:, full], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out, hidden + ffn, atol=1e-2)


@pytest.mark.parametrize("norms", ["cumulative momentum", "other modules"])
def test_adapter_batch_norms_match_over_steps(norms):
    """Running statistics after two training steps and an eval step: with ``momentum=None`` on the
    fused path, and with norm modules it does not fuse (plain ``nn.BatchNorm1d``: module by module)."""
    config, centers, table, hidden, ffn = make_inputs("vision", seed=5)
    _, geometry = reference_geometry(centers, table, ProjectionSpec.from_config(config), config.voxel_size)
    ref, fast = make_pair(config, seed=5)
    for adapter in (ref, fast):
        if norms == "other modules":
            adapter.view_norms = torch.nn.ModuleList(torch.nn.BatchNorm1d(norm.num_features)
                                                     for norm in adapter.view_norms)
        for norm in [*adapter.view_norms, adapter.voxel_norm]:
            norm.momentum = None if norms == "cumulative momentum" else 0.3
    fast.load_state_dict(ref.state_dict())
    with ops.use_backend("torch"), torch.no_grad():
        for step in range(3):
            ref.train(step < 2), fast.train(step < 2)
            assert_close_to_reference(fast(hidden, ffn, geometry), ref(hidden, ffn, geometry), msg=f"step {step}")
    for name, buffer in fast.named_buffers():
        assert_close_to_reference(buffer.float(), dict(ref.named_buffers())[name].float(), msg=name)
    assert int(fast.voxel_norm.num_batches_tracked) == 2
