"""Per-tile maps of a prediction: what each map is (:class:`TileMap`) and how it is computed.

A :class:`~mirror_model.inference.Prediction` of a slide carries ``maps``, an insertion-ordered
``dict[str, TileMap]`` keyed by map name, every map aligned with ``Prediction.coords_level0``:

``"attention"``
    The slide encoder's own per-tile attention (where the encoder looks). Non-negative, sums
    to 1. It answers no clinical question and its orientation is not fixed by training.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["ATTENTION", "TileMap"]

#: Name of the encoder-attention map.
ATTENTION = "attention"


@dataclass(frozen=True, eq=False)
class TileMap:
    """One value per tile of a slide, with what it means.

    Attributes
    ----------
    name : str
        The key in ``Prediction.maps`` (``"attention"``, ``"subtype:<class>"``, ``"risk"``).
    values : np.ndarray
        ``[N]`` float64, read-only, aligned with ``Prediction.coords_level0``.
    label : str
        Short text for a selector (e.g. ``"Evidence for solid"``).
    description : str
        One sentence: what the map means and which direction is "more".
    signed : bool
        True when negative values mean evidence against (draw with a diverging colour map
        centred on 0); False for non-negative maps.
    method : str
        How the values were computed.
    units : str
        Unit of ``values``.
    """

    name: str
    values: np.ndarray
    label: str
    description: str
    signed: bool
    method: str
    units: str

    def __post_init__(self) -> None:
        v = np.array(self.values, dtype=np.float64).reshape(-1)
        v.flags.writeable = False
        object.__setattr__(self, "values", v)

    @property
    def n_tiles(self) -> int:
        return int(self.values.size)

    def display_range(self, percentile: float = 99.0) -> tuple[float, float]:
        """A colour range that a few extreme tiles do not squash.

        Signed maps: ``(-a, a)`` with ``a`` the ``percentile``-th percentile of ``|values|``
        (0 stays the centre of the colour map). Unsigned maps: the ``100 - percentile`` and
        ``percentile`` percentiles. Non-finite values are ignored; an empty or constant map
        gives a range of width > 0 around its value.
        """
        v = self.values[np.isfinite(self.values)]
        if v.size == 0:
            return (-1.0, 1.0) if self.signed else (0.0, 1.0)
        if self.signed:
            a = float(np.percentile(np.abs(v), percentile))
            a = a if a > 0 else float(np.abs(v).max()) or 1.0
            return (-a, a)
        lo, hi = (float(x) for x in np.percentile(v, [100.0 - percentile, percentile]))
        if hi <= lo:
            lo, hi = float(v.min()), float(v.max())
        if hi <= lo:
            hi = lo + (abs(lo) or 1.0)
        return (lo, hi)


def attention_map(attention: np.ndarray, source: str) -> TileMap:
    """The encoder-attention :class:`TileMap` (weights summing to 1, from ``source``)."""
    return TileMap(
        name=ATTENTION,
        values=attention,
        label="Attention (where the encoder looks)",
        description=(
            "Share of the slide encoder's attention that goes to each tile (sums to 1); higher = "
            "the encoder reads the tile more. It is not evidence for a subtype or for risk, and "
            "self-supervised training does not fix which tissue it favours."
        ),
        signed=False,
        method=source,
        units="attention weight (sums to 1 over the tiles)",
    )
