"""Tissue detection at low resolution.

Method: the slide is read at ``mask_mpp`` µm per pixel (a low-resolution overview), converted
to HSV saturation ``(max - min) / max`` (stained tissue is coloured, glass background is grey
or white), smoothed by a 3x3 median, and thresholded by Otsu's method. The Otsu threshold is
clipped to ``[min_saturation, max_saturation]``: the floor keeps faint background noise out
on slides with almost no tissue, the ceiling keeps the whole tissue when a slide is almost all
tissue (there Otsu would split dark from light tissue). Very dark pixels (pen marks, scanner
borders: all channels below ``dark_value``) are excluded. The mask is then cleaned with a
binary opening, objects smaller than ``min_object_um2`` are removed and holes smaller than
``max_hole_um2`` are filled (lumina larger than that stay background).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

__all__ = ["TissueMask", "detect_tissue", "otsu_threshold", "saturation"]


@dataclass(frozen=True)
class TissueMask:
    """A boolean tissue mask over the whole slide at low resolution.

    Attributes
    ----------
    mask : np.ndarray
        bool ``[h, w]``, True = tissue.
    downsample : tuple[float, float]
        Level-0 pixels per mask pixel along (x, y).
    threshold : float
        The saturation threshold used (in [0, 1]).
    mask_mpp : float
        µm per mask pixel (x).
    """

    mask: np.ndarray
    downsample: tuple[float, float]
    threshold: float
    mask_mpp: float

    @property
    def tissue_fraction(self) -> float:
        """Fraction of the slide area covered by tissue."""
        return float(self.mask.mean()) if self.mask.size else 0.0

    def fraction_in_boxes(self, xy_level0: np.ndarray, size_level0: float) -> np.ndarray:
        """Tissue fraction inside square boxes given in level-0 pixels.

        Parameters
        ----------
        xy_level0 : np.ndarray
            ``[N, 2]`` top-left corners (x, y) in level-0 pixels.
        size_level0 : float
            Box side in level-0 pixels.

        Returns
        -------
        np.ndarray
            ``[N]`` float32 in [0, 1], area-weighted (fractional mask pixels at box edges
            count by the part inside the box).
        """
        xy = np.asarray(xy_level0, dtype=np.float64).reshape(-1, 2)
        if xy.shape[0] == 0:
            return np.zeros(0, np.float32)
        m = self.mask.astype(np.float64)
        h, w = m.shape
        sat = np.zeros((h + 1, w + 1))
        sat[1:, 1:] = m.cumsum(0).cumsum(1)
        dx, dy = self.downsample
        x0, x1 = xy[:, 0] / dx, (xy[:, 0] + size_level0) / dx
        y0, y1 = xy[:, 1] / dy, (xy[:, 1] + size_level0) / dy
        total = (
            _area_integral(sat, x1, y1)
            - _area_integral(sat, x0, y1)
            - _area_integral(sat, x1, y0)
            + _area_integral(sat, x0, y0)
        )
        area = (x1 - x0) * (y1 - y0)
        return np.clip(total / area, 0.0, 1.0).astype(np.float32)


def _area_integral(sat: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Integral of the mask over [0, x) x [0, y) for fractional x, y (bilinear in the SAT)."""
    h, w = sat.shape[0] - 1, sat.shape[1] - 1
    x = np.clip(x, 0, w)
    y = np.clip(y, 0, h)
    xi = np.minimum(np.floor(x).astype(np.int64), w - 1)
    yi = np.minimum(np.floor(y).astype(np.int64), h - 1)
    fx, fy = x - xi, y - yi
    s00 = sat[yi, xi]
    s01 = sat[yi, xi + 1]
    s10 = sat[yi + 1, xi]
    s11 = sat[yi + 1, xi + 1]
    return s00 * (1 - fx) * (1 - fy) + s01 * fx * (1 - fy) + s10 * (1 - fx) * fy + s11 * fx * fy


def saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation ``(max - min) / max`` of uint8 RGB, in [0, 1] (0 for black)."""
    rgb = np.asarray(rgb)
    mx = rgb.max(axis=-1).astype(np.float32)
    mn = rgb.min(axis=-1).astype(np.float32)
    return np.where(mx > 0, (mx - mn) / np.maximum(mx, 1.0), 0.0).astype(np.float32)


def otsu_threshold(
    values: np.ndarray, bins: int = 256, value_range: tuple[float, float] = (0.0, 1.0)
) -> float:
    """Otsu's threshold (maximum between-class variance) of ``values``."""
    hist, edges = np.histogram(np.asarray(values).ravel(), bins=bins, range=value_range)
    hist = hist.astype(np.float64)
    if hist.sum() == 0:
        return float(value_range[0])
    centers = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centers)
    mu0 = m0 / np.maximum(w0, 1e-12)
    mu1 = (m0[-1] - m0) / np.maximum(w1, 1e-12)
    between = w0 * w1 * (mu0 - mu1) ** 2
    between[w1 == 0] = 0
    # Every cut inside an empty gap between two modes separates them equally well: take the
    # middle of that plateau rather than its first edge.
    best = np.flatnonzero(between >= between.max() * (1 - 1e-9))
    return float((edges[best[0] + 1] + edges[best[-1] + 1]) / 2)


def detect_tissue(
    slide: object,
    mask_mpp: float = 8.0,
    *,
    max_mask_px: int = 4096,
    min_saturation: float = 0.04,
    max_saturation: float = 0.15,
    dark_value: int = 30,
    min_object_um2: float = 20_000.0,
    max_hole_um2: float = 20_000.0,
) -> TissueMask:
    """Detect tissue on a slide at low resolution.

    Parameters
    ----------
    slide : SlideHandle
        An open slide (see :func:`mirror_model.slide.open_slide`).
    mask_mpp : float
        Target µm per mask pixel (coarser if the mask would exceed ``max_mask_px``).
    max_mask_px : int
        Upper bound on the mask's longer side, in pixels.
    min_saturation, max_saturation : float
        Bounds applied to the Otsu threshold on saturation (see module docstring).
    dark_value : int
        Pixels whose channels are all below this (0-255) are not tissue (pen, borders).
    min_object_um2 : float
        Tissue pieces smaller than this area (µm²) are dropped (dust, debris).
    max_hole_um2 : float
        Holes smaller than this area (µm²) inside tissue are filled.

    Returns
    -------
    TissueMask
    """
    w0, h0 = slide.dimensions  # type: ignore[attr-defined]
    mpp = float(slide.mpp)  # type: ignore[attr-defined]
    scale = max(mask_mpp / mpp, max(w0, h0) / float(max_mask_px), 1.0)
    mw, mh = max(1, round(w0 / scale)), max(1, round(h0 / scale))
    rgb = slide.read_scaled(mw, mh)  # type: ignore[attr-defined]
    sat = ndi.median_filter(saturation(rgb), size=3)
    thr = float(np.clip(otsu_threshold(sat), min_saturation, max_saturation))
    dark = rgb.max(axis=-1) < dark_value
    mask = (sat > thr) & ~dark
    mask = ndi.binary_opening(mask, structure=np.ones((2, 2), bool))
    dx, dy = w0 / mw, h0 / mh
    px_area_um2 = dx * dy * mpp * mpp
    mask = ndi.binary_closing(mask, structure=np.ones((3, 3), bool), border_value=0) | mask
    # fill small holes: holes are background components not touching the border
    holes = ndi.binary_fill_holes(mask) & ~mask
    if holes.any():
        lab, n = ndi.label(holes)
        sizes = ndi.sum_labels(holes, lab, index=np.arange(1, n + 1))
        small = np.zeros(n + 1, bool)
        small[1:] = sizes * px_area_um2 < max_hole_um2
        mask = mask | small[lab]
    if mask.any():
        lab, n = ndi.label(mask)
        sizes = ndi.sum_labels(mask, lab, index=np.arange(1, n + 1))
        keep = np.zeros(n + 1, bool)
        keep[1:] = sizes * px_area_um2 >= min_object_um2
        mask = keep[lab]
    return TissueMask(mask=mask, downsample=(dx, dy), threshold=thr, mask_mpp=dx * mpp)
