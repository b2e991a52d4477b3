"""The one case generator and checker of the per-op tests: every implementation sees the same layouts.

A layout is ``[V, B, N]`` bucket ids of one of :data:`PATTERNS` (random ids among a few buckets,
one bucket, all singletons, empty buckets between the used ones, a handful of buckets among very
many, skewed sizes with one long bucket) and its segments. The Triton interpreter is slow, so
:func:`budget` keeps its shapes small (``N`` up to 64, still enough for one long skewed bucket);
the torch path draws ``N`` up to 300 (its padded length classes start past 64).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from any2point_fast import reference
from any2point_fast.geometry import Segments
from tests.ops.implementations import Runnable
from tests.tolerances import assert_close_to_reference

PATTERNS = ("random", "one", "singletons", "empty", "sparse", "skewed")


class Budget(NamedTuple):
    """Shape bounds and examples of the property tests of one implementation."""

    max_views: int
    max_batch: int
    max_tokens: int
    examples: int
    dtypes: tuple[torch.dtype, ...]


def budget(impl: Runnable) -> Budget:
    """Interpreted Triton: small shapes, few examples, bfloat16 too; the torch path: ``N`` to 300 (each
    route its own examples: together more than the single torch test of each op had before)."""
    if impl.implementation.backend == "triton":
        return Budget(4, 2, 64, 8, (torch.float32, torch.float16, torch.bfloat16))
    return Budget(8, 4, 300, 15, (torch.float32, torch.float16))


def property_settings(impl: Runnable) -> settings:
    return settings(max_examples=budget(impl).examples, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def bucket_ids(pattern: str, views: int, batch: int, tokens: int, gen: torch.Generator) -> tuple[torch.Tensor, int]:
    """``[V, B, N]`` int64 per-cloud bucket ids of ``pattern`` and the number of buckets per cloud."""
    shape = (views, batch, tokens)
    if pattern == "random":
        num = int(torch.randint(1, 12, (), generator=gen))
        return torch.randint(0, num, shape, generator=gen), num
    if pattern == "one":
        num = int(torch.randint(1, 5, (), generator=gen))
        return torch.randint(0, num, (views, batch, 1), generator=gen).expand(shape).contiguous(), num
    if pattern == "singletons":
        num = tokens + int(torch.randint(0, 5, (), generator=gen))
        return torch.stack([torch.randperm(num, generator=gen)[:tokens] for _ in range(views * batch)]).view(shape), num
    if pattern == "empty":  # every other bucket empty
        num = int(torch.randint(1, 7, (), generator=gen))
        return 2 * torch.randint(0, num, shape, generator=gen) + 1, 2 * num + 1
    if pattern == "sparse":  # a handful of occupied buckets among many empty ones
        num = 10 * tokens + 50
        used = torch.randint(0, num, (views, batch, 3), generator=gen)
        return used.gather(2, torch.randint(0, 3, shape, generator=gen)), num
    num = int(torch.randint(2, 9, (), generator=gen))  # skewed: bucket 0 long, the others of many lengths
    return (torch.rand(shape, generator=gen) ** 3 * num).long(), num


class Layout(NamedTuple):
    ids: torch.Tensor  # [V, B, N] bucket ids, on the implementation's device
    num_buckets: int
    segments: Segments
    batch: int
    tokens: int
    seed: int


@st.composite
def layouts(draw, impl: Runnable, max_views: int | None = None) -> Layout:
    """A random bucket layout within ``impl``'s :func:`budget` (``N`` mostly ≤ 24)."""
    bound = budget(impl)
    pattern = draw(st.sampled_from(PATTERNS))
    views = draw(st.integers(1, min(max_views or bound.max_views, bound.max_views)))
    batch = draw(st.integers(1, bound.max_batch))
    tokens = draw(st.one_of(st.integers(1, 24), st.integers(25, bound.max_tokens)))
    seed = draw(st.integers(0, 2**31 - 1))
    ids, num = bucket_ids(pattern, views, batch, tokens, torch.Generator().manual_seed(seed))
    ids = ids.to(impl.device)
    return Layout(ids, num, reference.bucket_sort(ids, num), batch, tokens, seed)


def strided(t: torch.Tensor) -> torch.Tensor:
    """The values of ``t`` as a non-contiguous view (every other element of a wider tensor)."""
    wide = t.new_zeros(*t.shape[:-1], 2 * t.shape[-1])
    wide[..., ::2] = t
    return wide[..., ::2]


def prepare(tensors: list[torch.Tensor], dtype: torch.dtype, noncontiguous: bool,
            device: torch.device) -> list[torch.Tensor]:
    """The inputs in ``dtype`` on ``device``, optionally non-contiguous, requiring grad."""
    out = []
    for t in tensors:
        t = t.to(device, dtype)
        t = strided(t) if noncontiguous else t.clone()
        out.append(t.requires_grad_())
    return out


def run(op, inputs: list[torch.Tensor], grad_seed: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Output of ``op(*inputs)`` and the gradients of ``inputs`` for a random upstream gradient."""
    out = op(*inputs)
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed)).to(out.device, out.dtype)
    return out, list(torch.autograd.grad(out, inputs, upstream))


def check_op(op, op_ref, inputs, names, dtype, grad_scale: float = 1.0, seed: int = 0,
             grad_rows: dict[str, torch.Tensor] | None = None, weight_scale: float = 16.0) -> None:
    """An implementation vs the reference on the same inputs: outputs, gradients, bitwise repeatability.

    The gradients of ``x``-like inputs are compared at ``grad_scale`` × the dtype's tolerance,
    those of weights shared by all tokens (names ending in ``weight``/``bias``, sums over up to
    ``M·B·N`` terms with cancellation) at ``weight_scale`` ×. ``grad_rows`` restricts the
    comparison of a named gradient to some rows (the others must only be finite).
    """
    out, grads = run(op, inputs, seed)
    out_again, grads_again = run(op, inputs, seed)
    ref_out, ref_grads = run(op_ref, inputs, seed)
    assert out.dtype == ref_out.dtype == inputs[0].dtype
    assert torch.equal(out, out_again), "not bitwise repeatable"
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
