"""The Triton backend (``kernels/``) against the reference oracle, op by op.

Hypothesis property tests of every fused op's forward and (where it has one) backward, with a
random upstream gradient and the gradient of every differentiable input compared, on random
shapes (odd channel counts included), bucket layouts (one bucket, all singletons, many empty
buckets, one-token clouds), float32/float16/bfloat16 and non-contiguous inputs; plus bitwise
determinism of repeated runs and the memory invariants of DESIGN.md §2.

Without a GPU the kernels run under ``TRITON_INTERPRET=1`` (NumPy, slow: shapes stay small).
``@triton.jit`` reads that variable when a kernel module is imported, so it is set here before
``any2point_fast.kernels`` is first imported; ``tests/conftest.py`` should set it for the whole
session (``os.environ.setdefault("TRITON_INTERPRET", "1")`` unless CUDA is available). With a
GPU and the variable unset, the same tests run the compiled kernels on CUDA tensors.
"""

from __future__ import annotations

import math
import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

triton = pytest.importorskip("triton")

from hypothesis import HealthCheck, assume, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from any2point_fast import kernels as K  # noqa: E402
from any2point_fast import ops  # noqa: E402
from any2point_fast import reference as R  # noqa: E402
from any2point_fast.geometry import ProjectionSpec, Segments, line_directions, view_rotations  # noqa: E402
from tests.margins import min_max_margin  # noqa: E402
from tests.tolerances import TOLERANCES, assert_close_to_reference  # noqa: E402

_INTERPRETED = not isinstance(K.segment_pool.__globals__["_segment_pool_fwd_kernel"], triton.runtime.JITFunction)
if not _INTERPRETED and not torch.cuda.is_available():
    pytest.skip("any2point_fast.kernels was imported before TRITON_INTERPRET=1 was set and there is no GPU; set it "
                "in tests/conftest.py: os.environ.setdefault('TRITON_INTERPRET', '1')", allow_module_level=True)

DEVICE = torch.device("cpu" if _INTERPRETED else "cuda")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
PROPERTY = settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])

seeds = st.integers(0, 2**31 - 1)
channel_counts = st.sampled_from((8, 36, 100))
dtypes = st.sampled_from(DTYPES)
layouts = st.sampled_from(("random", "one_bucket", "singletons", "sparse"))


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(gen: torch.Generator, *shape: int, scale: float = 1.0, dtype=torch.float32,
           contiguous: bool = True) -> torch.Tensor:
    """Random normal tensor on DEVICE; ``contiguous=False`` gives a transposed view of the same values."""
    if contiguous or len(shape) < 2:
        return (torch.randn(*shape, generator=gen) * scale).to(DEVICE, dtype)
    t = (torch.randn(*shape[:-2], shape[-1], shape[-2], generator=gen) * scale).to(DEVICE, dtype)
    return t.transpose(-1, -2)


def _bucket_ids(gen: torch.Generator, layout: str, views: int, batch: int, tokens: int) -> tuple[torch.Tensor, int]:
    """``[V, B, N]`` per-cloud bucket ids of a layout, and the number of buckets."""
    shape = (views, batch, tokens)
    if layout == "one_bucket":
        num_buckets = int(torch.randint(1, 5, (), generator=gen))
        ids = torch.randint(0, num_buckets, (views, batch, 1), generator=gen).expand(shape)
    elif layout == "singletons":
        num_buckets = tokens + int(torch.randint(0, 5, (), generator=gen))
        ids = torch.stack([torch.randperm(num_buckets, generator=gen)[:tokens] for _ in range(views * batch)])
    elif layout == "sparse":  # a handful of occupied buckets among many empty ones
        num_buckets = 10 * tokens + 50
        used = torch.randint(0, num_buckets, (views, batch, 3), generator=gen)
        ids = used.gather(2, torch.randint(0, 3, shape, generator=gen))
    else:
        num_buckets = int(torch.randint(1, 12, (), generator=gen))
        ids = torch.randint(0, num_buckets, shape, generator=gen)
    return ids.reshape(shape).to(DEVICE).contiguous(), num_buckets


def _assert_same_segments(actual: Segments, expected: Segments) -> None:
    for field in ("segment_ids", "perm", "offsets"):
        a, e = getattr(actual, field), getattr(expected, field)
        assert a.dtype == e.dtype == torch.int64 and a.shape == e.shape, field
        assert torch.equal(a, e), field
    assert actual.view_offsets == expected.view_offsets
    assert type(actual.max_len) is int and actual.max_len == expected.max_len
    assert all(type(v) is int for v in actual.view_offsets)


def _leaves(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.detach().clone().requires_grad_() for t in tensors]


def _compare_grads(names, actual, expected, dtype, scale=1.0) -> None:
    for name, a, e in zip(names, actual, expected):
        assert a.grad is not None and a.grad.dtype == a.dtype, name
        assert_close_to_reference(a.grad, e.grad, dtype, scale=scale, msg=f"gradient of {name}")


# --------------------------------------------------------------------------------------------- bucket_sort
@PROPERTY
@given(seed=seeds, views=st.integers(1, 8), batch=st.integers(1, 3), tokens=st.integers(1, 40), layout=layouts)
def test_bucket_sort_matches_reference(seed, views, batch, tokens, layout):
    ids, num_buckets = _bucket_ids(_generator(seed), layout, views, batch, tokens)
    _assert_same_segments(K.bucket_sort(ids, num_buckets), R.bucket_sort(ids, num_buckets))


@pytest.mark.parametrize("layout", ["one_bucket", "singletons", "sparse"])
def test_bucket_sort_layouts(layout):
    ids, num_buckets = _bucket_ids(_generator(7), layout, 3, 2, 37)
    segments = K.bucket_sort(ids, num_buckets)
    _assert_same_segments(segments, R.bucket_sort(ids, num_buckets))
    expected_segments = {"one_bucket": 6, "singletons": 6 * 37}.get(layout)
    if expected_segments is not None:
        assert segments.num_segments == expected_segments


def test_bucket_sort_one_token_clouds_and_long_rows():
    ids = torch.tensor([[[3], [0]], [[1], [1]]], device=DEVICE)  # two views, two one-token clouds
    _assert_same_segments(K.bucket_sort(ids, 4), R.bucket_sort(ids, 4))
    ids = torch.randint(0, 5, (1, 2, 300), generator=_generator(1)).to(DEVICE)  # rows longer than a block
    _assert_same_segments(K.bucket_sort(ids, 5), R.bucket_sort(ids, 5))


@pytest.mark.parametrize(("rows", "keys"), [(1, 1), (100, 7), (3000, 37), (2500, 2500)])
def test_group_by_key_is_a_stable_sort(rows, keys):
    """The chunked counting sort behind segment_pool and the ensemble backward (rows > 1024: several chunks)."""
    from any2point_fast.kernels.buckets import group_by_key

    ids = torch.randint(0, keys, (rows,), generator=_generator(rows)).to(DEVICE)
    perm, offsets = group_by_key(ids, keys)
    assert torch.equal(perm, torch.argsort(ids, stable=True))
    counts = torch.bincount(ids, minlength=keys)
    assert torch.equal(offsets, torch.cat((counts.new_zeros(1), counts.cumsum(0))))


def test_bucket_sort_rejects_out_of_range_ids():
    with pytest.raises(ValueError, match="must lie in"):
        K.bucket_sort(torch.tensor([[[0, 4]]], device=DEVICE), 4)


# ---------------------------------------------------------------------------------------------- project_pe
def _spec(gen: torch.Generator, kind: str, views: int) -> ProjectionSpec:
    if kind == "1d":
        directions = line_directions(views) if views <= 6 else torch.nn.functional.normalize(
            torch.randn(views, 3, generator=gen), dim=1)
        return ProjectionSpec("1d", directions, segment_length=float(torch.randint(1, 4, (), generator=gen)))
    if views <= 6:
        rotations = view_rotations(views)
    else:
        rotations = torch.linalg.qr(torch.randn(views, 3, 3, generator=gen, dtype=torch.float64))[0].float()
    canvas = ((518, 518), (192, 304), (40, 24))[int(torch.randint(0, 3, (), generator=gen))]
    patch = int(torch.randint(4, 27, (), generator=gen))
    return ProjectionSpec("2d", rotations, canvas_size=canvas, patch_size=patch, camera_distance=1.4)


@PROPERTY
@given(seed=seeds, kind=st.sampled_from(("1d", "2d")), views=st.integers(1, 8), batch=st.integers(1, 3),
       tokens=st.integers(1, 40), channels=channel_counts, dtype=dtypes,
       cloud=st.sampled_from(("normal", "lattice", "degenerate")), contiguous=st.booleans())
def test_project_pe_matches_reference(seed, kind, views, batch, tokens, channels, dtype, cloud, contiguous):
    gen = _generator(seed)
    spec = _spec(gen, kind, views)
    if cloud == "lattice":  # positions land exactly on bucket borders
        centers = (torch.randint(-3, 4, (batch, tokens, 3), generator=gen) * 0.25).to(DEVICE)
    else:
        centers = _randn(gen, batch, tokens, 3, scale=2.0)
        if cloud == "degenerate":
            centers[0] = centers[0, :1]
    if not contiguous:
        centers = centers.transpose(0, 1).contiguous().transpose(0, 1)
    shape = (77, channels) if kind == "1d" else (int(torch.randint(2, 15, (), generator=gen)), 11, channels)
    table = _randn(gen, *shape, dtype=dtype)
    pe, buckets = K.project_pe(centers, table, spec)
    ref_pe, ref_buckets = R.project_pe(centers, table, spec)
    assert pe.dtype == dtype and buckets.dtype == torch.int64
    assert torch.equal(buckets, ref_buckets)
    assert_close_to_reference(pe, ref_pe, dtype)


def test_project_pe_has_no_backward():
    table = torch.randn(77, 8, device=DEVICE, requires_grad=True)
    with pytest.raises(NotImplementedError):
        K.project_pe(torch.randn(1, 4, 3, device=DEVICE), table, ProjectionSpec("1d", line_directions(2)))


# -------------------------------------------------------------------------------------------- segment_pool
@PROPERTY
@given(seed=seeds, rows=st.integers(1, 60), channels=channel_counts, num_segments=st.integers(1, 20),
       pooling=st.sampled_from(("mean", "max+mean")), dtype=dtypes, contiguous=st.booleans())
def test_segment_pool_matches_reference(seed, rows, channels, num_segments, pooling, dtype, contiguous):
    gen = _generator(seed)
    values = _randn(gen, rows, channels, dtype=dtype, contiguous=contiguous)
    segment_ids = torch.randint(0, num_segments, (rows,), generator=gen).to(DEVICE)
    if rows > 2:  # exact ties for the max: a duplicated row in the same segment
        values = values.clone()
        values[1], segment_ids[1] = values[0], segment_ids[0]
    (actual,), (expected,) = _leaves(values), _leaves(values)
    out = K.segment_pool(actual, segment_ids, num_segments, pooling)
    ref = R.segment_pool(expected, segment_ids, num_segments, pooling)
    assert out.dtype == dtype and out.shape == (num_segments, channels)
    assert_close_to_reference(out, ref, dtype)
    grad = _randn(gen, num_segments, channels, dtype=dtype)
    out.backward(grad)
    ref.backward(grad)
    _compare_grads(["values"], [actual], [expected], dtype)


# ------------------------------------------------------------------------------ neighborhood_attention_pool
def _attention_case(seed, views, batch, tokens, channels, heads, head_dim, layout, dtype, contiguous=True,
                    duplicates=True):
    gen = _generator(seed)
    ids, num_buckets = _bucket_ids(gen, layout, views, batch, tokens)
    segments = R.bucket_sort(ids, num_buckets)
    x = _randn(gen, batch, tokens, channels, dtype=dtype, contiguous=contiguous)
    if duplicates and tokens > 2:  # identical tokens: exact max ties inside their buckets
        x = x.clone()
        x[:, 1] = x[:, 0]
    dim = heads * head_dim
    # unit-variance q, k, v and outputs: attention that is far from uniform yet well conditioned
    weights = (
        1 + _randn(gen, views, channels, scale=0.2, dtype=dtype),
        _randn(gen, views, channels, scale=0.2, dtype=dtype),
        _randn(gen, views, 3 * dim, channels, scale=2 / channels**0.5, dtype=dtype, contiguous=contiguous),
        _randn(gen, views, 3 * dim, scale=0.2, dtype=dtype),
        _randn(gen, views, channels, dim, scale=1 / dim**0.5, dtype=dtype, contiguous=contiguous),
        _randn(gen, views, channels, scale=0.2, dtype=dtype),
    )
    return x, segments, weights


_NAMES = ("x", "ln_weight", "ln_bias", "qkv_weight", "qkv_bias", "out_weight", "out_bias")


def _assert_pair_sum_close(actual: torch.Tensor, expected: torch.Tensor, dtype, scale: float) -> None:
    """``[B, N, C]`` gradients: tokens 2.. each at the dtype's tolerance; tokens 0 and 1 summed, within
    the sum of their two tolerances (each may carry the whole tied gradient)."""
    assert actual.dtype == dtype
    tol = TOLERANCES[dtype]
    a, e = actual.float(), expected.float()
    bound = scale * (2 * tol["atol"] + tol["rtol"] * (e[:, 0].abs() + e[:, 1].abs()))
    excess = ((a[:, 0] + a[:, 1]) - (e[:, 0] + e[:, 1])).abs() - bound
    assert float(excess.max()) <= 0, f"gradient of the duplicated pair, summed: {float(excess.max())} over the bound"
    assert_close_to_reference(actual[:, 2:], expected[:, 2:], dtype, scale=scale, msg="gradient of x")


def _check_attention(x, segments, weights, heads, pooling, dtype, seed):
    actual, expected = _leaves(x, *weights), _leaves(x, *weights)
    out = K.neighborhood_attention_pool(actual[0], segments, *actual[1:], heads, pooling)
    ref = R.neighborhood_attention_pool(expected[0], segments, *expected[1:], heads, pooling)
    assert out.dtype == dtype and out.shape == (segments.num_segments, x.shape[2])
    assert_close_to_reference(out, ref, dtype, msg="pooled rows")
    grad = _randn(_generator(seed + 1), *out.shape, dtype=dtype)
    out.backward(grad)
    ref.backward(grad)
    if pooling == "max+mean" and x.shape[1] > 2 and torch.equal(x[:, 0], x[:, 1]):
        # Tokens 0 and 1 are identical: in exact arithmetic they tie for every maximum of a bucket they
        # share, but the reference's dense GEMMs may round their t_j an ulp apart and hand one of them
        # the whole gradient. Only the pair's sum is determined (the weight gradients do not depend on
        # the split: the two tokens' activations are the same).
        _assert_pair_sum_close(actual[0].grad, expected[0].grad, dtype, scale=2.0)
    else:
        _compare_grads(_NAMES[:1], actual[:1], expected[:1], dtype, scale=2.0)
    # weight gradients are sums over every token of a view: wider bounds, fixed per test
    _compare_grads(_NAMES[1:], actual[1:], expected[1:], dtype, scale=8.0)


@PROPERTY
@given(data=st.data(), seed=seeds, channels=channel_counts, head_shape=st.sampled_from(((6, 2), (2, 4), (1, 16))),
       layout=layouts, pooling=st.sampled_from(("mean", "max+mean")), dtype=dtypes, contiguous=st.booleans())
def test_neighborhood_attention_pool_matches_reference(data, seed, channels, head_shape, layout, pooling, dtype,
                                                       contiguous):
    views = data.draw(st.integers(1, 8), label="views")
    batch = data.draw(st.integers(1, 3), label="batch")
    tokens = data.draw(st.integers(1, max(1, min(40, 160 // (views * batch)))), label="tokens")
    heads, head_dim = head_shape
    # no duplicated tokens: their ties are exact in exact arithmetic only (the reference's GEMMs may round
    # the two apart); exact ties have their own test
    x, segments, weights = _attention_case(seed, views, batch, tokens, channels, heads, head_dim, layout, dtype,
                                           contiguous, duplicates=False)
    if pooling == "max+mean":  # near-ties flip the maximum between backends
        assume(min_max_margin(x, segments, weights, heads) > 1e-5)
    _check_attention(x, segments, weights, heads, pooling, dtype, seed)


@pytest.mark.parametrize("pooling", ["mean", "max+mean"])
def test_neighborhood_attention_pool_long_segment(pooling):
    """One bucket of 40 tokens: several query and key blocks (online softmax across key blocks)."""
    x, segments, weights = _attention_case(3, 1, 1, 40, 36, 6, 2, "one_bucket", torch.float32)
    assert segments.max_len == 40
    _check_attention(x, segments, weights, 6, pooling, torch.float32, 3)


def test_neighborhood_attention_pool_ties_share_the_gradient():
    """Exact ties for the maximum (identical tokens, zero output projection: ``t_j = x`` in every
    backend) share its gradient equally among the tied tokens, as in the reference."""
    x, segments, weights = _attention_case(5, 2, 2, 6, 8, 6, 2, "one_bucket", torch.float32)
    weights = (*weights[:4], torch.zeros_like(weights[4]), torch.zeros_like(weights[5]))
    actual, expected = _leaves(x, *weights), _leaves(x, *weights)
    out = K.neighborhood_attention_pool(actual[0], segments, *actual[1:], 6, "max+mean")
    ref = R.neighborhood_attention_pool(expected[0], segments, *expected[1:], 6, "max+mean")
    grad = _randn(_generator(6), *out.shape, dtype=torch.float32)
    out.backward(grad)
    ref.backward(grad)
    _compare_grads(_NAMES[:1], actual[:1], expected[:1], torch.float32)
    assert torch.equal(actual[0].grad[:, 0], actual[0].grad[:, 1])


def test_neighborhood_attention_pool_split_weight_gradients(monkeypatch):
    """The weight gradients summed over several token splits (partial sums added afterwards)."""
    monkeypatch.setattr("any2point_fast.kernels.attention._WGRAD_SPLIT_TOKENS", 32)
    x, segments, weights = _attention_case(4, 2, 2, 40, 36, 6, 2, "random", torch.float32)
    _check_attention(x, segments, weights, 6, "max+mean", torch.float32, 4)


def test_neighborhood_attention_pool_head_dim_64():
    x, segments, weights = _attention_case(5, 2, 1, 18, 8, 1, 64, "random", torch.float32)
    _check_attention(x, segments, weights, 1, "max+mean", torch.float32, 5)


# -------------------------------------------------------------------------------------- ensemble_propagate
def _ensemble_case(gen, views, batch, tokens, channels, dtype, contiguous=True, extremes=False):
    x = _randn(gen, batch, tokens, channels, dtype=dtype, contiguous=contiguous)
    num_base, num_rows = int(torch.randint(1, 6, (), generator=gen)), int(torch.randint(1, 3 * views + 2, (),
                                                                                           generator=gen))
    base = _randn(gen, num_base, channels, dtype=dtype)
    rows = _randn(gen, num_rows, channels, dtype=dtype, contiguous=contiguous)
    base_ids = torch.randint(0, num_base, (batch, tokens), generator=gen).to(DEVICE)
    view_ids = torch.randint(0, num_rows, (views, batch, tokens), generator=gen).to(DEVICE)
    if extremes and views > 1 and num_rows > 1 and num_base > 1:
        # one view row exactly opposite to one token's baseline row (cos = −1); that baseline row is the
        # token's alone and its other views see other rows (a token whose views are all opposite has
        # weights 0/0, ill-conditioned in any implementation)
        rows = rows.clone()
        rows[0] = -base[0]
        base_ids = torch.where(base_ids == 0, 1 + base_ids % (num_base - 1), base_ids)
        base_ids[0, 0] = 0
        view_ids[0, 0, 0] = 0
        view_ids[1:, 0, 0] = 1 + view_ids[1:, 0, 0] % (num_rows - 1)
    return x, base, base_ids, rows, view_ids


@PROPERTY
@given(seed=seeds, views=st.integers(1, 8), batch=st.integers(1, 3), tokens=st.integers(1, 40),
       channels=channel_counts, dtype=dtypes, contiguous=st.booleans(), extremes=st.booleans())
def test_ensemble_propagate_matches_reference(seed, views, batch, tokens, channels, dtype, contiguous, extremes):
    gen = _generator(seed)
    x, base, base_ids, rows, view_ids = _ensemble_case(gen, views, batch, tokens, channels, dtype, contiguous,
                                                       extremes)
    coef = 0.7
    actual, expected = _leaves(x, base, rows), _leaves(x, base, rows)
    out = K.ensemble_propagate(actual[0], actual[1], base_ids, actual[2], view_ids, coef)
    ref = R.ensemble_propagate(expected[0], expected[1], base_ids, expected[2], view_ids, coef)
    assert out.dtype == dtype and out.shape == x.shape
    assert_close_to_reference(out, ref, dtype)
    grad = _randn(gen, *out.shape, dtype=dtype)
    out.backward(grad)
    ref.backward(grad)
    _compare_grads(("x", "base_rows", "view_rows"), actual, expected, dtype, scale=4.0)


def test_ensemble_propagate_zero_rows():
    """All-zero rows: the cosine's ``max(|a||b|, eps)`` and the norms' zero-gradient convention."""
    gen = _generator(11)
    x, base, base_ids, rows, view_ids = _ensemble_case(gen, 3, 2, 9, 8, torch.float32)
    base, rows = base.clone(), rows.clone()
    base[0], rows[0] = 0, 0
    base_ids[0, :3], view_ids[0, 0, :3] = 0, 0
    actual, expected = _leaves(x, base, rows), _leaves(x, base, rows)
    out = K.ensemble_propagate(actual[0], actual[1], base_ids, actual[2], view_ids, 0.3)
    ref = R.ensemble_propagate(expected[0], expected[1], base_ids, expected[2], view_ids, 0.3)
    assert_close_to_reference(out, ref)
    grad = _randn(gen, *out.shape)
    out.backward(grad)
    ref.backward(grad)
    _compare_grads(("x", "base_rows", "view_rows"), actual, expected, torch.float32)


# ---------------------------------------------------------------------------------------- batch_norm_gelu
def _norm_case(gen, sizes, own, channels, dtype, param_dtype=torch.float32, contiguous=True):
    """Rows of groups of ``sizes`` (channel means far from 0: the two-pass variance), the groups' affine
    parameters and running statistics, and ``batch`` flags (``own`` where a group has >= 2 rows)."""
    offsets = tuple(int(o) for o in torch.tensor([0, *sizes]).cumsum(0))
    groups = len(sizes)
    shift = _randn(gen, channels, scale=2.0)
    rows = (_randn(gen, offsets[-1], channels, contiguous=contiguous) + shift).to(dtype)
    weight = (1 + _randn(gen, groups, channels, scale=0.3, contiguous=contiguous)).to(param_dtype)
    bias = _randn(gen, groups, channels, scale=0.3, dtype=param_dtype)
    running_mean = _randn(gen, groups, channels, scale=2.0)
    running_var = torch.rand(groups, channels, generator=gen).to(DEVICE) + 0.5
    batch = tuple(bool(o) and n >= 2 for o, n in zip(own, sizes))
    return rows, offsets, weight, bias, running_mean, running_var, batch


def _check_batch_norm_gelu(rows, offsets, weight, bias, running_mean, running_var, batch, seed):
    dtype = rows.dtype
    actual, expected = _leaves(rows, weight, bias), _leaves(rows, weight, bias)
    out, mean, var = K.batch_norm_gelu(actual[0], offsets, *actual[1:], running_mean, running_var, batch)
    ref, ref_mean, ref_var = R.batch_norm_gelu(expected[0], offsets, *expected[1:], running_mean, running_var, batch)
    assert out.dtype == dtype and out.shape == rows.shape
    assert mean.dtype == var.dtype == torch.float32 and mean.shape == var.shape == weight.shape
    assert not mean.requires_grad and not var.requires_grad
    assert_close_to_reference(out, ref, dtype, msg="output")
    assert_close_to_reference(mean, ref_mean, torch.float32, msg="mean")
    assert_close_to_reference(var, ref_var, torch.float32, msg="variance")
    grad = _randn(_generator(seed + 1), *out.shape, dtype=dtype)
    out.backward(grad)
    ref.backward(grad)
    _compare_grads(["rows"], actual[:1], expected[:1], dtype)
    # sums over the rows of a group: wider bounds, fixed per test
    _compare_grads(["weight", "bias"], actual[1:], expected[1:], weight.dtype, scale=4.0)


@PROPERTY
@given(seed=seeds, sizes=st.lists(st.one_of(st.sampled_from((0, 1)), st.integers(2, 24)), min_size=1, max_size=4),
       own=st.lists(st.booleans(), min_size=4, max_size=4), channels=channel_counts,
       dtype=st.sampled_from((torch.float32, torch.float16)), same_dtype=st.booleans(), contiguous=st.booleans())
def test_batch_norm_gelu_matches_reference(seed, sizes, own, channels, dtype, same_dtype, contiguous):
    gen = _generator(seed)
    case = _norm_case(gen, sizes, own, channels, dtype, dtype if same_dtype else torch.float32, contiguous)
    _check_batch_norm_gelu(*case, seed)


@pytest.mark.parametrize(("channels", "dtype"), [(36, torch.float32), (100, torch.float16)])
def test_batch_norm_gelu_layouts(channels, dtype, monkeypatch):
    """Empty, one-row, multi-block (37 rows in blocks of 16) groups, with their own or the given statistics;
    rows a strided slice of a wider table."""
    monkeypatch.setattr("any2point_fast.kernels.norm._BLOCK_ROWS", 16)
    gen = _generator(channels)
    sizes, own = (0, 1, 3, 0, 37, 5, 2), (False, False, True, True, True, False, True)
    rows, offsets, weight, bias, running_mean, running_var, batch = _norm_case(gen, sizes, own, channels, dtype)
    assert batch == (False, False, True, False, True, False, True)
    wide = _randn(gen, rows.shape[0], 2 * channels, dtype=dtype)
    wide[:, ::2] = rows
    rows = wide[:, ::2]
    assert not rows.is_contiguous()
    _check_batch_norm_gelu(rows, offsets, weight, bias, running_mean, running_var, batch, channels)
    _, mean, var = K.batch_norm_gelu(rows, offsets, weight, bias, running_mean, running_var, batch)
    for g in (0, 1, 3, 5):  # the given statistics, empty groups included
        assert torch.equal(mean[g], running_mean[g]) and torch.equal(var[g], running_var[g])


# ----------------------------------------------------------------------------- determinism, memory, dispatch
def _run_all(seed: int) -> list[torch.Tensor]:
    """Every op's outputs and gradients on one fixed input."""
    gen = _generator(seed)
    results = []
    ids, num_buckets = _bucket_ids(gen, "random", 3, 2, 20)
    segments = K.bucket_sort(ids, num_buckets)
    results += [segments.segment_ids, segments.perm, segments.offsets]
    centers = _randn(gen, 2, 20, 3)
    results += list(K.project_pe(centers, _randn(gen, 7, 9, 36), _spec(gen, "2d", 3)))
    x, _, weights = _attention_case(seed, 3, 2, 20, 36, 6, 2, "random", torch.float32)
    leaves = _leaves(x, *weights)
    pooled = K.neighborhood_attention_pool(leaves[0], segments, *leaves[1:], 6, "max+mean")
    pooled.backward(_randn(gen, *pooled.shape))
    results += [pooled] + [t.grad for t in leaves]
    values = _leaves(_randn(gen, 40, 36))[0]
    voxel = K.segment_pool(values, ids.flatten()[:40], num_buckets, "max+mean")
    voxel.backward(_randn(gen, *voxel.shape))
    results += [voxel, values.grad]
    leaves = _leaves(x, _randn(gen, 5, 36), _randn(gen, segments.num_segments, 36))
    out = K.ensemble_propagate(leaves[0], leaves[1], ids[0] % 5, leaves[2], segments.segment_ids, 0.5)
    out.backward(_randn(gen, *out.shape))
    results += [out] + [t.grad for t in leaves]
    rows, offsets, weight, bias, running_mean, running_var, batch = _norm_case(gen, (0, 1, 20, 3), (1, 1, 1, 0), 36,
                                                                               torch.float32)
    leaves = _leaves(rows, weight, bias)
    out, mean, var = K.batch_norm_gelu(leaves[0], offsets, *leaves[1:], running_mean, running_var, batch)
    out.backward(_randn(gen, *out.shape))
    results += [out, mean, var] + [t.grad for t in leaves]
    return results


def test_repeated_runs_are_bitwise_identical():
    first, second = _run_all(0), _run_all(0)
    assert len(first) == len(second)
    for i, (a, b) in enumerate(zip(first, second)):
        assert torch.equal(a, b), f"result {i} differs between two identical runs"


class _RecordShapes(TorchDispatchMode):
    """Records the shape of every tensor produced by an aten op while active.

    Byte tensors are skipped: they are the interpreter's views of existing storages.
    """

    def __init__(self):
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.dtype != torch.uint8:
                self.shapes.append(tuple(t.shape))
        return out


def _memory_violations(fn, views, batch, tokens, channels) -> list[tuple[int, ...]]:
    with _RecordShapes() as mode:
        fn()
    per_view_features = views * batch * tokens * channels
    return [s for s in mode.shapes if math.prod(s) >= per_view_features or sum(d == tokens for d in s) >= 2]


def test_memory_invariants():
    """No ``N×N`` tensor and no ``[M, B·N, C]``-sized tensor, forward and backward (DESIGN.md §2)."""
    views, batch, tokens, channels = 3, 2, 23, 100  # C > 3·D: the small per-item buffers stay below the bound
    x, segments, weights = _attention_case(2, views, batch, tokens, channels, 6, 2, "random", torch.float32)
    assert segments.num_segments < views * batch * tokens  # pooled rows [S, C] stay below the bound

    def attention(module):
        def run():
            leaves = _leaves(x, *weights)
            out = module.neighborhood_attention_pool(leaves[0], segments, *leaves[1:], 6, "max+mean")
            out.backward(torch.ones_like(out))
        return run

    def ensemble(module):
        def run():
            leaves = _leaves(x, torch.randn(4, channels, device=DEVICE),
                             torch.randn(segments.num_segments, channels, device=DEVICE))
            base_ids = torch.arange(batch * tokens, device=DEVICE).reshape(batch, tokens) % 4
            out = module.ensemble_propagate(leaves[0], leaves[1], base_ids, leaves[2], segments.segment_ids, 0.5)
            out.backward(torch.ones_like(out))
        return run

    for make in (attention, ensemble):
        assert _memory_violations(make(K), views, batch, tokens, channels) == [], make.__name__
        # the check can fail: the dense reference allocates exactly what the fused path must not
        assert _memory_violations(make(R), views, batch, tokens, channels), make.__name__


def test_ops_dispatches_to_triton(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1" if _INTERPRETED else "0")
    values = torch.randn(10, 8, device=DEVICE)
    segment_ids = torch.arange(10, device=DEVICE) % 3
    with ops.use_backend("triton"):
        assert ops.not_supported_reasons("triton", "segment_pool", DEVICE) == []
        pooled = ops.segment_pool(values, segment_ids, 3, "max+mean")
    assert torch.equal(pooled, K.segment_pool(values, segment_ids, 3, "max+mean"))
    case = _norm_case(_generator(3), (4, 0, 6), (1, 0, 0), 8, torch.float32)
    with ops.use_backend("triton"):
        assert ops.not_supported_reasons("triton", "batch_norm_gelu", DEVICE) == []
        normed = ops.batch_norm_gelu(*case)
    for a, e in zip(normed, K.batch_norm_gelu(*case)):
        assert torch.equal(a, e)


def test_invalid_arguments_are_refused():
    x, segments, weights = _attention_case(1, 1, 1, 5, 8, 2, 4, "random", torch.float32)
    with pytest.raises(ValueError, match="pooling"):
        K.neighborhood_attention_pool(x, segments, *weights, 2, "max")
    with pytest.raises(ValueError, match="heads"):
        K.neighborhood_attention_pool(x, segments, *weights, 3, "mean")
    with pytest.raises(ValueError, match="must lie in"):
        K.segment_pool(torch.zeros(3, 2, device=DEVICE), torch.tensor([0, 1, 2], device=DEVICE), 2, "mean")
    with pytest.raises(TypeError):
        K.segment_pool(torch.zeros(3, 2, dtype=torch.int32, device=DEVICE), torch.zeros(3, dtype=torch.long,
                                                                                         device=DEVICE), 1, "mean")


_COMPILE_SCRIPT = r"""
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import importlib
failures = []
for module, name, signature, constexprs, num_warps in json.loads(sys.stdin.read()):
    fn = getattr(importlib.import_module(module), name)
    try:
        triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                       target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
    except Exception as error:
        failures.append(f"{name}: {error!r}"[:2000])
print(json.dumps(failures))
"""


@pytest.mark.slow
@pytest.mark.skipif(not _INTERPRETED, reason="on a GPU the other tests compile and run every kernel")
def test_every_kernel_compiles_for_sm90(monkeypatch):
    """The interpreter accepts code the compiler rejects: compile every launched kernel for sm_90, offline.

    Records one launch of each kernel (argument types, constexprs, ``num_warps``) while the ops run
    under the interpreter, then compiles them to cubin in a subprocess without ``TRITON_INTERPRET``
    (Triton's bundled ``ptxas``; no GPU needed).
    """
    import inspect
    import json
    import subprocess
    import sys

    pytest.importorskip("triton.backends.nvidia.compiler")
    from triton.runtime.interpreter import InterpretedFunction

    pointer_types = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.int64: "*i64",
                     torch.int32: "*i32"}
    launches = {}
    run = InterpretedFunction.run

    def recording_run(self, *args, grid, warmup, **kwargs):
        params = inspect.signature(self.fn).parameters
        bound = {**dict(zip(params, args)), **{k: v for k, v in kwargs.items() if k in params}}
        signature, constexprs = {}, {}
        for name, value in bound.items():
            if "constexpr" in str(params[name].annotation):
                signature[name], constexprs[name] = "constexpr", value
            elif isinstance(value, torch.Tensor):
                signature[name] = pointer_types[value.dtype]
            else:
                signature[name] = "fp32" if isinstance(value, float) else "i32"
        launches.setdefault(self.fn.__name__, (self.fn.__module__, self.fn.__name__, signature, constexprs,
                                               kwargs.get("num_warps", 4)))
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    monkeypatch.setattr(InterpretedFunction, "run", recording_run)
    _run_all(0)
    x, segments, weights = _attention_case(0, 2, 1, 9, 8, 1, 64, "random", torch.float16)  # head dim 64, fp16
    K.neighborhood_attention_pool(*_leaves(x)[:1], segments, *weights, 1, "mean").float().sum().backward()
    K.project_pe(torch.randn(1, 5, 3), torch.randn(77, 8), ProjectionSpec("1d", line_directions(2)))
    assert len(launches) >= 20
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], input=json.dumps(list(launches.values())),
                            capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []
