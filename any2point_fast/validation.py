"""Checks of user input at the public API: clear errors before anything reaches a kernel.

Every error says what was expected and what was received. The checks read only shapes,
dtypes and devices, except :func:`check_points`, which also rejects non-finite coordinates
(one reduction over ``[B, P, 3]``, negligible next to the tokenizer).
"""

from __future__ import annotations

import torch

from .geometry import Geometry, Segments


class InputError(ValueError):
    """An input tensor has the wrong rank, size, dtype, device or values."""


def _describe(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, {t.dtype}, on {t.device}"


def check_points(points: object, min_points: int) -> torch.Tensor:
    """A batch of clouds ``[B, P, 3]`` of finite floats with ``B ≥ 1`` and ``P ≥ min_points``."""
    if not isinstance(points, torch.Tensor):
        raise InputError(f"points must be a torch.Tensor [B, P, 3], got {type(points).__name__}")
    if points.dim() != 3 or points.shape[-1] != 3:
        raise InputError(f"points must be [B, P, 3] (a batch of xyz clouds), got {_describe(points)}")
    if not points.is_floating_point():
        raise InputError(f"points must be floating point (float32, float16, bfloat16 or float64), "
                         f"got {points.dtype}; convert with points.float()")
    if points.shape[0] == 0:
        raise InputError("points is an empty batch (B = 0); expected at least one cloud")
    if points.shape[1] < min_points:
        raise InputError(f"each cloud needs at least {min_points} points (the tokenizer's num_points), "
                         f"got {points.shape[1]}; resample the clouds or lower num_points")
    if torch.compiler.is_compiling():  # traced code cannot branch on values: checked when the graph runs
        torch._assert_async(torch.isfinite(points).all(), "points contain NaN or Inf coordinates")
    elif not torch.isfinite(points).all():
        bad = (~torch.isfinite(points)).any(dim=(1, 2)).nonzero().flatten().tolist()
        raise InputError(f"points contain NaN or Inf coordinates in clouds {bad[:10]}")
    return points


def check_segments(segments: Segments, batch: int, tokens: int, name: str) -> None:
    """``segments`` were built for ``batch`` clouds of ``tokens`` tokens."""
    if segments.segment_ids.shape[1:] != (batch, tokens):
        raise InputError(f"{name} were computed for [B, N] = {list(segments.segment_ids.shape[1:])} "
                         f"but the tokens are [B, N] = [{batch}, {tokens}]; recompute the geometry from these "
                         f"tokens' centres")


def check_adapter_inputs(hidden: torch.Tensor, ffn_out: torch.Tensor, geometry: Geometry,
                         num_prefix_tokens: int) -> None:
    """``hidden`` and ``ffn_out`` are equal-shaped ``[B, P + N, C]`` matching ``geometry``."""
    for name, t in (("hidden", hidden), ("ffn_out", ffn_out)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3:
            got = _describe(t) if isinstance(t, torch.Tensor) else type(t).__name__
            raise InputError(f"{name} must be [B, P + N, C], got {got}")
    # dtypes may differ: under autocast the FFN output is half precision, the residual float32
    if hidden.shape != ffn_out.shape or hidden.device != ffn_out.device:
        raise InputError(f"hidden and ffn_out must have one shape and device: hidden has {_describe(hidden)}, "
                         f"ffn_out has {_describe(ffn_out)}")
    if not 0 <= num_prefix_tokens < hidden.shape[1]:
        raise InputError(f"num_prefix_tokens={num_prefix_tokens} leaves no point tokens in {hidden.shape[1]}")
    batch, tokens = hidden.shape[0], hidden.shape[1] - num_prefix_tokens
    check_segments(geometry.views, batch, tokens, "the view buckets")
    check_segments(geometry.voxels, batch, tokens, "the voxels")
    if geometry.views.segment_ids.device != hidden.device:
        raise InputError(f"the geometry is on {geometry.views.segment_ids.device} but the tokens on "
                         f"{hidden.device}; move it with geometry.to(device)")


def check_pe_table(pe_table: torch.Tensor, pe_kind: str, hidden_size: int) -> None:
    """A 1D table ``[L, C]`` or a 2D grid ``[Gh, Gw, C]`` of floats with ``C = hidden_size``."""
    rank = 2 if pe_kind == "1d" else 3
    layout = "[L, C]" if rank == 2 else "[Gh, Gw, C]"
    if pe_table.dim() != rank or pe_table.shape[-1] != hidden_size or 0 in pe_table.shape:
        raise InputError(f"a {pe_kind} PE table must be {layout} with C = {hidden_size}, got {_describe(pe_table)}")
    if not pe_table.is_floating_point():
        raise InputError(f"the PE table must be floating point, got {pe_table.dtype}")
