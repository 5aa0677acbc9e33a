"""Exports of a MIRROR result: QuPath GeoJSON, per-tile CSV, PNG snapshot, JSON report (no Qt).

The per-tile values come from the prediction itself (``Prediction.tiles_table`` /
``to_geojson``, the same files ``mirror-train predict`` writes); the plugin adds what the user
saw: the model card (name, training data, date, intended use, the demo warning) and the map
that was displayed. All files are written atomically: a failed export never leaves half a file.
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from mirror_model import atomic_path, atomic_write_text, jsonable

__all__ = [
    "REPORT_FORMAT",
    "csv_header",
    "geojson_feature_collection",
    "report_dict",
    "write_geojson",
    "write_png",
    "write_report",
    "write_tile_csv",
]

REPORT_FORMAT = "napari-mirror-report/2"
PathLike = str | os.PathLike[str]


def _require_tiles(prediction: Any) -> None:
    if not getattr(prediction, "maps", None):
        raise ValueError(
            "This result has no slide tiles (expression-only run): there is nothing to export per tile."
        )


def geojson_feature_collection(
    prediction: Any,
    *,
    object_type: str = "tile",
    model: dict[str, Any] | None = None,
    selected_map: str | None = None,
) -> dict[str, Any]:
    """``Prediction.to_geojson`` with the model card, the warnings and the displayed map.

    The collection's ``properties`` (a GeoJSON foreign member QuPath ignores) hold ``model``
    (the prediction's provenance updated with the card), ``warnings`` and ``selected_map``;
    every feature's ``properties`` get ``model`` (the model's name) and, for a synthetic
    model, ``not_for_patient_material: true`` (QuPath shows feature properties).
    """
    _require_tiles(prediction)
    fc = prediction.to_geojson(object_type=object_type)
    props = dict(fc.get("properties") or {})
    props["model"] = {**dict(props.get("model") or {}), **dict(model or {})}
    props["warnings"] = _warnings(prediction, model)
    props["selected_map"] = selected_map
    fc["properties"] = jsonable(props)
    if model:
        for f in fc["features"]:
            f["properties"]["model"] = model.get("name")
            if model.get("synthetic"):
                f["properties"]["not_for_patient_material"] = True
    return fc


def write_geojson(
    path: PathLike,
    prediction: Any,
    *,
    object_type: str = "tile",
    model: dict[str, Any] | None = None,
    selected_map: str | None = None,
) -> Path:
    """Write :func:`geojson_feature_collection` (import in QuPath by drag and drop)."""
    fc = geojson_feature_collection(prediction, object_type=object_type, model=model, selected_map=selected_map)
    atomic_write_text(path, json.dumps(fc))
    return Path(path)


def csv_header(model: dict[str, Any] | None, selected_map: str | None, prediction: Any = None) -> list[str]:
    """``#`` comment lines on top of the per-tile CSV (read it with ``pandas.read_csv(...,
    comment="#")``): the model, its training data, date and intended use, the demo warning and
    the displayed map."""
    lines = ["# MIRROR per-tile maps (napari-mirror)"]
    if model:
        lines.append(f"# model: {model.get('name')} (created {model.get('created')})")
        lines.append(f"# trained on: {model.get('training_data')}")
        lines.append(f"# intended use: {model.get('intended_use')}")
    for w in _warnings(prediction, model):
        lines.append(f"# WARNING: {w}")
    if selected_map:
        lines.append(f"# displayed map: {selected_map}")
    return [line.replace("\n", " ") for line in lines]


def write_tile_csv(
    path: PathLike,
    prediction: Any,
    *,
    model: dict[str, Any] | None = None,
    selected_map: str | None = None,
) -> Path:
    """Per-tile CSV (``Prediction.write_tiles_csv``: coordinates, and value/rank/percentile of
    every map) under :func:`csv_header`."""
    _require_tiles(prediction)
    header = "\n".join(csv_header(model, selected_map, prediction)) + "\n"
    with atomic_path(path) as tmp:
        prediction.write_tiles_csv(tmp)
        body = tmp.read_text(encoding="utf-8")
        tmp.write_text(header + body, encoding="utf-8")
    return Path(path)


def write_png(path: PathLike, image: np.ndarray) -> Path:
    """Write an ``[H, W, 3|4]`` uint8 screenshot as PNG."""
    img = np.asarray(image)
    if img.ndim != 3 or img.shape[2] not in (3, 4):
        raise ValueError(f"expected an [H, W, 3|4] image; got shape {img.shape}")
    import matplotlib.image as mpimg

    with atomic_path(path) as tmp:
        mpimg.imsave(tmp, np.ascontiguousarray(img.astype(np.uint8)), format="png")
    return Path(path)


def _warnings(prediction: Any, model: dict[str, Any] | None) -> list[str]:
    """The model's warning first, then the prediction's own (each once)."""
    out = [str(model["warning"])] if model and model.get("warning") else []
    for w in getattr(prediction, "warnings", None) or []:
        if str(w) not in out:
            out.append(str(w))
    return out


def report_dict(
    prediction: Any,
    *,
    inputs: dict[str, Any],
    bundle: Any = None,
    model: dict[str, Any] | None = None,
    selected_map: str | None = None,
    top_k: int = 10,
) -> dict[str, Any]:
    """Everything needed to reproduce and audit a result: model card, bundle hash, inputs,
    outputs (``Prediction.to_dict``) and every warning, the demo-model one first."""
    from . import __version__

    out = prediction.to_dict(include_tiles=False, top_k=top_k)
    bundle_info: dict[str, Any] = {"sha256": getattr(prediction, "bundle_sha256", None)}
    if bundle is not None:
        for attr in ("name", "format_version", "created", "metrics"):
            val = getattr(bundle, attr, None)
            if val is not None:
                bundle_info[attr] = val
    return jsonable(
        {
            "format": REPORT_FORMAT,
            "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "napari_mirror_version": __version__,
            "model": model,
            "warnings": _warnings(prediction, model),
            "selected_map": selected_map,
            "bundle": bundle_info,
            "inputs": inputs,
            "outputs": out,
        }
    )


def write_report(path: PathLike, prediction: Any, **kwargs: Any) -> Path:
    """Write :func:`report_dict` (same keyword arguments) as indented JSON."""
    atomic_write_text(path, json.dumps(report_dict(prediction, **kwargs), indent=2))
    return Path(path)
