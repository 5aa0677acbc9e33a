"""Gated-attention ABMIL slide encoder (Ilse et al. 2018), the TANGLE baseline (design §1.10).

``h_i = Dropout(GELU(W_in x_i))``;  ``a_i = softmax_i( w_cᵀ (tanh(W_a h_i) ⊙ σ(W_b h_i)) )`` over
the real tiles;  embedding ``= W_out Σ_i a_i h_i``. The attention weights a_i are the per-tile
attention (non-negative, summing to 1 over the real tiles). Every operation is per tile or a sum
over tiles, so the embedding and the attention are invariant to the tile order and unaffected
by padded tiles.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..config import ModelConfig
from ..layers import FeatureStandardizer
from ._common import SlideEncoderOutput, prepare_bag, to_input_order

__all__ = ["GatedABMILEncoder"]


class GatedABMILEncoder(nn.Module):
    """Gated ABMIL with sum pooling.

    Parameters
    ----------
    config
        Uses ``patch_dim, embed_dim, abmil_attention_dim, abmil_dropout``.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        d, a = config.embed_dim, config.abmil_attention_dim
        self.patch_dim = config.patch_dim
        self.embed_dim = d
        self.input_norm = (
            FeatureStandardizer(config.patch_dim)
            if config.slide_input_norm == "standardize"
            else None
        )
        self.fc = nn.Sequential(
            nn.Linear(config.patch_dim, d), nn.GELU(), nn.Dropout(config.abmil_dropout)
        )
        self.attn_a = nn.Linear(d, a)
        self.attn_b = nn.Linear(d, a)
        self.attn_c = nn.Linear(a, 1)
        self.out = nn.Linear(d, d)

    def forward(
        self, features: Tensor, tile_mask: Tensor | None = None, return_tokens: bool = False
    ) -> SlideEncoderOutput:
        """Encode ``features [B, N, D_p]`` (or ``[N, D_p]``) with optional ``tile_mask [B, N]``."""
        bag = prepare_bag(features, tile_mask, self.patch_dim, self.fc[0].weight.device)
        x = bag.x.to(self.fc[0].weight.dtype) if not torch.is_autocast_enabled() else bag.x
        valid = torch.arange(x.shape[1], device=x.device)[None, :] < bag.lengths[:, None]
        if self.input_norm is not None:
            x = self.input_norm(x, None if bag.uniform else valid)
        h = self.fc(x)  # [B, Nc, D]
        logits = self.attn_c(torch.tanh(self.attn_a(h)) * torch.sigmoid(self.attn_b(h))).squeeze(-1)
        weights = (
            (logits if logits.dtype == torch.float64 else logits.float())
            .masked_fill(~valid, float("-inf"))
            .softmax(dim=1)
        )
        pooled = torch.einsum("bn,bnd->bd", weights.to(h.dtype), h)
        embedding = self.out(pooled)
        attention = to_input_order(weights, bag)
        return SlideEncoderOutput(
            embedding=embedding, attention=attention, tokens=h if return_tokens else None, bag=bag
        )
