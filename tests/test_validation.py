"""Bad input at the public API gets an error naming what was expected and what was received."""

import pytest
import torch

from any2point_fast import Any2PointConfig, ReferenceModel, ops
from any2point_fast.geometry import ProjectionSpec
from any2point_fast.reference import ReferenceAdapter, ViewAttention, build_geometry
from any2point_fast.validation import InputError

CFG = Any2PointConfig.preset("language", hidden_size=24, num_points=64, num_tokens=16, knn_k=4)


@pytest.fixture(scope="module")
def model():
    return ReferenceModel(CFG, num_layers=1).eval()


@pytest.mark.parametrize("points, words", [
    (torch.randn(64, 3), r"\[B, P, 3\]"),
    (torch.randn(2, 64, 2), r"\[B, P, 3\]"),
    (torch.randint(0, 5, (2, 64, 3)), "floating point"),
    (torch.randn(0, 64, 3), "empty batch"),
    (torch.randn(2, 10, 3), "at least 64 points"),
    (torch.full((2, 64, 3), float("nan")), "NaN or Inf"),
    (torch.tensor([[[float("inf"), 0.0, 0.0]] * 64, [[0.0, 0.0, 0.0]] * 64]), r"clouds \[0\]"),
    ([[0.0, 0.0, 0.0]], "torch.Tensor"),
])
def test_model_refuses_bad_points(model, points, words):
    with pytest.raises(InputError, match=words):
        model(points)


def _adapter_inputs():
    gen = torch.Generator().manual_seed(0)
    centers = torch.randn(2, 16, 3, generator=gen)
    _, geometry = build_geometry(centers, torch.randn(77, 24, generator=gen), ProjectionSpec.from_config(CFG),
                                 CFG.voxel_size)
    return torch.randn(2, 17, 24, generator=gen), geometry


def test_adapter_refuses_mismatched_inputs():
    adapter = ReferenceAdapter(CFG)
    hidden, geometry = _adapter_inputs()
    with pytest.raises(InputError, match=r"hidden and ffn_out must have one shape and device"):
        adapter(hidden, hidden[:, :5], geometry)
    with pytest.raises(InputError, match=r"\[B, N\] = \[2, 16\].*\[2, 20\]"):
        adapter(torch.randn(2, 21, 24), torch.randn(2, 21, 24), geometry)
    with pytest.raises(InputError, match=r"\[B, P \+ N, C\]"):
        adapter(hidden[0], hidden[0], geometry)
    with pytest.raises(InputError, match="leaves no point tokens"):
        adapter(hidden, hidden, geometry, num_prefix_tokens=17)


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_ops_refuse_bad_shapes_before_any_backend(backend):
    hidden, geometry = _adapter_inputs()
    tokens = hidden[:, 1:]
    attn = ViewAttention(24, 6, 12, 6)
    spec = ProjectionSpec.from_config(CFG)
    with ops.use_backend(backend):
        with pytest.raises(InputError, match="rank 2"):
            ops.project_pe(torch.randn(2, 16, 3), torch.randn(7, 7, 24), spec)
        with pytest.raises(InputError, match=r"centers must be float \[B, N, 3\]"):
            ops.project_pe(torch.randn(2, 16, 4), torch.randn(77, 24), spec)
        with pytest.raises(InputError, match="int64"):
            ops.bucket_sort(torch.zeros(1, 2, 16, dtype=torch.int32), 4)
        with pytest.raises(InputError, match=r"tokens are \[B, N\] = \[2, 15\]"):
            ops.neighborhood_attention_pool(tokens[:, 1:], geometry.views, *attn.weights(), 6, "mean")
        weights = list(attn.weights())
        weights[2] = weights[2][:, :, :20]
        with pytest.raises(InputError, match=r"qkv_weight must have shape \[6, 36, 24\]"):
            ops.neighborhood_attention_pool(tokens, geometry.views, *weights, 6, "mean")
        with pytest.raises(InputError, match="not divisible by num_heads=5"):
            ops.neighborhood_attention_pool(tokens, geometry.views, *attn.weights(), 5, "mean")
        with pytest.raises(InputError, match=r"view_ids must be \[M, B, N\]"):
            ops.ensemble_propagate(tokens, torch.randn(3, 24), geometry.voxels.segment_ids[0], torch.randn(5, 24),
                                   geometry.views.segment_ids[:, :1], 0.3)
        with pytest.raises(InputError, match=r"base_rows must be \[S, 24\]"):
            ops.ensemble_propagate(tokens, torch.randn(3, 23), geometry.voxels.segment_ids[0], torch.randn(5, 24),
                                   geometry.views.segment_ids, 0.3)
        with pytest.raises(InputError, match=r"segment ids \[T\]"):
            ops.segment_pool(torch.randn(10, 4), torch.zeros(9, dtype=torch.long), 1, "mean")
        stats = [torch.ones(2, 4)] * 4
        with pytest.raises(InputError, match="offsets must rise from 0 to the 5 rows"):
            ops.batch_norm_gelu(torch.randn(5, 4), (0, 3, 4), *stats, (True, False))
        with pytest.raises(InputError, match=r"groups \[1\] have fewer than 2 rows"):
            ops.batch_norm_gelu(torch.randn(5, 4), (0, 4, 5), *stats, (True, True))
        with pytest.raises(InputError, match=r"running_var must have shape \[2, 4\]"):
            ops.batch_norm_gelu(torch.randn(5, 4), (0, 4, 5), *stats[:3], torch.ones(2, 3), (True, False))


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        ops.set_backend("cuda")
