"""Pyramid position encoding generator (PPEG) of TransMIL.

The patch tokens are mixed by depthwise 2-D convolutions of several kernel sizes plus an
identity path. Two layouts:

* :meth:`PPEG.forward` — a dense ``[B, D, S, S]`` grid. The authors lay the tokens out row-major
  on a square in sequence order (the caller pads the sequence to the next square by repeating
  its first tokens); their tokens are in random order, so that grid is *not* tissue geometry.
* :meth:`PPEG.forward_sparse` — the tiles' **real** grid cells: each tile is mixed with the tiles
  at the neighbouring cells of the slide's tile lattice (:func:`grid_neighbours`), empty cells
  (background, or tiles not sampled this step) count as zero — exactly the dense convolution of
  a canvas that holds each tile at its own cell and zeros elsewhere, without building the canvas.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._dwconv import depthwise_conv2d

__all__ = ["PPEG", "grid_neighbours"]


def grid_neighbours(positions: Tensor, lengths: Tensor, kernel: int) -> Tensor:
    """Indices of each tile's ``kernel × kernel`` lattice neighbours: ``[B, Nc, kernel²]`` int64.

    Parameters
    ----------
    positions
        ``[B, Nc, 2]`` integer lattice cells (column, row) of the tiles; for sample b only the
        first ``lengths[b]`` are real.
    lengths
        ``[B]`` number of real tiles per sample.
    kernel
        Odd window width.

    Returns
    -------
    Tensor
        ``out[b, i, o]`` is the index (into the sample's Nc tiles) of the tile at cell
        ``positions[b, i] + offset_o`` (offsets in row-major order of the window, rows = y), or
        ``Nc`` when no real tile sits there. Several tiles on one cell (a tile drawn twice)
        resolve to one of them.
    """
    bsz, n_c, _ = positions.shape
    half = kernel // 2
    device = positions.device
    out = torch.full((bsz, n_c, kernel * kernel), n_c, dtype=torch.long, device=device)
    dy, dx = torch.meshgrid(
        torch.arange(-half, half + 1, device=device),
        torch.arange(-half, half + 1, device=device),
        indexing="ij",
    )
    dx, dy = dx.reshape(-1), dy.reshape(-1)
    for b, n in enumerate(lengths.tolist()):
        p = positions[b, :n].to(torch.long)
        p = p - p.min(dim=0).values + half
        width = int(p[:, 0].max()) + 1 + half
        height = int(p[:, 1].max()) + 1 + half
        table = torch.full((height * width,), n_c, dtype=torch.long, device=device)
        table[p[:, 1] * width + p[:, 0]] = torch.arange(n, device=device)
        cells = (p[:, 1:2] + dy) * width + (p[:, 0:1] + dx)  # [n, k*k], always inside the table
        out[b, :n] = table[cells]
    return out


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
        self.kernels = tuple(int(k) for k in kernels)
        self.convs = nn.ModuleList(
            nn.Conv2d(dim, dim, int(k), 1, int(k) // 2, groups=dim) for k in kernels
        )

    def forward(self, grid: Tensor) -> Tensor:
        """Mix ``grid [B, D, S, S]``; returns the same shape.

        The identity plus the sum of depthwise convolutions equals *one* depthwise convolution
        whose kernel is the zero-padded sum of the kernels plus a centre delta, so a single
        convolution is run (exactly the same function, ~3x less memory traffic). Passing a
        channels_last grid (a free view of ``[B, S*S, D]`` tokens) is fastest on CPU. The
        backward avoids oneDNN's slow depthwise backward (see
        :func:`~mirror_model.layers._dwconv.depthwise_conv2d`).
        """
        weight, bias = self.fused_kernel()
        return depthwise_conv2d(grid, weight, bias)

    def forward_sparse(self, tokens: Tensor, neighbours: Tensor) -> Tensor:
        """Mix ``tokens [B, Nc, D]`` with their lattice neighbours (:func:`grid_neighbours`).

        The same function as :meth:`forward` on a zero canvas holding each tile at its cell.
        Memory stays O(B·Nc·D): one gathered slice per kernel offset at a time.
        """
        weight, bias = self.fused_kernel()
        bsz, n_c, d = tokens.shape
        k = weight.shape[-1]
        w = weight.reshape(d, k * k).t().to(tokens.dtype)  # [k*k, D]
        padded = torch.cat([tokens, tokens.new_zeros(bsz, 1, d)], dim=1)  # index Nc = empty cell
        out = bias.to(tokens.dtype).expand(bsz, n_c, d)
        for o in range(k * k):
            idx = neighbours[:, :, o : o + 1].expand(bsz, n_c, d)
            out = out + padded.gather(1, idx) * w[o]
        return out

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
