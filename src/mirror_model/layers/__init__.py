"""Shared layers: Nyström attention, PPEG, the RNA transformer block, MLPs."""

from .input_norm import FeatureStandardizer
from .mlp import Mlp, MlpStack, xavier_init_linears
from .nystrom import (
    NystromAttention,
    NystromLayer,
    NystromResult,
    gather_rows,
    moore_penrose_pinv,
)
from .ppeg import PPEG
from .transformer import ChunkAttention, ChunkBlock, chunk_transformer, sinusoidal_positions

__all__ = [
    "PPEG",
    "ChunkAttention",
    "ChunkBlock",
    "FeatureStandardizer",
    "Mlp",
    "MlpStack",
    "NystromAttention",
    "NystromLayer",
    "NystromResult",
    "chunk_transformer",
    "gather_rows",
    "moore_penrose_pinv",
    "sinusoidal_positions",
    "xavier_init_linears",
]
