"""The tile grid: square tiles at a target resolution, kept where there is tissue.

A tile of ``tile_px`` pixels at ``target_mpp`` µm/px covers ``tile_size_level0 =
round(tile_px * target_mpp / slide.mpp)`` level-0 pixels. The grid starts at (0, 0) and steps
by ``tile_size_level0``; only tiles fully inside the slide are considered, and a tile is kept
when the tissue mask covers at least ``tissue_threshold`` of its area. Tiles are read from the
most detailed-enough pyramid level: the level with the largest downsample that is still
≤ the needed downsample (``target_mpp / slide.mpp``), as ``read_size_px`` pixels of that
level, and resized to the encoder's input afterwards.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError, SlideError
from ._tissue import TissueMask, detect_tissue

__all__ = ["TileGrid", "make_tile_grid"]


@dataclass(frozen=True)
class TileGrid:
    """Where the tiles of one slide are and how to read them.

    Attributes
    ----------
    coords_level0 : np.ndarray
        ``[N, 2]`` int64, (x, y) top-left corner of every kept tile in level-0 pixels,
        in row-major order (y, then x).
    tile_size_level0 : int
        Side of a tile in level-0 pixels.
    target_mpp : float
        µm per pixel the tiles represent once resized to ``tile_px``.
    tile_px : int
        Tile side in pixels at ``target_mpp``.
    read_level : int
        Pyramid level the tiles are read from.
    read_size_px : int
        Side of a tile in pixels of ``read_level``.
    tissue_fraction : np.ndarray
        ``[N]`` float32, tissue-mask coverage of every kept tile.
    tissue_mask : TissueMask
        The low-resolution mask used.
    slide_dimensions : tuple[int, int]
        Level-0 (width, height) of the slide.
    slide_mpp : float
        Level-0 µm per pixel of the slide.
    tissue_threshold : float
        Minimum tissue fraction for a tile to be kept.
    """

    coords_level0: np.ndarray
    tile_size_level0: int
    target_mpp: float
    tile_px: int
    read_level: int
    read_size_px: int
    tissue_fraction: np.ndarray
    tissue_mask: TissueMask
    slide_dimensions: tuple[int, int]
    slide_mpp: float
    tissue_threshold: float

    def __len__(self) -> int:
        return int(self.coords_level0.shape[0])

    @property
    def n_tiles(self) -> int:
        return len(self)

    @property
    def grid_shape(self) -> tuple[int, int]:
        """(rows, cols) of the full grid over the slide (kept or not)."""
        w, h = self.slide_dimensions
        return h // self.tile_size_level0, w // self.tile_size_level0


def make_tile_grid(
    slide: object,
    target_mpp: float = 0.5,
    tile_px: int = 256,
    *,
    tissue_threshold: float = 0.25,
    tissue: TissueMask | None = None,
    mask_mpp: float | None = None,
    require_tissue: bool = True,
) -> TileGrid:
    """Lay a tile grid over a slide and keep the tiles on tissue.

    Parameters
    ----------
    slide : SlideHandle
        An open slide.
    target_mpp : float
        µm per pixel of the tiles (0.5 ≈ 20x).
    tile_px : int
        Tile side in pixels at ``target_mpp``.
    tissue_threshold : float
        Minimum fraction of a tile's area covered by tissue (0-1); 0 keeps every tile.
    tissue : TissueMask, optional
        A precomputed mask (default: :func:`detect_tissue` at ``mask_mpp``).
    mask_mpp : float, optional
        Resolution of the tissue mask (default: 1/16 of a tile, i.e. 16x16 mask pixels per tile).
    require_tissue : bool
        Raise :class:`SlideError` when no tile is kept (default); otherwise return an empty grid.

    Returns
    -------
    TileGrid
    """
    try:
        target_mpp = float(target_mpp)
        tile_px = int(tile_px)
        tissue_threshold = float(tissue_threshold)
    except (TypeError, ValueError) as exc:
        raise ConfigError(
            f"target_mpp, tile_px and tissue_threshold must be numbers ({exc})."
        ) from None
    if not target_mpp > 0:
        raise ConfigError(f"target_mpp must be > 0 µm per pixel, got {target_mpp}.")
    if tile_px < 8:
        raise ConfigError(f"tile_px must be at least 8 pixels, got {tile_px}.")
    if not 0.0 <= tissue_threshold <= 1.0:
        raise ConfigError(f"tissue_threshold must be in [0, 1], got {tissue_threshold}.")
    mpp = float(slide.mpp)  # type: ignore[attr-defined]
    w0, h0 = slide.dimensions  # type: ignore[attr-defined]
    path = getattr(slide, "path", "slide")
    if target_mpp < mpp / 1.1:
        warnings.warn(
            f"{path}: target resolution {target_mpp} µm/px is finer than the scan ({mpp:.4g} µm/px); "
            "tiles will be upsampled.",
            stacklevel=2,
        )
    needed_downsample = target_mpp / mpp
    tile_size_level0 = max(1, round(tile_px * needed_downsample))
    read_level = int(slide.get_best_level_for_downsample(needed_downsample))  # type: ignore[attr-defined]
    level_ds = float(slide.level_downsamples[read_level])  # type: ignore[attr-defined]
    read_size_px = max(1, round(tile_size_level0 / level_ds))

    if tissue is None:
        if mask_mpp is None:
            mask_mpp = tile_size_level0 * mpp / 16.0
        tissue = detect_tissue(slide, mask_mpp=mask_mpp)

    nx, ny = w0 // tile_size_level0, h0 // tile_size_level0
    if nx == 0 or ny == 0:
        raise SlideError(
            f"{path}: the slide ({w0}x{h0} px at {mpp:.4g} µm/px) is smaller than one tile "
            f"({tile_px} px at {target_mpp} µm/px = {tile_size_level0} level-0 px); use a smaller --tile-px."
        )
    ys, xs = np.meshgrid(np.arange(ny), np.arange(nx), indexing="ij")
    all_xy = np.stack([xs.ravel(), ys.ravel()], axis=1).astype(np.int64) * tile_size_level0
    frac = tissue.fraction_in_boxes(all_xy, tile_size_level0)
    keep = frac >= tissue_threshold if tissue_threshold > 0 else np.ones(len(frac), bool)
    if tissue_threshold > 0:
        keep &= frac > 0
    coords = all_xy[keep]
    if require_tissue and coords.shape[0] == 0:
        _refuse_colourless(slide, path)
        raise SlideError(
            f"{path}: no tissue found (tissue covers {100 * tissue.tissue_fraction:.1f}% of the overview; "
            f"no {tile_px} px tile at {target_mpp} µm/px has ≥{100 * tissue_threshold:.0f}% tissue). "
            "Check that this is a brightfield H&E slide that is not blank or almost white, that its "
            f"resolution ({mpp:.4g} µm/px) is right, or lower the tissue threshold."
        )
    return TileGrid(
        coords_level0=coords,
        tile_size_level0=int(tile_size_level0),
        target_mpp=target_mpp,
        tile_px=tile_px,
        read_level=read_level,
        read_size_px=int(read_size_px),
        tissue_fraction=frac[keep].astype(np.float32),
        tissue_mask=tissue,
        slide_dimensions=(int(w0), int(h0)),
        slide_mpp=mpp,
        tissue_threshold=tissue_threshold,
    )


def _refuse_colourless(slide: object, path: object) -> None:
    """A grayscale / single-channel slide has no stain colour to find tissue by: say so
    instead of "no tissue found"."""
    try:
        thumb = np.asarray(slide.get_thumbnail(512))  # type: ignore[attr-defined]
    except Exception:  # the ordinary message follows
        return
    grey = thumb if thumb.ndim == 2 else thumb[..., 0]
    if float(np.mean(grey < 220)) < 0.01:
        return  # blank (near-white) slide: the ordinary "no tissue" message fits
    if thumb.ndim == 2 or (
        thumb.ndim == 3
        and thumb.shape[2] >= 3
        and np.array_equal(thumb[..., 0], thumb[..., 1])
        and np.array_equal(thumb[..., 1], thumb[..., 2])
    ):
        raise SlideError(
            f"{path}: the slide has a single channel (grayscale: red = green = blue in every "
            "pixel), so no stained tissue can be found in it. MIRROR needs a brightfield RGB "
            "scan (H&E); a grayscale, fluorescence or single-channel export cannot be used — "
            "open the original colour scan."
        )
