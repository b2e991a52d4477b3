"""One tolerance table for every comparison of a fast path with the reference.

Reference functions compute in float32; a fast path in ``dtype`` must match within these
bounds (``torch.testing.assert_close`` semantics), outputs and gradients alike.
"""

from __future__ import annotations

import torch

TOLERANCES = {
    torch.float64: dict(atol=1e-9, rtol=1e-7),
    torch.float32: dict(atol=2e-5, rtol=2e-4),
    torch.float16: dict(atol=4e-3, rtol=4e-3),
    torch.bfloat16: dict(atol=3e-2, rtol=2e-2),
}


def assert_close_to_reference(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None,
                              scale: float = 1.0, msg: str = "") -> None:
    """Compare ``actual`` with the reference ``expected`` at the tolerance of ``dtype``.

    ``scale`` widens both bounds for quantities that accumulate over many terms (e.g. weight
    gradients summed over all tokens); it is set per test, never per failure.
    """
    tol = TOLERANCES[dtype or actual.dtype]
    torch.testing.assert_close(actual.float(), expected.float(), atol=tol["atol"] * scale, rtol=tol["rtol"] * scale,
                               msg=(lambda m: f"{msg}\n{m}") if msg else None)
