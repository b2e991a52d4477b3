"""``torch.compile``: the fused ops as custom ops (``torch.library.opcheck``), whole models traced in one graph.

Graph breaks are counted by ``torch._dynamo.explain`` and excluded by ``fullgraph=True``; the number of
non-empty buckets is data (an unbacked size of ``bucket_sort``'s custom op), which dynamo captures
under ``fullgraph=True`` or ``capture_dynamic_output_shape_ops``. Compiled code runs with the
``eager``/``aot_eager`` backends only (no C++ compilation here); its outputs, gradients and BatchNorm
buffers are compared with the same model run eagerly.
"""

from __future__ import annotations

import gc
import os

import pytest
import torch
import torch.nn.functional as F

from any2point_fast import Any2PointConfig, custom_ops, ops, reference, registry
from any2point_fast.geometry import ProjectionSpec, line_directions, view_rotations
from any2point_fast.model import StandInModel
from any2point_fast.torch_ops import native
from tests.ops.cases import bucket_ids, view_weights

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(hidden_size=32, num_points=64, num_tokens=16, knn_k=8, tokenizer_dim=4, tokenizer_bottleneck=2,
            head_hidden=16, num_classes=4)


def test_every_registered_op_has_a_custom_op():
    assert set(custom_ops.BOUNDARIES) == set(registry.OPS)
    for name in registry.OPS:
        assert custom_ops.custom_op(name)._qualname == f"{custom_ops.NAMESPACE}::{name}"


def _op_inputs() -> dict[str, tuple]:
    """Small arguments of every op, as :mod:`any2point_fast.ops` takes them (float inputs require grad)."""
    gen = torch.Generator().manual_seed(0)

    def rand(*shape, grad=True):
        return torch.randn(*shape, generator=gen).requires_grad_(grad)

    ids, num = bucket_ids("random", 2, 2, 10, gen)
    views = reference.bucket_sort(ids, num)
    voxels = reference.bucket_sort(bucket_ids("skewed", 1, 2, 10, gen)[0], 9)
    channels = 8
    return {
        "farthest_point_sample": (rand(2, 12, 3, grad=False), 4),
        "knn": (rand(2, 4, 3, grad=False), rand(2, 12, 3, grad=False), 3),
        "project_pe": (rand(2, 10, 3, grad=False), rand(16, channels), ProjectionSpec("1d", line_directions(2))),
        "bucket_sort": (ids, num),
        "neighborhood_attention_pool": (rand(2, 10, channels), views,
                                        *(w.requires_grad_() for w in view_weights(2, channels, 4, gen)), 2,
                                        "max+mean", 1e-5),
        "segment_pool": (rand(20, channels), voxels.segment_ids.flatten(), voxels.num_segments, "max+mean"),
        "batch_norm_gelu": (rand(9, channels), (0, 5, 9), rand(2, channels), rand(2, channels),
                            rand(2, channels, grad=False), rand(2, channels, grad=False).abs(), (True, False), 1e-5),
        "ensemble_propagate": (rand(2, 10, channels), rand(voxels.num_segments, channels), voxels.segment_ids[0],
                               rand(views.num_segments, channels), views.segment_ids, 0.3),
        "interpolate_features": (rand(2, 12, 3, grad=False), rand(2, 5, 3, grad=False), rand(2, 5, channels), 1e-8),
        "neighborhood_aggregate": (rand(2, 12, 4), rand(2, 5, 3, 3), torch.randint(0, 12, (2, 5), generator=gen),
                                   torch.randint(0, 12, (2, 5, 3), generator=gen), rand(4, channels), rand(4), rand(4),
                                   rand(4, grad=False), rand(4, grad=False).abs() + 0.5, rand(channels, 4),
                                   rand(channels), rand(channels), rand(channels, grad=False),
                                   rand(channels, grad=False).abs() + 0.5, True, 1e-5, 1000.0, 100.0),
    }


@pytest.mark.parametrize("name", registry.OPS)
def test_opcheck(name):
    """Schema, fake tensors, autograd registration and AOT dispatch (values and gradients) of each custom op."""
    torch.library.opcheck(custom_ops.custom_op(name), custom_ops.arguments(name, "torch", *_op_inputs()[name]))


def test_two_dimensional_projection_opcheck():
    spec = ProjectionSpec("2d", view_rotations(2), canvas_size=(32, 48), patch_size=8, camera_distance=1.6)
    args = custom_ops.arguments("project_pe", "torch", torch.randn(2, 10, 3), torch.randn(4, 6, 8), spec)
    torch.library.opcheck(custom_ops.custom_op("project_pe"), args)


@pytest.mark.parametrize("name", ["neighborhood_attention_pool", "batch_norm_gelu", "ensemble_propagate"])
def test_custom_op_matches_the_eager_op(name):
    """Through the custom op (its body, its backward op) the op gives the eager values and gradients, bitwise,
    contiguous as its fakes say."""
    args = _op_inputs()[name]
    floats = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    results = []
    for run in (lambda: getattr(ops, name)(*args), lambda: custom_ops.call(name, "torch", *args)):
        out = run()
        out = out[0] if isinstance(out, tuple) else out
        upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
        results.append((out, torch.autograd.grad(out, floats, upstream)))
    (eager, eager_grads), (custom, custom_grads) = results
    assert torch.equal(eager, custom) and custom.is_contiguous()
    for a, b in zip(eager_grads, custom_grads):
        assert torch.equal(a, b)
        assert b.is_contiguous(), "a compiled graph takes the fake's strides: contiguous"


def test_a_second_backward_recomputes_what_the_first_used_up():
    """A custom op's backward uses up the graph its forward recorded; a second backward through
    ``retain_graph`` runs the forward again and gives the same gradients."""
    args = _op_inputs()["neighborhood_aggregate"]
    floats = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    outputs = custom_ops.custom_op("neighborhood_aggregate")(*custom_ops.arguments("neighborhood_aggregate", "torch",
                                                                                  *args))
    assert len(custom_ops._RECORDED) == 1, "the forward recorded its graph, under the handle it returned last"
    upstream = torch.randn(outputs[0].shape, generator=torch.Generator().manual_seed(1))
    first = torch.autograd.grad(outputs[0], floats, upstream, retain_graph=True)
    assert not custom_ops._RECORDED
    second = torch.autograd.grad(outputs[0], floats, upstream)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def _step(model, run, points, labels):
    """Logits, and the gradients of the trainable parameters for the cross-entropy of one training step."""
    model.zero_grad()
    torch.manual_seed(1)  # the same dropout masks
    logits, loss = run(points, labels)
    loss.backward()
    return logits, {name: p.grad for name, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("preset", ["vision"])
def test_compiled_stand_in_training_step_equals_eager(preset):
    """A whole StandInModel's training forward and loss in one graph (``fullgraph=True``: a graph break
    fails), forward and backward equal to eager, BatchNorm running statistics updated alike."""
    torch.manual_seed(0)
    eager = StandInModel(Any2PointConfig.preset(preset, **TINY), num_layers=2, num_heads=2)
    twin = StandInModel(Any2PointConfig.preset(preset, **TINY), num_layers=2, num_heads=2)
    twin.load_state_dict(eager.state_dict())
    points, labels = torch.randn(3, 64, 3), torch.tensor([0, 3, 1])

    def loss_of(model):
        def run(points, labels):
            logits = model(points)
            return logits, F.cross_entropy(logits, labels)
        return run

    with ops.use_backend("torch"):
        compiled = torch.compile(loss_of(twin), backend="aot_eager", fullgraph=True)
        logits, grads = _step(eager, loss_of(eager), points, labels)
        compiled_logits, compiled_grads = _step(twin, compiled, points, labels)
    torch.testing.assert_close(compiled_logits, logits, rtol=1e-5, atol=1e-6)
    assert grads.keys() == compiled_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)
    for (name, buffer), twin_buffer in zip(eager.named_buffers(), twin.buffers()):
        torch.testing.assert_close(twin_buffer, buffer, rtol=1e-6, atol=1e-7, msg=name)
    assert any(b.num_batches_tracked > 0 for b in twin.modules() if isinstance(b, torch.nn.BatchNorm1d))


@pytest.mark.skipif(not native.available(torch.device("cpu")), reason="the compiled CPU kernels did not build")
def test_a_compiled_training_step_runs_each_forward_once_and_keeps_no_graph():
    """The backward ops run the graphs their forwards recorded (the tokenizer's aggregation runs once per
    stage in a step, as eagerly), and no recorded graph outlives its step, whether backward ran or not."""
    torch.manual_seed(0)
    model = StandInModel(Any2PointConfig.preset("vision", **TINY), num_layers=2, num_heads=2)
    points, labels = torch.randn(3, 64, 3), torch.tensor([0, 3, 1])
    with ops.use_backend("torch"):
        compiled = torch.compile(lambda p, y: F.cross_entropy(model(p), y), backend="aot_eager", fullgraph=True)
        compiled(points, labels).backward()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
            compiled(points, labels).backward()
        assert not custom_ops._RECORDED
        loss = compiled(points, labels)
        assert custom_ops._RECORDED, "a training forward records its graphs"
        del loss
        gc.collect()
        assert not custom_ops._RECORDED, "the graphs of a forward without backward are freed with it"
    runs = sum(event.count for event in profile.key_averages() if event.key == "any2point_native::aggregate_hidden")
    assert runs == model.config.tokenizer_stages


def test_hugging_face_model_traces_without_graph_breaks():
    """``torch._dynamo.explain`` of an Any2PointModel over a tiny random BERT, forward and loss: one graph."""
    transformers = pytest.importorskip("transformers")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from any2point_fast.model import Any2PointModel

    torch.manual_seed(0)
    backbone = transformers.AutoModel.from_config(transformers.BertConfig(
        vocab_size=99, max_position_embeddings=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64))
    model = Any2PointModel(backbone, **{k: v for k, v in TINY.items() if k != "hidden_size"})
    labels = torch.tensor([0, 3])

    def loss(points):
        return F.cross_entropy(model(points), labels)

    with ops.use_backend("torch"), torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        explained = torch._dynamo.explain(loss)(torch.randn(2, 64, 3))
    assert [b.reason for b in explained.break_reasons] == []
    assert explained.graph_break_count == 0 and explained.graph_count == 1
