"""Pyramid position encoding generator (PPEG) of TransMIL.

The patch tokens are laid out row-major on a square grid (the caller pads the sequence to the
next square by repeating its first tokens, as the authors do) and mixed by depthwise 2-D
convolutions of several kernel sizes plus an identity path. The MIRROR/TransMIL tokens are in
random order, so this grid is *not* real tissue geometry; it is kept for faithfulness.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["PPEG"]


class PPEG(nn.Module):
    """``grid + Σ_k dwconv_k(grid)`` over a ``[B, D, S, S]`` token grid (kernels 7/5/3 by default).

    Parameters
    ----------
    dim
        Channel width D.
    kernels
        Odd kernel sizes of the depthwise convolutions (same padding, with bias).
    """

    def __init__(self, dim: int, kernels: Sequence[int] = (7, 5, 3)) -> None:
        super().__init__()
        self.convs = nn.ModuleList(
            nn.Conv2d(dim, dim, int(k), 1, int(k) // 2, groups=dim) for k in kernels
        )

    def forward(self, grid: Tensor) -> Tensor:
        """Mix ``grid [B, D, S, S]``; returns the same shape.

        The identity plus the sum of depthwise convolutions equals *one* depthwise convolution
        whose kernel is the zero-padded sum of the kernels plus a centre delta, so a single
        convolution is run (exactly the same function, ~3x less memory traffic). Passing a
        channels_last grid (a free view of ``[B, S*S, D]`` tokens) is fastest on CPU.
        """
        weight, bias = self.fused_kernel()
        return F.conv2d(
            grid, weight.to(grid.dtype), bias.to(grid.dtype), padding=weight.shape[-1] // 2,
            groups=grid.shape[1],
        )  # fmt: skip

    def fused_kernel(self) -> tuple[Tensor, Tensor]:
        """The single depthwise kernel ``[D, 1, k, k]`` and bias ``[D]`` equal to the module."""
        k_max = max(conv.kernel_size[0] for conv in self.convs)
        first = self.convs[0]
        weight = first.weight.new_zeros(first.weight.shape[0], 1, k_max, k_max)
        bias = torch.zeros_like(first.bias)
        for conv in self.convs:
            off = (k_max - conv.kernel_size[0]) // 2
            weight = weight + F.pad(conv.weight, (off, off, off, off))
            bias = bias + conv.bias
        centre = torch.zeros_like(weight)
        centre[:, :, k_max // 2, k_max // 2] = 1.0
        return weight + centre, bias
