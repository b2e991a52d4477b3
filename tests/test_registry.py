"""The op registry: what each backend chooses per op, per-op fallback, refusals, the support table."""

from __future__ import annotations

import pytest
import torch

from any2point_fast import ops, registry, torch_ops
from any2point_fast import reference as R
from any2point_fast.torch_ops import native
from any2point_fast.torch_ops.attention import Route
from tests.ops.implementations import require_compiled, runnable

CPU = torch.device("cpu")


def test_every_op_has_a_torch_and_a_reference_implementation():
    for op in registry.OPS:
        backends = {impl.backend for impl in registry.implementations(op)}
        assert {"torch", "reference"} <= backends, op
        priorities = [impl.priority for impl in registry.implementations(op)]
        assert priorities == sorted(priorities, reverse=True), op


@pytest.mark.parametrize("op", registry.OPS)
def test_auto_on_the_cpu_takes_the_compiled_kernels_then_plain_torch(op):
    require_compiled()
    expected = "torch-compiled" if any(i.name == "torch-compiled" for i in registry.implementations(op)) else "torch"
    dtype = torch.int64 if op == "bucket_sort" else torch.float32
    assert registry.choose(op, "auto", CPU, dtype).name == expected
    assert registry.choose(op, "torch", CPU, dtype).name == expected
    assert registry.choose(op, "reference", CPU, dtype).name == "reference"


def test_auto_never_interprets_triton_on_the_cpu():
    assert all(impl.backend != "triton" for op in registry.OPS for impl in registry.candidates(op, "auto", CPU))


def test_auto_on_cuda_prefers_triton():
    cuda = torch.device("cuda")
    for op in registry.OPS:
        first = registry.candidates(op, "auto", cuda)[0]
        assert first.backend == ("torch" if op == "knn" else "triton"), op
        assert all(impl.name != "torch-compiled" for impl in registry.candidates(op, "auto", cuda)
                   if not impl.supports(cuda))


def test_an_explicit_backend_without_the_op_falls_back_to_auto_for_that_op():
    """Triton has no knn: under ``set_backend("triton")`` knn runs what ``auto`` picks (the torch
    path here), while the ops Triton has stay on Triton."""
    assert not any(impl.backend == "triton" for impl in registry.implementations("knn"))
    with ops.use_backend("triton"):
        assert ops.chosen("knn", CPU, torch.float32).backend == "torch"
        assert ops.chosen("farthest_point_sample", CPU, torch.float32).backend == "triton"
        gen = torch.Generator().manual_seed(0)
        query, points = torch.randn(2, 5, 3, generator=gen), torch.randn(2, 30, 3, generator=gen)
        assert ops.knn(query, points, 4).tolist() == R.knn(query, points, 4).tolist()


def test_set_backend_triton_runs_the_kernels():
    """Under ``set_backend("triton")`` the op runs the Triton kernel itself: the same bits."""
    from any2point_fast import kernels

    values, ids = torch.randn(10, 8, generator=torch.Generator().manual_seed(0)), torch.arange(10) % 3
    with ops.use_backend("triton"):
        assert ops.chosen("segment_pool", CPU, values.dtype).name == "triton"
        pooled = ops.segment_pool(values, ids, 3, "max+mean")
    assert torch.equal(pooled, kernels.segment_pool(values, ids, 3, "max+mean"))


def test_a_backend_lacking_one_op_is_still_available():
    assert ops.not_supported_reasons("triton", "knn", CPU) == ["triton has no knn"]
    assert ops.available_backends(CPU)["triton"] == []  # TRITON_INTERPRET=1 (tests/conftest.py)
    assert ops.available_backends(CPU)["torch"] == ops.available_backends(CPU)["reference"] == []


def test_the_refusal_names_every_implementation_tried(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    with ops.use_backend("triton"), pytest.raises(ops.BackendError) as error:
        ops.segment_pool(torch.zeros(3, 2), torch.zeros(3, dtype=torch.long), 1, "mean")
    assert str(error.value) == ("no backend can run segment_pool on cpu (backend 'triton'):\n"
                                "  triton: tensors on cpu; triton runs on CUDA, or on CPU under TRITON_INTERPRET=1")
    assert ops.available_backends(CPU)["triton"] == [
        "tensors on cpu; triton runs on CUDA, or on CPU under TRITON_INTERPRET=1"]


def test_dtypes_an_implementation_does_not_take_are_refused_with_the_reason():
    with ops.use_backend("triton"), pytest.raises(ops.BackendError, match="triton: takes float16, bfloat16, float32, "
                                                                          "not float64"):
        ops.segment_pool(torch.zeros(3, 2, dtype=torch.float64), torch.zeros(3, dtype=torch.long), 1, "mean")
    assert ops.chosen("segment_pool", CPU, torch.float64).backend == "torch"  # auto: the torch path takes it


def test_the_torch_backend_runs_plain_pytorch_where_the_kernels_do_not_run():
    """On a device the compiled kernels do not run (``meta``: no kernels at all), each op takes its
    plain route; asking for the compiled one there is refused by the op itself."""
    meta = torch.device("meta")
    assert registry.choose("segment_pool", "torch", meta).name == "torch"
    assert registry.choose("neighborhood_attention_pool", "torch", meta).name == "torch-tiled"
    reasons = {i.name: i.supports(meta) for i in registry.implementations("neighborhood_attention_pool")}
    assert reasons["torch-compiled"] == reasons["torch-flash"] == ["runs on cpu, not meta"]
    with pytest.raises(RuntimeError, match="compiled CPU kernels do not run tensors on meta"):
        native.resolve(True, meta)
    with pytest.raises(RuntimeError, match="flash attention does not run tensors on meta"):
        Route(compiled=False, flash=True).check(meta)


def test_the_registered_routes_are_the_functions_with_their_explicit_arguments():
    """Each torch route is the one function with its options: the same values as calling it so."""
    require_compiled()
    values, ids = torch.randn(7, 4, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 0, 1, 1, 1, 2, 2])
    for name, route in runnable("segment_pool").items():
        if route.implementation.backend == "torch":
            compiled = name == "torch-compiled"
            assert route.implementation.options == {"compiled": compiled}
            assert torch.equal(route.fn(values, ids, 3, "max+mean"),
                               torch_ops.segment_pool(values, ids, 3, "max+mean", compiled=compiled))


def test_support_table_and_its_lines():
    table = registry.support_table(CPU)
    assert list(table) == list(registry.OPS)
    assert table["knn"] == {"torch": [], "reference": []}
    lines = registry.format_support_table(CPU).splitlines()
    assert len(lines) == sum(len(registry.implementations(op)) for op in registry.OPS)
    assert sum(line.endswith("(auto)") for line in lines) == len(registry.OPS)


def test_names_are_unique_per_op():
    impl = registry.implementations("knn")[0]
    with pytest.raises(ValueError, match="already has an implementation named 'torch'"):
        registry.register(impl)
