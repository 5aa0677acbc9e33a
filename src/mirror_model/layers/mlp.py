"""Small MLP building blocks."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

__all__ = ["Mlp", "MlpStack", "xavier_init_linears"]


def xavier_init_linears(module: nn.Module) -> None:
    """Xavier-uniform weights and zero biases for every ``nn.Linear`` inside ``module``.

    The MIRROR authors initialise their slide branch (TransMIL encoder, retention decoder and
    alignment head) this way; other modules keep PyTorch's default initialisation.
    """
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class Mlp(nn.Module):
    """``fc2(drop(norm(act(fc1(x)))))`` followed by dropout (timm ``Mlp`` layout).

    Parameters
    ----------
    in_dim, hidden_dim, out_dim
        Widths.
    dropout
        Dropout after the activation and after ``fc2``.
    norm
        Apply a LayerNorm (eps 1e-6) to the hidden layer (the MIRROR RNA embedding does).
    """

    def __init__(
        self,
        in_dim: int,
        hidden_dim: int,
        out_dim: int,
        dropout: float = 0.0,
        norm: bool = False,
    ) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden_dim)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(hidden_dim, eps=1e-6) if norm else nn.Identity()
        self.fc2 = nn.Linear(hidden_dim, out_dim)
        self.drop2 = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop2(self.fc2(self.norm(self.drop1(self.act(self.fc1(x))))))


class MlpStack(nn.Module):
    """``[Linear → LayerNorm → GELU → Dropout]`` per hidden width, then a final Linear.

    Parameters
    ----------
    in_dim
        Input width.
    hidden_dims
        Hidden widths (may be empty: a single Linear).
    out_dim
        Output width.
    dropout
        Dropout after each hidden activation.
    """

    def __init__(
        self, in_dim: int, hidden_dims: Sequence[int], out_dim: int, dropout: float = 0.0
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = in_dim
        for hidden in hidden_dims:
            layers += [
                nn.Linear(width, hidden),
                nn.LayerNorm(hidden),
                nn.GELU(),
                nn.Dropout(dropout),
            ]
            width = hidden
        layers.append(nn.Linear(width, out_dim))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)
