"""napari layer data for slides, heatmaps and top-attention tiles (pure logic, no Qt).

Each builder returns napari ``LayerData`` tuples ``(data, kwargs, layer_type)`` so that the
reader, the sample data and the widget share one definition, and tests need no viewer.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ._geometry import (
    TileLattice,
    percentile_limits,
    percentile_ranks,
    rasterize,
    smooth_nan,
    tile_centres_world_um,
    tile_lattice,
    tile_rectangles_world_um,
)

__all__ = [
    "HEATMAP_COLORMAPS",
    "METADATA_KEY",
    "HeatmapDisplay",
    "TopTile",
    "heatmap_layer_data",
    "slide_info",
    "slide_layer_data",
    "top_tiles",
    "top_tiles_layer_data",
]

LayerData = tuple[Any, dict[str, Any], str]

#: Key under ``layer.metadata`` where the plugin keeps what it knows about a layer.
METADATA_KEY = "mirror"
#: Colormaps offered for the heatmap (all napari built-ins, all map NaN to transparent).
HEATMAP_COLORMAPS = ("inferno", "magma", "viridis", "turbo", "plasma", "hot", "jet")
UNITS = ("µm", "µm")
AXIS_LABELS = ("y", "x")


def slide_info(slide: Any) -> dict[str, Any]:
    """Plain-JSON description of an open slide, kept in the layer's metadata."""
    info: dict[str, Any] = {
        "kind": "slide",
        "slide_path": str(Path(slide.path).resolve()),
        "mpp": float(slide.mpp),
        "dimensions_level0": [int(v) for v in slide.dimensions],
        "level_dimensions": [[int(v) for v in d] for d in slide.level_dimensions],
        "level_downsamples": [float(d) for d in slide.level_downsamples],
    }
    for attr in ("vendor", "backend", "mpp_source", "objective_power"):
        val = getattr(slide, attr, None)
        if val is not None:
            info[attr] = val if isinstance(val, (int, float, str)) else str(val)
    props = getattr(slide, "properties", None)
    if isinstance(props, dict) and props:
        # Keep the scanner's own key/value properties (strings) for the user to inspect.
        info["properties"] = {str(k): str(v) for k, v in list(props.items())[:500]}
    return info


def slide_layer_data(
    path: str | os.PathLike[str],
    *,
    mpp: float | None = None,
    name: str | None = None,
    extra_metadata: dict[str, Any] | None = None,
    chunk_px: int | None = None,
) -> LayerData:
    """Lazy multiscale RGB image layer of a slide, scaled in µm.

    Parameters
    ----------
    path : path-like
        Any slide :func:`mirror_model.slide.open_slide` reads.
    mpp : float, optional
        µm per level-0 pixel, overriding the file's metadata.
    name : str, optional
        Layer name (default: the file name without its extension).
    extra_metadata : dict, optional
        Merged into ``metadata["mirror"]`` (the sample data records its expression table here).
    chunk_px : int, optional
        Dask chunk side per level.

    Raises
    ------
    mirror_model.errors.SlideError
        The slide cannot be opened or has no resolution.
    """
    from mirror_model.ids import slide_stem
    from mirror_model.slide import open_slide

    from ._pyramid import DEFAULT_CHUNK_PX, slide_pyramid

    slide = open_slide(path, mpp=mpp)
    pyr = slide_pyramid(slide, chunk_px=chunk_px or DEFAULT_CHUNK_PX)
    info = slide_info(slide)
    info["display_downsamples"] = pyr.downsamples
    info.update(extra_metadata or {})
    s = float(slide.mpp)
    stem = slide_stem(path)
    kwargs: dict[str, Any] = {
        "name": name or stem,
        "rgb": True,
        "multiscale": pyr.multiscale,
        "scale": (s, s),
        "translate": (0.0, 0.0),
        "units": UNITS,
        "axis_labels": AXIS_LABELS,
        "contrast_limits": (0, 255),
        # The dask graph keeps the slide handle open as long as the layer lives; the counter
        # lets anyone check what was read (tests use it to prove laziness).
        "metadata": {METADATA_KEY: info, "_mirror_chunk_counter": pyr.counter},
    }
    data = pyr.levels if pyr.multiscale else pyr.levels[0]
    return (data, kwargs, "image")


@dataclass(frozen=True)
class HeatmapDisplay:
    """How the attention heatmap is drawn.

    Attributes
    ----------
    colormap : str
        Any napari colormap name; NaN (no tissue) is transparent.
    opacity : float
        0–1.
    scaling : {"percentile", "minmax"}
        Contrast limits from the 1st–99th percentiles (robust to a few hot tiles) or min/max.
    low_percentile, high_percentile : float
        Percentiles used by ``"percentile"``.
    smoothing_sigma_tiles : float
        Gaussian smoothing in tiles (0 = none); NaN cells stay transparent.
    """

    colormap: str = "inferno"
    opacity: float = 0.55
    scaling: str = "percentile"
    low_percentile: float = 1.0
    high_percentile: float = 99.0
    smoothing_sigma_tiles: float = 0.0

    def contrast_limits(self, values: np.ndarray) -> tuple[float, float]:
        if self.scaling == "minmax":
            return percentile_limits(values, 0.0, 100.0)
        if self.scaling != "percentile":
            raise ValueError(f"scaling must be 'percentile' or 'minmax'; got {self.scaling!r}")
        return percentile_limits(values, self.low_percentile, self.high_percentile)


def _tile_scores(prediction: Any) -> np.ndarray:
    att = getattr(prediction, "attention", None)
    if att is None:
        raise ValueError("this prediction has no slide attention (expression-only run)")
    return np.asarray(att, dtype=np.float64).reshape(-1)


def heatmap_grid(prediction: Any, display: HeatmapDisplay | None = None) -> tuple[np.ndarray, TileLattice]:
    """The heatmap array ``[rows, cols]`` (NaN outside tissue) and its lattice."""
    display = display or HeatmapDisplay()
    lattice = tile_lattice(prediction.coords_level0, int(prediction.tile_size_level0))
    grid = rasterize(_tile_scores(prediction), lattice)
    if display.smoothing_sigma_tiles > 0:
        grid = smooth_nan(grid, display.smoothing_sigma_tiles)
    return grid, lattice


def heatmap_layer_data(
    prediction: Any,
    *,
    mpp: float | None = None,
    display: HeatmapDisplay | None = None,
    name: str = "MIRROR attention",
    source: dict[str, Any] | None = None,
) -> LayerData:
    """Attention heatmap on the tile grid, aligned exactly with the slide layer.

    Cell ``(r, c)`` covers the level-0 pixels of the tile at
    ``origin + (c, r)·stride``; see :meth:`TileLattice.translate_um` for the half-pixel shift
    that napari's pixel-centre convention needs.

    Parameters
    ----------
    prediction : mirror_model.inference.Prediction
        Needs ``coords_level0``, ``tile_size_level0`` and ``attention``.
    mpp : float, optional
        µm per level-0 pixel (default: ``prediction.slide_mpp``).
    display : HeatmapDisplay, optional
    name : str
    source : dict, optional
        Stored in ``metadata["mirror"]`` (e.g. the slide path).
    """
    display = display or HeatmapDisplay()
    mpp = float(mpp if mpp is not None else prediction.slide_mpp)
    grid, lattice = heatmap_grid(prediction, display)
    meta = {
        "kind": "heatmap",
        "tile_size_level0": int(lattice.tile_size_level0),
        "stride_level0": int(lattice.stride_level0),
        "origin_level0": [int(v) for v in lattice.origin_level0],
        "lattice_exact": bool(lattice.exact),
        "n_tiles": int(len(lattice.rows)),
        "mpp": mpp,
        "scaling": display.scaling,
        "smoothing_sigma_tiles": float(display.smoothing_sigma_tiles),
        "bundle_sha256": getattr(prediction, "bundle_sha256", None),
    }
    meta.update(source or {})
    kwargs = {
        "name": name,
        "scale": lattice.scale_um(mpp),
        "translate": lattice.translate_um(mpp),
        "units": UNITS,
        "axis_labels": AXIS_LABELS,
        "colormap": display.colormap,
        "contrast_limits": display.contrast_limits(grid),
        "opacity": float(display.opacity),
        "blending": "translucent",
        # Nearest keeps one flat square per tile, matching the exported polygons.
        "interpolation2d": "nearest",
        "metadata": {METADATA_KEY: meta},
    }
    return (grid, kwargs, "image")


@dataclass(frozen=True)
class TopTile:
    """One of the most attended tiles.

    Attributes
    ----------
    rank : int
        1 = highest attention.
    index : int
        Row in the prediction's tile arrays.
    x_level0, y_level0 : int
        Top-left corner in level-0 pixels.
    tile_size_level0 : int
    score : float
        Attention weight.
    percentile : float
        Percentile rank among the slide's tiles (0–100).
    centre_world_um : tuple[float, float]
        ``(y, x)`` world position of the tile centre (µm), for centring the view.
    """

    rank: int
    index: int
    x_level0: int
    y_level0: int
    tile_size_level0: int
    score: float
    percentile: float
    centre_world_um: tuple[float, float]

    def label(self) -> str:
        return (
            f"#{self.rank}  x={self.x_level0}, y={self.y_level0}  "
            f"attention {self.score:.4g} (pct {self.percentile:.1f})"
        )


def top_tiles(prediction: Any, k: int = 10, *, mpp: float | None = None) -> list[TopTile]:
    """The ``k`` tiles with the highest attention, best first (ties: lower index first)."""
    scores = _tile_scores(prediction)
    if k <= 0 or scores.size == 0:
        return []
    mpp = float(mpp if mpp is not None else prediction.slide_mpp)
    coords = np.asarray(prediction.coords_level0).astype(np.int64)
    size = int(prediction.tile_size_level0)
    order = np.lexsort((np.arange(scores.size), -np.nan_to_num(scores, nan=-np.inf)))[:k]
    pct = percentile_ranks(scores)
    centres = tile_centres_world_um(coords[order], size, mpp)
    return [
        TopTile(
            rank=i + 1,
            index=int(j),
            x_level0=int(coords[j, 0]),
            y_level0=int(coords[j, 1]),
            tile_size_level0=size,
            score=float(scores[j]),
            percentile=float(pct[j]),
            centre_world_um=(float(centres[i, 0]), float(centres[i, 1])),
        )
        for i, j in enumerate(order)
    ]


def top_tiles_layer_data(
    prediction: Any,
    k: int = 10,
    *,
    mpp: float | None = None,
    name: str = "MIRROR top tiles",
    source: dict[str, Any] | None = None,
) -> LayerData:
    """Outlines of the ``k`` most attended tiles, numbered by rank, as a Shapes layer (µm)."""
    mpp = float(mpp if mpp is not None else prediction.slide_mpp)
    tops = top_tiles(prediction, k, mpp=mpp)
    coords = np.array([[t.x_level0, t.y_level0] for t in tops], dtype=np.int64).reshape(-1, 2)
    size = int(prediction.tile_size_level0)
    rects = list(tile_rectangles_world_um(coords, size, mpp))
    features = {
        "rank": np.array([t.rank for t in tops], dtype=np.int64),
        "attention": np.array([t.score for t in tops], dtype=np.float64),
        "x_level0": coords[:, 0],
        "y_level0": coords[:, 1],
    }
    kwargs = {
        "name": name,
        "shape_type": "rectangle",
        "edge_color": "cyan",
        "face_color": "transparent",
        "edge_width": max(2.0, 0.04 * size) * mpp,
        "features": features,
        "text": {"string": "{rank}", "color": "cyan", "size": 12, "anchor": "upper_left"},
        "units": UNITS,
        "axis_labels": AXIS_LABELS,
        "metadata": {METADATA_KEY: {"kind": "top_tiles", "k": int(k), "mpp": mpp, **(source or {})}},
    }
    return (rects, kwargs, "shapes")
