"""Exports of a MIRROR result: QuPath GeoJSON, per-tile CSV, PNG snapshot, JSON report (no Qt).

All files are written atomically: a failed export never leaves half a file behind.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from mirror_model._io import atomic_path, atomic_write_text, jsonable

from ._geometry import percentile_ranks

__all__ = [
    "REPORT_FORMAT",
    "geojson_feature_collection",
    "report_dict",
    "tile_table",
    "write_geojson",
    "write_png",
    "write_report",
    "write_tile_csv",
]

REPORT_FORMAT = "napari-mirror-report/1"
PathLike = str | os.PathLike[str]


def _tiles(prediction: Any) -> tuple[np.ndarray, int, np.ndarray]:
    att = getattr(prediction, "attention", None)
    coords = getattr(prediction, "coords_level0", None)
    if att is None or coords is None or len(np.asarray(coords)) == 0:
        raise ValueError(
            "This result has no slide tiles (expression-only run): there is nothing to export per tile."
        )
    return (
        np.asarray(coords).astype(np.int64).reshape(-1, 2),
        int(prediction.tile_size_level0),
        np.asarray(att, dtype=np.float64).reshape(-1),
    )


def _stable_uuid(*parts: object) -> str:
    # Deterministic ids: exporting the same result twice gives identical files.
    return str(uuid.uuid5(uuid.NAMESPACE_URL, "napari-mirror:" + ":".join(map(str, parts))))


def geojson_feature_collection(
    prediction: Any, *, object_type: str = "tile", measurement: str = "MIRROR attention"
) -> dict[str, Any]:
    """QuPath-compatible GeoJSON: one square Polygon per tile, in level-0 pixels.

    Parameters
    ----------
    prediction : mirror_model.inference.Prediction
    object_type : {"tile", "detection", "annotation"}
        QuPath object type of each feature.
    measurement : str
        Name of the score measurement; ``"<measurement> percentile"`` holds its percentile rank.

    Returns
    -------
    dict
        A GeoJSON ``FeatureCollection``. Each polygon runs ``(x, y) → (x+s, y) → (x+s, y+s) →
        (x, y+s) → (x, y)`` in level-0 pixel coordinates (QuPath's image space), i.e. it covers
        pixels ``[x, x+s) × [y, y+s)``.
    """
    if object_type not in ("tile", "detection", "annotation"):
        raise ValueError(f"object_type must be tile, detection or annotation; got {object_type!r}")
    coords, size, scores = _tiles(prediction)
    pct = percentile_ranks(scores)
    sha = getattr(prediction, "bundle_sha256", "") or ""
    features = []
    for i, ((x, y), score, p) in enumerate(zip(coords.tolist(), scores.tolist(), pct.tolist(), strict=True)):
        ring = [[x, y], [x + size, y], [x + size, y + size], [x, y + size], [x, y]]
        features.append(
            {
                "type": "Feature",
                "id": _stable_uuid(sha, i, x, y),
                "geometry": {"type": "Polygon", "coordinates": [ring]},
                "properties": {
                    "objectType": object_type,
                    "name": f"tile {i}",
                    "isLocked": True,
                    "measurements": {
                        measurement: None if not math.isfinite(score) else score,
                        f"{measurement} percentile": None if not math.isfinite(p) else p,
                    },
                },
            }
        )
    return {"type": "FeatureCollection", "features": features}


def write_geojson(path: PathLike, prediction: Any, *, object_type: str = "tile") -> Path:
    """Write :func:`geojson_feature_collection` to ``path`` (import in QuPath by drag and drop)."""
    fc = geojson_feature_collection(prediction, object_type=object_type)
    atomic_write_text(path, json.dumps(fc))
    return Path(path)


def tile_table(prediction: Any) -> list[dict[str, Any]]:
    """One row per tile: index, level-0 box, µm centre, attention, percentile rank and rank."""
    coords, size, scores = _tiles(prediction)
    pct = percentile_ranks(scores)
    mpp = float(getattr(prediction, "slide_mpp", None) or float("nan"))
    order = np.lexsort((np.arange(scores.size), -np.nan_to_num(scores, nan=-np.inf)))
    rank = np.empty(scores.size, np.int64)
    rank[order] = np.arange(1, scores.size + 1)
    rows = []
    for i in range(scores.size):
        x, y = int(coords[i, 0]), int(coords[i, 1])
        rows.append(
            {
                "tile_index": i,
                "x_level0": x,
                "y_level0": y,
                "tile_size_level0": size,
                "centre_x_um": (x + size / 2.0) * mpp,
                "centre_y_um": (y + size / 2.0) * mpp,
                "attention": float(scores[i]),
                "attention_percentile": float(pct[i]),
                "rank": int(rank[i]),
            }
        )
    return rows


def write_tile_csv(path: PathLike, prediction: Any) -> Path:
    """Per-tile CSV (columns of :func:`tile_table`); level-0 pixels and µm (mpp of the slide)."""
    rows = tile_table(prediction)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0].keys()) if rows else ["tile_index"])
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())
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


def report_dict(prediction: Any, *, inputs: dict[str, Any], bundle: Any = None) -> dict[str, Any]:
    """Everything needed to reproduce and audit a result: bundle hash, inputs, outputs."""
    from . import __version__

    try:
        # Per-tile values live in the CSV/GeoJSON exports; the report lists the top tiles.
        out = prediction.to_dict(include_tiles=False)
    except TypeError:
        out = prediction.to_dict()
    except AttributeError:
        out = {k: v for k, v in vars(prediction).items() if not k.startswith("_")}
    bundle_info: dict[str, Any] = {"sha256": getattr(prediction, "bundle_sha256", None)}
    if bundle is not None:
        for attr in ("path", "name", "format_version", "metrics"):
            val = getattr(bundle, attr, None)
            if val is not None:
                bundle_info[attr] = val
    return jsonable(
        {
            "format": REPORT_FORMAT,
            "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "napari_mirror_version": __version__,
            "bundle": bundle_info,
            "inputs": inputs,
            "outputs": out,
        }
    )


def write_report(path: PathLike, prediction: Any, *, inputs: dict[str, Any], bundle: Any = None) -> Path:
    """Write :func:`report_dict` as indented JSON."""
    atomic_write_text(path, json.dumps(report_dict(prediction, inputs=inputs, bundle=bundle), indent=2))
    return Path(path)
