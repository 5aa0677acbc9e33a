"""napari layer data for slides, per-tile map heatmaps and top tiles (pure logic, no Qt).

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
    rasterize,
    smooth_nan,
    tile_centres_world_um,
    tile_lattice,
    tile_rectangles_world_um,
)
from ._panel import format_percentile

__all__ = [
    "DIVERGING_COLORMAPS",
    "HEATMAP_COLORMAPS",
    "METADATA_KEY",
    "SCALINGS",
    "SEQUENTIAL_COLORMAPS",
    "HeatmapDisplay",
    "TopTile",
    "colorbar_label",
    "heatmap_grid",
    "heatmap_layer_data",
    "make_layer",
    "selected_map",
    "slide_info",
    "slide_layer_data",
    "top_tiles",
    "top_tiles_layer_data",
]

LayerData = tuple[Any, dict[str, Any], str]

#: Key under ``layer.metadata`` where the plugin keeps what it knows about a layer.
METADATA_KEY = "mirror"
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


#: Colormaps offered for unsigned maps (napari built-ins; NaN cells stay transparent).
SEQUENTIAL_COLORMAPS = ("inferno", "magma", "viridis", "turbo", "plasma")
#: Colormaps offered for signed maps: diverging, white at 0 (matplotlib names napari knows).
DIVERGING_COLORMAPS = ("RdBu_r", "coolwarm", "PiYG")
HEATMAP_COLORMAPS = SEQUENTIAL_COLORMAPS + DIVERGING_COLORMAPS
#: Contrast choices: (key, words for the panel and the colour-bar label).
SCALINGS = {
    "percentile": "1st–99th percentile of this slide's tiles",
    "minmax": "full range of this slide's tiles",
}


@dataclass(frozen=True)
class HeatmapDisplay:
    """How a per-tile map is drawn.

    Attributes
    ----------
    colormap : str or None
        Any napari colormap name; None = ``"inferno"`` for unsigned maps and ``"RdBu_r"``
        (diverging, white at 0) for signed ones. NaN (no tissue) is transparent.
    opacity : float
        0–1.
    scaling : {"percentile", "minmax"}
        Colour range. Unsigned maps: the 1st–99th percentiles (a few hot tiles do not squash
        the rest) or min–max. Signed maps: always centred on 0, ``±`` the 99th percentile of
        ``|value|`` or ``±`` its maximum.
    smoothing_sigma_tiles : float
        Gaussian smoothing in tiles (0 = none); NaN cells stay transparent.
    """

    colormap: str | None = None
    opacity: float = 0.55
    scaling: str = "percentile"
    smoothing_sigma_tiles: float = 0.0

    def __post_init__(self) -> None:
        if self.scaling not in SCALINGS:
            raise ValueError(f"scaling must be one of {', '.join(SCALINGS)}; got {self.scaling!r}")

    def colormap_for(self, tile_map: Any) -> str:
        if self.colormap:
            return self.colormap
        return DIVERGING_COLORMAPS[0] if tile_map.signed else SEQUENTIAL_COLORMAPS[0]

    def contrast_limits(self, tile_map: Any) -> tuple[float, float]:
        """Colour range of ``tile_map`` (its own :meth:`~mirror_model.TileMap.display_range`
        for ``"percentile"``); signed maps are symmetric about 0."""
        if self.scaling == "percentile":
            lo, hi = tile_map.display_range(99.0)
        else:
            lo, hi = tile_map.display_range(100.0)
        if not hi > lo:  # napari refuses empty ranges
            eps = max(abs(lo) * 1e-3, 1e-12)
            lo, hi = lo - eps, hi + eps
        return float(lo), float(hi)


def selected_map(prediction: Any, map_name: str | None = None) -> Any:
    """The :class:`~mirror_model.TileMap` ``map_name`` of the prediction (default: its first).

    Raises
    ------
    ValueError
        The prediction has no per-tile maps (no slide input) or no map of that name.
    """
    maps = getattr(prediction, "maps", None) or {}
    if not maps:
        raise ValueError("this prediction has no per-tile maps (expression-only run)")
    if map_name is None:
        return next(iter(maps.values()))
    if map_name not in maps:
        raise ValueError(f"this prediction has no map {map_name!r}; it has {', '.join(maps)}")
    return maps[map_name]


def colorbar_label(
    tile_map: Any, display: HeatmapDisplay, limits: tuple[float, float], note: str | None = None
) -> str:
    """What the colour bar shows, in words: the map, its units and the colour range, under
    ``note`` (e.g. that the model is a synthetic-data demo: every screenshot then says so)."""
    lo, hi = limits
    if tile_map.signed:
        spread = "99th percentile" if display.scaling == "percentile" else "largest value"
        scale = f"white = 0; colours to ± the {spread} of |value| on this slide, ±{hi:.3g}"
    else:
        scale = f"colours: {SCALINGS[display.scaling]}, {lo:.3g} to {hi:.3g}"
    text = f"{tile_map.label}\n{tile_map.units}\n{scale}"
    # the trailing line keeps napari's stacked colour bar clear of the last line of text
    return (f"{note}\n{text}" if note else text) + "\n"


def heatmap_grid(
    prediction: Any, map_name: str | None = None, display: HeatmapDisplay | None = None
) -> tuple[np.ndarray, TileLattice]:
    """The map as an array ``[rows, cols]`` on the tile lattice (NaN outside tissue)."""
    display = display or HeatmapDisplay()
    tile_map = selected_map(prediction, map_name)
    lattice = tile_lattice(prediction.coords_level0, int(prediction.tile_size_level0))
    grid = rasterize(tile_map.values, lattice)
    if display.smoothing_sigma_tiles > 0:
        grid = smooth_nan(grid, display.smoothing_sigma_tiles)
    return grid, lattice


def heatmap_layer_data(
    prediction: Any,
    *,
    map_name: str | None = None,
    mpp: float | None = None,
    display: HeatmapDisplay | None = None,
    name: str = "MIRROR heatmap",
    source: dict[str, Any] | None = None,
    note: str | None = None,
) -> LayerData:
    """A per-tile map on the tile grid, aligned exactly with the slide layer.

    Cell ``(r, c)`` covers the level-0 pixels of the tile at ``origin + (c, r)·stride``; see
    :meth:`TileLattice.translate_um` for the half-pixel shift that napari's pixel-centre
    convention needs.

    Parameters
    ----------
    prediction : mirror_model.inference.Prediction
        Needs ``coords_level0``, ``tile_size_level0`` and ``maps``.
    map_name : str, optional
        Key of ``prediction.maps`` (default: the first map).
    mpp : float, optional
        µm per level-0 pixel (default: ``prediction.slide_mpp``).
    display : HeatmapDisplay, optional
    name : str
    source : dict, optional
        Stored in ``metadata["mirror"]`` (e.g. the slide path).
    note : str, optional
        First line of the colour-bar label (:func:`colorbar_label`).
    """
    display = display or HeatmapDisplay()
    tile_map = selected_map(prediction, map_name)
    mpp = float(mpp if mpp is not None else prediction.slide_mpp)
    grid, lattice = heatmap_grid(prediction, tile_map.name, display)
    limits = display.contrast_limits(tile_map)
    meta = {
        "kind": "heatmap",
        "map_name": tile_map.name,
        "map_label": tile_map.label,
        "map_description": tile_map.description,
        "map_units": tile_map.units,
        "signed": bool(tile_map.signed),
        "colorbar_label": colorbar_label(tile_map, display, limits, note),
        "legend_note": note,
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
        "colormap": display.colormap_for(tile_map),
        "contrast_limits": limits,
        "opacity": float(display.opacity),
        "blending": "translucent",
        # Nearest keeps one flat square per tile, matching the exported polygons.
        "interpolation2d": "nearest",
        "metadata": {METADATA_KEY: meta},
    }
    return (grid, kwargs, "image")


@dataclass(frozen=True)
class TopTile:
    """One of the tiles with the highest values of the selected map.

    Attributes
    ----------
    rank : int
        1 = highest value of the map.
    index : int
        Row in the prediction's tile arrays.
    x_level0, y_level0 : int
        Top-left corner in level-0 pixels.
    tile_size_level0 : int
    value : float
        The map's value on this tile (in the map's units).
    percentile : float
        Percentile rank among the slide's tiles (0–100, 100 = highest).
    centre_world_um : tuple[float, float]
        ``(y, x)`` world position (µm) of the tile centre, for centring the view.
    """

    rank: int
    index: int
    x_level0: int
    y_level0: int
    tile_size_level0: int
    value: float
    percentile: float
    centre_world_um: tuple[float, float]

    def label(self) -> str:
        return (
            f"#{self.rank}   {format_percentile(self.percentile)} percentile   "
            f"(x {self.x_level0}, y {self.y_level0})"
        )


def top_tiles(
    prediction: Any, k: int = 10, *, map_name: str | None = None, mpp: float | None = None
) -> list[TopTile]:
    """The ``k`` tiles with the highest values of the map, best first (ties: lower index first;
    ``Prediction.top_tiles`` decides)."""
    if k <= 0 or not getattr(prediction, "maps", None):
        return []
    from mirror_model.maps import rank_tiles

    tile_map = selected_map(prediction, map_name)
    mpp = float(mpp if mpp is not None else prediction.slide_mpp)
    order = np.asarray(prediction.top_tiles(int(k), map_name=tile_map.name), dtype=np.int64)
    coords = np.asarray(prediction.coords_level0).astype(np.int64)
    size = int(prediction.tile_size_level0)
    _, pct = rank_tiles(tile_map.values)
    centres = tile_centres_world_um(coords[order], size, mpp)
    return [
        TopTile(
            rank=i + 1,
            index=int(j),
            x_level0=int(coords[j, 0]),
            y_level0=int(coords[j, 1]),
            tile_size_level0=size,
            value=float(tile_map.values[j]),
            percentile=float(pct[j]),
            centre_world_um=(float(centres[i, 0]), float(centres[i, 1])),
        )
        for i, j in enumerate(order)
    ]


def top_tiles_layer_data(
    prediction: Any,
    k: int = 10,
    *,
    map_name: str | None = None,
    mpp: float | None = None,
    name: str = "MIRROR top tiles",
    source: dict[str, Any] | None = None,
    tops: list[TopTile] | None = None,
) -> LayerData:
    """Outlines of the ``k`` highest tiles of the map, numbered by rank, as a Shapes layer (µm)."""
    mpp = float(mpp if mpp is not None else prediction.slide_mpp)
    if tops is None:
        tops = top_tiles(prediction, k, map_name=map_name, mpp=mpp)
    coords = np.array([[t.x_level0, t.y_level0] for t in tops], dtype=np.int64).reshape(-1, 2)
    size = int(prediction.tile_size_level0)
    rects = list(tile_rectangles_world_um(coords, size, mpp))
    features = {
        "rank": np.array([t.rank for t in tops], dtype=np.int64),
        "value": np.array([t.value for t in tops], dtype=np.float64),
        "percentile": np.array([t.percentile for t in tops], dtype=np.float64),
        "x_level0": coords[:, 0],
        "y_level0": coords[:, 1],
    }
    tile_map = selected_map(prediction, map_name)
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
        "metadata": {
            METADATA_KEY: {
                "kind": "top_tiles",
                "k": int(k),
                "map_name": tile_map.name,
                "mpp": mpp,
                **(source or {}),
            }
        },
    }
    return (rects, kwargs, "shapes")


def make_layer(layer_data: LayerData) -> Any:
    """A napari layer object from ``LayerData`` (no viewer or Qt needed: callable off the GUI
    thread, so that adding it to the viewer later costs little)."""
    from napari.layers import Layer

    data, kwargs, layer_type = layer_data
    return Layer.create(data, kwargs, layer_type)
