"""Pre-norm transformer block of the MIRROR RNA encoder, and sinusoidal positions.

The MIRROR RNA encoder feeds *one vector* per sample to its transformer blocks. Faithful to the
authors' code, the "self-attention" then runs across the ``heads`` chunks of the feature
dimension: the qkv projection of x [B, D] is split into ``heads`` chunks of width D/heads that
act as a sequence of ``heads`` tokens attending to each other (a heads×heads attention per
sample), and the result is re-assembled in the authors' interleaved order
(``[B, heads, D/heads] → transpose → [B, D]``) before the output projection.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .mlp import Mlp

__all__ = ["ChunkAttention", "ChunkBlock", "chunk_transformer", "sinusoidal_positions"]


class ChunkAttention(nn.Module):
    """Attention among the ``heads`` feature chunks of a single vector ``x [B, D]``."""

    def __init__(self, dim: int, heads: int = 12, qkv_bias: bool = True, dropout: float = 0.0):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim={dim} must be divisible by heads={heads}")
        self.heads = heads
        self.head_dim = dim // heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        bsz, dim = x.shape
        q, k, v = self.qkv(x).reshape(bsz, 3, self.heads, self.head_dim).unbind(1)
        out = F.scaled_dot_product_attention(q, k, v)  # [B, heads, head_dim]
        out = out.transpose(1, 2).reshape(bsz, dim)  # authors' interleaved re-assembly
        return self.proj_drop(self.proj(out))


class ChunkBlock(nn.Module):
    """Pre-norm block ``x + attn(norm1(x)); x + mlp(norm2(x))`` on ``x [B, D]`` (LayerNorm eps 1e-6)."""

    def __init__(self, dim: int, heads: int = 12, mlp_ratio: float = 4.0, dropout: float = 0.1):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = ChunkAttention(dim, heads, qkv_bias=True, dropout=dropout)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), dim, dropout=dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def chunk_transformer(
    dim: int, heads: int, mlp_ratio: float, dropout: float, depth: int
) -> tuple[nn.Parameter, nn.ModuleList, nn.LayerNorm]:
    """The body of the RNA transformer and of its retention decoder: a learned position vector
    (truncated normal, std 0.02), ``depth`` :class:`ChunkBlock` s and a final LayerNorm.

    Returned as parts that the caller stores as ``pos_embed``, ``blocks``, ``norm`` (the
    state-dict keys of saved models), created in this order (the random init depends on it).
    """
    pos_embed = nn.Parameter(torch.empty(dim))
    nn.init.trunc_normal_(pos_embed, std=0.02)
    blocks = nn.ModuleList(ChunkBlock(dim, heads, mlp_ratio, dropout) for _ in range(depth))
    return pos_embed, blocks, nn.LayerNorm(dim, eps=1e-6)


def sinusoidal_positions(
    n: int, dim: int, device: torch.device | None = None, dtype: torch.dtype = torch.float32
) -> Tensor:
    """Fixed sine/cosine position table ``[n, dim]`` (Vaswani et al.), defined for any ``n``.

    Column ``2i`` is ``sin(p / 10000^(2i/dim))`` and column ``2i+1`` the cosine, p = 0..n-1.
    """
    pos = torch.arange(n, device=device, dtype=torch.float32)[:, None]
    half = (dim + 1) // 2
    freq = torch.exp(
        -math.log(10000.0) * torch.arange(half, device=device, dtype=torch.float32) * 2.0 / dim
    )
    angles = pos * freq[None, :]
    table = torch.stack((angles.sin(), angles.cos()), dim=-1).reshape(n, 2 * half)[:, :dim]
    return table.to(dtype)
