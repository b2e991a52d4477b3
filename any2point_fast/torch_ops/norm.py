"""``batch_norm_gelu``: BatchNorm of groups of rows, then exact GELU, fused.

The pooled rows of the ``M`` views (and of the voxels) are normalised view by view and go
through GELU before the ensemble. Module by module that is a BatchNorm per view, a
concatenation and a GELU: about seven passes over the ``[S, C]`` table forward and ten backward.
Here, per group of rows and per channel:

- forward: the statistics (mean, then the biased variance around it), then
  ``y = GELU((x − mean) · rstd · γ + β)``;
- backward: ``dz = dy · GELU'(z)``, summed with ``dz · x̂`` per channel (``dβ``, ``dγ``), then
  ``dx = γ · rstd · (dz − mean(dz) − x̂ · mean(dz · x̂))`` (without the two means for groups
  normalised with given statistics).

On the CPU the compiled kernel of :mod:`.native` does each step in one pass over the rows (two
forward, two backward), in tasks of up to 32 whole rows of one group. Its forward also keeps
``GELU'(z)`` ``[S, C]`` for backward (when an input needs a gradient), since evaluating erf and
exp is most of the kernel's time. Elsewhere, or where it cannot build, the same formulas run as
PyTorch ops group by group, and backward recomputes ``GELU'(z)`` from the saved inputs and
``[G, C]`` statistics.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import native
from ._common import compute_dtype, without_autocast


def _groups(offsets: tuple[int, ...]):
    """``(g, first, last)`` of every non-empty group."""
    return [(g, first, last) for g, (first, last) in enumerate(zip(offsets[:-1], offsets[1:])) if last > first]


def _forward(x, offsets, weight, bias, mean, var, batch, eps):
    """Plain PyTorch: ``y`` ``[S, C]`` and the mean, var and rstd ``[G, C]`` used."""
    y = torch.empty_like(x)
    for g, first, last in _groups(offsets):
        if batch[g]:
            var[g], mean[g] = torch.var_mean(x[first:last], dim=0, correction=0)
    rstd = torch.rsqrt(var + eps)
    for g, first, last in _groups(offsets):
        y[first:last] = F.gelu(torch.addcmul(bias[g], x[first:last] - mean[g], rstd[g] * weight[g]))
    return y, mean, var, rstd


def _backward(grad, x, offsets, weight, bias, mean, rstd, batch):
    """Plain PyTorch: the gradients of ``x`` ``[S, C]``, ``weight`` and ``bias`` ``[G, C]``."""
    grad_x, grad_weight, grad_bias = torch.empty_like(x), torch.zeros_like(weight), torch.zeros_like(bias)
    for g, first, last in _groups(offsets):
        xhat = (x[first:last] - mean[g]).mul_(rstd[g])
        dz = torch.ops.aten.gelu_backward(grad[first:last], torch.addcmul(bias[g], xhat, weight[g]))
        torch.sum(dz, dim=0, out=grad_bias[g])
        torch.sum(dz * xhat, dim=0, out=grad_weight[g])
        if batch[g]:
            dz = dz.sub_(grad_bias[g] / (last - first)).sub_(xhat.mul_(grad_weight[g] / (last - first)))
        torch.mul(dz, weight[g] * rstd[g], out=grad_x[first:last])
    return grad_x, grad_weight, grad_bias


class _BatchNormGelu(torch.autograd.Function):
    @staticmethod
    @without_autocast
    def forward(ctx, rows, offsets, weight, bias, running_mean, running_var, batch, eps, compiled):
        dtype = compute_dtype(rows, weight, bias)
        x = rows.to(dtype).contiguous()
        w, b = weight.to(dtype).contiguous(), bias.to(dtype).contiguous()
        mean, var = running_mean.to(dtype), running_var.to(dtype)
        # the compiled kernel's view of the groups, built once for forward and backward
        layout = (torch.tensor(offsets), torch.tensor(batch, dtype=torch.bool)) if compiled else None
        if layout is not None:
            # GELU'(z) kept for backward when there is one: backward then evaluates no erf
            y, mean, var, rstd, slope = native.ops().batch_norm_gelu(x, layout[0], w, b, mean, var, layout[1], eps,
                                                                     any(ctx.needs_input_grad))
        else:
            y, mean, var, rstd = _forward(x, offsets, w, b, mean.clone(), var.clone(), batch, eps)
            slope = None
        ctx.save_for_backward(x, w, b, mean, rstd, slope)
        ctx.offsets, ctx.batch, ctx.layout = offsets, batch, layout
        ctx.dtypes = rows.dtype, weight.dtype, bias.dtype
        ctx.mark_non_differentiable(mean, var)
        return y.to(rows.dtype), mean.float(), var.float()

    @staticmethod
    @without_autocast
    def backward(ctx, grad, _grad_mean, _grad_var):
        x, w, b, mean, rstd, slope = ctx.saved_tensors
        g = grad.to(x.dtype).contiguous()
        if ctx.layout is not None:
            offsets, own = ctx.layout
            grads = native.ops().batch_norm_gelu_backward(g, x, slope, offsets, w, mean, rstd, own)
        else:
            grads = _backward(g, x, ctx.offsets, w, b, mean, rstd, ctx.batch)
        needs, (rows_dtype, weight_dtype, bias_dtype) = ctx.needs_input_grad, ctx.dtypes
        return (grads[0].to(rows_dtype) if needs[0] else None, None,
                grads[1].to(weight_dtype) if needs[2] else None, grads[2].to(bias_dtype) if needs[3] else None,
                None, None, None, None, None)


def batch_norm_gelu(rows: torch.Tensor, offsets: tuple[int, ...], weight: torch.Tensor, bias: torch.Tensor,
                    running_mean: torch.Tensor, running_var: torch.Tensor, batch: tuple[bool, ...],
                    eps: float = 1e-5, *,
                    compiled: bool | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``GELU(BN_g(rows))`` for every group ``g`` of consecutive rows; the values of
    :func:`any2point_fast.reference.batch_norm_gelu`, in two passes forward and two backward.

    Args:
        rows: ``[S, C]``; group ``g`` is rows ``offsets[g] … offsets[g + 1] − 1``.
        weight, bias: ``[G, C]``; running_mean, running_var: ``[G, C]``, used where ``batch[g]`` is false.
        batch: ``G`` bools: group ``g`` normalises with its own (biased) statistics.
        compiled: run the compiled CPU kernel (:mod:`.native`), or (``False``) PyTorch ops group by
            group; ``None``: compiled wherever the kernels run.

    Returns:
        ``[S, C]`` of ``rows``' dtype; the float32 ``[G, C]`` mean and biased variance used.
    """
    return _BatchNormGelu.apply(rows, tuple(offsets), weight, bias, running_mean, running_var, tuple(batch), eps,
                                native.resolve(compiled, rows.device))


__all__ = ["batch_norm_gelu"]
