"""Each fused op alone, forward and forward+backward, on every available backend.

Shapes: the paper's scale of one block (B = 32, N = 128, C = 768, M = 6), 1D and 2D recipes;
``--quick`` uses tiny shapes. Every benchmark checks its result against the reference and records
the achieved GB/s and TFLOP/s from the analytic counts of :mod:`bench.costs` (on a known GPU,
also their fractions of the device's peaks).
"""

from __future__ import annotations

import pytest
import torch

from any2point_fast import ops, reference
from any2point_fast.reference import ViewAttention
from tests.tolerances import assert_close_to_reference

from .conftest import device
from .costs import op_cost
from .workloads import AdapterCase, adapter_case, case_sizes, forward_backward, tolerance_dtype

RECIPES = ("language", "vision")


@pytest.fixture(scope="module", params=[(recipe, index) for recipe in RECIPES for index in range(2)],
                ids=lambda param: f"{param[0]}-{'paper' if param[1] == 0 else 'long'}")
def case(request) -> AdapterCase:
    recipe, index = request.param
    sizes = case_sizes(request.config.getoption("--quick"), device())
    if index >= len(sizes):
        pytest.skip("N = 1024 is measured on a GPU only")
    return adapter_case(recipe, device=device(), **sizes[index])


def op_inputs(case: AdapterCase):
    """Leaf tensors (with gradients) for the differentiable ops."""
    torch.manual_seed(0)
    attn = ViewAttention(case.hidden.shape[-1], case.config.num_views, case.config.attn_dim,
                         case.config.attn_heads).to(case.hidden.device)
    tokens = case.hidden[:, 1:].clone().requires_grad_()
    views, voxels = case.geometry.views, case.geometry.voxels
    gen = torch.Generator().manual_seed(2)
    view_rows = torch.randn(views.num_segments, tokens.shape[-1], generator=gen).to(tokens).requires_grad_()
    base_rows = torch.randn(voxels.num_segments, tokens.shape[-1], generator=gen).to(tokens).requires_grad_()
    return attn, tokens, view_rows, base_rows


def differentiable_ops(case: AdapterCase):
    attn, tokens, view_rows, base_rows = op_inputs(case)
    views, voxels, cfg = case.geometry.views, case.geometry.voxels, case.config
    flat = tokens.reshape(-1, tokens.shape[-1])
    norm_weight, norm_bias = (torch.full((views.num_views, tokens.shape[-1]), value, device=tokens.device,
                                         requires_grad=True) for value in (1.0, 0.0))
    running = (torch.zeros_like(norm_weight), torch.ones_like(norm_weight))
    return {
        "batch_norm_gelu": (lambda impl: impl.batch_norm_gelu(
            view_rows, views.view_offsets, norm_weight, norm_bias, *running, (True,) * views.num_views)[0],
            [view_rows, norm_weight, norm_bias]),
        "segment_pool": (lambda impl: impl.segment_pool(flat, voxels.segment_ids.flatten(), voxels.num_segments,
                                                         cfg.pooling), [tokens]),
        "neighborhood_attention_pool": (lambda impl: impl.neighborhood_attention_pool(
            tokens, views, *attn.weights(), cfg.attn_heads, cfg.pooling), [tokens, *attn.parameters()]),
        "ensemble_propagate": (lambda impl: impl.ensemble_propagate(
            tokens, base_rows, voxels.segment_ids[0], view_rows, views.segment_ids, cfg.ensemble_coef),
            [tokens, view_rows, base_rows]),
    }


@pytest.mark.parametrize("op", ["segment_pool", "neighborhood_attention_pool", "batch_norm_gelu", "ensemble_propagate"])
@pytest.mark.parametrize("mode", ["forward", "forward+backward"])
def test_differentiable_op(measure, backend, case, op, mode):
    fn, inputs = differentiable_ops(case)[op]
    info = dict(group=f"op:{op}", case=case.label, backend=backend, mode=mode, cost=op_cost(op, case, mode))
    if mode == "forward":
        with torch.no_grad():
            out = measure(lambda: fn(ops), **info)
    else:
        out = measure(forward_backward(lambda: fn(ops), inputs), **info)
    with torch.no_grad():
        assert_close_to_reference(out, fn(reference), dtype=tolerance_dtype(), scale=10)


def test_project_pe(measure, backend, case):
    pe, buckets = measure(lambda: ops.project_pe(case.centers, case.pe_table, case.spec),
                          group="op:project_pe", case=case.label, backend=backend, mode="forward",
                          cost=op_cost("project_pe", case, "forward"))
    ref_pe, ref_buckets = reference.project_pe(case.centers, case.pe_table, case.spec)
    assert torch.equal(buckets, ref_buckets)
    assert_close_to_reference(pe, ref_pe, tolerance_dtype())


def test_bucket_sort(measure, backend, case):
    buckets = reference.project_pe(case.centers, case.pe_table, case.spec)[1]
    num = case.spec.buckets_per_view(case.pe_table.shape[0])
    seg = measure(lambda: ops.bucket_sort(buckets, num), group="op:bucket_sort", case=case.label, backend=backend,
                  mode="forward", cost=op_cost("bucket_sort", case, "forward"))
    ref = reference.bucket_sort(buckets, num)
    assert torch.equal(seg.perm, ref.perm) and torch.equal(seg.offsets, ref.offsets)
