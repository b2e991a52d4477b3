"""``ensemble_propagate``: every implementation against the reference, values and gradients, clamps included."""

from __future__ import annotations

import gc

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from any2point_fast import reference as R
from any2point_fast.torch_ops import _common as torch_common
from any2point_fast.torch_ops import ensemble as torch_ensemble
from tests.ops.cases import budget, check_op, layouts, prepare, property_settings
from tests.ops.implementations import names, runnable
from tests.ops.shapes import memory_violations
from tests.tolerances import assert_close_to_reference

OP = "ensemble_propagate"


@pytest.mark.parametrize("name", names(OP))
def test_matches_the_reference(name):
    impl = runnable(OP)[name]

    @property_settings(impl)
    @given(layouts(impl), st.sampled_from([2, 8, 36, 96, 100]), st.floats(0.05, 1.0),
           st.sampled_from(budget(impl).dtypes), st.booleans(), st.booleans(), st.booleans(), st.booleans())
    def run(layout, channels, coef, dtype, noncontiguous, zero_rows, shared_rows, opposite):
        check(impl, layout, channels, coef, dtype, noncontiguous, zero_rows, shared_rows, opposite)

    run()


def check(impl, layout, channels, coef, dtype, noncontiguous, zero_rows, shared_rows, opposite):
    # C = 1 is left out: every cosine is ±1, and where all M are −1 the 1/eps of the weight
    # normalisation turns rounding noise into the gradient, in the reference as well.
    segments, batch, tokens, seed = layout[2:]
    gen = torch.Generator().manual_seed(seed)
    voxel_ids = torch.randint(0, max(1, tokens // 4), (batch, tokens), generator=gen)
    x = torch.randn(batch, tokens, channels, generator=gen)
    base_rows = torch.randn(int(voxel_ids.max()) + 1, channels, generator=gen)
    view_rows = torch.randn(segments.num_segments, channels, generator=gen)
    view_ids = segments.segment_ids.cpu()
    if shared_rows:  # any row may serve several views, clouds, even one token twice
        view_ids = torch.randint(0, segments.num_segments, view_ids.shape, generator=gen)
    # token 0 alone in a baseline row exactly opposite its first view row (cos = −1), where its other
    # views see other rows (a token whose views are all opposite has weights 0/0, ill-conditioned anywhere)
    row = view_ids[0, 0, 0]
    if opposite and len(view_ids) > 1 and not bool((view_ids[1:, 0, 0] == row).any()):
        voxel_ids[0, 0] = len(base_rows)
        base_rows = torch.cat((base_rows, -view_rows[row, None]))
    kept = None
    if zero_rows:  # norms of 0: the clamped denominator of the cosine. The gradient of such a row
        base_rows[0] = 0  # is its neighbours' sum over 1/eps: compared on the other rows only.
        view_rows[::3] = 0
        kept = {"base_rows": base_rows.norm(dim=1) > 0, "view_rows": view_rows.norm(dim=1) > 0}
    inputs = prepare([x, base_rows, view_rows], dtype, noncontiguous, impl.device)
    # A token whose views all point away from its baseline (every cosine near −1, likely at small
    # C and M) has its weight normaliser at the eps clamp: there a rounding difference switches
    # the gradient on or off, in the reference as well. Its rows are compared in value only.
    base, views = inputs[1].detach().float().cpu()[voxel_ids], inputs[2].detach().float().cpu()[view_ids]
    cos = (base * views).sum(-1) / (base.norm(dim=-1) * views.norm(dim=-1)).clamp_min(1e-8)
    at_clamp = ((cos + 1) / 2).sum(dim=0) < 1e-3  # [B, N]
    if bool(at_clamp.any()):
        kept = kept or {"base_rows": torch.ones(len(base_rows), dtype=torch.bool),
                        "view_rows": torch.ones(len(view_rows), dtype=torch.bool)}
        kept["base_rows"][voxel_ids[at_clamp]] = False
        kept["view_rows"][view_ids[:, at_clamp].flatten()] = False
    voxel_ids, view_ids = voxel_ids.to(impl.device), view_ids.to(impl.device)

    def op(x, b, v):
        return impl.fn(x, b, voxel_ids, v, view_ids, coef)

    def ref_op(x, b, v):
        return R.ensemble_propagate(x, b, voxel_ids, v, view_ids, coef)

    check_op(op, ref_op, inputs, ["x", "base_rows", "view_rows"], dtype, grad_scale=4, seed=seed, grad_rows=kept)


@pytest.mark.parametrize("name", names(OP))
def test_opposite_and_aligned_views_hand_made(name):
    """Token 0 sees one view opposite to its baseline (cos = −1, weight 0) and one aligned (weight 1)."""
    impl = runnable(OP)[name]
    d = impl.device
    base = torch.tensor([[1.0, 2.0, -1.0]], device=d, requires_grad=True)
    rows = torch.tensor([[-2.0, -4.0, 2.0], [0.5, 1.0, -0.5], [1.0, 0.0, 0.0]], device=d, requires_grad=True)
    view_ids, base_ids, x = torch.tensor([[[0, 2]], [[1, 2]]], device=d), torch.zeros(1, 2, dtype=torch.long,
                                                                                       device=d), torch.zeros(1, 2, 3,
                                                                                                              device=d)
    out = impl.fn(x, base, base_ids, rows, view_ids, 0.5)
    torch.testing.assert_close(out[0, 0], 0.5 * rows[1].detach())
    torch.testing.assert_close(out[0, 1], 0.5 * rows[2].detach())
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(0)).to(d)
    grads = torch.autograd.grad(out, (base, rows), upstream)
    ref = R.ensemble_propagate(x, base, base_ids, rows, view_ids, 0.5)
    for grad, ref_grad in zip(grads, torch.autograd.grad(ref, (base, rows), upstream)):
        assert_close_to_reference(grad, ref_grad)


@pytest.mark.parametrize("name", names(OP))
def test_clamps_hand_made(name):
    """The two clamps of Eq. 3's weights, one view per token: token 0's view is exactly opposite
    its baseline (cos = −1, so the weights sum to 0: clamped, the token keeps x); token 1's view
    row is zero (its cosine's denominator is clamped: cos = 0, weight 1 on a zero row)."""
    impl = runnable(OP)[name]
    d = impl.device
    x = torch.tensor([[[1.0, 1.0, 1.0], [2.0, 2.0, 2.0]]], device=d)
    args = (torch.tensor([[1.0, 0.0, 0.0]], device=d), torch.zeros(1, 2, dtype=torch.long, device=d),
            torch.tensor([[-2.0, 0.0, 0.0], [0.0, 0.0, 0.0]], device=d), torch.tensor([[[0, 1]]], device=d), 0.5)
    out = impl.fn(x, *args)
    torch.testing.assert_close(out, x, rtol=0, atol=0)
    torch.testing.assert_close(out, R.ensemble_propagate(x, *args), rtol=0, atol=0)


@pytest.mark.parametrize("name", names(OP))
def test_zero_rows_get_the_reference_gradients(name):
    """All-zero rows: the cosine's ``max(|a||b|, eps)`` and the norms' zero-gradient convention."""
    impl = runnable(OP)[name]
    gen = torch.Generator().manual_seed(11)
    x, base, rows = torch.randn(2, 9, 8, generator=gen), torch.randn(4, 8, generator=gen), torch.randn(7, 8,
                                                                                                      generator=gen)
    base_ids, view_ids = torch.randint(0, 4, (2, 9), generator=gen), torch.randint(0, 7, (3, 2, 9), generator=gen)
    base[0], rows[0] = 0, 0
    base_ids[0, :3], view_ids[0, 0, :3] = 0, 0
    base_ids, view_ids = base_ids.to(impl.device), view_ids.to(impl.device)
    check_op(lambda x, b, v: impl.fn(x, b, base_ids, v, view_ids, 0.3),
             lambda x, b, v: R.ensemble_propagate(x, b, base_ids, v, view_ids, 0.3),
             prepare([x, base, rows], torch.float32, False, impl.device), ["x", "base_rows", "view_rows"],
             torch.float32)


@pytest.mark.parametrize("name", [n for n in names(OP) if runnable(OP)[n].implementation.backend == "torch"])
def test_gradcheck(name):
    fn = runnable(OP)[name].fn
    gen = torch.Generator().manual_seed(4)
    view_ids = torch.randint(0, 7, (3, 2, 9), generator=gen)
    base_ids = torch.randint(0, 4, (2, 9), generator=gen)
    x = torch.randn(2, 9, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    base = torch.randn(4, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    rows = torch.randn(7, 6, generator=gen, dtype=torch.float64, requires_grad=True)

    def op(x, base, rows):
        return fn(x, base, base_ids, rows, view_ids, 0.7)

    assert torch.autograd.gradcheck(op, (x, base, rows))


@pytest.mark.parametrize("name", names(OP))
def test_no_per_view_or_quadratic_tensor(name):
    """No ``[M, B·N, C]``-sized tensor and no ``N × N`` one, forward and backward; the check catches the reference."""
    impl = runnable(OP)[name]
    views, batch, tokens, channels = 3, 2, 23, 100
    gen = torch.Generator().manual_seed(2)
    view_ids = torch.randint(0, 20, (views, batch, tokens), generator=gen).to(impl.device)
    base_ids = (torch.arange(batch * tokens).reshape(batch, tokens) % 4).to(impl.device)
    inputs = [torch.randn(batch, tokens, channels, generator=gen), torch.randn(4, channels, generator=gen),
              torch.randn(20, channels, generator=gen)]

    def run(fn):
        def go():
            leaves = prepare(inputs, torch.float32, False, impl.device)
            fn(leaves[0], leaves[1], base_ids, leaves[2], view_ids, 0.5).sum().backward()
        return go

    assert memory_violations(run(impl.fn), views, batch, tokens, channels) == []
    assert memory_violations(run(R.ensemble_propagate), views, batch, tokens, channels)


@pytest.mark.parametrize("name", [n for n in names(OP) if n.startswith("torch")])
def test_the_index_plan_is_built_once_per_ids(name, monkeypatch):
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
        out = runnable(OP)[name].fn(x, rows[0], bases, rows[1], views, 0.3)
        expected = R.ensemble_propagate(x, base_rows, bases, view_rows, views, 0.3)
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
            out = runnable(OP)[name].fn(x, base_rows, base_ids, view_rows, view_ids, 0.3)
            expected = R.ensemble_propagate(x, base_rows, base_ids, view_rows, view_ids, 0.3)
            torch.testing.assert_close(out, expected)
    assert len(built) == 6 and len(torch_common._DERIVED) == cached - 1
    run(view_ids, base_ids)  # then in training
    assert len(built) == 7
