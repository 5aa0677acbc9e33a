"""MIRROR transcriptomics encoder (design §1.3).

``Linear(G→2D) → GELU → LayerNorm → Linear(2D→D)``, plus one learned vector (the authors'
"positional embedding" of a single token), then ``rna_depth`` pre-norm transformer blocks and a
final LayerNorm (eps 1e-6). Faithful to the authors: the input is one vector per sample, so the
blocks' "self-attention" runs across the ``rna_heads`` chunks of the feature dimension (see
:mod:`mirror_model.layers.transformer`), not across genes or samples.
"""

from __future__ import annotations

from torch import Tensor, nn

from ..config import ModelConfig
from ..layers import Mlp, chunk_transformer

__all__ = ["MirrorRNAEncoder"]


class MirrorRNAEncoder(nn.Module):
    """Transformer expression encoder ``[B, G] → [B, D]``.

    Parameters
    ----------
    config
        Uses ``n_genes, embed_dim, rna_heads, rna_depth, rna_mlp_ratio, rna_dropout``.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        d = config.embed_dim
        self.n_genes = config.n_genes
        self.embed_dim = d
        self.embed = Mlp(config.n_genes, 2 * d, d, dropout=0.0, norm=True)
        self.pos_embed, self.blocks, self.norm = chunk_transformer(
            d, config.rna_heads, config.rna_mlp_ratio, config.rna_dropout, config.rna_depth
        )

    def forward(self, rna: Tensor) -> Tensor:
        """Embed ``rna [B, G]`` (normalised expression) into ``[B, D]``."""
        x = self.embed(rna) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.norm(x)
