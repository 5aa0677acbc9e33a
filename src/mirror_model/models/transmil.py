"""TransMIL slide encoder (design §1.2), as used by MIRROR.

``Linear(D_p→D) + ReLU`` → prepend a learnable CLS token → Nyström layer 1 → PPEG → Nyström
layer 2 → LayerNorm; the slide embedding is the CLS output.

Layout details (faithful to the authors unless stated):

* Before the CLS token is added, the N tile tokens are padded to the next square S² by repeating
  the first S²−N tokens, so that PPEG can lay them out row-major on an S×S grid. The repeated
  tokens stay in the sequence for layer 2, as in the reference.
* Any padding beyond that (batch padding of slides with fewer tiles, Nyström padding to a
  multiple of the landmark count) is *masked*: it never acts as a key, so a slide encoded inside a
  padded batch gets the same embedding and attention as encoded alone (up to float rounding).
  Each sample gets its own grid size S_b.
* The tile order matters: PPEG mixes grid neighbours and the Nyström value convolution mixes
  sequence neighbours, so TransMIL is **not** invariant to the order of the tiles (the authors feed
  them in random order).

Per-tile attention (the heatmap): the CLS row of one layer's attention, averaged over heads,
restricted to the real tiles. Nyström attention never forms that row explicitly; it approximates
``softmax(q_cls · Kᵀ / √d)``. We return that exact row, computed in O(N) from the layer's own
queries and keys, with the softmax taken over the real tiles only (the CLS key and the square-
padding duplicates are excluded), so it is non-negative and sums to 1 over the real tiles.

Which layer (``ModelConfig.heatmap_layer``): the authors map the **last** layer's row back to
the tiles. But a last-layer key is not a tile: after layer 1 the value convolution (33 sequence
neighbours) and PPEG (7×7 grid neighbours) have mixed every token with its neighbours, which in
the authors' random tile order are unrelated tiles, so "attention to key i" is attention to a
blend of ~50 random tiles. The **first** layer's keys are the tiles themselves, and its CLS
output reaches the embedding directly through the residual stream; its row is what the CLS
token takes from each tile. We default to ``"first"``; on the demo cohort it is the row that
follows the tumour (see the demo report), ``"last"`` reproduces the authors' map.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..config import ModelConfig
from ..errors import FeatureFileError
from ..layers import PPEG, FeatureStandardizer, NystromLayer, xavier_init_linears
from ..layers.ppeg import grid_neighbours
from ._common import (
    Bag,
    SlideEncoderOutput,
    nystrom_layer_kwargs,
    prepare_bag,
    sort_bag_by_position,
    to_input_order,
)

__all__ = ["TransMILEncoder"]


class TransMILEncoder(nn.Module):
    """TransMIL slide encoder.

    Parameters
    ----------
    config
        Uses ``patch_dim, embed_dim, slide_heads, landmarks, pinv_iterations,
        nystrom_conv_kernel, ppeg_kernels, slide_dropout, slide_attention, heatmap_layer``.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        d = config.embed_dim
        self.patch_dim = config.patch_dim
        self.embed_dim = d
        self.heatmap_layer = config.heatmap_layer
        self.readout = config.slide_readout
        self.ppeg_layout = config.ppeg_layout
        self.input_norm = (
            FeatureStandardizer(config.patch_dim)
            if config.slide_input_norm == "standardize"
            else None
        )
        self.fc = nn.Sequential(nn.Linear(config.patch_dim, d), nn.ReLU())
        self.cls_token = nn.Parameter(torch.empty(1, 1, d))
        nn.init.normal_(self.cls_token, std=0.02)
        self.layer1 = NystromLayer(d, **nystrom_layer_kwargs(config))
        self.ppeg = PPEG(d, config.ppeg_kernels) if config.ppeg_layout != "off" else None
        self.layer2 = NystromLayer(d, **nystrom_layer_kwargs(config))
        self.norm = nn.LayerNorm(d)
        xavier_init_linears(self)  # as the authors' slide branch

    def forward(
        self,
        features: Tensor,
        tile_mask: Tensor | None = None,
        return_tokens: bool = False,
        positions: Tensor | None = None,
    ) -> SlideEncoderOutput:
        """Encode ``features [B, N, D_p]`` (or ``[N, D_p]``) with optional ``tile_mask [B, N]``.

        ``positions [B, N, 2]`` (or ``[N, 2]``): the tiles' integer lattice cells (column, row),
        required when ``ppeg_layout == "grid"`` and ignored otherwise.

        Returns embedding ``[B, D]``, attention ``[B, N]`` (input order) and, if
        ``return_tokens``, the final per-tile tokens ``[B, Nc, D]`` of the real tiles (compact
        layout, see :class:`~mirror_model.models._common.Bag`).
        """
        grid = self.ppeg_layout == "grid"
        if grid and positions is None:
            raise FeatureFileError(
                "this TransMIL model mixes tiles with their neighbours on the slide's tile grid "
                "(ppeg_layout='grid') and needs each tile's lattice cell: pass positions= "
                "(mirror_model.features.grid_positions of the tiles' level-0 coordinates)."
            )
        device = self.fc[0].weight.device
        bag = prepare_bag(
            features, tile_mask, self.patch_dim, device, positions=positions if grid else None
        )
        if grid:
            bag = sort_bag_by_position(bag)
        x = bag.x.to(self.fc[0].weight.dtype) if not torch.is_autocast_enabled() else bag.x
        if self.input_norm is not None:
            x = self.input_norm(x, None if bag.uniform else _valid(bag))
        h = self.fc(x)  # [B, Nc, D]
        bsz, n_compact, d = h.shape
        lens = bag.lengths_list
        sides = [math.isqrt(n - 1) + 1 for n in lens]  # ceil(sqrt(n))
        device = h.device

        if grid:
            # real tiles in raster order of their cells, then batch padding (no square padding)
            padded_lengths = lens
        else:
            # ---- square padding by repetition (per sample), batch padding after it
            padded_lengths = [s * s for s in sides]
            seq_max = max(padded_lengths)
            if bag.uniform and len(set(lens)) == 1:
                add = padded_lengths[0] - lens[0]
                if add:
                    h = torch.cat([h, h[:, :add]], dim=1)
            else:
                j = torch.arange(seq_max, device=device)[None, :]
                n_t = bag.lengths[:, None]
                sq_t = torch.tensor(padded_lengths, device=device)[:, None]
                idx = torch.where(j < n_t, j, torch.where(j < sq_t, j - n_t, torch.zeros_like(j)))
                h = h.gather(1, idx[:, :, None].expand(bsz, seq_max, d))

        h = torch.cat([self.cls_token.expand(bsz, -1, -1).to(h.dtype), h], dim=1)
        seq_lengths = None
        if len(set(padded_lengths)) > 1:
            seq_lengths = torch.tensor(padded_lengths, device=device) + 1
        # keys of the heatmap softmax: the real tiles only (positions 1..n_b)
        pos = torch.arange(h.shape[1], device=device)[None, :]
        cls_key_mask = (pos >= 1) & (pos <= bag.lengths[:, None])
        first = self.heatmap_layer == "first"

        res1 = self.layer1(h, lengths=seq_lengths, cls_key_mask=cls_key_mask if first else None)
        h = res1.out

        if self.ppeg_layout == "sequence":
            h = self._ppeg_sequence(h, sides)
        elif grid:
            h = self._ppeg_grid(h, bag)
        need_tokens = return_tokens or self.readout != "cls"
        # without tokens only the CLS output of the last layer is used: compute just that
        res = self.layer2(
            h,
            lengths=seq_lengths,
            cls_key_mask=None if first else cls_key_mask,
            cls_only=not need_tokens,
        )
        h = res.out
        if self.readout == "cls":
            pooled = h[:, 0]
        else:
            # mean of the real tiles' output tokens (not the square-padding repeats)
            valid = (pos[:, 1 : 1 + n_compact] <= bag.lengths[:, None]).to(h.dtype)
            tile_mean = (h[:, 1 : 1 + n_compact] * valid[..., None]).sum(1) / valid.sum(1, True)
            pooled = tile_mean if self.readout == "mean" else h[:, 0] + tile_mean
        embedding = self.norm(pooled)
        cls_attention = res1.cls_attention if first else res.cls_attention
        assert cls_attention is not None
        attention = to_input_order(cls_attention[:, 1 : 1 + n_compact], bag)
        tokens = self.norm(h[:, 1 : 1 + n_compact]) if return_tokens else None
        return SlideEncoderOutput(embedding=embedding, attention=attention, tokens=tokens, bag=bag)

    def _ppeg_grid(self, h: Tensor, bag: Bag) -> Tensor:
        """PPEG over the tiles' real lattice cells (``ppeg_layout="grid"``)."""
        assert self.ppeg is not None and bag.positions is not None
        n_c = bag.x.shape[1]
        kernel = max(self.ppeg.kernels)
        nbrs = grid_neighbours(bag.positions, bag.lengths, kernel)
        tiles = h[:, 1 : 1 + n_c]
        if torch.is_grad_enabled() and tiles.requires_grad:
            # recompute the k² gathers in backward instead of keeping them (memory O(B·N·D))
            mixed = checkpoint(self.ppeg.forward_sparse, tiles, nbrs, use_reentrant=False)
        else:
            mixed = self.ppeg.forward_sparse(tiles, nbrs)
        return torch.cat([h[:, :1], mixed, h[:, 1 + n_c :]], dim=1)

    def _ppeg_sequence(self, h: Tensor, sides: list[int]) -> Tensor:
        """PPEG on each sample's own S x S grid of tokens in sequence order (the authors')."""
        assert self.ppeg is not None
        bsz, _, d = h.shape
        device = h.device
        groups: dict[int, list[int]] = {}
        for b, s in enumerate(sides):
            groups.setdefault(s, []).append(b)
        if len(groups) == 1:
            s = sides[0]
            # [B, S*S, D] tokens viewed as a channels_last [B, D, S, S] grid: no copy
            grid = h[:, 1 : 1 + s * s].reshape(bsz, s, s, d).permute(0, 3, 1, 2)
            mixed = self.ppeg(grid).permute(0, 2, 3, 1).reshape(bsz, s * s, d)
            h = torch.cat([h[:, :1], mixed, h[:, 1 + s * s :]], dim=1)
        else:
            h = h.clone()
            for s, rows in groups.items():
                rows_t = torch.tensor(rows, device=device)
                grid = h[rows_t, 1 : 1 + s * s].reshape(len(rows), s, s, d).permute(0, 3, 1, 2)
                mixed = self.ppeg(grid).permute(0, 2, 3, 1).reshape(len(rows), s * s, d)
                h[rows_t, 1 : 1 + s * s] = mixed
        return h


def _valid(bag: Bag) -> Tensor:
    """``[B, Nc]`` True at the real tiles of a compact bag."""
    n = bag.x.shape[1]
    return torch.arange(n, device=bag.x.device)[None, :] < bag.lengths[:, None]
