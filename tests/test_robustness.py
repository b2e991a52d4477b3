"""Degenerate and adversarial clouds through the whole model: finite outputs and gradients on
every backend, the backends agreeing, and fp16/bf16 autocast staying finite."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from any2point_fast import Any2PointConfig, ops
from any2point_fast.model import StandInModel

from .tolerances import assert_close_to_reference

pytestmark = pytest.mark.usefixtures("one_thread")

POINTS = 64
CONFIGS = {
    preset: Any2PointConfig.preset(preset, hidden_size=24, num_points=POINTS, num_tokens=16, knn_k=4, num_classes=5)
    for preset in ("language", "vision")
}
SHAPES = ("random", "identical", "collinear", "coplanar", "duplicated", "two_points")


def adversarial_cloud(shape: str, seed: int, scale: float, offset: float) -> torch.Tensor:
    """``[POINTS, 3]`` float32: a degenerate ``shape`` scaled by ``scale`` and moved ``offset`` away."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(POINTS, 3, generator=gen, dtype=torch.float64)
    if shape == "identical":
        base = base[:1].expand(POINTS, 3)
    elif shape == "collinear":
        base = base[:, :1] * torch.tensor([[0.3, -1.0, 2.0]], dtype=torch.float64)
    elif shape == "coplanar":
        base = base[:, :2] @ torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, -1.0]], dtype=torch.float64)
    elif shape == "duplicated":
        base = base[torch.randint(0, 4, (POINTS,), generator=gen)]
    elif shape == "two_points":
        base = base[torch.arange(POINTS) % 2]
    direction = torch.randn(3, generator=gen, dtype=torch.float64)
    return (base * scale + offset * direction / direction.norm()).float()


def clouds():
    """Batches of 1–3 adversarial clouds, each of any shape, scale 1e-6…1e6 and offset up to 1e6."""
    one = st.builds(adversarial_cloud, st.sampled_from(SHAPES), st.integers(0, 2**16),
                    st.sampled_from([1e-6, 1e-3, 1.0, 1e3, 1e6]), st.sampled_from([0.0, 1.0, 1e3, 1e6]))
    return st.lists(one, min_size=1, max_size=3).map(torch.stack)


def model(preset: str, seed: int = 0) -> StandInModel:
    torch.manual_seed(seed)
    return StandInModel(CONFIGS[preset], num_layers=2, num_heads=2, seed=seed)


def forward_backward(net: StandInModel, points: torch.Tensor, backend: str, autocast: torch.dtype | None = None):
    """Logits and the gradients of every trainable parameter, on ``backend``; the forward under
    ``autocast`` to that dtype when given, the backward outside it (as PyTorch prescribes)."""
    net.zero_grad()
    torch.manual_seed(0)  # the same dropout masks on every backend
    with ops.use_backend(backend):
        with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
            logits = net(points)
        logits.float().square().sum().backward()
    return logits, {name: p.grad for name, p in net.named_parameters() if p.requires_grad}


def assert_finite(logits, grads):
    assert torch.isfinite(logits).all(), "non-finite logits"
    assert all(grad is not None for grad in grads.values()), "a trainable parameter got no gradient"
    bad = [name for name, grad in grads.items() if not torch.isfinite(grad).all()]
    assert not bad, f"non-finite gradients of {bad}"


def near_a_kink(net: StandInModel, points: torch.Tensor) -> bool:
    """Whether an input of the model's ReLU modules (the tokenizer's embedding, the head) lies within
    1e-5 of its layer's largest from 0 (the reference, in evaluation mode): the backends' 1e-7
    rounding differences may then put it on either side, and which side takes the gradient (as at a
    tie) depends on the last bit."""
    inputs = []
    hooks = [m.register_forward_pre_hook(lambda module, args: inputs.append(args[0].clone()))  # before an in-place ReLU
             for m in net.modules() if isinstance(m, torch.nn.ReLU)]
    try:
        with torch.no_grad(), ops.use_backend("reference"):
            net.eval()(points)
    finally:
        for hook in hooks:
            hook.remove()
    return any(bool((x.abs() < 1e-5 * x.abs().amax()).any()) for x in inputs)


def check_backend_agrees(net: StandInModel, points: torch.Tensor, backend: str) -> bool:
    """On ``reference`` and ``backend``: finite logits and gradients in training and evaluation
    mode, and in evaluation mode the same logits and gradients within the float32 tolerance.

    Agreement is checked in evaluation mode only: in training, BatchNorm over a batch of equal
    clouds (or over one thinner than float32's resolution) divides by a spread of a few ulps
    and amplifies the backends' 1e-7 rounding differences without bound. Gradients are compared
    (and ``True`` returned)
    only for clouds float32 resolves (extent above 1e-4 of their distance from the origin) whose
    token centres are distinct: elsewhere tokens tie for bucket maxima, and which of them attains
    a maximum then depends on the last bit of a GEMM (the values agree, the max-pool subgradient
    does not; exact ties are tested op by op in ``tests/ops/``). Nor where a ReLU module's input
    sits on its kink (:func:`near_a_kink`), for the same reason.
    """
    expected_logits, expected_grads = forward_backward(net.eval(), points, "reference")
    logits, grads = forward_backward(net, points, backend)
    for result in ((expected_logits, expected_grads), (logits, grads)):
        assert_finite(*result)
    assert_close_to_reference(logits, expected_logits, msg=f"{backend} logits")
    with torch.no_grad():
        centers = net.tokenizer(points)[1]
    extent = (points - points.mean(dim=1, keepdim=True)).norm(dim=-1).amax(dim=1)
    resolved = bool((extent > 1e-4 * points.abs().amax(dim=(1, 2))).all())
    compared = resolved and all(len(torch.unique(cloud, dim=0)) == len(cloud) for cloud in centers) \
        and not near_a_kink(net, points)
    if compared:
        for name, grad in grads.items():  # summed over every token and block: a wider bound
            assert_close_to_reference(grad, expected_grads[name], scale=16, msg=f"{backend} gradient of {name}")
    for name in ("reference", backend):
        assert_finite(*forward_backward(net.train(), points, name))
    return compared


@pytest.mark.parametrize("preset", CONFIGS)
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(points=clouds())
def test_adversarial_clouds_are_finite_and_the_torch_path_agrees(preset, points):
    check_backend_agrees(model(preset), points, "torch")


def resolved_clouds():
    """Batches of 1–3 clouds of distinct points at any scale, at most 10 extents from the origin."""
    one = st.builds(lambda shape, seed, scale, offset: adversarial_cloud(shape, seed, scale, offset * scale),
                    st.sampled_from(["random", "collinear", "coplanar"]), st.integers(0, 2**16),
                    st.sampled_from([1e-6, 1e-3, 1.0, 1e3, 1e6]), st.sampled_from([0.0, 1.0, 10.0]))
    return st.lists(one, min_size=1, max_size=3).map(torch.stack)


@pytest.mark.parametrize("preset", CONFIGS)
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(points=resolved_clouds())
def test_resolved_clouds_get_the_reference_gradients_at_any_scale(preset, points):
    net = model(preset)
    assume(not near_a_kink(net, points))
    assert check_backend_agrees(net, points, "torch"), "gradients were not compared"


@pytest.mark.skipif(bool(ops.available_backends()["triton"]), reason="triton unavailable")
@pytest.mark.parametrize("preset, shape, scale, offset", [
    ("language", "identical", 1e6, 1e6), ("vision", "collinear", 1e-6, 1.0), ("vision", "two_points", 1.0, 1e3)])
def test_adversarial_clouds_on_triton(preset, shape, scale, offset):
    """The interpreter runs a whole model in seconds, not milliseconds: a few fixed degenerate clouds
    through one tokenizer stage and two view-attention heads (it pays per kernel launch, program and head)."""
    config = dataclasses.replace(CONFIGS[preset], tokenizer_stages=1, attn_heads=2)
    net = StandInModel(config, num_layers=1, num_heads=2)
    points = torch.stack([adversarial_cloud(shape, 0, scale, offset), adversarial_cloud("random", 1, 1.0, 0.0)])
    check_backend_agrees(net, points, "triton")


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_autocast_stays_finite_on_adversarial_clouds(shape, backend, dtype):
    net = model("vision").train()
    points = torch.stack([adversarial_cloud(shape, 1, 1e6, 1e6), adversarial_cloud(shape, 2, 1e-6, 1.0)])
    assert_finite(*forward_backward(net, points, backend, autocast=dtype))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_autocast_matches_float32_within_its_precision(dtype):
    net = model("language").eval()
    points = torch.stack([adversarial_cloud("random", seed, 1.0, 0.0) for seed in range(2)])
    with ops.use_backend("torch"):
        full = net(points)
        with torch.autocast("cpu", dtype=dtype):
            mixed = net(points)
    torch.testing.assert_close(mixed.float(), full, atol=0.05 * float(full.detach().abs().max()), rtol=0.05)


def test_a_training_batch_of_one_cloud_keeps_the_running_statistics():
    net = model("language").train()
    norms = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm1d)]
    before = [m.running_mean.clone() for m in norms]
    points = adversarial_cloud("random", 0, 1.0, 0.0)[None]
    with ops.use_backend("torch"):
        assert_finite(*forward_backward(net, points, "torch"))
    head = [m for m in net.head.modules() if isinstance(m, torch.nn.BatchNorm1d)]
    assert head and all(torch.equal(m.running_mean, b) for m, b in zip(norms, before) if m in head)
