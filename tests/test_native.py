"""Building and falling back from the compiled CPU kernels of the torch path (``torch_ops.native``)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from torch.utils import cpp_extension

from any2point_fast import reference, torch_ops
from any2point_fast.torch_ops import attention as torch_attention
from any2point_fast.torch_ops import native
from tests.ops.implementations import require_compiled
from tests.tolerances import assert_close_to_reference


@pytest.fixture
def fresh_build(monkeypatch):
    """Forget whether the kernels were built, before and after the test (the build is cached on disk)."""
    monkeypatch.delenv(native.ENV_VAR, raising=False)
    native._build.cache_clear()
    yield
    native._build.cache_clear()


def long_buckets() -> tuple:
    ids = torch.repeat_interleave(torch.arange(3), torch.tensor([40, 25, 11]))[None, None]
    segments = torch_ops.bucket_sort(ids, 3)
    gen = torch.Generator().manual_seed(0)
    weights = [torch.randn(1, 16, generator=gen) * 0.1 + 1, torch.randn(1, 16, generator=gen) * 0.1,
               torch.randn(1, 36, 16, generator=gen) * 0.3, torch.randn(1, 36, generator=gen) * 0.1,
               torch.randn(1, 16, 12, generator=gen) * 0.3, torch.randn(1, 16, generator=gen) * 0.1]
    return torch.randn(1, ids.shape[-1], 16, generator=gen), segments, weights


def default_route() -> torch_attention.Route:
    return torch_attention.Route.default(torch.device("cpu"))


def test_the_kernels_build_and_attend_the_long_buckets(fresh_build):
    require_compiled()
    x, segments, weights = long_buckets()
    plan = torch_attention._plan(segments, x.shape[1], default_route())
    assert plan.native is not None and plan.native[1].tolist() == [40, 25, 11] and not plan.batches
    assert_close_to_reference(torch_ops.neighborhood_attention_pool(x, segments, *weights, 6, "max+mean"),
                              reference.neighborhood_attention_pool(x, segments, *weights, 6, "max+mean"),
                              torch.float32)


def test_a_failed_build_warns_once_and_the_torch_path_stays_plain_pytorch(fresh_build, monkeypatch):
    def no_compiler(*args, **kwargs):
        raise RuntimeError("Error building extension 'any2point_native': c++: not found")

    monkeypatch.setattr(cpp_extension, "load", no_compiler)
    x, segments, weights = long_buckets()
    with pytest.warns(RuntimeWarning, match=r"could not build .*c\+\+: not found.*ANY2POINT_NATIVE=0"):
        out = torch_ops.neighborhood_attention_pool(x, segments, *weights, 6, "max+mean")
    assert torch_attention._plan(segments, x.shape[1], default_route()).native is None
    assert_close_to_reference(out, reference.neighborhood_attention_pool(x, segments, *weights, 6, "max+mean"),
                              torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once: later calls neither retry nor warn
        assert not native.available(torch.device("cpu"))


def test_the_environment_variable_skips_the_build(fresh_build, monkeypatch):
    monkeypatch.setenv(native.ENV_VAR, "0")
    monkeypatch.setattr(cpp_extension, "load", lambda *a, **k: pytest.fail("built although turned off"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not native.available(torch.device("cpu"))


def test_only_cpu_tensors_take_the_kernels():
    assert not native.available(torch.device("meta"))


def test_the_ninja_of_an_inactive_virtual_environment_is_found(monkeypatch, tmp_path):
    """``cpp_extension`` runs ``ninja`` from ``PATH``; the package's dependency installs it beside
    the Python, which is not on ``PATH`` unless the environment is activated."""
    beside = Path(sys.executable).parent
    if shutil.which("ninja", path=str(beside)) is None:
        pytest.skip("no ninja beside this Python (the package is not installed in this environment)")
    monkeypatch.setenv("PATH", str(tmp_path))
    assert shutil.which("ninja") is None
    with native._ninja_on_path():
        assert Path(shutil.which("ninja")).parent == beside
    assert os.environ["PATH"] == str(tmp_path)


def test_a_build_that_takes_long_says_so_on_stderr(fresh_build, monkeypatch, capfd):
    def slow_build(*args, **kwargs):
        time.sleep(0.5)

    monkeypatch.setattr(cpp_extension, "load", slow_build)
    monkeypatch.setattr(native, "NOTICE_AFTER_S", 0.05)
    assert native.available(torch.device("cpu"))
    assert "compiling the CPU kernels" in capfd.readouterr().err


def test_a_quick_load_is_silent(fresh_build, monkeypatch, capfd):
    monkeypatch.setattr(cpp_extension, "load", lambda *args, **kwargs: None)
    monkeypatch.setattr(native, "NOTICE_AFTER_S", 0.05)
    assert native.available(torch.device("cpu"))
    time.sleep(0.3)  # the cancelled timer stays silent
    assert capfd.readouterr().err == ""


def test_each_instruction_set_has_its_own_build(fresh_build, monkeypatch):
    """``-march=native`` code from one CPU must not be loaded on another sharing the build cache."""
    names = []
    monkeypatch.setattr(cpp_extension, "load", lambda name, *args, **kwargs: names.append(name))
    assert native.available(torch.device("cpu"))
    assert names == [native.build_name()] and names[0].startswith(native.NAMESPACE + "_")
    environment = native._environment_fingerprint()
    monkeypatch.setattr(native, "_cpu_fingerprint", lambda: "another-cpu")
    assert native.build_name() == f"{native.NAMESPACE}_another-cpu_{environment}" != names[0]


def test_each_environment_has_its_own_build():
    """Two virtual environments with the same torch write different include paths into
    ``build.ninja``: sharing a folder, each start in the other would rebuild the kernels."""
    here = native.build_name()
    script = "from any2point_fast.torch_ops import native; print(native.build_name())"
    same = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert same.stdout.strip() == here
    other_prefix = subprocess.run([sys.executable, "-c", f"import sys; sys.prefix = '/elsewhere'; {script}"],
                                  capture_output=True, text=True, check=True)
    name = other_prefix.stdout.strip()
    assert name != here and name.rsplit("_", 1)[0] == here.rsplit("_", 1)[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("channel", [0, 17, 63, 64, 80, 96, 99])
def test_bucket_pool_flags_a_tie_in_any_channel(dtype, channel):
    """Two items tying for one channel's maximum flag their segment, wherever that channel falls
    among the kernel's blocks of SIMD vectors, single vectors and last channels (100 channels); the
    argmax names the first item holding each maximum; segments of one item (2 t) or none (the
    bias only) have no maximum slot."""
    require_compiled()
    gen = torch.Generator().manual_seed(channel)
    x = torch.randn(7, 100, generator=gen, dtype=dtype)
    x[[1, 2], channel] = x[:, channel].max() + 1  # segment 0 (items 0-2): a tie at `channel` only
    out = torch.randn(7, 12, generator=gen, dtype=dtype)
    wt = torch.zeros(1, 12, 100, dtype=dtype)  # features t = x exactly
    bias = torch.randn(1, 100, generator=gen, dtype=dtype)
    starts, lengths = torch.tensor([0, 3, 4, 4, 6]), torch.tensor([3, 1, 0, 2, 1])
    visit_order = torch.tensor([3, 0, 4, 2, 1])
    pooled, argmax, tied = native.ops().bucket_pool(x, out, wt, bias, torch.arange(7), starts, lengths,
                                                    torch.zeros(5, dtype=torch.long), 2.0, visit_order)
    assert tied.tolist() == [True, False]
    rows = [x[first:first + n] for first, n in zip(starts.tolist(), lengths.tolist())]
    expected = torch.stack([r.amax(0) + r.mean(0) if len(r) else torch.zeros(100, dtype=dtype) for r in rows])
    torch.testing.assert_close(pooled, expected + 2 * bias)
    assert argmax[0, channel] == 1
    torch.testing.assert_close(argmax, torch.stack((rows[0].argmax(0), rows[3].argmax(0))).to(dtype), rtol=0, atol=0)


@pytest.mark.parametrize("dim", [12, 3])
@pytest.mark.parametrize("maxima_of", [(True, False), (False, True)])
def test_bucket_pool_backward_writes_every_gradient_by_its_formula(dim, maxima_of):
    """Two clouds of 3 tokens, two views, segments visited cloud by cloud in two runs: every row of
    grad_x and grad_out is written (they start as NaN) with the linear part's share and, in the
    view with maxima (either), each maximum's; [W_o | b_o]'s gradient by view. The recipes' D = 12 and a
    runtime D, over 20 channels (a SIMD vector and a tail)."""
    require_compiled()
    gen = torch.Generator().manual_seed(dim)
    channels = 20
    # view 0: {0, 1} {2} {3, 4, 5}; view 1: {0} {1, 2} {3, 5} {4}
    tokens = torch.tensor([0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 5, 4])
    starts, lengths = torch.tensor([0, 2, 3, 6, 7, 9, 11]), torch.tensor([2, 1, 3, 1, 2, 2, 1])
    views = torch.tensor([0, 0, 0, 1, 1, 1, 1])
    visit_order, runs = torch.tensor([0, 1, 3, 4, 2, 5, 6]), torch.tensor([0, 4, 7])  # cloud 0, then cloud 1
    grad, weights = torch.randn(7, channels, generator=gen), torch.rand(7, generator=gen) + 0.5
    linear, out = torch.randn(7, dim + 1, generator=gen), torch.randn(12, dim, generator=gen)
    w = torch.randn(2, channels, dim, generator=gen)
    argmax = torch.stack([torch.randint(0, int(n), (channels,), generator=gen) for n in lengths if n > 1]).float()
    has_max = torch.tensor(maxima_of)  # the other view's maxima are someone else's (a tie)
    grad_x, grad_out = torch.full((6, channels), float("nan")), torch.full((12, dim), float("nan"))
    grad_w = native.ops().bucket_pool_backward(grad, weights, linear, argmax, has_max, out, w,
                                               w.transpose(1, 2).contiguous(), tokens, starts, lengths, views,
                                               visit_order, runs, grad_x, grad_out)
    expected_x, expected_out = torch.zeros(6, channels), torch.zeros(12, dim)
    expected_w = torch.zeros(2, channels, dim + 1)
    slot = 0
    for s in range(7):
        g, v, first, n = grad[s], int(views[s]), int(starts[s]), int(lengths[s])
        expected_w[v] += torch.outer(g, linear[s])
        for i in range(first, first + n):
            expected_x[tokens[i]] += weights[s] * g
            expected_out[i] = weights[s] * g @ w[v]
        if n < 2:
            continue
        if has_max[v]:
            for c in range(channels):
                item = first + int(argmax[slot, c])
                expected_x[tokens[item], c] += g[c]
                expected_out[item] += g[c] * w[v, c]
                expected_w[v, c, :dim] += g[c] * out[item]
        slot += 1
    torch.testing.assert_close(grad_x, expected_x)
    torch.testing.assert_close(grad_out, expected_out)
    torch.testing.assert_close(grad_w, expected_w)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("channels", [1, 7, 36, 100, 768])
def test_layer_norm_rows_match_aten(dtype, channels):
    """x̂ and the per-row mean and rstd ([R, 1]) of ATen's LayerNorm without weights, on rows far
    off zero (the variance is taken around the mean) and constant rows (var 0: rstd = 1/√eps)."""
    require_compiled()
    gen = torch.Generator().manual_seed(channels)
    x = (torch.randn(37, channels, generator=gen) * 3 + 50).to(dtype)
    x[5] = 7.0
    ours = native.ops().layer_norm_rows(x, 1e-5)
    aten = torch.native_layer_norm(x, [channels], None, None, 1e-5)
    for name, actual, expected in zip(["xhat", "mean", "rstd"], ours, aten):
        assert actual.shape == expected.shape and actual.dtype == dtype, name
        torch.testing.assert_close(actual, expected, msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("channels", [1, 7, 36, 768])
def test_layer_norm_rows_backward_adds_atens_gradient(dtype, channels):
    """The gradient of x through x̂ (ATen's LayerNorm backward without weights), added to grad_x."""
    require_compiled()
    gen = torch.Generator().manual_seed(channels)
    x, grad, grad_x = ((torch.randn(23, channels, generator=gen) * 3 + 20).to(dtype) for _ in range(3))
    _, mean, rstd = native.ops().layer_norm_rows(x, 1e-5)
    expected = grad_x + torch.ops.aten.native_layer_norm_backward(grad, x, [channels], mean, rstd, None, None,
                                                                 [True, False, False])[0]
    native.ops().layer_norm_rows_backward(grad, x, mean, rstd, grad_x)
    torch.testing.assert_close(grad_x, expected, rtol=1e-5, atol=1e-5)  # ATen sums in another order
