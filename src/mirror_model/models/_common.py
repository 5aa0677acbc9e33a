"""Input checking and bag layout shared by the encoders.

A *bag* is a batch of tile-feature sets ``[B, N, D_p]`` with an optional ``tile_mask [B, N]``
(True = real tile). Encoders work on a *compact* layout: for every sample the real tiles are moved
to the front, in input order, and the batch is cut to the largest real count ``Nc``. ``order``
maps compact position j of sample b back to the input index ``order[b, j]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..errors import ConfigError, ExpressionError, FeatureFileError

__all__ = [
    "Bag",
    "SlideEncoderOutput",
    "check_rna",
    "nystrom_layer_kwargs",
    "prepare_bag",
    "sample_masks",
    "sort_bag_by_position",
    "to_input_order",
]


@dataclass
class Bag:
    """Compact tile layout.

    Attributes
    ----------
    x
        ``[B, Nc, D_p]`` features, real tiles first (input order kept), padding after.
    lengths
        ``[B]`` int64 number of real tiles per sample (>= 1).
    lengths_list
        The same as Python ints.
    order
        ``[B, N]`` int64 input index of each compact position, or ``None`` when the layout is
        the input layout (no mask, or every tile real).
    n_input
        N, the number of tiles of the input (compact results are scattered back to this width).
    positions
        ``[B, Nc, 2]`` int64 lattice cells (column, row) of the tiles in compact layout, or
        ``None`` when none were given.
    """

    x: Tensor
    lengths: Tensor
    lengths_list: list[int]
    order: Tensor | None
    n_input: int
    positions: Tensor | None = None

    @property
    def uniform(self) -> bool:
        """All samples have the same number of real tiles and no padding."""
        return self.order is None


@dataclass
class SlideEncoderOutput:
    """Output of a slide encoder.

    Attributes
    ----------
    embedding
        ``[B, D]`` slide embedding (TransMIL: the CLS output after the final LayerNorm).
    attention
        ``[B, N]`` per-tile attention in input order: non-negative, summing to 1 over the real
        tiles of each sample, exactly 0 at masked tiles.
    tokens
        ``[B, Nc, D]`` per-tile output tokens in compact layout (real tiles first), or ``None``
        when not requested.
    bag
        The compact layout used (lengths, order) so callers can map token results back.
    """

    embedding: Tensor
    attention: Tensor
    tokens: Tensor | None
    bag: Bag


def prepare_bag(
    features: Tensor,
    tile_mask: Tensor | None,
    patch_dim: int,
    device: torch.device | None = None,
    positions: Tensor | None = None,
) -> Bag:
    """Check ``features [B, N, D_p]`` (or ``[N, D_p]``) and ``tile_mask [B, N]``; compact them.

    ``device`` is the model's device; features elsewhere raise a clear error. ``positions``
    ``[B, N, 2]`` (or ``[N, 2]``) integer lattice cells are checked and compacted alongside.
    """
    wanted = f"features must be a torch.Tensor of shape [N, {patch_dim}] or [B, N, {patch_dim}]"
    _require_tensor(features, FeatureFileError, wanted)
    if features.dim() == 2:
        features = features.unsqueeze(0)
        if tile_mask is not None and tile_mask.dim() == 1:
            tile_mask = tile_mask.unsqueeze(0)
        if isinstance(positions, Tensor) and positions.dim() == 2:
            positions = positions.unsqueeze(0)
    if features.dim() != 3:
        raise FeatureFileError(
            f"features must have shape [N, {patch_dim}] or [B, N, {patch_dim}]; "
            f"got {tuple(features.shape)}."
        )
    bsz, n, dim = features.shape
    if dim != patch_dim:
        raise FeatureFileError(
            f"features have {dim} dimensions per tile but the model expects patch_dim={patch_dim}; "
            "were they extracted with a different patch encoder than the one this model was trained on?"
        )
    if n == 0 or bsz == 0:
        raise FeatureFileError("features hold no tiles (N = 0); a slide needs at least one tile.")
    features = _float_on_device(
        features, device, "features are", "move them first, e.g. features", FeatureFileError,
        "features contain NaN or infinite values; re-extract the features.",
    )  # fmt: skip

    if positions is not None:
        positions = _check_positions(positions, bsz, n, features.device)
    if tile_mask is None:
        lengths = torch.full((bsz,), n, dtype=torch.long, device=features.device)
        return Bag(features, lengths, [n] * bsz, None, n, positions)
    if not isinstance(tile_mask, Tensor) or tuple(tile_mask.shape) != (bsz, n):
        shape = (
            tuple(tile_mask.shape) if isinstance(tile_mask, Tensor) else type(tile_mask).__name__
        )
        raise ConfigError(f"tile_mask must be a bool tensor of shape {(bsz, n)}; got {shape}.")
    mask = tile_mask.to(device=features.device, dtype=torch.bool)
    lengths = mask.sum(dim=1)
    lengths_list = [int(v) for v in lengths.tolist()]
    empty = [i for i, v in enumerate(lengths_list) if v == 0]
    if empty:
        raise ConfigError(
            f"tile_mask marks no real tile in batch row(s) {empty}; every sample needs at least one tile."
        )
    if min(lengths_list) == n:
        return Bag(features, lengths, lengths_list, None, n, positions)
    # stable sort puts real tiles first while keeping their input order
    order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)
    n_compact = max(lengths_list)
    idx = order[:, :n_compact]
    x = features.gather(1, idx[:, :, None].expand(bsz, n_compact, dim))
    if positions is not None:
        positions = positions.gather(1, idx[:, :, None].expand(bsz, n_compact, 2))
    return Bag(x, lengths, lengths_list, order, n, positions)


def _check_positions(positions: Tensor, bsz: int, n: int, device: torch.device) -> Tensor:
    if isinstance(positions, Tensor) and positions.dim() == 2 and bsz == 1:
        positions = positions.unsqueeze(0)
    if not isinstance(positions, Tensor) or tuple(positions.shape) != (bsz, n, 2):
        shape = (
            tuple(positions.shape) if isinstance(positions, Tensor) else type(positions).__name__
        )
        raise FeatureFileError(
            f"tile positions must be integer lattice cells of shape {(bsz, n, 2)} (one (column, "
            f"row) per tile, see mirror_model.features.grid_positions); got {shape}."
        )
    if positions.is_floating_point():
        if not bool(torch.isfinite(positions).all()) or bool((positions != positions.round()).any()):
            raise FeatureFileError(
                "tile positions must be whole lattice cells (column, row), not level-0 pixel "
                "coordinates; convert them with mirror_model.features.grid_positions."
            )
    return positions.to(device=device, dtype=torch.long)


def sort_bag_by_position(bag: Bag) -> Bag:
    """The same bag with each sample's real tiles in raster order of their lattice cells.

    Row-major (row, then column), ties (a tile drawn twice) in input order; padding stays last.
    ``order`` is composed so :func:`to_input_order` still maps results back to the input order.
    """
    assert bag.positions is not None
    pos = bag.positions
    bsz, n_c, _ = pos.shape
    valid = torch.arange(n_c, device=pos.device)[None, :] < bag.lengths[:, None]
    rel = pos - torch.where(valid[..., None], pos, pos.new_full((), 2**31)).amin(1, keepdim=True)
    width = int(rel[valid][:, 0].max()) + 1 if bool(valid.any()) else 1
    key = torch.where(valid, rel[..., 1] * width + rel[..., 0], torch.iinfo(torch.long).max)
    perm = torch.argsort(key, dim=1, stable=True)  # [B, Nc]
    x = bag.x.gather(1, perm[:, :, None].expand_as(bag.x))
    positions = pos.gather(1, perm[:, :, None].expand_as(pos))
    if bag.order is None:
        order = perm
        if n_c < bag.n_input:  # cannot happen without a mask; kept for safety
            order = torch.cat([perm, torch.arange(n_c, bag.n_input, device=perm.device).expand(bsz, -1)], 1)
    else:
        order = torch.cat([bag.order[:, :n_c].gather(1, perm), bag.order[:, n_c:]], dim=1)
    return Bag(x, bag.lengths, bag.lengths_list, order, bag.n_input, positions)


def to_input_order(values: Tensor, bag: Bag, fill: float | bool = 0) -> Tensor:
    """Scatter per-tile ``values [B, Nc, ...]`` from compact layout back to ``[B, N, ...]``."""
    if bag.order is None:
        return values
    bsz, n_compact = values.shape[:2]
    out = values.new_full((bsz, bag.n_input, *values.shape[2:]), fill)
    valid = torch.arange(n_compact, device=values.device)[None, :] < bag.lengths[:, None]
    values = torch.where(valid.view(bsz, n_compact, *([1] * (values.dim() - 2))), values, fill)
    idx = bag.order[:, :n_compact]
    if values.dim() > 2:
        idx = idx.view(bsz, n_compact, *([1] * (values.dim() - 2))).expand_as(values)
    return out.scatter(1, idx, values)


def sample_masks(
    lengths: Tensor, width: int, ratio: float, generator: torch.Generator | None = None
) -> Tensor:
    """Random retention masks ``[B, width]`` (True = masked) over the first ``lengths[b]`` slots.

    Exactly ``n - int(n * (1 - ratio))`` of the ``n = lengths[b]`` valid slots are masked in each
    row (the authors' count: ``int`` of the kept share), chosen uniformly at random.
    """
    bsz = lengths.shape[0]
    device = lengths.device
    noise = torch.rand(bsz, width, device=device, generator=generator)
    valid = torch.arange(width, device=device)[None, :] < lengths[:, None]
    noise = noise.masked_fill(~valid, 2.0)  # padding sorts last
    ranks = noise.argsort(dim=1).argsort(dim=1)
    n_keep = torch.floor(lengths.to(torch.float64) * (1.0 - ratio) + 1e-9).to(torch.long)
    n_mask = lengths - n_keep
    return ranks < n_mask[:, None]


def check_rna(rna: Tensor, n_genes: int, device: torch.device | None = None) -> Tensor:
    """Check an expression input ``[B, G]`` or ``[G]``; return it as ``[B, G]`` floating.

    ``device`` is the model's device; an input elsewhere raises a clear error.
    """
    wanted = f"rna must be a torch.Tensor of shape [G] or [B, G] with G = {n_genes}"
    _require_tensor(rna, ExpressionError, wanted)
    if rna.dim() == 1:
        rna = rna.unsqueeze(0)
    if rna.dim() != 2 or rna.shape[1] != n_genes:
        raise ExpressionError(
            f"expression input has shape {tuple(rna.shape)} but the model expects "
            f"[B, {n_genes}] (n_genes={n_genes}, in the gene order stored with the model)."
        )
    if rna.shape[0] == 0:
        raise ExpressionError("expression input holds no samples (B = 0).")
    return _float_on_device(
        rna, device, "the expression input is", "move it first, e.g. rna", ExpressionError,
        "expression input contains NaN or infinite values; impute or drop them first.",
    )  # fmt: skip


def _require_tensor(x: Any, error: type[Exception], expected: str) -> None:
    """Raise ``error("<expected>; got <type>.")`` unless ``x`` is a tensor."""
    if not isinstance(x, Tensor):
        raise error(f"{expected}; got {type(x).__name__}.")


def _float_on_device(
    x: Tensor, device: Any, subject: str, move: str, error: type[Exception], not_finite: str
) -> Tensor:
    """``x`` as floating point, checked to be on the model's ``device`` and finite."""
    if device is not None and x.device != device:
        raise ConfigError(
            f"{subject} on {x.device} but the model is on {device}; {move}.to({str(device)!r})."
        )
    if not x.is_floating_point():
        x = x.float()
    if not bool(torch.isfinite(x).all()):
        raise error(not_finite)
    return x


def nystrom_layer_kwargs(config: Any) -> dict[str, Any]:
    """Keyword arguments of the slide branch's :class:`~mirror_model.layers.NystromLayer` (encoder
    and retention decoder alike) from a :class:`~mirror_model.config.ModelConfig`."""
    return {
        "heads": config.slide_heads,
        "landmarks": config.landmarks,
        "pinv_iterations": config.pinv_iterations,
        "conv_kernel": config.nystrom_conv_kernel,
        "dropout": config.slide_dropout,
        "mode": config.slide_attention,
    }
