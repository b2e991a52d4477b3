"""``torch_ops`` against the reference: property tests of every fused op, outputs and gradients.

Every test draws the layout (clouds ``B``, tokens ``N``, views ``M``, channels ``C``, bucket
pattern), the dtype and the strides, runs the torch op and the reference on the same tensors,
and compares the outputs and the gradient of every differentiable input for a random upstream
gradient, at the tolerance of ``tests/tolerances.py``. The torch op is run twice and must be
bitwise repeatable.
"""

from __future__ import annotations

import gc
import itertools
import math
from typing import NamedTuple

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from any2point_fast import reference, torch_ops
from any2point_fast.config import Any2PointConfig
from any2point_fast.geometry import ProjectionSpec, Segments
from any2point_fast.torch_ops import _common as torch_common
from any2point_fast.torch_ops import attention as torch_attention
from any2point_fast.torch_ops import ensemble as torch_ensemble
from any2point_fast.torch_ops._common import segment_max
from tests.margins import min_max_margin
from tests.routes import ROUTES, use_compiled, use_route
from tests.tolerances import assert_close_to_reference

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FAST = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])

#: Bucket patterns: random ids among a few buckets, one bucket, all singletons, many empty
#: buckets, skewed sizes (long buckets of many different lengths: the padded flash classes).
PATTERNS = ("few", "one", "singletons", "sparse", "skewed")


def bucket_ids(pattern: str, views: int, batch: int, tokens: int, gen: torch.Generator) -> tuple[torch.Tensor, int]:
    """``[V, B, N]`` per-cloud bucket ids of ``pattern`` and the number of buckets per cloud."""
    shape = (views, batch, tokens)
    if pattern == "few":
        num = int(torch.randint(1, 7, (), generator=gen))
        return torch.randint(0, num, shape, generator=gen), num
    if pattern == "one":
        return torch.full(shape, 2, dtype=torch.long), 3
    if pattern == "singletons":
        return torch.stack([torch.randperm(tokens, generator=gen) for _ in range(views * batch)]).view(shape), tokens
    if pattern == "sparse":
        return torch.randint(0, 10_000, shape, generator=gen), 10_000
    num = int(torch.randint(2, 9, (), generator=gen))
    return (torch.rand(shape, generator=gen) ** 3 * num).long(), num


class Layout(NamedTuple):
    ids: torch.Tensor  # [V, B, N] bucket ids
    num_buckets: int
    segments: Segments
    batch: int
    tokens: int
    seed: int


@st.composite
def layouts(draw, max_views: int = 8, max_tokens: int = 300) -> Layout:
    """A random bucket layout: ``B`` in 1..4, ``N`` in 1..300 (mostly ≤ 24), ``V`` in 1..max_views."""
    pattern = draw(st.sampled_from(PATTERNS))
    views = draw(st.integers(1, max_views))
    batch = draw(st.integers(1, 4))
    tokens = draw(st.one_of(st.integers(1, 24), st.integers(25, max_tokens)))
    seed = draw(st.integers(0, 2**31 - 1))
    ids, num = bucket_ids(pattern, views, batch, tokens, torch.Generator().manual_seed(seed))
    return Layout(ids, num, torch_ops.bucket_sort(ids, num), batch, tokens, seed)


def strided(t: torch.Tensor) -> torch.Tensor:
    """The values of ``t`` as a non-contiguous view (every other element of a wider tensor)."""
    wide = t.new_zeros(*t.shape[:-1], 2 * t.shape[-1])
    wide[..., ::2] = t
    return wide[..., ::2]


def prepare(tensors: list[torch.Tensor], dtype: torch.dtype, noncontiguous: bool) -> list[torch.Tensor]:
    """The inputs in ``dtype``, optionally non-contiguous, requiring grad."""
    out = []
    for t in tensors:
        t = t.to(dtype)
        t = strided(t) if noncontiguous else t.clone()
        out.append(t.requires_grad_())
    return out


def run(op, inputs: list[torch.Tensor], grad_seed: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Output of ``op(*inputs)`` and the gradients of ``inputs`` for a random upstream gradient."""
    out = op(*inputs)
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed)).to(out.dtype)
    return out, list(torch.autograd.grad(out, inputs, upstream))


def check_op(op_torch, op_ref, inputs, names, dtype, grad_scale: float = 1.0, seed: int = 0,
             grad_rows: dict[str, torch.Tensor] | None = None, weight_scale: float = 16.0) -> None:
    """Torch op vs reference on the same inputs: outputs, gradients, and bitwise repeatability.

    The gradients of ``x``-like inputs are compared at ``grad_scale`` × the dtype's tolerance,
    those of weights shared by all tokens (names ending in ``weight``/``bias``, sums over up to
    ``M·B·N`` terms with cancellation) at ``weight_scale`` ×. ``grad_rows`` restricts the
    comparison of a named gradient to some rows (the others must only be finite).
    """
    out, grads = run(op_torch, inputs, seed)
    out_again, grads_again = run(op_torch, inputs, seed)
    ref_out, ref_grads = run(op_ref, inputs, seed)
    assert out.dtype == ref_out.dtype == inputs[0].dtype
    assert torch.equal(out, out_again), "torch op is not bitwise repeatable"
    assert_close_to_reference(out, ref_out, dtype, msg="output")
    for name, grad, grad_again, ref_grad in zip(names, grads, grads_again, ref_grads):
        assert grad.dtype == ref_grad.dtype
        assert torch.equal(grad, grad_again), f"gradient of {name} is not bitwise repeatable"
        if grad_rows and name in grad_rows:
            assert torch.isfinite(grad.float()).all() or dtype == torch.float16, f"gradient of {name}"
            grad, ref_grad = grad[grad_rows[name]], ref_grad[grad_rows[name]]
        scale = weight_scale if name.endswith(("weight", "bias", "_w", "_b")) else grad_scale
        assert_close_to_reference(grad, ref_grad, dtype, scale=scale, msg=f"gradient of {name}")


def view_weights(views: int, channels: int, width: int, gen: torch.Generator) -> list[torch.Tensor]:
    """``LN_j``, ``Attn_j`` weights of ``M`` views, scaled so that attention is far from uniform."""
    return [
        1 + 0.3 * torch.randn(views, channels, generator=gen),
        0.3 * torch.randn(views, channels, generator=gen),
        torch.randn(views, 3 * width, channels, generator=gen) * 1.5 / math.sqrt(channels),
        0.3 * torch.randn(views, 3 * width, generator=gen),
        torch.randn(views, channels, width, generator=gen) / math.sqrt(width),
        0.3 * torch.randn(views, channels, generator=gen),
    ]


# ----------------------------------------------------------------------------------- bucket_sort
@SETTINGS
@given(layouts(), st.booleans())
def test_bucket_sort_is_identical_to_reference(layout, int32_ids):
    ids = layout.ids.int() if int32_ids else layout.ids
    expected = reference.bucket_sort(layout.ids, layout.num_buckets)
    actual = torch_ops.bucket_sort(ids, layout.num_buckets)
    for field in ("segment_ids", "perm", "offsets"):
        a, e = getattr(actual, field), getattr(expected, field)
        assert a.dtype == e.dtype and torch.equal(a, e), field
    assert actual.view_offsets == expected.view_offsets
    assert actual.max_len == expected.max_len


def test_bucket_sort_hand_made():
    ids = torch.tensor([[[2, 0, 2, 1]], [[0, 0, 0, 0]]])
    s = torch_ops.bucket_sort(ids, 3)
    assert s.segment_ids.tolist() == [[[2, 0, 2, 1]], [[3, 3, 3, 3]]]
    assert s.perm.tolist() == [1, 3, 0, 2, 4, 5, 6, 7]
    assert s.offsets.tolist() == [0, 1, 2, 4, 8]
    assert s.view_offsets == (0, 3, 4) and s.max_len == 4


# ------------------------------------------------------------------------------------ project_pe
@FAST
@given(st.sampled_from(["language", "vision", "audio"]), st.integers(1, 6), st.integers(1, 3),
       st.integers(1, 200), st.sampled_from([1, 8, 36]), st.sampled_from([torch.float32, torch.float16]),
       st.sampled_from(["normal", "degenerate", "duplicates"]), st.integers(0, 2**31 - 1))
def test_project_pe_matches_reference(preset, views, batch, tokens, channels, dtype, cloud, seed):
    gen = torch.Generator().manual_seed(seed)
    config = Any2PointConfig.preset(preset, num_views=views)
    spec = ProjectionSpec.from_config(config)
    centers = torch.randn(batch, tokens, 3, generator=gen) * 3 + 1
    if cloud == "degenerate":
        centers[0] = centers[0, :1]
    elif cloud == "duplicates":
        centers = centers[:, torch.randint(0, tokens, (tokens,), generator=gen)]
    shape = (config.pe_length, channels) if config.pe_kind == "1d" else (*config.pe_grid, channels)
    table = torch.randn(shape, generator=gen).to(dtype)
    pe, buckets = torch_ops.project_pe(strided(centers), table, spec)
    ref_pe, ref_buckets = reference.project_pe(centers, table, spec)
    assert buckets.dtype == torch.int64 and torch.equal(buckets, ref_buckets)
    assert pe.dtype == dtype
    assert_close_to_reference(pe, ref_pe, dtype)


# ---------------------------------------------------------------------------------- segment_pool
@SETTINGS
@given(layouts(max_views=1), st.sampled_from([1, 8, 36, 96, 100]), st.sampled_from(["mean", "max+mean"]),
       st.sampled_from([torch.float32, torch.float16]), st.booleans(), st.booleans(), st.booleans(), st.booleans())
def test_segment_pool_matches_reference(layout, channels, pooling, dtype, noncontiguous, duplicates, gaps, compiled):
    segments, batch, tokens, seed = layout[2:]
    gen = torch.Generator().manual_seed(seed)
    values = torch.randn(batch * tokens, channels, generator=gen)
    if duplicates:  # many rows repeated: maxima tied between rows of a segment
        values = values[torch.randint(0, max(1, batch * tokens // 3), (batch * tokens,), generator=gen)]
    (v,) = prepare([values], dtype, noncontiguous)
    ids, num = segments.segment_ids.flatten(), segments.num_segments
    if gaps:  # every other segment empty: pooled to zeros
        ids, num = 2 * ids + 1, 2 * num + 1
    with pytest.MonkeyPatch.context() as monkeypatch:
        use_compiled(monkeypatch, compiled)
        check_op(lambda v: torch_ops.segment_pool(v, ids, num, pooling),
                 lambda v: reference.segment_pool(v, ids, num, pooling), [v], ["values"], dtype, seed=seed)


@pytest.mark.parametrize("backend", [reference, torch_ops])
def test_max_pool_gradient_at_a_zero_maximum(backend):
    """A maximum of exactly 0 gets its whole gradient: no zero fill may count as a tie."""
    values = torch.tensor([[0.0, 1.0], [-1.0, 2.0]], requires_grad=True)
    backend.segment_pool(values, torch.tensor([0, 0]), 1, "max+mean").sum().backward()
    torch.testing.assert_close(values.grad, torch.tensor([[1.5, 0.5], [0.5, 1.5]]))


def test_segment_pool_ties_share_the_gradient_equally():
    values = torch.tensor([[2.0, 1.0], [2.0, 3.0], [1.0, 3.0], [5.0, 5.0]], requires_grad=True)
    torch_ops.segment_pool(values, torch.tensor([0, 0, 0, 1]), 2, "max+mean").sum().backward()
    expected = torch.tensor([[1 / 3 + 1 / 2, 1 / 3], [1 / 3 + 1 / 2, 1 / 3 + 1 / 2], [1 / 3, 1 / 3 + 1 / 2], [2, 2]])
    torch.testing.assert_close(values.grad, expected)


# ------------------------------------------------------------------- neighborhood_attention_pool
HEADS_AND_WIDTH = st.sampled_from([(6, 12), (1, 4), (2, 16), (3, 3), (1, 64)])
# C = 1, 2 are left out: LayerNorm over one channel is 0 / sqrt(eps), over two it divides by their
# difference; either amplifies rounding noise (in the reference too) beyond any fixed tolerance.


@SETTINGS
@given(layouts(), st.sampled_from([8, 36, 96, 100]), HEADS_AND_WIDTH, st.sampled_from(["mean", "max+mean"]),
       st.sampled_from([torch.float32, torch.float16]), st.booleans(), st.sampled_from(ROUTES[:4]))
def test_neighborhood_attention_pool_matches_reference(layout, channels, heads_width, pooling, dtype, noncontiguous,
                                                       route):
    with pytest.MonkeyPatch.context() as monkeypatch:
        use_route(monkeypatch, route)
        check_neighborhood_attention_pool(layout, channels, heads_width, pooling, dtype, noncontiguous)


def check_neighborhood_attention_pool(layout, channels, heads_width, pooling, dtype, noncontiguous):
    segments, batch, tokens, seed = layout[2:]
    num_heads, width = heads_width
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, tokens, channels, generator=gen)
    weights = view_weights(segments.num_views, channels, width, gen)
    inputs = prepare([x, *weights], dtype, noncontiguous)
    if pooling == "max+mean":
        assume(min_max_margin(inputs[0], segments, inputs[1:], num_heads) > 1e-5)
    names = ["x", "ln_weight", "ln_bias", "qkv_weight", "qkv_bias", "out_weight", "out_bias"]
    check_op(lambda *a: torch_ops.neighborhood_attention_pool(a[0], segments, *a[1:], num_heads, pooling),
            lambda *a: reference.neighborhood_attention_pool(a[0], segments, *a[1:], num_heads, pooling),
            inputs, names, dtype, grad_scale=4, seed=seed)


@pytest.mark.parametrize("channels", [8, 100])
@pytest.mark.parametrize("buckets", [4, 1])
@pytest.mark.parametrize("route", ROUTES[:4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_neighborhood_max_pool_ties_match_reference(dtype, route, buckets, channels, monkeypatch):
    """Duplicated tokens in every bucket tie for the maximum; they share its gradient equally
    (a view that would save argmaxes finds the tie in forward and recomputes instead, also with
    padded length classes: one bucket of 30 tokens). 100 channels: the compiled kernel's blocks of
    SIMD vectors, single vectors and last channels one at a time all see ties."""
    use_route(monkeypatch, route)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 30, channels, generator=gen)
    x[:, 0] += 3  # the maxima of the first bucket of a cloud, whose first token pads a length class
    x[:, 15:] = x[:, :15]  # token i + 15 duplicates token i ...
    ids = torch.randint(0, buckets, (3, 2, 15), generator=gen)
    segments = torch_ops.bucket_sort(torch.cat((ids, ids), dim=2), buckets)  # ... and shares all its buckets
    weights = view_weights(3, channels, 12, gen)
    weights[4] = torch.zeros_like(weights[4])  # t_j = x exactly: the ties are exact in both paths
    weights[5] = torch.zeros_like(weights[5])
    inputs = prepare([x, *weights], dtype, noncontiguous=False)
    names = ["x", "ln_weight", "ln_bias", "qkv_weight", "qkv_bias", "out_weight", "out_bias"]
    check_op(lambda *a: torch_ops.neighborhood_attention_pool(a[0], segments, *a[1:], 6, "max+mean"),
            lambda *a: reference.neighborhood_attention_pool(a[0], segments, *a[1:], 6, "max+mean"),
            inputs, names, dtype, grad_scale=4)


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("pooling", ["mean", "max+mean"])
def test_long_buckets_of_every_length_class(pooling, route, monkeypatch):
    """Buckets of 1..130 tokens: the compiled kernels (every bucket but the singletons), or the
    explicit short path, then the exact and padded length classes of the flash and tiled paths."""
    use_route(monkeypatch, route)
    lengths = [1, 2, 3, 4, 5, 17, 64, 65, 67, 68, 71, 72, 129, 130]
    ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    ids = ids[torch.randperm(len(ids), generator=torch.Generator().manual_seed(1))]
    segments = torch_ops.bucket_sort(torch.stack((ids, ids.flip(0)))[:, None], len(lengths))
    plan = torch_attention._plan(segments, len(ids))
    if route.startswith("compiled"):
        assert plan.native is not None and len(plan.native[0]) == 2 * 13, "the buckets are not compiled"
        assert [b.length for b in plan.batches] == [1]
    else:
        assert plan.native is None and any(b.keep is not None for b in plan.batches), "no padded class exercised"
    gen = torch.Generator().manual_seed(2)
    inputs = prepare([torch.randn(1, len(ids), 36, generator=gen), *view_weights(2, 36, 12, gen)], torch.float32,
                     noncontiguous=True)
    check_op(lambda *a: torch_ops.neighborhood_attention_pool(a[0], segments, *a[1:], 6, pooling),
            lambda *a: reference.neighborhood_attention_pool(a[0], segments, *a[1:], 6, pooling),
            inputs, ["x", "ln_w", "ln_b", "qkv_w", "qkv_b", "out_w", "out_b"], torch.float32, grad_scale=4)


def test_the_plan_of_a_geometry_is_built_once(monkeypatch):
    """Every block of a model pools over the same segments: their plan (sort orders, bucket lists,
    sparse pooling matrices) is derived once per Segments object and route, then reused."""
    built = []
    plan = torch_attention._plan
    monkeypatch.setattr(torch_attention, "_plan", lambda *args: built.append(1) or plan(*args))
    ids = torch.randint(0, 5, (2, 3, 20), generator=torch.Generator().manual_seed(0))
    segments = torch_ops.bucket_sort(ids, 5)
    gen = torch.Generator().manual_seed(1)
    x, weights = torch.randn(3, 20, 36, generator=gen, requires_grad=True), view_weights(2, 36, 12, gen)
    outputs = []
    for same in (segments, segments, segments.to("cpu")):  # .to makes a new Segments object
        out = torch_ops.neighborhood_attention_pool(x, same, *weights, 6, "max+mean")
        outputs.append((out, *torch.autograd.grad(out.sum(), x)))
    assert len(built) == 2
    for out, grad in outputs[1:]:
        torch.testing.assert_close(out, outputs[0][0], rtol=0, atol=0)
        torch.testing.assert_close(grad, outputs[0][1], rtol=0, atol=0)


def test_the_ensemble_index_plan_is_built_once_per_ids(monkeypatch):
    """Every block passes the same view ids: the ensemble's sort orders are built once for them, and
    again for other baseline ids, for ids changed in place or for a new ids tensor; the values and
    gradients never depend on whether the plan was reused."""
    built = []
    plan = torch_ensemble._index_plan
    monkeypatch.setattr(torch_ensemble, "_index_plan", lambda *args: built.append(1) or plan(*args))
    gen = torch.Generator().manual_seed(0)
    view_ids, base_ids = torch.randint(0, 9, (3, 2, 10), generator=gen), torch.randint(0, 4, (2, 10), generator=gen)
    x = torch.randn(2, 10, 16, generator=gen)
    base_rows, view_rows = torch.randn(4, 16, generator=gen), torch.randn(9, 16, generator=gen)

    def run(views, bases):
        rows = (base_rows.clone().requires_grad_(), view_rows.clone().requires_grad_())
        out = torch_ops.ensemble_propagate(x, rows[0], bases, rows[1], views, 0.3)
        expected = reference.ensemble_propagate(x, base_rows, bases, view_rows, views, 0.3)
        torch.testing.assert_close(out, expected)
        return (out, *torch.autograd.grad(out.sum(), rows))

    first = run(view_ids, base_ids)
    for result in (run(view_ids, base_ids.clone()), run(view_ids, base_ids)):  # equal values: reused
        for ours, theirs in zip(result, first):
            torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    assert len(built) == 1
    run(view_ids, (base_ids + 1) % 4)
    assert len(built) == 2
    view_ids[0, 0, 0] = (view_ids[0, 0, 0] + 1) % 9  # in place: rebuilt
    run(view_ids, base_ids)
    run(view_ids.clone(), base_ids)
    assert len(built) == 4
    cached = len(torch_common._DERIVED)
    del view_ids
    gc.collect()
    assert len(torch_common._DERIVED) == cached - 1  # the plan goes with its ids
    view_ids = torch.randint(0, 9, (2, 10, 3), generator=gen).permute(2, 0, 1)  # strided ids
    with torch.inference_mode():  # built every time, not kept: its tensors could not be saved later
        for _ in range(2):
            out = torch_ops.ensemble_propagate(x, base_rows, base_ids, view_rows, view_ids, 0.3)
            expected = reference.ensemble_propagate(x, base_rows, base_ids, view_rows, view_ids, 0.3)
            torch.testing.assert_close(out, expected)
    assert len(built) == 6 and len(torch_common._DERIVED) == cached - 1
    run(view_ids, base_ids)  # then in training
    assert len(built) == 7


def test_segment_pool_bookkeeping_follows_its_ids_values():
    """segment_pool derives its sort order once per ids tensor, yet sees a change of their values made
    where no version counter sees it (a numpy buffer), and works in training after inference."""
    buffer = np.zeros(6, dtype=np.int64)
    ids = torch.from_numpy(buffer)
    values = torch.arange(12.0).view(6, 2).requires_grad_()
    with torch.inference_mode():
        torch_ops.segment_pool(values.detach(), ids, 3, "max+mean")
    for layout in ([0, 0, 0, 0, 0, 0], [0, 0, 1, 1, 2, 2]):
        buffer[:] = layout
        out = torch_ops.segment_pool(values, ids, 3, "max+mean")
        torch.testing.assert_close(out, reference.segment_pool(values, ids, 3, "max+mean"))
        out.sum().backward()


def test_saved_argmax_rows_hold_the_maxima_of_padded_classes():
    """The rows saved for backward hold each bucket's maximum and are never a padding row (the
    padding repeats a real item: left in, it would tie with it and force the recomputation)."""
    lengths = torch.tensor([2, 3, 65, 67, 71, 130, 131])
    ids = torch.repeat_interleave(torch.arange(len(lengths)), lengths)[None, None]
    segments = torch_ops.bucket_sort(ids, len(lengths))
    plan = torch_attention._plan(segments, ids.shape[-1])
    (items,) = torch_attention._max_items(plan, segments)
    assert items.padding is not None, "no padded class exercised"
    gen = torch.Generator().manual_seed(4)
    xf, out = torch.randn(ids.shape[-1], 36, generator=gen), torch.randn(len(plan.rows), 12, generator=gen)
    buffer = xf.new_empty(len(items.positions), 36)
    t = torch_attention._max_features(xf, out, plan, items, torch.randn(36, 12, generator=gen), buffer)
    expected = segment_max(t, items.local, len(items.segments))
    maxima, rows = torch_attention._maxima_and_items(t.clone(), items, torch.empty_like(t))
    assert rows is not None and torch.equal(maxima, expected)
    assert torch.equal(t.gather(0, rows), maxima)
    assert not torch.isin(rows, items.padding).any()


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("pooling", ["mean", "max+mean"])
def test_neighborhood_attention_pool_gradcheck(pooling, route, monkeypatch):
    """float64 ``gradcheck`` on a layout with singletons, short, exact and padded long buckets."""
    use_route(monkeypatch, route)
    gen = torch.Generator().manual_seed(3)
    lengths = torch.tensor([1, 1, 2, 3, 6, 20, 67, 68])
    ids = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
    views = torch.stack((ids[torch.randperm(len(ids), generator=gen)], ids))[:, None]
    segments = torch_ops.bucket_sort(torch.cat((views, torch.zeros_like(views)), dim=1), len(lengths))
    x = torch.randn(2, len(ids), 5, generator=gen, dtype=torch.float64, requires_grad=True)
    weights = [w.double().requires_grad_() for w in view_weights(2, 5, 4, gen)]

    def op(x, *w):
        return torch_ops.neighborhood_attention_pool(x, segments, *w, 2, pooling)

    assert torch.autograd.gradcheck(op, (x, *weights), fast_mode=True)


# ---------------------------------------------------------------------------- ensemble_propagate
@SETTINGS
@given(layouts(), st.sampled_from([2, 8, 36, 96, 100]), st.floats(0.05, 1.0),
       st.sampled_from([torch.float32, torch.float16]), st.booleans(), st.booleans(), st.booleans(), st.booleans())
def test_ensemble_propagate_matches_reference(layout, channels, coef, dtype, noncontiguous, zero_rows, shared_rows,
                                              compiled):
    with pytest.MonkeyPatch.context() as monkeypatch:
        use_compiled(monkeypatch, compiled)
        check_ensemble_propagate(layout, channels, coef, dtype, noncontiguous, zero_rows, shared_rows)


def check_ensemble_propagate(layout, channels, coef, dtype, noncontiguous, zero_rows, shared_rows):
    # C = 1 is left out: every cosine is ±1, and where all M are −1 the 1/eps of the weight
    # normalisation turns rounding noise into the gradient, in the reference as well.
    segments, batch, tokens, seed = layout[2:]
    gen = torch.Generator().manual_seed(seed)
    voxel_ids = torch.randint(0, max(1, tokens // 4), (batch, tokens), generator=gen)
    x = torch.randn(batch, tokens, channels, generator=gen)
    base_rows = torch.randn(int(voxel_ids.max()) + 1, channels, generator=gen)
    view_rows = torch.randn(segments.num_segments, channels, generator=gen)
    kept = None
    if zero_rows:  # norms of 0: the clamped denominator of the cosine. The gradient of such a row
        base_rows[0] = 0  # is its neighbours' sum over 1/eps: compared on the other rows only.
        view_rows[::3] = 0
        kept = {"base_rows": base_rows.norm(dim=1) > 0, "view_rows": view_rows.norm(dim=1) > 0}
    inputs = prepare([x, base_rows, view_rows], dtype, noncontiguous)
    view_ids = segments.segment_ids
    if shared_rows:  # any row may serve several views, clouds, even one token twice
        view_ids = torch.randint(0, segments.num_segments, view_ids.shape, generator=gen)
    # A token whose views all point away from its baseline (every cosine near −1, likely at small
    # C and M) has its weight normaliser at the eps clamp: there a rounding difference switches
    # the gradient on or off, in the reference as well. Its rows are compared in value only.
    base, views = inputs[1].float()[voxel_ids], inputs[2].float()[view_ids]
    cos = (base * views).sum(-1) / (base.norm(dim=-1) * views.norm(dim=-1)).clamp_min(1e-8)
    at_clamp = ((cos + 1) / 2).sum(dim=0) < 1e-3  # [B, N]
    if bool(at_clamp.any()):
        kept = kept or {"base_rows": torch.ones(len(base_rows), dtype=torch.bool),
                        "view_rows": torch.ones(len(view_rows), dtype=torch.bool)}
        kept["base_rows"][voxel_ids[at_clamp]] = False
        kept["view_rows"][view_ids[:, at_clamp].flatten()] = False

    def torch_op(x, b, v):
        return torch_ops.ensemble_propagate(x, b, voxel_ids, v, view_ids, coef)

    def ref_op(x, b, v):
        return reference.ensemble_propagate(x, b, voxel_ids, v, view_ids, coef)

    check_op(torch_op, ref_op, inputs, ["x", "base_rows", "view_rows"], dtype, grad_scale=4, seed=seed,
            grad_rows=kept)


@pytest.mark.parametrize("compiled", [True, False])
def test_ensemble_opposite_and_aligned_views_hand_made(compiled, monkeypatch):
    """Token 0 sees one view opposite to its baseline (cos = −1, weight 0) and one aligned (weight 1)."""
    use_compiled(monkeypatch, compiled)
    base = torch.tensor([[1.0, 2.0, -1.0]], requires_grad=True)
    rows = torch.tensor([[-2.0, -4.0, 2.0], [0.5, 1.0, -0.5], [1.0, 0.0, 0.0]], requires_grad=True)
    view_ids = torch.tensor([[[0, 2]], [[1, 2]]])
    out = torch_ops.ensemble_propagate(torch.zeros(1, 2, 3), base, torch.zeros(1, 2, dtype=torch.long), rows,
                                       view_ids, 0.5)
    torch.testing.assert_close(out[0, 0], 0.5 * rows[1].detach())
    torch.testing.assert_close(out[0, 1], 0.5 * rows[2].detach())
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(0))
    grads = torch.autograd.grad(out, (base, rows), upstream)
    ref = reference.ensemble_propagate(torch.zeros(1, 2, 3), base, torch.zeros(1, 2, dtype=torch.long), rows,
                                       view_ids, 0.5)
    for grad, ref_grad in zip(grads, torch.autograd.grad(ref, (base, rows), upstream)):
        assert_close_to_reference(grad, ref_grad)


@pytest.mark.parametrize("compiled", [True, False])
def test_ensemble_clamps_hand_made(compiled, monkeypatch):
    """The two clamps of Eq. 3's weights, one view per token: token 0's view is exactly opposite
    its baseline (cos = −1, so the weights sum to 0: clamped, the token keeps x); token 1's view
    row is zero (its cosine's denominator is clamped: cos = 0, weight 1 on a zero row)."""
    use_compiled(monkeypatch, compiled)
    x = torch.tensor([[[1.0, 1.0, 1.0], [2.0, 2.0, 2.0]]])
    args = (torch.tensor([[1.0, 0.0, 0.0]]), torch.zeros(1, 2, dtype=torch.long),
            torch.tensor([[-2.0, 0.0, 0.0], [0.0, 0.0, 0.0]]), torch.tensor([[[0, 1]]]), 0.5)
    out = torch_ops.ensemble_propagate(x, *args)
    torch.testing.assert_close(out, x, rtol=0, atol=0)
    torch.testing.assert_close(out, reference.ensemble_propagate(x, *args), rtol=0, atol=0)


@pytest.mark.parametrize("compiled", [True, False])
def test_ensemble_propagate_gradcheck(compiled, monkeypatch):
    use_compiled(monkeypatch, compiled)
    gen = torch.Generator().manual_seed(4)
    view_ids = torch.randint(0, 7, (3, 2, 9), generator=gen)
    base_ids = torch.randint(0, 4, (2, 9), generator=gen)
    x = torch.randn(2, 9, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    base = torch.randn(4, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    rows = torch.randn(7, 6, generator=gen, dtype=torch.float64, requires_grad=True)

    def op(x, base, rows):
        return torch_ops.ensemble_propagate(x, base, base_ids, rows, view_ids, 0.7)

    assert torch.autograd.gradcheck(op, (x, base, rows))


# ------------------------------------------------------------------------------- batch_norm_gelu
@st.composite
def row_groups(draw) -> tuple[tuple[int, ...], tuple[bool, ...]]:
    """Offsets of 1..8 groups of rows (empty, single and longer ones), and which groups use their
    own statistics (only groups of two rows or more can)."""
    sizes = draw(st.lists(st.one_of(st.integers(0, 2), st.integers(3, 80)), min_size=1, max_size=8))
    batch = tuple(draw(st.booleans()) and size > 1 for size in sizes)
    return tuple(itertools.accumulate(sizes, initial=0)), batch


def norm_inputs(offsets: tuple[int, ...], channels: int, gen: torch.Generator) -> list[torch.Tensor]:
    """Rows off-centre and wide (the statistics matter), affine weights, running statistics."""
    groups = len(offsets) - 1
    rows = 2 + 3 * torch.randn(offsets[-1], channels, generator=gen)
    return [rows, 1 + 0.5 * torch.randn(groups, channels, generator=gen),
            0.5 * torch.randn(groups, channels, generator=gen), torch.randn(groups, channels, generator=gen),
            0.5 + torch.rand(groups, channels, generator=gen)]


@SETTINGS
@given(row_groups(), st.sampled_from([1, 8, 36, 96, 100]), st.sampled_from([torch.float32, torch.float16]),
       st.booleans(), st.booleans(), st.integers(0, 2**31 - 1))
def test_batch_norm_gelu_matches_reference(groups, channels, dtype, noncontiguous, compiled, seed):
    offsets, batch = groups
    rows, weight, bias, running_mean, running_var = norm_inputs(offsets, channels, torch.Generator().manual_seed(seed))
    inputs = prepare([rows, weight, bias], dtype, noncontiguous)

    def torch_op(rows, weight, bias):
        return torch_ops.batch_norm_gelu(rows, offsets, weight, bias, running_mean, running_var, batch)[0]

    def ref_op(rows, weight, bias):
        return reference.batch_norm_gelu(rows, offsets, weight, bias, running_mean, running_var, batch)[0]

    with pytest.MonkeyPatch.context() as monkeypatch:
        use_compiled(monkeypatch, compiled)
        check_op(torch_op, ref_op, inputs, ["rows", "weight", "bias"], dtype, grad_scale=4, seed=seed)
        _, mean, var = torch_ops.batch_norm_gelu(inputs[0], offsets, *inputs[1:], running_mean, running_var, batch)
    _, ref_mean, ref_var = reference.batch_norm_gelu(inputs[0], offsets, *inputs[1:], running_mean, running_var, batch)
    assert mean.dtype == var.dtype == torch.float32 and not mean.requires_grad
    assert_close_to_reference(mean, ref_mean, dtype, msg="mean")
    assert_close_to_reference(var, ref_var, dtype, scale=4, msg="var")


@pytest.mark.parametrize("compiled", [True, False])
def test_batch_norm_gelu_hand_made(compiled, monkeypatch):
    """Group 0 (own statistics): rows ±1 around 3 → mean 3, biased var 1, z = ±1/√(1 + eps);
    group 1 (given statistics) is x·rstd·γ + β exactly; group 2 is empty."""
    use_compiled(monkeypatch, compiled)
    rows = torch.tensor([[2.0], [4.0], [0.5]])
    out, mean, var = torch_ops.batch_norm_gelu(rows, (0, 2, 3, 3), torch.tensor([[1.0], [2.0], [1.0]]),
                                               torch.tensor([[0.0], [-1.0], [0.0]]), torch.zeros(3, 1),
                                               torch.full((3, 1), 4.0), (True, False, False), eps=0.0)
    torch.testing.assert_close(mean, torch.tensor([[3.0], [0.0], [0.0]]))
    torch.testing.assert_close(var, torch.tensor([[1.0], [4.0], [4.0]]))
    z = torch.tensor([[-1.0], [1.0], [-0.5]])  # group 1: 0.5 · 4^-½ · 2 − 1
    torch.testing.assert_close(out, z * 0.5 * (1 + torch.erf(z / math.sqrt(2))))


@pytest.mark.parametrize("compiled", [True, False])
def test_batch_norm_gelu_gradcheck(compiled, monkeypatch):
    use_compiled(monkeypatch, compiled)
    offsets, batch = (0, 3, 3, 4, 9), (True, False, False, True)
    rows, weight, bias, running_mean, running_var = (
        t.double() for t in norm_inputs(offsets, 5, torch.Generator().manual_seed(5)))

    def op(rows, weight, bias):
        return torch_ops.batch_norm_gelu(rows, offsets, weight, bias, running_mean, running_var, batch)[0]

    assert torch.autograd.gradcheck(op, tuple(t.requires_grad_() for t in (rows, weight, bias)))
