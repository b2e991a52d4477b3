"""The guided adapter of one block, and the per-forward geometry, on every available backend.

Targets (issue 6, CPU): adapter forward+backward at the paper's scale ``torch`` ≥ 4× faster
than ``reference`` with ≤ 1/5 of its operator calls; geometry ≤ 1/10 of the reference's time.
"""

from __future__ import annotations

import pytest
import torch

from any2point_fast import reference
from any2point_fast.projection import VirtualProjection
from tests.tolerances import assert_close_to_reference

from .conftest import device
from .workloads import (
    AdapterCase,
    adapter_case,
    adapter_pair,
    case_sizes,
    count_operator_calls,
    forward_backward,
    tolerance_dtype,
)

RECIPES = ("language", "vision", "audio")


@pytest.fixture(scope="module", params=[(recipe, index) for recipe in RECIPES for index in range(2)],
                ids=lambda param: f"{param[0]}-{'paper' if param[1] == 0 else 'long'}")
def case(request) -> AdapterCase:
    recipe, index = request.param
    sizes = case_sizes(request.config.getoption("--quick"), device())
    if index >= len(sizes):
        pytest.skip("N = 1024 is measured on a GPU only")
    return adapter_case(recipe, device=device(), **sizes[index])


@pytest.mark.parametrize("mode", ["forward", "forward+backward"])
def test_adapter(measure, backend, case, mode):
    adapter, oracle = adapter_pair(case)
    hidden, ffn = case.hidden.clone().requires_grad_(), case.ffn.clone().requires_grad_()

    def fn():
        return adapter(hidden, ffn, case.geometry)

    run = forward_backward(fn, [hidden, ffn, *adapter.parameters()]) if mode == "forward+backward" else fn
    calls = count_operator_calls(run)
    # fifteen rounds: a shared 2-core runner is noisy, and its slow phases last seconds, several
    # rounds of one test; the median of fifteen outlasts them better than that of seven
    out = measure(run, rounds=15, group="adapter", case=case.label, backend=backend, mode=mode, op_calls=calls)
    expected = oracle(hidden, ffn, case.geometry)
    assert_close_to_reference(out, expected, tolerance_dtype(), scale=50)


def test_geometry(measure, backend, case):
    projection = VirtualProjection(case.config, case.pe_table).to(case.centers.device)
    pe, geometry = measure(lambda: projection(case.centers), group="geometry", case=case.label, backend=backend,
                           mode="forward")
    ref_pe, ref_geometry = reference.build_geometry(case.centers, case.pe_table, case.spec, case.config.voxel_size)
    assert torch.equal(geometry.views.segment_ids, ref_geometry.views.segment_ids)
    assert torch.equal(geometry.voxels.segment_ids, ref_geometry.voxels.segment_ids)
    assert_close_to_reference(pe, ref_pe, tolerance_dtype())
