"""The adapter's bottleneck and residual, ``hidden + ffn + s · Up(QuickGELU(Down(ffn)))``, in one autograd node.

Module by module, the sum is a ``[B, P + N, C]`` tensor whose point tokens every op then copies
out of their slice, and backward zero-fills a full-size gradient per slice, scales it for
``Up``, reads it for ``Up``'s bias, and adds ``Down``'s input gradient in a pass of its own.
Here forward writes the prefix ``[B, P, C]`` and the point tokens ``[B, N, C]`` once each,
contiguous: ``hidden + ffn``, then a matrix product per part adds ``s · (a Wᵤᵀ + bᵤ)`` in place
(``a = QuickGELU(Down(ffn))`` with a column of ones, ``[Wᵤ | bᵤ]``). Backward assembles the
``[B, P + N, C]`` gradient once, which is ``hidden``'s; it reads it for ``Up``'s weight and bias
at once and for ``a``'s gradient, and writes ``ffn``'s as that gradient plus ``Down``'s input
gradient, in one product.

Same values as the module-by-module formula up to float rounding, in the inputs' dtype. Under
autocast, or where the inputs and weights do not share one dtype, :func:`bottleneck` computes
module by module instead (autocast's per-op precision rules apply there): see :func:`fusable`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: ``k`` of CLIP's QuickGELU, ``x · sigmoid(k x)``.
QUICK_GELU_K = 1.702


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """``x · sigmoid(1.702 x)``, elementwise, any shape and dtype."""
    return x * torch.sigmoid(QUICK_GELU_K * x)


class _Bottleneck(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, ffn, down_weight, down_bias, up_weight, up_bias, scale, num_prefix_tokens):
        batch, length, channels = ffn.shape
        f = ffn.reshape(-1, channels)
        d = F.linear(f, down_weight, down_bias)  # [R, r]
        a1 = torch.cat((d * torch.sigmoid(QUICK_GELU_K * d), d.new_ones(len(d), 1)), dim=1).view(batch, length, -1)
        w1 = torch.cat((up_weight, up_bias[:, None]), dim=1)  # [C, r + 1]
        parts = []
        for part in (slice(None, num_prefix_tokens), slice(num_prefix_tokens, None)):
            x = torch.add(hidden[:, part], ffn[:, part])  # a fresh contiguous [B, ·, C]
            x.view(-1, channels).addmm_(a1[:, part].reshape(-1, a1.shape[-1]), w1.T, alpha=scale)
            parts.append(x)
        ctx.save_for_backward(f, down_weight, d, a1, w1)
        ctx.scale = scale
        return tuple(parts)

    @staticmethod
    def backward(ctx, grad_prefix, grad_tokens):
        f, down_weight, d, a1, w1 = ctx.saved_tensors
        needs = ctx.needs_input_grad
        grad = torch.cat((grad_prefix, grad_tokens), dim=1)  # hidden's gradient, [B, P + N, C]
        g = grad.view(-1, grad.shape[-1])
        a1 = a1.view(len(g), -1)
        grad_w1 = torch.mm(g.T, a1).mul_(ctx.scale) if needs[4] or needs[5] else None  # [C, r + 1]
        grad_a = torch.mm(g, w1[:, :-1]).mul_(ctx.scale)  # [R, r]
        s = torch.sigmoid(QUICK_GELU_K * d)
        grad_d = grad_a.mul_(s + QUICK_GELU_K * d * s * (1 - s))
        grad_ffn = torch.addmm(g, grad_d, down_weight).view_as(grad) if needs[1] else None
        grad_down_weight = torch.mm(f.T, grad_d).T if needs[2] else None  # not grad_dᵀ f: MKL is faster so
        return (grad if needs[0] else None, grad_ffn, grad_down_weight, grad_d.sum(dim=0) if needs[3] else None,
                grad_w1[:, :-1] if needs[4] else None, grad_w1[:, -1] if needs[5] else None, None, None)


def fusable(hidden: torch.Tensor, ffn: torch.Tensor, down: torch.nn.Linear, up: torch.nn.Linear) -> bool:
    """Whether :func:`bottleneck` applies: no autocast, one dtype for the inputs and the weights."""
    tensors = (hidden, ffn, down.weight, down.bias, up.weight, up.bias)
    return not torch.is_autocast_enabled(hidden.device.type) and len({t.dtype for t in tensors}) == 1


def bottleneck(hidden: torch.Tensor, ffn: torch.Tensor, down: torch.nn.Linear, up: torch.nn.Linear, scale: float,
               num_prefix_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``hidden + ffn + scale · up(QuickGELU(down(ffn)))`` ``[B, P + N, C]`` as its prefix ``[B, P, C]``
    and its point tokens ``[B, N, C]``: in one autograd node, both contiguous, where :func:`fusable`;
    otherwise module by module, as two slices of the sum."""
    if fusable(hidden, ffn, down, up):
        return _Bottleneck.apply(hidden, ffn, down.weight, down.bias, up.weight, up.bias, scale, num_prefix_tokens)
    x = hidden + ffn + scale * up(quick_gelu(down(ffn)))
    return x[:, :num_prefix_tokens], x[:, num_prefix_tokens:]


__all__ = ["QUICK_GELU_K", "bottleneck", "fusable", "quick_gelu"]
