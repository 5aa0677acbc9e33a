"""Per-dimension standardisation of tile features with statistics learned from the training tiles.

Patch encoders give features whose dimensions have very different offsets and scales (the
embedded stain-texture encoder: means from 0.01 to 2.6, standard deviations from 0 to 0.3). A
slide encoder that starts with ``Linear + ReLU`` then sees mostly the constant offsets: the
variation between tiles and slides is a small perturbation of a large common vector, attention
logits are nearly equal, and the first steps of training cannot tell tiles apart. The raw-input
baselines standardise every dimension; this layer gives the encoders the same input.

The statistics are *buffers* (saved with the weights, so a bundle carries them), accumulated
exactly over every real tile the module sees in training mode — a cumulative mean and variance
(Chan et al.'s parallel update in float64), never over padding — and frozen in eval mode. Under
``torch.distributed`` each update is summed over the ranks, so all ranks keep identical buffers.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = ["FeatureStandardizer"]


class FeatureStandardizer(nn.Module):
    """``(x - mean) / scale`` per feature dimension; statistics from the training tiles.

    Parameters
    ----------
    dim
        Feature width D_p.
    rel_floor
        The scale of a dimension is at least ``rel_floor`` × the root-mean-square standard
        deviation over all dimensions, so a (nearly) constant dimension stays near 0 instead of
        turning rounding noise into large values.

    Notes
    -----
    Before any training tile has been seen (``count == 0``) the module is the identity.
    """

    def __init__(self, dim: int, rel_floor: float = 1e-2) -> None:
        super().__init__()
        self.rel_floor = float(rel_floor)
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("mean", torch.zeros(dim, dtype=torch.float64))
        self.register_buffer("m2", torch.zeros(dim, dtype=torch.float64))

    @torch.no_grad()
    def update(self, x: Tensor, valid: Tensor | None = None) -> None:
        """Add the real tiles of ``x [B, N, D]`` (``valid [B, N]`` True = real) to the statistics."""
        rows = x.reshape(-1, x.shape[-1]) if valid is None else x[valid]
        rows = rows.detach().double()
        n = torch.tensor(float(rows.shape[0]), dtype=torch.float64, device=rows.device)
        s = rows.sum(dim=0)
        if dist.is_available() and dist.is_initialized():
            packed = torch.cat([n[None], s])
            dist.all_reduce(packed)
            n, s = packed[0], packed[1:]
        if float(n) == 0:
            return
        mean_b = s / n
        sq = ((rows - mean_b) ** 2).sum(dim=0)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(sq)  # every rank subtracted the same global batch mean
        total = self.count + n
        delta = mean_b - self.mean
        self.m2.add_(sq + delta**2 * self.count * n / total)
        self.mean.add_(delta * n / total)
        self.count.copy_(total)

    def scale(self) -> Tensor:
        """Per-dimension divisor ``[D]`` (float64): the standard deviation, floored."""
        var = self.m2 / self.count.clamp(min=1.0)
        std = var.clamp(min=0).sqrt()
        floor = self.rel_floor * var.mean().clamp(min=0).sqrt()
        return torch.maximum(std, floor.clamp(min=1e-12))

    def forward(self, x: Tensor, valid: Tensor | None = None) -> Tensor:
        """Standardise ``x [B, N, D]``; in training mode first add its real tiles to the statistics."""
        if self.training:
            self.update(x, valid)
        if float(self.count) == 0:
            return x
        dtype = x.dtype if x.is_floating_point() else torch.float32
        mean = self.mean.to(dtype)
        inv = self.scale().reciprocal().to(dtype)
        return (x - mean) * inv
