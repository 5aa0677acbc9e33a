"""Tile-grid geometry shared by the heatmap, the top-tile markers and the exports (no Qt).

Conventions
-----------
* Tile coordinates are level-0 pixels ``(x, y)`` of the tile's top-left corner; tile ``(x, y)``
  covers the level-0 pixels ``[x, x + size) × [y, y + size)``.
* The slide layer is drawn with ``scale = (mpp, mpp)`` µm per level-0 pixel and no translation.
  napari puts the *centre* of data pixel ``i`` at world ``i · scale + translate``, so level-0 pixel
  ``x`` covers world ``[(x - ½)·mpp, (x + ½)·mpp)`` µm. Every world coordinate below follows from
  that convention, so that overlays line up with the slide exactly.
* World coordinates are ``(y, x)`` in µm, napari's axis order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import reduce

import numpy as np

__all__ = [
    "TileLattice",
    "rasterize",
    "smooth_nan",
    "tile_centres_world_um",
    "tile_lattice",
    "tile_rectangles_world_um",
]


@dataclass(frozen=True)
class TileLattice:
    """Where each tile sits on a regular grid of heatmap cells.

    Attributes
    ----------
    origin_level0 : tuple[int, int]
        ``(x, y)`` level-0 pixel of the top-left corner of cell ``(0, 0)``.
    stride_level0 : int
        Distance between neighbouring cells in level-0 pixels (equals the tile size for the
        non-overlapping grids the extractor writes).
    tile_size_level0 : int
        Side of one tile in level-0 pixels.
    n_rows, n_cols : int
        Heatmap shape.
    rows, cols : numpy.ndarray
        ``[N]`` int64 cell of each tile.
    exact : bool
        True when every tile sits exactly on the lattice (False: coordinates were rounded to the
        nearest cell, e.g. for feature files from an extractor that jittered its tiles).
    """

    origin_level0: tuple[int, int]
    stride_level0: int
    tile_size_level0: int
    n_rows: int
    n_cols: int
    rows: np.ndarray
    cols: np.ndarray
    exact: bool

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n_rows, self.n_cols)

    def scale_um(self, mpp: float) -> tuple[float, float]:
        """``(y, x)`` size of one heatmap cell in µm."""
        s = float(self.stride_level0) * float(mpp)
        return (s, s)

    def translate_um(self, mpp: float) -> tuple[float, float]:
        """``(y, x)`` world position (µm) of the centre of cell ``(0, 0)``.

        Cell ``c`` covers level-0 pixels ``[x0 + c·stride, x0 + (c+1)·stride)``, i.e. world
        ``[(x0 + c·stride − ½)·mpp, (x0 + (c+1)·stride − ½)·mpp)``; its centre is at
        ``(x0 + c·stride + (stride − 1)/2)·mpp``, hence this translation.
        """
        x0, y0 = self.origin_level0
        half = (self.stride_level0 - 1) / 2.0
        return ((y0 + half) * float(mpp), (x0 + half) * float(mpp))


def _as_coords(coords_level0: np.ndarray) -> np.ndarray:
    c = np.asarray(coords_level0)
    if c.ndim != 2 or c.shape[1] != 2:
        raise ValueError(f"coords_level0 must have shape [N, 2] (x, y); got {c.shape}")
    return np.rint(c).astype(np.int64)


def tile_lattice(coords_level0: np.ndarray, tile_size_level0: int) -> TileLattice:
    """Place tiles on the regular lattice they were cut from.

    Parameters
    ----------
    coords_level0 : array [N, 2]
        Top-left ``(x, y)`` of each tile in level-0 pixels.
    tile_size_level0 : int
        Tile side in level-0 pixels.

    Returns
    -------
    TileLattice
        The stride is the tile size when all offsets are multiples of it (the usual,
        non-overlapping grid); otherwise the greatest common divisor of the offsets when that is
        at least a quarter tile (overlapping grids); otherwise tiles are rounded to the nearest
        tile-sized cell and ``exact`` is False.
    """
    size = int(tile_size_level0)
    if size <= 0:
        raise ValueError(f"tile_size_level0 must be positive; got {tile_size_level0}")
    c = _as_coords(coords_level0)
    if len(c) == 0:
        return TileLattice((0, 0), size, size, 0, 0, np.zeros(0, np.int64), np.zeros(0, np.int64), True)
    x0, y0 = int(c[:, 0].min()), int(c[:, 1].min())
    off = c - np.array([x0, y0])
    stride = size
    exact = bool(np.all(off % size == 0))
    if not exact:
        nonzero = [int(v) for v in np.unique(off) if v > 0]
        g = reduce(math.gcd, nonzero, 0)
        if g >= max(1, size // 4):
            stride, exact = g, True
    cols = np.rint(off[:, 0] / stride).astype(np.int64)
    rows = np.rint(off[:, 1] / stride).astype(np.int64)
    return TileLattice(
        origin_level0=(x0, y0),
        stride_level0=int(stride),
        tile_size_level0=size,
        n_rows=int(rows.max()) + 1,
        n_cols=int(cols.max()) + 1,
        rows=rows,
        cols=cols,
        exact=exact,
    )


def rasterize(values: np.ndarray, lattice: TileLattice) -> np.ndarray:
    """Put one value per tile on the heatmap grid; cells without a tile are NaN (transparent).

    When two tiles fall in one cell (inexact lattices only), the cell holds their mean.
    """
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    if len(v) != len(lattice.rows):
        raise ValueError(f"{len(v)} values for {len(lattice.rows)} tiles")
    total = np.zeros(lattice.shape, np.float64)
    count = np.zeros(lattice.shape, np.int64)
    ok = np.isfinite(v)
    np.add.at(total, (lattice.rows[ok], lattice.cols[ok]), v[ok])
    np.add.at(count, (lattice.rows[ok], lattice.cols[ok]), 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        grid = np.where(count > 0, total / np.maximum(count, 1), np.nan)
    return grid.astype(np.float32)


def smooth_nan(grid: np.ndarray, sigma_cells: float) -> np.ndarray:
    """Gaussian smoothing that ignores NaN cells and keeps them NaN (normalised convolution).

    ``sigma_cells`` is in heatmap cells (tiles); 0 returns a copy.
    """
    g = np.asarray(grid, dtype=np.float64)
    if sigma_cells <= 0:
        return g.astype(np.float32, copy=True)
    from scipy.ndimage import gaussian_filter

    valid = np.isfinite(g)
    num = gaussian_filter(np.where(valid, g, 0.0), sigma_cells, mode="constant")
    den = gaussian_filter(valid.astype(np.float64), sigma_cells, mode="constant")
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(valid, num / den, np.nan)
    return out.astype(np.float32)


def tile_centres_world_um(coords_level0: np.ndarray, tile_size_level0: int, mpp: float) -> np.ndarray:
    """``[N, 2]`` world ``(y, x)`` µm of each tile's centre under napari's pixel-centre convention."""
    c = _as_coords(coords_level0).astype(np.float64)
    half = (int(tile_size_level0) - 1) / 2.0
    return np.stack([(c[:, 1] + half) * mpp, (c[:, 0] + half) * mpp], axis=1)


def tile_rectangles_world_um(coords_level0: np.ndarray, tile_size_level0: int, mpp: float) -> np.ndarray:
    """``[N, 4, 2]`` world ``(y, x)`` µm corners of each tile's outline (napari rectangles).

    The outline runs along the outer edges of the tile's pixels: ``x − ½`` to ``x + size − ½``.
    """
    c = _as_coords(coords_level0).astype(np.float64)
    s = float(tile_size_level0)
    x0 = c[:, 0] - 0.5
    y0 = c[:, 1] - 0.5
    x1, y1 = x0 + s, y0 + s
    rect = np.stack(
        [np.stack([y0, x0], 1), np.stack([y0, x1], 1), np.stack([y1, x1], 1), np.stack([y1, x0], 1)],
        axis=1,
    )
    return rect * float(mpp)
