"""``neighborhood_attention_pool``: every implementation and torch route against the reference.

The torch path's routes are registered implementations (``torch-compiled``, ``torch-flash``,
``torch-tiled``); each also runs with its argmax threshold at both ends (``saved argmax``: every
view saves the items of its maxima; ``recompute``: none does, backward recomputes the features),
and the tiled one with tiles small enough to split the test buckets.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from any2point_fast import reference as R
from any2point_fast.torch_ops import attention as torch_attention
from any2point_fast.torch_ops._common import segment_max
from tests.margins import min_max_margin
from tests.ops.cases import budget, check_op, layouts, prepare, property_settings, view_weights
from tests.ops.implementations import names, runnable, triton_device, with_route
from tests.ops.shapes import memory_violations

OP = "neighborhood_attention_pool"
NAMES = ["x", "ln_weight", "ln_bias", "qkv_weight", "qkv_bias", "out_weight", "out_bias"]
MAXIMA = {"saved argmax": 1, "recompute": 10**9}
#: ``(implementation, how maxima go backward)``: every torch route both ways, Triton once.
VARIANTS = [(name, maximum) for name in names(OP)
            for maximum in ((None,) if runnable(OP)[name].implementation.backend == "triton" else tuple(MAXIMA))]


#: The property test's: the tiled route (several times slower than flash on the CPU) once.
PROPERTY_VARIANTS = [v for v in VARIANTS if v != ("torch-tiled", "saved argmax")]
#: The ties test's: interpreted Triton and the tiled route (its maxima take the flash route's code) on
#: the smallest case of each bucket count only.
TIES = [(dtype, name, maximum, buckets, channels) for dtype in (torch.float32, torch.float16)
        for name, maximum in VARIANTS for buckets in (4, 1) for channels in (8, 100)
        if name not in ("triton", "torch-tiled") or (dtype, channels) == (torch.float32, 8)]


def variant(name: str, maximum: str | None, small_tiles: bool = True):
    """The function of an implementation, a torch route with its argmax threshold set by ``maximum``
    (and the tiled route's tiles small enough to split the test buckets)."""
    if maximum is None:
        return runnable(OP)[name].fn
    tiles = {"tile_elements": 20_000} if name == "torch-tiled" and small_tiles else {}
    return with_route(name, argmax_min_length=MAXIMA[maximum], **tiles)


def require(ok: bool) -> None:
    """Outside a property test a fixed draw must be clear of ties."""
    assert ok, "the fixed draw is too close to a tie"


def heads_and_widths(impl) -> list[tuple[int, int]]:
    """``(heads, D)``; C = 1, 2 are left out of the channels: LayerNorm over one channel is 0 / sqrt(eps),
    over two it divides by their difference; either amplifies rounding noise beyond any fixed tolerance."""
    if impl.implementation.backend == "triton":
        return [(6, 12), (2, 8), (1, 16)]
    return [(6, 12), (1, 4), (2, 16), (3, 3), (1, 64)]


def check(fn, device, segments, x, weights, num_heads, pooling, dtype, noncontiguous, seed, guard=assume):
    inputs = prepare([x, *weights], dtype, noncontiguous, device)
    if pooling == "max+mean":  # near-ties flip the maximum between backends
        guard(min_max_margin(inputs[0], segments, inputs[1:], num_heads) > 1e-5)
    check_op(lambda *a: fn(a[0], segments, *a[1:], num_heads, pooling),
             lambda *a: R.neighborhood_attention_pool(a[0], segments, *a[1:], num_heads, pooling),
             inputs, NAMES, dtype, grad_scale=4, seed=seed)


@pytest.mark.parametrize(("name", "maximum"), PROPERTY_VARIANTS)
def test_matches_the_reference(name, maximum):
    impl, fn = runnable(OP)[name], variant(name, maximum, small_tiles=False)
    triton = impl.implementation.backend == "triton"

    @property_settings(impl)
    @given(layouts(impl, max_views=2 if triton else None), st.sampled_from([8, 36, 96, 100]),
           st.sampled_from(heads_and_widths(impl)), st.sampled_from(["mean", "max+mean"]),
           st.sampled_from(budget(impl).dtypes), st.booleans())
    def run(layout, channels, heads_width, pooling, dtype, noncontiguous):
        assume(not triton or layout.ids.numel() <= 160)  # the interpreter: at most 160 items
        num_heads, width = heads_width
        gen = torch.Generator().manual_seed(layout.seed)
        x = torch.randn(layout.batch, layout.tokens, channels, generator=gen)
        weights = view_weights(layout.segments.num_views, channels, width, gen)
        check(fn, impl.device, layout.segments, x, weights, num_heads, pooling, dtype, noncontiguous, layout.seed)

    run()


@pytest.mark.parametrize(("dtype", "name", "maximum", "buckets", "channels"), TIES)
def test_max_pool_ties_match_the_reference(dtype, name, maximum, buckets, channels):
    """Duplicated tokens in every bucket tie for the maximum; they share its gradient equally
    (a view that would save argmaxes finds the tie in forward and recomputes instead, also with
    padded length classes: one bucket of 30 tokens). 100 channels: the compiled kernel's blocks of
    SIMD vectors, single vectors and last channels one at a time all see ties."""
    impl, fn = runnable(OP)[name], variant(name, maximum)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 30, channels, generator=gen)
    x[:, 0] += 3  # the maxima of the first bucket of a cloud, whose first token pads a length class
    x[:, 15:] = x[:, :15]  # token i + 15 duplicates token i ...
    ids = torch.randint(0, buckets, (3, 2, 15), generator=gen)
    segments = R.bucket_sort(torch.cat((ids, ids), dim=2).to(impl.device), buckets)  # ... and shares its buckets
    weights = view_weights(3, channels, 12, gen)
    weights[4] = torch.zeros_like(weights[4])  # t_j = x exactly: the ties are exact in every implementation
    weights[5] = torch.zeros_like(weights[5])
    inputs = prepare([x, *weights], dtype, False, impl.device)
    check_op(lambda *a: fn(a[0], segments, *a[1:], 6, "max+mean"),
             lambda *a: R.neighborhood_attention_pool(a[0], segments, *a[1:], 6, "max+mean"),
             inputs, NAMES, dtype, grad_scale=4)


def long_bucket_segments(lengths: list[int], device: torch.device):
    """Two views of buckets of the given lengths in one cloud, the tokens shuffled."""
    ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    ids = ids[torch.randperm(len(ids), generator=torch.Generator().manual_seed(1))]
    return R.bucket_sort(torch.stack((ids, ids.flip(0)))[:, None].to(device), len(lengths)), len(ids)


@pytest.mark.parametrize(("name", "maximum"), VARIANTS)
@pytest.mark.parametrize("pooling", ["mean", "max+mean"])
def test_long_buckets_of_every_length_class(pooling, name, maximum):
    """Buckets of 1..130 tokens (Triton: 1..40, several query and key blocks): the compiled kernels
    (every bucket but the singletons), or the explicit short path, then the exact and padded length
    classes of the flash and tiled paths."""
    impl, fn = runnable(OP)[name], variant(name, maximum)
    if impl.implementation.backend == "triton":
        lengths = [1, 2, 3, 5, 17, 40]
    else:
        lengths = [1, 2, 3, 4, 5, 17, 64, 65, 67, 68, 71, 72, 129, 130]
        route = impl.implementation.options["route"]
        plan = torch_attention._plan(long_bucket_segments(lengths, impl.device)[0], sum(lengths), route)
        if route.compiled:
            assert plan.native is not None and len(plan.native[0]) == 2 * 13, "the buckets are not compiled"
            assert [b.length for b in plan.batches] == [1]
        else:
            assert plan.native is None and any(b.keep is not None for b in plan.batches), "no padded class exercised"
    segments, tokens = long_bucket_segments(lengths, impl.device)
    gen = torch.Generator().manual_seed(2)
    inputs = prepare([torch.randn(1, tokens, 36, generator=gen), *view_weights(2, 36, 12, gen)], torch.float32, True,
                     impl.device)
    check_op(lambda *a: fn(a[0], segments, *a[1:], 6, pooling),
             lambda *a: R.neighborhood_attention_pool(a[0], segments, *a[1:], 6, pooling),
             inputs, NAMES, torch.float32, grad_scale=4)


@pytest.mark.parametrize(("name", "maximum"), [v for v in VARIANTS if v[1] is not None])
@pytest.mark.parametrize("pooling", ["mean", "max+mean"])
def test_gradcheck(pooling, name, maximum):
    """float64 ``gradcheck`` on a layout with singletons, short, exact and padded long buckets."""
    fn = variant(name, maximum)
    gen = torch.Generator().manual_seed(3)
    lengths = torch.tensor([1, 1, 2, 3, 6, 20, 67, 68])
    ids = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
    views = torch.stack((ids[torch.randperm(len(ids), generator=gen)], ids))[:, None]
    segments = R.bucket_sort(torch.cat((views, torch.zeros_like(views)), dim=1), len(lengths))
    x = torch.randn(2, len(ids), 5, generator=gen, dtype=torch.float64, requires_grad=True)
    weights = [w.double().requires_grad_() for w in view_weights(2, 5, 4, gen)]
    assert torch.autograd.gradcheck(lambda x, *w: fn(x, segments, *w, 2, pooling), (x, *weights), fast_mode=True)


@pytest.mark.parametrize("name", [n for n in names(OP) if n.startswith("torch")])
def test_the_plan_of_a_geometry_is_built_once(name, monkeypatch):
    """Every block of a model pools over the same segments: their plan (sort orders, bucket lists,
    sparse pooling matrices) is derived once per Segments object and route, then reused."""
    fn = runnable(OP)[name].fn
    built = []
    plan = torch_attention._plan
    monkeypatch.setattr(torch_attention, "_plan", lambda *args: built.append(1) or plan(*args))  # a spy, not a route
    segments = R.bucket_sort(torch.randint(0, 5, (2, 3, 20), generator=torch.Generator().manual_seed(0)), 5)
    gen = torch.Generator().manual_seed(1)
    x, weights = torch.randn(3, 20, 36, generator=gen, requires_grad=True), view_weights(2, 36, 12, gen)
    outputs = []
    for same in (segments, segments, segments.to("cpu")):  # .to makes a new Segments object
        out = fn(x, same, *weights, 6, "max+mean")
        outputs.append((out, *torch.autograd.grad(out.sum(), x)))
    assert len(built) == 2
    for out, grad in outputs[1:]:
        torch.testing.assert_close(out, outputs[0][0], rtol=0, atol=0)
        torch.testing.assert_close(grad, outputs[0][1], rtol=0, atol=0)


@pytest.mark.parametrize("name", [n for n in names(OP) if n.startswith("torch")])
def test_saved_argmax_rows_hold_the_maxima_of_padded_classes(name):
    """The rows saved for backward hold each bucket's maximum and are never a padding row (the
    padding repeats a real item: left in, it would tie with it and force the recomputation)."""
    lengths = torch.tensor([2, 3, 65, 67, 71, 130, 131])
    ids = torch.repeat_interleave(torch.arange(len(lengths)), lengths)[None, None]
    segments = R.bucket_sort(ids, len(lengths))
    plan = torch_attention._plan(segments, ids.shape[-1], runnable(OP)[name].implementation.options["route"])
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


@pytest.mark.parametrize("name", names(OP))
def test_no_per_view_or_quadratic_tensor(name):
    """No ``N × N`` tensor and no ``[M, B·N, C]``-sized one, forward and backward; the check catches the reference."""
    impl = runnable(OP)[name]
    views, batch, tokens, channels = 3, 2, 23, 100  # C > 3·D: the small per-item buffers stay below the bound
    gen = torch.Generator().manual_seed(2)
    segments = R.bucket_sort(torch.randint(0, 6, (views, batch, tokens), generator=gen).to(impl.device), 6)
    assert segments.num_segments < views * batch * tokens  # pooled rows [S, C] stay below the bound
    inputs = [torch.randn(batch, tokens, channels, generator=gen), *view_weights(views, channels, 12, gen)]

    def run(fn):
        def go():
            leaves = prepare(inputs, torch.float32, False, impl.device)
            fn(leaves[0], segments, *leaves[1:], 6, "max+mean").sum().backward()
        return go

    assert memory_violations(run(impl.fn), views, batch, tokens, channels) == []
    assert memory_violations(run(R.neighborhood_attention_pool), views, batch, tokens, channels)


def test_triton_weight_gradients_summed_over_token_splits(monkeypatch):
    """Triton sums the weight gradients over several token splits (partial sums added afterwards)."""
    from any2point_fast import kernels

    device = triton_device()
    monkeypatch.setattr("any2point_fast.kernels.attention._WGRAD_SPLIT_TOKENS", 32)
    gen = torch.Generator().manual_seed(4)
    segments = R.bucket_sort(torch.randint(0, 5, (2, 2, 40), generator=gen).to(device), 5)
    check(kernels.neighborhood_attention_pool, device, segments, torch.randn(2, 40, 36, generator=gen),
          view_weights(2, 36, 12, gen), 6, "max+mean", torch.float32, False, 4, require)


def test_triton_head_dim_64():
    from any2point_fast import kernels

    device = triton_device()
    gen = torch.Generator().manual_seed(5)
    segments = R.bucket_sort(torch.randint(0, 4, (2, 1, 18), generator=gen).to(device), 4)
    check(kernels.neighborhood_attention_pool, device, segments, torch.randn(1, 18, 8, generator=gen),
          view_weights(2, 8, 64, gen), 1, "max+mean", torch.float32, False, 5, require)


@pytest.mark.parametrize("name", names(OP))
def test_invalid_arguments_are_refused(name):
    impl = runnable(OP)[name]
    gen = torch.Generator().manual_seed(1)
    segments = R.bucket_sort(torch.randint(0, 3, (1, 1, 5), generator=gen).to(impl.device), 3)
    x, weights = torch.randn(1, 5, 8, generator=gen).to(impl.device), [w.to(impl.device)
                                                                        for w in view_weights(1, 8, 4, gen)]
    with pytest.raises(ValueError, match="pooling"):
        impl.fn(x, segments, *weights, 2, "max")
    with pytest.raises(ValueError, match="heads"):
        impl.fn(x, segments, *weights, 3, "mean")
