"""The 3D tokenizer: a light Point-PN (DESIGN.md §1.1, paper §2.2 "Tokenization in 3D Space").

raw xyz ``[B, P, 3]`` → per-point Linear+BN+ReLU embedding (``tokenizer_dim`` channels) →
``tokenizer_stages`` stages of FPS → k-NN → local geometry → max-pool, channels doubling per
stage → ``N`` token features ``[B, N, C]`` and their centres ``[B, N, 3]``.
"""

from __future__ import annotations

import math

import torch
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


class LocalGeometryStage(nn.Module):
    """One tokenizer stage: FPS to ``num_samples`` centres, group ``k`` neighbours, aggregate.

    Neighbour offsets are normalised by their standard deviation over the cloud (Point-PN);
    each neighbour's feature is concatenated with its centre's (``2·C_in`` channels), the
    position code of its normalised offset is added, a residual bottleneck MLP is applied and
    the neighbours are max-pooled.
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
        centre_feat = gather_points(feat, centre_idx)[:, :, None].expand(-1, -1, nbr_idx.shape[2], -1)
        grouped = torch.cat((gather_points(feat, nbr_idx), centre_feat), dim=-1)
        grouped = grouped + sinusoidal_position_code(rel, self.out_dim, self.alpha, self.beta)
        shape = grouped.shape
        flat = grouped.reshape(-1, self.out_dim)
        grouped = torch.relu(flat + self.mlp(flat)).reshape(shape)
        return centres, grouped.amax(dim=2)


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
