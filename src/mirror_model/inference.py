"""THE inference API: one slide and/or one expression profile through a model bundle.

Used by ``mirror-train predict`` and by the napari plugin alike::

    from mirror_model.bundle import load_bundle, default_bundle_path
    from mirror_model.inference import predict

    bundle = load_bundle(default_bundle_path())
    pred = predict(bundle, slide_path="slide.svs", expression_path="expr.csv")
    pred.subtype_probabilities, pred.risk_score, pred.risk_group, pred.attention

What happens
------------
Slide (``slide_path``): the slide is tiled with the bundle's tiling (``target_mpp``, ``tile_px``,
tissue threshold), every tile is encoded in memory with the bundle's patch encoder, and the
slide encoder gives the slide embedding and one attention weight per tile (TransMIL: the CLS
attention row of the layer named by the model's ``heatmap_layer``, by default the first, whose
keys are the tiles themselves; averaged over heads; sums to 1 over the tiles). Precomputed features
(``features_path``, a ``.h5`` from ``mirror-train extract``/CLAM/TRIDENT) skip the tiling and
encoding; they must come from the bundle's patch encoder (checked).

Expression (``expression_path`` or ``expression_values``): one row is chosen (``sample_id``;
else the only row; else the row whose sample ID matches the slide's file name, see
:func:`match_sample`), the bundle's genes are taken in the bundle's order (a table lacking any of
them is refused, listing them), normalised with the bundle's training statistics, and the RNA
encoder gives the RNA embedding.

Heads: the input kind is ``"both"`` (slide and RNA embeddings concatenated) when both are
given, else ``"slide"`` or ``"rna"``; the bundle's subtype probe gives the class
probabilities and its Cox head the risk score (**higher = worse prognosis**; the Cox linear
predictor). The risk percentile (0–100) is the share of the bundle's reference cohort (held-out
patients of the exported fold) with a lower risk (ties count half); the risk group is
``"high"`` when the risk exceeds the cut-off chosen on the training patients (their median
risk), ``"low"`` otherwise.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ._kinds import INPUT_KIND_WORDS, input_kind
from ._progress import ProgressFn, StopFn, check_cancel, report
from .errors import ConfigError, ExpressionError, FeatureFileError, MirrorError
from .ids import match_sample, slide_stem
from .maps import (
    ATTENTION,
    DEFAULT_MAP_METHOD,
    MAP_METHODS,
    TileMap,
    attention_map,
    rank_tiles,
)

__all__ = [
    "NULL_SURVIVAL_HEAD_WARNING",
    "Prediction",
    "TileMap",
    "match_sample",
    "predict",
    "slide_stem",
]


#: Warning when the bundle's survival head is the null model (no coefficient survived inner CV).
NULL_SURVIVAL_HEAD_WARNING = (
    "the model's survival head for {kind} input is the null model (its inner cross-validation "
    "kept no feature): every patient gets the same risk score, the risk group and percentile "
    "say nothing about this patient, and the risk map is flat."
)


# --------------------------------------------------------------------------------------------
# result
# --------------------------------------------------------------------------------------------
@dataclass
class Prediction:
    """What the model says about one patient.

    Attributes
    ----------
    modalities : tuple of str
        Inputs used, in order: ``("slide",)``, ``("rna",)`` or ``("slide", "rna")``.
    input_kind : str
        Head input kind used: ``"slide"``, ``"rna"`` or ``"both"``.
    coords_level0 : np.ndarray or None
        ``[N, 2]`` int64 (x, y) top-left corner of every tile, level-0 pixels (None: no slide).
    tile_size_level0 : int or None
        Side of a tile in level-0 pixels.
    attention : np.ndarray or None
        ``[N]`` float64 attention per tile (non-negative, sums to 1), None without a slide.
    attention_source : str or None
        What ``attention`` is, in words (e.g. the CLS row of TransMIL's first layer).
    maps : dict[str, TileMap]
        Per-tile maps by name, in display order (empty without a slide): ``"attention"``
        (``maps["attention"].values == attention``), see :mod:`mirror_model.maps`.
    subtype_probabilities : dict[str, float] or None
        Class → probability (sums to 1), in the bundle's class order; None without a head.
    predicted_subtype : str or None
        The most probable class.
    risk_score : float or None
        Cox linear predictor: **higher = worse prognosis** (only comparable within one bundle
        and input kind).
    risk_percentile : float or None
        0–100: share of the bundle's reference cohort with a lower risk (ties count half).
    risk_group : str or None
        ``"high"`` if ``risk_score`` > ``risk_cutoff`` else ``"low"``.
    risk_cutoff : float or None
        The cut-off (median risk of the bundle's training patients).
    reference_km : dict
        ``{group: {"time": [...], "survival": [...], ...}}`` Kaplan–Meier curves of the reference
        cohort's risk groups for this input kind (time in the cohort's unit, e.g. months).
    slide_path, features_path, expression_path : str or None
        Inputs as given.
    sample_id : str or None
        Expression row used.
    sample_match : str or None
        How the row was chosen (``"given"``, ``"only row"``, ``"matched slide name"``).
    slide_mpp : float or None
        Level-0 µm per pixel of the slide (or as recorded in the feature file).
    slide_dimensions : tuple[int, int] or None
        Level-0 (width, height) in pixels.
    target_mpp, tile_px : float, int or None
        Tiling of the slide (µm/px of the tiles, tile side in pixels at that resolution).
    patch_encoder : str or None
        Patch encoder used.
    slide_embedding, rna_embedding : np.ndarray or None
        ``[D]`` float32 embeddings (before the alignment heads).
    bundle_sha256, bundle_name : str
        Identify the exact model.
    provenance : dict
        The model's name, training data, date and intended use
        (:class:`~mirror_model.bundle.ModelProvenance` as a dict); it goes into
        :meth:`to_dict` and :meth:`to_geojson`.
    device, precision : str
        Where and how the model ran.
    timings_s : dict[str, float]
        Seconds per stage (``open_slide``, ``tiling``, ``patch_features`` or ``read_features``,
        ``slide_encoder``, ``expression``, ``rna_encoder``, ``heads``, ``total``).
    warnings : list[str]
        Notes worth showing to the user (e.g. a fallback to single-modality heads).
    """

    modalities: tuple[str, ...]
    input_kind: str
    coords_level0: np.ndarray | None = None
    tile_size_level0: int | None = None
    attention: np.ndarray | None = None
    attention_source: str | None = None
    maps: dict[str, TileMap] = field(default_factory=dict)
    subtype_probabilities: dict[str, float] | None = None
    predicted_subtype: str | None = None
    risk_score: float | None = None
    risk_percentile: float | None = None
    risk_group: str | None = None
    risk_cutoff: float | None = None
    reference_km: dict[str, Any] = field(default_factory=dict)
    slide_path: str | None = None
    features_path: str | None = None
    expression_path: str | None = None
    sample_id: str | None = None
    sample_match: str | None = None
    slide_mpp: float | None = None
    slide_dimensions: tuple[int, int] | None = None
    target_mpp: float | None = None
    tile_px: int | None = None
    patch_encoder: str | None = None
    slide_embedding: np.ndarray | None = None
    rna_embedding: np.ndarray | None = None
    bundle_sha256: str = ""
    bundle_name: str = ""
    provenance: dict[str, Any] = field(default_factory=dict)
    device: str = "cpu"
    precision: str = "fp32"
    timings_s: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    @property
    def n_tiles(self) -> int:
        return 0 if self.coords_level0 is None else int(self.coords_level0.shape[0])

    def map_values(self, map_name: str = ATTENTION) -> np.ndarray:
        """``[N]`` values of the map ``map_name`` (a key of :attr:`maps`)."""
        if not self.maps:
            raise ConfigError("this prediction has no slide input, so it has no per-tile maps.")
        if map_name not in self.maps:
            raise ConfigError(
                f"this prediction has no map {map_name!r}; it has: {', '.join(self.maps)}."
            )
        return self.maps[map_name].values

    def top_tiles(self, k: int = 10, map_name: str = ATTENTION) -> np.ndarray:
        """Indices of the ``k`` tiles with the highest values of map ``map_name``, highest
        first (ties: lower tile index first); empty without a slide."""
        if not self.maps:
            return np.zeros(0, dtype=np.int64)
        rank, _ = rank_tiles(self.map_values(map_name))
        return np.argsort(rank, kind="stable")[: max(0, int(k))].astype(np.int64)

    def tiles_table(self) -> dict[str, np.ndarray]:
        """THE per-tile table (the CSV, the GeoJSON and the plugin's exports use it).

        Columns, in order: ``tile_index``; ``x_level0``, ``y_level0`` (top-left corner) and
        ``tile_size_level0`` in level-0 pixels; ``centre_x_um``, ``centre_y_um`` (tile centre
        in µm from the slide's top-left corner, NaN when the resolution is unknown); then for
        every map of :attr:`maps`, in order, ``<name>`` (its value), ``<name>_rank`` (1 =
        highest, ties by tile index) and ``<name>_percentile`` (0–100, 100 = highest, ties
        share their mean rank); see :func:`mirror_model.maps.rank_tiles`.
        """
        if self.coords_level0 is None or not self.maps:
            raise ConfigError("this prediction has no slide input, so it has no tiles.")
        n = self.n_tiles
        size = int(self.tile_size_level0 or 0)
        mpp = float(self.slide_mpp) if self.slide_mpp else math.nan
        xy = self.coords_level0.astype(np.int64)
        cols: dict[str, np.ndarray] = {
            "tile_index": np.arange(n, dtype=np.int64),
            "x_level0": xy[:, 0],
            "y_level0": xy[:, 1],
            "tile_size_level0": np.full(n, size, dtype=np.int64),
            "centre_x_um": (xy[:, 0] + size / 2.0) * mpp,
            "centre_y_um": (xy[:, 1] + size / 2.0) * mpp,
        }
        for name, m in self.maps.items():
            rank, pct = rank_tiles(m.values)
            cols[name] = m.values
            cols[f"{name}_rank"] = rank
            cols[f"{name}_percentile"] = pct
        return cols

    def write_tiles_csv(self, path: str | os.PathLike[str]) -> Path:
        """Write :meth:`tiles_table` as CSV (atomically); returns the path."""
        import csv
        import io

        from ._io import atomic_write_text

        cols = self.tiles_table()
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(cols)
        text = {k: _csv_column(v) for k, v in cols.items()}
        writer.writerows(zip(*text.values(), strict=True))
        atomic_write_text(path, buf.getvalue())
        return Path(path)

    def to_geojson(self, object_type: str = "tile") -> dict[str, Any]:
        """QuPath GeoJSON ``FeatureCollection``: one square polygon per tile in level-0 pixels
        (covering ``[x, x+s) × [y, y+s)``), every map's value and percentile as measurements
        (names as in :meth:`tiles_table`)."""
        if object_type not in ("tile", "detection", "annotation"):
            raise ConfigError(
                f"object_type must be 'tile', 'detection' or 'annotation'; got {object_type!r}."
            )
        cols = self.tiles_table()
        size = int(self.tile_size_level0 or 0)
        keys = [k for name in self.maps for k in (name, f"{name}_percentile")]
        values = {k: np.asarray(cols[k], dtype=np.float64).tolist() for k in keys}
        features = []
        for i, (x, y) in enumerate(self.coords_level0.tolist()):
            ring = [[x, y], [x + size, y], [x + size, y + size], [x, y + size], [x, y]]
            features.append(
                {
                    "type": "Feature",
                    "id": _tile_uuid(self.bundle_sha256, i, x, y),
                    "geometry": {"type": "Polygon", "coordinates": [ring]},
                    "properties": {
                        "objectType": object_type,
                        "name": f"tile {i}",
                        "isLocked": True,
                        "measurements": {
                            k: (v[i] if math.isfinite(v[i]) else None) for k, v in values.items()
                        },
                    },
                }
            )
        # A foreign member (RFC 7946 §6.1) that QuPath ignores: which model made these values.
        model = {"bundle": self.bundle_name, "bundle_sha256": self.bundle_sha256, **self.provenance}
        return {"type": "FeatureCollection", "features": features, "properties": {"model": model}}

    def write_geojson(self, path: str | os.PathLike[str], object_type: str = "tile") -> Path:
        """Write :meth:`to_geojson` (atomically; QuPath imports it by drag and drop)."""
        import json

        from ._io import atomic_write_text

        atomic_write_text(path, json.dumps(self.to_geojson(object_type)))
        return Path(path)

    def to_dict(self, include_tiles: bool = False, top_k: int = 10) -> dict[str, Any]:
        """JSON-able report. Per-tile values only with ``include_tiles`` (they can be many);
        the ``top_k`` highest-attention tiles are always listed."""
        d: dict[str, Any] = {
            "modalities": list(self.modalities),
            "input_kind": self.input_kind,
            "inputs": {
                "slide_path": self.slide_path,
                "features_path": self.features_path,
                "expression_path": self.expression_path,
                "sample_id": self.sample_id,
                "sample_match": self.sample_match,
            },
            "subtype": None
            if self.subtype_probabilities is None
            else {
                "predicted": self.predicted_subtype,
                "probabilities": dict(self.subtype_probabilities),
            },
            "survival": None
            if self.risk_score is None
            else {
                "risk_score": self.risk_score,
                "risk_score_direction": "higher = worse prognosis",
                "risk_percentile": self.risk_percentile,
                "risk_group": self.risk_group,
                "risk_cutoff": self.risk_cutoff,
                "reference_km": self.reference_km,
            },
            "slide": None
            if self.attention is None
            else {
                "n_tiles": self.n_tiles,
                "tile_size_level0": self.tile_size_level0,
                "slide_mpp": self.slide_mpp,
                "slide_dimensions": list(self.slide_dimensions) if self.slide_dimensions else None,
                "target_mpp": self.target_mpp,
                "tile_px": self.tile_px,
                "patch_encoder": self.patch_encoder,
                "attention_source": self.attention_source,
                "maps": {name: self._map_summary(name, top_k) for name in self.maps},
            },
            "model": {
                "bundle": self.bundle_name,
                "bundle_sha256": self.bundle_sha256,
                "provenance": dict(self.provenance),
                "device": self.device,
                "precision": self.precision,
            },
            "timings_s": dict(self.timings_s),
            "warnings": list(self.warnings),
        }
        if include_tiles and self.maps and self.coords_level0 is not None:
            d["slide"]["tiles"] = {
                "coords_level0": self.coords_level0.tolist(),
                **{name: m.values.tolist() for name, m in self.maps.items()},
            }
        return d

    def _map_summary(self, name: str, top_k: int) -> dict[str, Any]:
        m = self.maps[name]
        lo, hi = m.display_range()
        return {
            "label": m.label,
            "description": m.description,
            "signed": m.signed,
            "method": m.method,
            "units": m.units,
            "display_range": [lo, hi],
            "top_tiles": [
                {
                    "tile_index": int(i),
                    "x_level0": int(self.coords_level0[i, 0]),
                    "y_level0": int(self.coords_level0[i, 1]),
                    "value": float(m.values[i]),
                }
                for i in self.top_tiles(top_k, name)
            ],
        }


def _csv_column(v: np.ndarray) -> list[str]:
    if np.issubdtype(v.dtype, np.integer):
        return [str(int(x)) for x in v]
    return ["" if not math.isfinite(x) else f"{x:.8g}" for x in v.tolist()]


def _tile_uuid(*parts: object) -> str:
    # deterministic ids: exporting the same result twice gives identical files
    import uuid

    return str(uuid.uuid5(uuid.NAMESPACE_URL, "napari-mirror:" + ":".join(map(str, parts))))


# --------------------------------------------------------------------------------------------
# predict
# --------------------------------------------------------------------------------------------
class _Timer:
    def __init__(self) -> None:
        self.t: dict[str, float] = {}
        self._start = time.perf_counter()

    def stage(self, name: str) -> _Stage:
        return _Stage(self, name)

    def total(self) -> None:
        self.t["total"] = round(time.perf_counter() - self._start, 4)


class _Stage:
    def __init__(self, timer: _Timer, name: str) -> None:
        self.timer, self.name = timer, name

    def __enter__(self) -> None:
        self.t0 = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self.timer.t[self.name] = round(
            self.timer.t.get(self.name, 0.0) + time.perf_counter() - self.t0, 4
        )


def predict(
    bundle: Any,
    slide_path: str | os.PathLike[str] | None = None,
    features_path: str | os.PathLike[str] | None = None,
    expression_path: str | os.PathLike[str] | None = None,
    sample_id: str | None = None,
    device: str = "auto",
    precision: str = "auto",
    mpp: float | None = None,
    progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
    *,
    expression_values: Any = None,
    patch_encoder_weights: str | os.PathLike[str] | None = None,
    batch_size: int = 64,
    num_workers: int = 2,
    nan_policy: str = "error",
    maps: bool | str = True,
) -> Prediction:
    """Run a model bundle on one patient's slide and/or expression profile.

    Parameters
    ----------
    bundle : Bundle or path
        A loaded :class:`~mirror_model.bundle.Bundle` or a bundle path (loaded here).
    slide_path : path, optional
        A whole-slide image (anything :func:`mirror_model.slide.open_slide` reads). With
        ``features_path`` too, the slide only supplies resolution and size (no re-extraction).
    features_path : path, optional
        Precomputed features (``.h5``) of the slide from the bundle's patch encoder.
    expression_path : path, optional
        Expression table (CSV/TSV/parquet, either orientation).
    sample_id : str, optional
        Row of the expression table (TCGA barcodes match on 12 characters). Default: the
        only row, or the row matching the slide's name (:func:`match_sample`).
    device : ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
    precision : ``"auto"``, ``"fp32"`` or ``"bf16"`` (never fp16).
    mpp : float, optional
        Level-0 µm per pixel of the slide when its file does not record it.
    progress : ProgressFn, optional
        Called as ``progress(done, total, stage)``.
    should_stop : StopFn, optional
        Polled between units of work; when it returns True, :class:`Cancelled` is raised
        (nothing is written anywhere).
    expression_values : ExpressionTable, mapping gene → value, pandas Series, or 1-D array
        in the bundle's gene order; an alternative to ``expression_path``.
    patch_encoder_weights : path, optional
        Weights file of the bundle's patch encoder when it needs one (e.g. UNI); the
        embedded ``stain-texture`` encoder needs none.
    batch_size, num_workers : tiles per encoder batch; tile-reading threads.
    nan_policy : missing expression values: ``"error"`` (default), ``"median"`` (the
        bundle's training medians), ``"zero"`` or ``"drop-genes"`` (see
        :func:`~mirror_model.expression.read_expression`).
    maps : compute the subtype and risk maps (``Prediction.maps``) besides the encoder's
        attention: True (the default method, :data:`mirror_model.maps.DEFAULT_MAP_METHOD`), a method name of
        :data:`mirror_model.maps.MAP_METHODS`, or False to skip them (the attention map is
        always there).

    Returns
    -------
    Prediction

    Raises
    ------
    ConfigError
        Neither a slide/feature file nor an expression input was given, or the bundle has no
        head for the inputs given.
    SlideError, FeatureFileError, ExpressionError, BundleError
        For unreadable or mismatched inputs (message names the file and what to do).
    Cancelled
        When ``should_stop()`` returned True.
    """
    from ._device import resolve_device, resolve_precision
    from .bundle import SYNTHETIC_WARNING, Bundle, load_bundle

    if not isinstance(maps, bool) and maps not in MAP_METHODS:
        raise ConfigError(
            f"maps = {maps!r} is invalid: must be True, False or one of {', '.join(MAP_METHODS)}."
        )
    if not isinstance(bundle, Bundle):
        bundle = load_bundle(bundle)
    have_slide, have_rna = _check_inputs(
        bundle, slide_path, features_path, expression_path, expression_values
    )
    dev = resolve_device(device)
    prec = resolve_precision(precision, dev)
    timer = _Timer()
    pred = Prediction(
        modalities=(),
        input_kind="",
        slide_path=None if slide_path is None else str(slide_path),
        features_path=None if features_path is None else str(features_path),
        expression_path=None if expression_path is None else str(expression_path),
        bundle_sha256=bundle.sha256,
        bundle_name=bundle.name,
        provenance=bundle.provenance.to_dict(),
        device=str(dev),
        precision=prec,
    )
    if bundle.provenance.synthetic:
        pred.warnings.append(SYNTHETIC_WARNING)
    run = _Run(bundle, _model_on(bundle, dev), dev, prec, timer, progress, should_stop)
    modalities: list[str] = []
    # expression first: it is fast, and a bad table should fail before a long extraction
    x_rna = None
    if have_rna:
        slide_like = slide_path if slide_path is not None else features_path
        x_rna = _expression_stage(
            run, pred, expression_path, expression_values, sample_id, slide_like, nan_policy
        )
    slide: SlideFeatures | None = None
    if have_slide:
        slide = _slide_features(
            run,
            slide_path,
            features_path,
            mpp=mpp,
            patch_encoder_weights=patch_encoder_weights,
            batch_size=batch_size,
            num_workers=num_workers,
        )
        slide.fill(pred)
        pred.target_mpp, pred.tile_px = bundle.target_mpp, bundle.tile_px
        pred.patch_encoder = bundle.patch_encoder_name
        _slide_encoder_stage(run, pred, slide)
        modalities.append("slide")
    if x_rna is not None:
        _rna_encoder_stage(run, pred, x_rna)
        modalities.append("rna")
    check_cancel(should_stop, "prediction")
    with timer.stage("heads"):
        _apply_heads(bundle, pred, tuple(modalities))
    if slide is not None and maps:
        _maps_stage(run, pred, slide, DEFAULT_MAP_METHOD if maps is True else str(maps))
    timer.total()
    pred.timings_s = timer.t
    return pred


@dataclass
class _Run:
    """What every stage of one :func:`predict` call shares."""

    bundle: Any
    model: Any
    dev: Any
    prec: str
    timer: _Timer
    progress: ProgressFn | None
    should_stop: StopFn | None


@dataclass
class SlideFeatures:
    """A slide's tile features and where the tiles are (the slide stage's result).

    Attributes
    ----------
    features : np.ndarray
        ``[N, D_p]`` float32 tile features from the bundle's patch encoder.
    coords_level0 : np.ndarray
        ``[N, 2]`` int64 (x, y) of each tile's top-left corner, level-0 pixels.
    tile_size_level0 : int or None
        Side of a tile in level-0 pixels.
    slide_mpp : float or None
        Level-0 µm per pixel.
    slide_dimensions : tuple[int, int] or None
        Level-0 (width, height).
    """

    features: np.ndarray
    coords_level0: np.ndarray
    tile_size_level0: int | None
    slide_mpp: float | None
    slide_dimensions: tuple[int, int] | None

    def positions(self) -> np.ndarray:
        """The tiles' lattice cells ``[N, 2]`` int64 (column, row), for encoders that mix
        neighbouring tiles (``MirrorModel.encode_slide(..., positions=)``)."""
        from .features import grid_positions

        return grid_positions(self.coords_level0, self.tile_size_level0)

    def fill(self, pred: Prediction) -> None:
        """Copy the tile geometry into ``pred``."""
        pred.coords_level0 = self.coords_level0
        pred.tile_size_level0 = self.tile_size_level0
        pred.slide_mpp = self.slide_mpp
        pred.slide_dimensions = self.slide_dimensions


def _check_inputs(
    bundle: Any, slide_path: Any, features_path: Any, expression_path: Any, expression_values: Any
) -> tuple[bool, bool]:
    """Which modalities were given (slide, rna); ConfigError for impossible combinations."""
    have_slide = slide_path is not None or features_path is not None
    have_rna = expression_path is not None or expression_values is not None
    if not have_slide and not have_rna:
        raise ConfigError(
            "nothing to predict from: give a slide (slide_path / --slide), precomputed features "
            "(features_path / --features) and/or an expression table (expression_path / "
            "--expression)."
        )
    if expression_path is not None and expression_values is not None:
        raise ConfigError("give either expression_path or expression_values, not both.")
    if have_slide and not bundle.has_slide_encoder:
        raise ConfigError(
            f"model bundle {bundle.name} has no slide heads; it predicts from expression only."
        )
    if have_rna and not bundle.has_rna_encoder:
        raise ConfigError(
            f"model bundle {bundle.name} has no RNA heads (no gene list); it predicts from "
            "slides only."
        )
    return have_slide, have_rna


def _expression_stage(
    run: _Run,
    pred: Prediction,
    expression_path: Any,
    expression_values: Any,
    sample_id: str | None,
    slide_like: Any,
    nan_policy: str = "error",
) -> np.ndarray:
    """The normalised expression vector; sets ``pred.sample_id`` / ``sample_match`` and adds
    the input's scale / missing-value / dead-gene warnings to ``pred.warnings``."""
    check_cancel(run.should_stop, "prediction")
    report(run.progress, 0, 1, "reading expression")
    with run.timer.stage("expression"):
        x_rna, sid, how, notes = _expression_vector(
            run.bundle, expression_path, expression_values, sample_id, slide_like, nan_policy
        )
    pred.sample_id, pred.sample_match = sid, how
    pred.warnings.extend(n for n in notes if n not in pred.warnings)
    report(run.progress, 1, 1, "reading expression")
    return x_rna


def _slide_encoder_stage(run: _Run, pred: Prediction, slide: SlideFeatures) -> None:
    """Slide embedding and encoder attention (``pred.slide_embedding``, ``attention``, maps)."""
    import torch

    from ._device import autocast

    check_cancel(run.should_stop, "prediction")
    report(run.progress, 0, 1, "slide encoder")
    with run.timer.stage("slide_encoder"), torch.no_grad():
        xb = torch.from_numpy(slide.features).to(run.dev).unsqueeze(0)
        kw = {}
        if getattr(run.model, "needs_positions", False):
            kw["positions"] = torch.from_numpy(slide.positions()).to(run.dev)
        with autocast(run.dev, run.prec):
            enc = run.model.encode_slide(xb, **kw)
        pred.slide_embedding = enc.embedding.float().cpu().numpy()[0]
        att = enc.attention.float().cpu().numpy()[0].astype(np.float64)
    # renormalise in float64: bf16 rounding must not leave a sum of 0.998
    att = np.clip(att, 0.0, None)
    total = att.sum()
    pred.attention = att / total if total > 0 else np.full(att.shape, 1.0 / max(att.size, 1))
    pred.attention_source = _describe_attention(run.model)
    att_map = attention_map(pred.attention, pred.attention_source)
    pred.maps[att_map.name] = att_map
    report(run.progress, 1, 1, "slide encoder")


def _maps_stage(run: _Run, pred: Prediction, slide: SlideFeatures, method: str) -> None:
    """Subtype and risk maps of the heads that made the prediction (``pred.input_kind``)."""
    if pred.input_kind not in ("slide", "both"):
        return
    import torch

    from .maps import head_maps, slide_heads

    check_cancel(run.should_stop, "prediction")
    report(run.progress, 0, 1, "maps")
    with run.timer.stage("maps"):
        heads = slide_heads(run.bundle, pred.input_kind, pred.rna_embedding)
        x = torch.from_numpy(slide.features).to(run.dev)
        pred.maps.update(
            head_maps(
                run.model, x, heads, method=method, precision=run.prec,
                positions=slide.positions() if getattr(run.model, "needs_positions", False)
                else None,
                should_stop=run.should_stop,
            )
        )
    report(run.progress, 1, 1, "maps")


def _rna_encoder_stage(run: _Run, pred: Prediction, x_rna: np.ndarray) -> None:
    import torch

    from ._device import autocast

    check_cancel(run.should_stop, "prediction")
    with run.timer.stage("rna_encoder"), torch.no_grad():
        rb = torch.from_numpy(x_rna[None, :]).to(run.dev)
        with autocast(run.dev, run.prec):
            z = run.model.encode_rna(rb)
        pred.rna_embedding = z.float().cpu().numpy()[0]


def _model_on(bundle: Any, dev: Any) -> Any:
    """The bundle's model on ``dev`` (cached per device; the CPU copy stays on the CPU)."""
    key = f"model@{dev}"
    if key not in bundle._cache:
        import copy

        base = bundle.model
        bundle._cache[key] = base if dev.type == "cpu" else copy.deepcopy(base).to(dev).eval()
    return bundle._cache[key]


def _expression_vector(
    bundle: Any,
    expression_path: Any,
    expression_values: Any,
    sample_id: str | None,
    slide_like: Any,
    nan_policy: str = "error",
) -> tuple[np.ndarray, str | None, str, list[str]]:
    """Normalised expression vector [G] in the bundle's gene order, its sample ID, how the
    row was chosen, and warnings about the input (scale, missing values, dead genes)."""
    genes = bundle.genes
    pp = bundle.preprocessing
    table = None
    notes: list[str] = []
    if expression_path is not None:
        from .expression import read_expression

        table = read_expression(expression_path, nan_policy=nan_policy)  # type: ignore[arg-type]
    elif hasattr(expression_values, "sample_ids") and hasattr(expression_values, "align_genes"):
        table = expression_values
    if table is not None:
        sid, how = _choose_row(table, sample_id, slide_like)
        row = int(table.rows_for([sid])[0]) if how != "only row" else 0
        model_cols = table.align_genes(genes)
        raw = np.asarray(model_cols[row], dtype=np.float32)
        sid = table.sample_ids[row]
        where = f"expression table {table.path}" if table.path is not None else "expression table"
        notes.extend(pp.input_warnings(model_cols, where))
        notes.extend(w for w in table.warnings if "missing values" in w)
    else:
        raw, sid, how = _vector_from_values(expression_values, genes, sample_id)
        notes.extend(pp.input_warnings(raw[None, :], f"expression of sample {sid or 'given'}"))
    missing = ~np.isfinite(raw)
    if missing.any():
        bad = [g for g, v in zip(genes, missing, strict=True) if v]
        if nan_policy != "median" or pp.fill_values is None or np.isinf(raw).any():
            raise ExpressionError(
                f"expression of sample {sid!r} has missing or non-finite values for "
                f"{len(bad)} of the model's genes: {', '.join(bad[:10])}"
                f"{', …' if len(bad) > 10 else ''}. Fill them, or use --nan-policy median "
                "(nan_policy='median': the model's training medians)."
            )
        notes.append(
            f"{len(bad)} of the model's genes are missing for sample {sid}: filled with the "
            f"training patients' medians ({', '.join(bad[:10])}{' …' if len(bad) > 10 else ''})."
        )
    x = np.asarray(pp.transform(raw[None, :], genes), dtype=np.float32)[0]
    if x.shape != (len(genes),) or not np.all(np.isfinite(x)):
        raise ExpressionError(
            f"expression of sample {sid!r} could not be normalised with the bundle's statistics "
            "(non-finite result); check the table's scale (raw counts vs log values)."
        )
    return x, sid, how, notes


def _choose_row(table: Any, sample_id: str | None, slide_like: Any) -> tuple[str, str]:
    name = str(table.path) if getattr(table, "path", None) is not None else "expression table"
    if sample_id is not None:
        table.rows_for([str(sample_id)])  # clear error naming the missing sample
        return str(sample_id), "given"
    if len(table.sample_ids) == 1:
        return table.sample_ids[0], "only row"
    sid = match_sample(table, slide_like)
    if sid is not None:
        return sid, "matched slide name"
    shown = ", ".join(table.sample_ids[:8])
    more = f", … ({len(table.sample_ids)} in all)" if len(table.sample_ids) > 8 else ""
    hint = (
        f" none matches the slide name {slide_stem(slide_like)!r};"
        if slide_like is not None
        else ""
    )
    raise ExpressionError(
        f"{name} has {len(table.sample_ids)} samples and no sample_id was given;{hint} choose one "
        f"with --sample-id / sample_id= (samples: {shown}{more})."
    )


def _vector_from_values(
    values: Any, genes: Sequence[str], sample_id: str | None
) -> tuple[np.ndarray, str | None, str]:
    if values is None:
        raise ExpressionError("no expression values given.")
    if hasattr(values, "index") and hasattr(values, "to_numpy") and not hasattr(values, "columns"):
        name = getattr(values, "name", None)
        sample_id = sample_id or (None if name is None else str(name))
        values = dict(zip((str(i) for i in values.index), values.to_numpy(), strict=True))
    if isinstance(values, Mapping):
        from .expression import ExpressionTable

        keys = [str(k) for k in values]
        tab = ExpressionTable(
            values=np.asarray([[float(values[k]) for k in values]], dtype=np.float32),
            sample_ids=[str(sample_id or "sample")],
            genes=keys,
        )
        return np.asarray(tab.align_genes(genes)[0], dtype=np.float32), sample_id, "given"
    arr = np.asarray(values, dtype=np.float32).ravel()
    if arr.size != len(genes):
        raise ExpressionError(
            f"an expression vector without gene names must have the bundle's {len(genes)} genes "
            f"in the bundle's order; got {arr.size} values. Pass a table or a gene → value mapping."
        )
    return arr, sample_id, "given"


def _slide_features(
    run: _Run,
    slide_path: Any,
    features_path: Any,
    *,
    mpp: float | None,
    patch_encoder_weights: Any,
    batch_size: int,
    num_workers: int,
) -> SlideFeatures:
    """The slide's tile features: read from ``features_path`` (checked against the bundle's
    encoder and, when ``slide_path`` is given too, against the slide's size) or extracted from
    ``slide_path`` with the bundle's tiling and patch encoder."""
    bundle, timer = run.bundle, run.timer
    want_dim = int(bundle.config_dict.get("patch_dim", bundle.patch_encoder.get("dim", 0)))
    if features_path is not None:
        return _read_slide_features(run, slide_path, features_path, mpp, want_dim)

    from .extract import extract_features_in_memory
    from .features import check_encoder

    check_cancel(run.should_stop, "prediction")
    with timer.stage("patch_features"):
        tissue_threshold = bundle.document["tiling"].get("tissue_threshold")
        ff = extract_features_in_memory(
            slide_path,
            bundle.patch_encoder_name,
            target_mpp=bundle.target_mpp,
            tile_px=bundle.tile_px,
            tissue_threshold=0.25 if tissue_threshold is None else float(tissue_threshold),
            weights=patch_encoder_weights,
            mpp=mpp,
            device=run.dev,
            precision=run.prec,
            batch_size=batch_size,
            num_workers=num_workers,
            progress=run.progress,
            should_stop=run.should_stop,
        )
        # the same name could carry other weights (e.g. another UNI checkpoint): compare specs
        check_encoder(ff, bundle.patch_encoder)
    if ff.dim != want_dim:
        raise FeatureFileError(
            f"the patch encoder {bundle.patch_encoder_name!r} gave {ff.dim}-d features but the "
            f"bundle's model expects {want_dim}-d; the bundle is inconsistent."
        )
    w, h = ff.attrs.get("slide_width"), ff.attrs.get("slide_height")
    return SlideFeatures(
        features=np.ascontiguousarray(ff.features, dtype=np.float32),
        coords_level0=np.asarray(ff.coords_level0, dtype=np.int64),
        tile_size_level0=int(ff.patch_size_level0),
        slide_mpp=float(ff.attrs["slide_mpp"]) if ff.attrs.get("slide_mpp") else None,
        slide_dimensions=(int(w), int(h)) if w and h else None,
    )


def _read_slide_features(
    run: _Run, slide_path: Any, features_path: Any, mpp: float | None, want_dim: int
) -> SlideFeatures:
    from .features import check_encoder, read_features

    bundle, timer = run.bundle, run.timer
    report(run.progress, 0, 1, "reading features")
    with timer.stage("read_features"):
        ff = read_features(features_path)
        check_encoder(ff, bundle.patch_encoder, target_mpp=bundle.target_mpp)
    if ff.dim != want_dim:
        raise FeatureFileError(
            f"{features_path}: features have dimension {ff.dim}, the bundle's model expects "
            f"{want_dim} (encoder {bundle.patch_encoder_name!r})."
        )
    if ff.coords_level0 is None:
        raise FeatureFileError(
            f"{features_path} has no tile coordinates, so no heatmap can be drawn; "
            "re-extract it with `mirror-train extract` (which stores coords)."
        )
    w, h = ff.attrs.get("slide_width"), ff.attrs.get("slide_height")
    out = SlideFeatures(
        features=np.ascontiguousarray(ff.features, dtype=np.float32),
        coords_level0=np.asarray(ff.coords_level0, dtype=np.int64),
        tile_size_level0=ff.patch_size_level0,
        slide_mpp=ff.attrs.get("slide_mpp"),
        slide_dimensions=(int(w), int(h)) if w and h else None,
    )
    if slide_path is not None:
        from .slide import open_slide

        with timer.stage("open_slide"), open_slide(slide_path, mpp=mpp) as slide:
            out.slide_mpp = float(slide.mpp)
            out.slide_dimensions = (int(slide.dimensions[0]), int(slide.dimensions[1]))
        _check_coords_fit(out, features_path, slide_path)
    if out.tile_size_level0 is None and out.slide_mpp and ff.target_mpp:
        out.tile_size_level0 = int(round(bundle.tile_px * ff.target_mpp / out.slide_mpp))
    report(run.progress, 1, 1, "reading features")
    return out


def _check_coords_fit(slide: SlideFeatures, features_path: Any, slide_path: Any) -> None:
    if slide.slide_dimensions is None or len(slide.coords_level0) == 0:
        return
    w, h = slide.slide_dimensions
    size = slide.tile_size_level0 or 0
    mx = slide.coords_level0.max(axis=0)
    # a tile may stick out by less than one tile at the right/bottom edge
    if mx[0] > w or mx[1] > h or (size and (mx[0] - size > w or mx[1] - size > h)):
        raise FeatureFileError(
            f"{features_path}: tile coordinates reach ({int(mx[0])}, {int(mx[1])}) but the slide "
            f"{slide_path} is only {w} x {h} pixels: the feature file belongs to another slide."
        )


def _describe_attention(model: Any) -> str:
    """What the per-tile attention of ``model``'s slide encoder is, in one sentence."""
    enc = getattr(model, "slide_encoder", model)
    layer = getattr(enc, "heatmap_layer", None)
    if layer is not None:
        return (
            f"CLS attention row of the {layer} TransMIL layer, averaged over heads, "
            "over the slide's tiles (sums to 1)"
        )
    return "gated-attention (ABMIL) weights over the slide's tiles (sum to 1)"


def _apply_heads(bundle: Any, pred: Prediction, modalities: tuple[str, ...]) -> None:
    pred.modalities = modalities
    kind = input_kind(modalities)
    if kind not in bundle.input_kinds:
        if kind == "both":
            fallback = next((k for k in ("slide", "rna") if k in bundle.input_kinds), None)
            if fallback is None:
                raise ConfigError(f"model bundle {bundle.name} has no prediction heads.")
            pred.warnings.append(
                f"the bundle has no heads for slide and expression together; the {fallback} "
                "heads were used (the other modality's embedding was still computed)."
            )
            kind = fallback
        else:
            raise ConfigError(
                f"model bundle {bundle.name} has no heads for {kind} input (it has: "
                f"{', '.join(bundle.input_kinds)})."
            )
    pred.input_kind = kind
    if kind == "slide":
        z = pred.slide_embedding[None, :]
    elif kind == "rna":
        z = pred.rna_embedding[None, :]
    else:
        z = np.concatenate([pred.slide_embedding, pred.rna_embedding])[None, :]
    z = z.astype(np.float64)
    probe = bundle.head(kind, "subtype")
    if probe is not None:
        p = probe.predict_proba(z)[0]
        classes = [str(c) for c in np.asarray(probe.classes_).tolist()]
        by = dict(zip(classes, (float(v) for v in p), strict=True))
        order = bundle.class_names or classes
        pred.subtype_probabilities = {c: by[c] for c in order if c in by}
        pred.predicted_subtype = max(
            pred.subtype_probabilities, key=pred.subtype_probabilities.__getitem__
        )
    cox = bundle.head(kind, "survival")
    if cox is not None:
        r = float(np.asarray(cox.predict_risk(z), dtype=np.float64).ravel()[0])
        pred.risk_score = r
        cutoff = bundle.risk_cutoff(kind)
        pred.risk_cutoff = cutoff
        if cutoff is not None:
            pred.risk_group = "high" if r > cutoff else "low"
        ref = bundle.reference(kind) or {}
        ref_risk = np.asarray(ref.get("risk", []), dtype=np.float64).ravel()
        ref_risk = ref_risk[np.isfinite(ref_risk)]
        if ref_risk.size:
            pred.risk_percentile = float(
                100.0 * (np.sum(ref_risk < r) + 0.5 * np.sum(ref_risk == r)) / ref_risk.size
            )
        pred.reference_km = bundle.reference_km_for(kind)
        if getattr(cox, "n_nonzero_", None) == 0:
            # inner CV chose the null model: the score is a constant, its map flat
            pred.warnings.append(NULL_SURVIVAL_HEAD_WARNING.format(kind=INPUT_KIND_WORDS[kind]))
    if pred.risk_score is not None and not math.isfinite(pred.risk_score):
        raise MirrorError(f"the survival head of {bundle.name} gave a non-finite risk score.")
