"""The 3D tokenizer: a light Point-PN (DESIGN.md §1.1, paper §2.2 "Tokenization in 3D Space").

raw xyz ``[B, P, 3]`` → per-point Linear+BN+ReLU embedding (``tokenizer_dim`` channels) →
``tokenizer_stages`` stages of FPS → k-NN → local geometry → max-pool, channels doubling per
stage → ``N`` token features ``[B, N, C]`` and their centres ``[B, N, 3]``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import Any2PointConfig
from .sampling import farthest_point_sample, gather_points, knn


def sinusoidal_position_code(rel_xyz: torch.Tensor, dim: int, alpha: float, beta: float) -> torch.Tensor:
    """Point-PN's parameter-free position code of relative coordinates.

    Each of the 3 axes gets ``f = ceil(dim / 6)`` frequencies ``alpha^(i/f)``; the code of a
    coordinate ``x`` is ``sin(beta·x / alpha^(i/f))`` and ``cos(...)``, and the 6·f channels are
    cut to ``dim``.

    Args:
        rel_xyz: ``[..., 3]`` float.

    Returns:
        ``[..., dim]`` of ``rel_xyz``'s dtype.
    """
    freqs = math.ceil(dim / 6)
    exponent = torch.arange(freqs, device=rel_xyz.device, dtype=torch.float32) / freqs
    angle = beta * rel_xyz.float()[..., None] / alpha**exponent  # [..., 3, f]
    code = torch.stack((angle.sin(), angle.cos()), dim=-1).flatten(-3)  # [..., 6f]
    return code[..., :dim].to(rel_xyz.dtype)


def _batch_norm(rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, running_mean: torch.Tensor,
                running_var: torch.Tensor, training: bool,
                eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``nn.BatchNorm1d`` of ``[R, D]`` rows without touching its running statistics: the rows
    normalised, and the ``[D]`` mean and biased variance used (the batch's in training)."""
    if training:
        var, mean = torch.var_mean(rows.detach(), dim=0, correction=0)
        return F.batch_norm(rows, None, None, weight, bias, True, 0.0, eps), mean, var
    mean, var = running_mean.to(rows.dtype), running_var.to(rows.dtype)
    return F.batch_norm(rows, mean, var, weight, bias, False, 0.0, eps), mean, var


def neighborhood_aggregate(feat: torch.Tensor, offsets: torch.Tensor, centre_index: torch.Tensor,
                           neighbour_index: torch.Tensor, weight1: torch.Tensor, norm1_weight: torch.Tensor,
                           norm1_bias: torch.Tensor, norm1_mean: torch.Tensor, norm1_var: torch.Tensor,
                           weight2: torch.Tensor, norm2_weight: torch.Tensor, norm2_bias: torch.Tensor,
                           norm2_mean: torch.Tensor, norm2_var: torch.Tensor, training: bool, eps: float,
                           alpha: float, beta: float) -> tuple[torch.Tensor, ...]:
    """The aggregation of a tokenizer stage's neighbourhoods (DESIGN.md §1.1), every row materialised.

    Each neighbour ``n`` of centre ``c`` gives the row ``x = cat(feat[n], feat[c]) + PE(offset)``
    (``2C`` channels); ``x`` passes the residual bottleneck ``relu(x + BN2(W2 relu(BN1(W1 x))))``
    (bias-free Linears, BatchNorm over all ``B·S·k`` rows) and the rows are max-pooled over the ``k``
    (of tied neighbours, the first takes the gradient).

    Args:
        feat: ``[B, P, C]`` point features.
        offsets: ``[B, S, k, 3]`` normalised offsets of the neighbours from their centre.
        centre_index: ``[B, S]``, neighbour_index: ``[B, S, k]`` int64 point indices.
        weight1: ``[H, 2C]``; weight2: ``[2C, H]``.
        norm1_*: ``[H]`` affine parameters and running statistics of BN1; norm2_*: ``[2C]`` of BN2.
        training: normalise with the batch's statistics (else the running ones).

    Returns:
        ``[B, S, 2C]`` of ``feat``'s dtype (computed in float32, or float64 for float64 inputs), and
        the mean and biased variance BN1 (``[H]``) and BN2 (``[2C]``) normalised with (no gradient).
    """
    given, dtype = feat.dtype, torch.promote_types(feat.dtype, torch.float32)
    feat, offsets = feat.to(dtype), offsets.to(dtype)
    dim, k = 2 * feat.shape[-1], neighbour_index.shape[-1]
    centre_feat = gather_points(feat, centre_index)[:, :, None].expand(-1, -1, k, -1)
    grouped = torch.cat((gather_points(feat, neighbour_index), centre_feat), dim=-1)
    grouped = grouped + sinusoidal_position_code(offsets, dim, alpha, beta)
    rows = grouped.reshape(-1, dim)
    # contiguous parameters: on the CPU, F.batch_norm's backward misreads a strided weight (torch 2.13)
    norm1_weight, norm1_bias, norm2_weight, norm2_bias = (
        t.to(dtype).contiguous() for t in (norm1_weight, norm1_bias, norm2_weight, norm2_bias))
    hidden, mean1, var1 = _batch_norm(F.linear(rows, weight1.to(dtype)), norm1_weight, norm1_bias, norm1_mean,
                                      norm1_var, training, eps)
    mixed, mean2, var2 = _batch_norm(F.linear(torch.relu(hidden), weight2.to(dtype)), norm2_weight, norm2_bias,
                                     norm2_mean, norm2_var, training, eps)
    # max, not amax: a tie's gradient goes to the first neighbour holding it, not split among them
    out = torch.relu(rows + mixed).reshape(grouped.shape).max(dim=2).values
    return out.to(given), mean1, var1, mean2, var2


def _track(norm: nn.BatchNorm1d, mean: torch.Tensor, var: torch.Tensor, rows: int) -> None:
    """The running statistics of ``norm`` after a training step on ``rows`` rows of batch ``mean`` and
    biased ``var``, as ``nn.BatchNorm1d`` updates them (the unbiased variance; ``momentum=None``:
    the cumulative average)."""
    with torch.no_grad():
        norm.num_batches_tracked += 1
        momentum = 1 / float(norm.num_batches_tracked) if norm.momentum is None else norm.momentum
        norm.running_mean.mul_(1 - momentum).add_(momentum * mean.to(norm.running_mean.dtype))
        norm.running_var.mul_(1 - momentum).add_(momentum * var.to(norm.running_var.dtype) * rows / (rows - 1))


class LocalGeometryStage(nn.Module):
    """One tokenizer stage: FPS to ``num_samples`` centres, group ``k`` neighbours, aggregate.

    Neighbour offsets are normalised by their standard deviation over the cloud (Point-PN); each
    neighbourhood is aggregated by :func:`neighborhood_aggregate`.
    """

    def __init__(self, in_dim: int, num_samples: int, k: int, bottleneck: int, alpha: float, beta: float):
        super().__init__()
        self.out_dim, self.num_samples, self.k = 2 * in_dim, num_samples, k
        self.alpha, self.beta = alpha, beta
        hidden = max(1, self.out_dim // bottleneck)
        self.mlp = nn.Sequential(
            nn.Linear(self.out_dim, hidden, bias=False),
            nn.BatchNorm1d(hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, self.out_dim, bias=False),
            nn.BatchNorm1d(self.out_dim),
        )

    def forward(self, xyz: torch.Tensor, feat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B, P, 3]``, ``[B, P, C]`` → centres ``[B, S, 3]``, features ``[B, S, 2C]``."""
        batch = xyz.shape[0]
        centre_idx = farthest_point_sample(xyz, self.num_samples)
        centres = gather_points(xyz, centre_idx)
        nbr_idx = knn(centres, xyz, min(self.k, xyz.shape[1]))  # [B, S, k]
        rel = gather_points(xyz, nbr_idx) - centres[:, :, None]  # [B, S, k, 3]
        std = rel.reshape(batch, -1).float().std(dim=1).to(rel.dtype)
        rel = rel / (std[:, None, None, None] + 1e-5)
        linear1, norm1, _, linear2, norm2 = self.mlp
        training = norm1.training  # the BatchNorms' own flags, as if they ran as modules
        if norm2.training != training:
            raise ValueError("the two BatchNorms of a tokenizer stage must both be in training or both in "
                             "evaluation mode")
        out, mean1, var1, mean2, var2 = neighborhood_aggregate(
            feat, rel, centre_idx, nbr_idx, linear1.weight, norm1.weight, norm1.bias, norm1.running_mean,
            norm1.running_var, linear2.weight, norm2.weight, norm2.bias, norm2.running_mean, norm2.running_var,
            training, norm1.eps, self.alpha, self.beta)
        if training:
            _track(norm1, mean1, var1, nbr_idx.numel())
            _track(norm2, mean2, var2, nbr_idx.numel())
        return centres, out


class PointTokenizer(nn.Module):
    """Point-PN-lite: ``[B, P, 3]`` → tokens ``[B, N, hidden_size]`` and centres ``[B, N, 3]``."""

    def __init__(self, config: Any2PointConfig):
        super().__init__()
        self.embed = nn.Sequential(
            nn.Linear(3, config.tokenizer_dim, bias=False),
            nn.BatchNorm1d(config.tokenizer_dim),
            nn.ReLU(inplace=True),
        )
        stages, dim = [], config.tokenizer_dim
        for num_samples in config.token_counts:
            stage = LocalGeometryStage(
                dim, num_samples, config.knn_k, config.tokenizer_bottleneck, config.pos_alpha, config.pos_beta
            )
            stages.append(stage)
            dim = stage.out_dim
        self.stages = nn.ModuleList(stages)
        self.proj = nn.Identity() if dim == config.hidden_size else nn.Linear(dim, config.hidden_size)

    def forward(self, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch, num_points, _ = points.shape
        # raw coordinates may be of any scale (1e6 overflows float16): embedded in float32, after
        # its BatchNorm the features are O(1) and safe under autocast
        with torch.autocast(points.device.type, enabled=False):
            wide = points.to(torch.promote_types(points.dtype, torch.float32))
            feat = self.embed(wide.reshape(-1, 3)).reshape(batch, num_points, -1)
        xyz = points
        for stage in self.stages:
            xyz, feat = stage(xyz, feat)
        return self.proj(feat), xyz
