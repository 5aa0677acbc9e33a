"""MLP transcriptomics encoder of the TANGLE baseline (design §1.10).

``[Linear → LayerNorm → GELU → Dropout] × len(rna_mlp_hidden_dims)`` then ``Linear → D``.
"""

from __future__ import annotations

from torch import Tensor, nn

from ..config import ModelConfig
from ..layers import MlpStack

__all__ = ["MlpRNAEncoder"]


class MlpRNAEncoder(nn.Module):
    """MLP expression encoder ``[B, G] → [B, D]``.

    Parameters
    ----------
    config
        Uses ``n_genes, embed_dim, rna_mlp_hidden_dims, rna_dropout``.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_genes = config.n_genes
        self.embed_dim = config.embed_dim
        self.net = MlpStack(
            config.n_genes, config.rna_mlp_hidden_dims, config.embed_dim, config.rna_dropout
        )

    def forward(self, rna: Tensor) -> Tensor:
        """Embed ``rna [B, G]`` into ``[B, D]``."""
        return self.net(rna)
