"""``segment_pool``: every implementation against the reference, values and gradients, ties included."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from any2point_fast import reference as R
from tests.ops.cases import budget, check_op, layouts, prepare, property_settings
from tests.ops.implementations import names, runnable, triton_device

OP = "segment_pool"


@pytest.mark.parametrize("name", names(OP))
def test_matches_the_reference(name):
    impl = runnable(OP)[name]

    @property_settings(impl)
    @given(layouts(impl, max_views=1), st.sampled_from([1, 8, 36, 96, 100]), st.sampled_from(["mean", "max+mean"]),
           st.sampled_from(budget(impl).dtypes), st.booleans(), st.booleans())
    def check(layout, channels, pooling, dtype, noncontiguous, duplicates):
        segments, batch, tokens, seed = layout[2:]
        gen = torch.Generator().manual_seed(seed)
        values = torch.randn(batch * tokens, channels, generator=gen)
        if duplicates:  # many rows repeated: maxima tied between rows of a segment
            values = values[torch.randint(0, max(1, batch * tokens // 3), (batch * tokens,), generator=gen)]
        (v,) = prepare([values], dtype, noncontiguous, impl.device)
        # the layout's ids, with its empty buckets: segment ids of one view, gaps included
        ids, num = layout.ids.flatten(), layout.num_buckets
        check_op(lambda v: impl.fn(v, ids, num, pooling), lambda v: R.segment_pool(v, ids, num, pooling), [v],
                 ["values"], dtype, seed=seed)

    check()


@pytest.mark.parametrize("name", [*names(OP), "reference"])
def test_max_pool_gradient_at_a_zero_maximum(name):
    """A maximum of exactly 0 gets its whole gradient: no zero fill may count as a tie."""
    fn, device = (R.segment_pool, torch.device("cpu")) if name == "reference" else runnable(OP)[name][1:3]
    values = torch.tensor([[0.0, 1.0], [-1.0, 2.0]], device=device, requires_grad=True)
    fn(values, torch.tensor([0, 0], device=device), 1, "max+mean").sum().backward()
    torch.testing.assert_close(values.grad.cpu(), torch.tensor([[1.5, 0.5], [0.5, 1.5]]))


@pytest.mark.parametrize("name", names(OP))
def test_ties_share_the_gradient_equally(name):
    impl = runnable(OP)[name]
    values = torch.tensor([[2.0, 1.0], [2.0, 3.0], [1.0, 3.0], [5.0, 5.0]], device=impl.device, requires_grad=True)
    impl.fn(values, torch.tensor([0, 0, 0, 1], device=impl.device), 2, "max+mean").sum().backward()
    expected = torch.tensor([[1 / 3 + 1 / 2, 1 / 3], [1 / 3 + 1 / 2, 1 / 3 + 1 / 2], [1 / 3, 1 / 3 + 1 / 2], [2, 2]])
    torch.testing.assert_close(values.grad.cpu(), expected)


@pytest.mark.parametrize("name", [n for n in names(OP) if n.startswith("torch")])
def test_the_bookkeeping_follows_its_ids_values(name):
    """The torch path derives its sort order once per ids tensor, yet sees a change of their values made
    where no version counter sees it (a numpy buffer), and works in training after inference."""
    fn = runnable(OP)[name].fn
    buffer = np.zeros(6, dtype=np.int64)
    ids = torch.from_numpy(buffer)
    values = torch.arange(12.0).view(6, 2).requires_grad_()
    with torch.inference_mode():
        fn(values.detach(), ids, 3, "max+mean")
    for layout in ([0, 0, 0, 0, 0, 0], [0, 0, 1, 1, 2, 2]):
        buffer[:] = layout
        out = fn(values, ids, 3, "max+mean")
        torch.testing.assert_close(out, R.segment_pool(values, ids, 3, "max+mean"))
        out.sum().backward()


def test_triton_refuses_invalid_arguments():
    from any2point_fast import kernels

    device = triton_device()
    with pytest.raises(ValueError, match="must lie in"):
        kernels.segment_pool(torch.zeros(3, 2, device=device), torch.tensor([0, 1, 2], device=device), 2, "mean")
    with pytest.raises(TypeError):
        kernels.segment_pool(torch.zeros(3, 2, dtype=torch.int32, device=device),
                             torch.zeros(3, dtype=torch.long, device=device), 1, "mean")
