"""napari plugin for MIRROR.

Reader (whole-slide images as lazy multiscale layers in µm), sample data (a demo patient) and the
MIRROR dock widget (per-tile maps, subtype, survival risk, the model's provenance). Submodules
are imported lazily so that napari's start-up stays fast; Qt is imported only when the widget
opens.
"""
__version__ = "0.1.0"

from importlib import import_module as _import_module
from typing import Any as _Any

_LAZY = {
    "MirrorWidget": "napari_mirror._widget",
    "napari_get_reader": "napari_mirror._reader",
    "load_demo_sample": "napari_mirror._sample_data",
    "slide_layer_data": "napari_mirror._layers",
    "heatmap_layer_data": "napari_mirror._layers",
    "top_tiles_layer_data": "napari_mirror._layers",
    "top_tiles": "napari_mirror._layers",
    "HeatmapDisplay": "napari_mirror._layers",
    "geojson_feature_collection": "napari_mirror._export",
    "write_geojson": "napari_mirror._export",
    "write_tile_csv": "napari_mirror._export",
    "write_report": "napari_mirror._export",
    "RunJob": "napari_mirror._run",
    "RunRequest": "napari_mirror._run",
    "run_prediction": "napari_mirror._run",
}

__all__ = ["__version__", *sorted(_LAZY)]


def __getattr__(name: str) -> _Any:
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'napari_mirror' has no attribute {name!r}")
    value = getattr(_import_module(mod), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
