"""Helpers shared by the launchers: block sizes, input checks, dtypes."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

#: Dtypes the kernels accept; they compute in float32 inside and return the input dtype.
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def pow2_at_least(n: int, minimum: int = 16) -> int:
    """The smallest power of two ``>= max(n, minimum)`` (``tl.dot`` needs every dim ``>= 16``)."""
    return max(minimum, triton.next_power_of_2(max(int(n), 1)))


def channel_block(channels: int, cap: int = 64) -> int:
    """Block over the feature dimension: a power of two in ``[16, cap]``."""
    return min(cap, pow2_at_least(channels))


def check_float(name: str, tensor: torch.Tensor) -> None:
    if tensor.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} must be one of {SUPPORTED_DTYPES}, got {tensor.dtype}")


def check_pooling(pooling: str) -> bool:
    """``True`` for ``"max+mean"``, ``False`` for ``"mean"``."""
    if pooling not in ("mean", "max+mean"):
        raise ValueError(f"pooling must be 'mean' or 'max+mean', got {pooling!r}")
    return pooling == "max+mean"


def as_index(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous int64 copy-or-view of an index tensor."""
    return tensor.to(torch.int64).contiguous()


def device_function(fn):
    """``@triton.jit`` for helpers called from kernels — a plain function under the interpreter.

    Under ``TRITON_INTERPRET=1`` every call of a nested jit function re-patches
    ``triton.language`` (about 0.4 ms a call, which dominated the interpreted tests); a plain
    function runs the same ``tl`` operations with the language already patched by the kernel.
    Compiled kernels inline the helper as usual.
    """
    return fn if triton.knobs.runtime.interpret else triton.jit(fn)


# ``tl.sum``/``tl.max``/``tl.min``/``tl.cumsum`` are themselves jit functions; under the
# interpreter each call re-patches ``triton.language`` (about 3 ms), so the kernels call these
# aliases: the library functions when compiled, their Python bodies when interpreted. (For the
# same reason the kernels write ``tl.full(shape, 0, dtype)``, a builtin, instead of ``tl.zeros``.)
if triton.knobs.runtime.interpret:
    tsum, tmax, tmin, tcumsum = tl.sum.fn, tl.max.fn, tl.min.fn, tl.cumsum.fn
else:
    tsum, tmax, tmin, tcumsum = tl.sum, tl.max, tl.min, tl.cumsum


@device_function
def max_and_ties(largest, ties, block):
    """Running per-channel maximum over row blocks, and how many rows attain it.

    ``block``: ``[R, C]`` fp32 with masked-out entries at ``-inf``; ``largest``, ``ties``: ``[C]``
    so far (``-inf`` and 0 before the first block). Returns the updated pair.
    """
    block_max = tmax(block, 0)
    block_ties = tsum((block == block_max[None, :]).to(tl.float32), 0)
    new_max = tl.maximum(largest, block_max)
    ties = tl.where(largest == new_max, ties, 0.0) + tl.where(block_max == new_max, block_ties, 0.0)
    return new_max, ties


@device_function
def segment_program(offsets_ptr, channels, BLOCK_C: tl.constexpr):
    """A program over one segment (grid axis 0) and one channel block (axis 1): the segment, its
    channels ``c`` ``[BLOCK_C]`` with their mask, and its sorted positions ``start … end − 1``."""
    seg = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    start = tl.load(offsets_ptr + seg)
    end = tl.load(offsets_ptr + seg + 1)
    return seg, c, c < channels, start, end
