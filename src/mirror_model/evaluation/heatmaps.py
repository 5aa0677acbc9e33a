"""How far a run's per-tile maps can be trusted: localisation against region masks and
faithfulness by deletion, on held-out slides only (``mirror-train heatmaps``).

For every fold ``k`` of a pretraining run, the fold's model is exported as a bundle (heads
fitted on the fold's training patients, as :func:`mirror_model.bundle.export_bundle` does) and
every slide of the fold's **test** patients is predicted with it through
:func:`mirror_model.inference.predict`, so each slide is scored by the model that never saw it,
with exactly the maps a user gets. Scored maps:

``subtype:true``
    The subtype map of the slide's annotated class (``subtype`` column of the cohort).
``subtype:predicted``
    The subtype map of the class the model predicts.
``risk``
    The survival-risk map.
``attention``
    The encoder's attention.
``feature_norm``, ``random``
    Baselines: the L2 norm of each tile's feature vector, and uniform noise.

The subtype and risk maps are those of ``predict(..., maps=methods[0])`` (by default the
method ``predict`` uses); every further method of ``methods`` adds the same three maps computed
with it, named ``<map>@<method>`` (e.g. ``subtype:true@gradient``), so candidate methods are
compared on the same slides, folds and random draws.

Per slide and map (tiles are "in the region" when at least ``threshold`` of their area is
non-zero in the slide's mask):

``auroc``
    AUROC of the map's values against the region (0.5 = chance, 1 = every region tile ranks
    above every other tile). ``auroc_abs`` scores ``|values|`` (for signed maps: evidence in
    either direction).
``mass_ratio``
    Share of the map's positive mass (for unsigned maps: of its mass) on region tiles, divided
    by the region's share of the tiles (1 = no preference; > 1 = concentrated on the region).
    ``abs_mass_ratio`` uses ``|values|``.
``deletion_ratio``
    Faithfulness without masks: the displayed output is recomputed with the top 10 % of tiles
    by the map removed, and with ``draws`` random 10 % removed; the ratio of the mean absolute
    changes (top vs random, means over the fold's slides). The output is the map's own:
    the probability of the map's class for subtype maps, the risk score for the risk map, and
    for the other maps the probability of the true class (``deletion_ratio``) and the risk
    (``deletion_ratio_risk``). ``deletion_lowers`` is the share of slides on which removing the
    top tiles lowered the output (a signed map's top tiles are evidence *for* it: expect ~1).
``insertion_gain``
    The other side of the same test: the output of a slide made of the map's top 10 % only,
    minus that of slides made of the random 10 % draws only (output units; > 0 = the top
    tiles alone carry the output up).

Each metric is averaged over the fold's slides, then summarised over folds as
``{"mean", "sd", "min_fold", "per_fold"}``.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .._progress import ProgressFn, StopFn, check_cancel, report
from ..errors import ConfigError
from .metrics import binary_auroc

__all__ = [
    "HeatmapEvaluation",
    "MASK_SUFFIXES",
    "evaluate_heatmaps",
    "find_masks",
    "mask_downsample",
    "map_rows",
    "read_region_mask",
    "summary_table",
    "tile_region_fraction",
    "write_heatmap_report",
    "write_heatmap_results",
]

MASK_SUFFIXES = (".png", ".tif", ".tiff")
BASELINES = ("feature_norm", "random")
#: Map names scored, in report order (maps of further methods follow as ``<name>@<method>``).
SCORED_MAPS = ("subtype:true", "subtype:predicted", "risk", "attention", *BASELINES)
#: The maps that a map method computes (the rest do not depend on it).
METHOD_MAPS = ("subtype:true", "subtype:predicted", "risk")
METRICS = (
    "auroc",
    "auroc_abs",
    "mass_ratio",
    "abs_mass_ratio",
    "deletion_ratio",
    "deletion_ratio_risk",
    "deletion_lowers",
    "insertion_gain",
)
SCHEMA_VERSION = 1


# --------------------------------------------------------------------------------------------
# masks
# --------------------------------------------------------------------------------------------
def find_masks(masks_dir: str | os.PathLike[str], slide_ids: list[str]) -> dict[str, Path]:
    """``<masks_dir>/<slide_id>.png`` (or ``.tif`` / ``.tiff``) for every slide.

    Raises
    ------
    ConfigError
        The folder does not exist or some slides have no mask (they are listed).
    """
    d = Path(masks_dir)
    if not d.is_dir():
        raise ConfigError(f"mask folder {d} does not exist.")
    from ..ids import files_by_slide

    found, missing = files_by_slide(d, slide_ids, MASK_SUFFIXES)
    if missing:
        first = missing[0]
        others = f" and {len(missing) - 1} more ({', '.join(missing[1:6])}{', …' if len(missing) > 6 else ''})" if len(missing) > 1 else ""
        near = _near_misses(d, first)
        hint = (
            f" Found {', '.join(p.name for p in near)}: rename it to {first}.png (the name must "
            "be the slide ID exactly, with a .png, .tif or .tiff suffix)."
            if near
            else ""
        )
        raise ConfigError(
            f"no mask for slide {first}: expected {d / (first + '.png')} (or .tif / .tiff)"
            f"{others}; {len(missing)} of the {len(slide_ids)} held-out slides have none.{hint} "
            "Masks are one image per slide named <slide_id>.png or .tif (non-zero = region); "
            "use --skip-missing to score only the slides that have one."
        )
    return found


def _near_misses(d: Path, slide_id: str) -> list[Path]:
    """Files in ``d`` that look like a misnamed mask of ``slide_id`` (other case or suffix, or
    the ID with a prefix/suffix such as ``_mask``)."""
    sid = slide_id.lower()
    out = []
    for p in sorted(d.iterdir()):
        if p.is_file() and sid in p.name.lower() and len(p.name) <= len(sid) + 16:
            out.append(p)
    return out[:3]


def read_region_mask(path: str | os.PathLike[str]) -> np.ndarray:
    """``[H, W]`` bool: True where the mask image is non-zero (any channel)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.seek(0)
            arr = np.asarray(im)
    except (OSError, ValueError, SyntaxError) as exc:
        raise ConfigError(f"cannot read mask {path}: {exc}") from None
    if arr.ndim == 3:
        arr = arr[..., :3].max(axis=2) if arr.shape[2] >= 3 else arr[..., 0]
    if arr.ndim != 2 or arr.size == 0:
        raise ConfigError(f"mask {path} is not a 2-D image (shape {arr.shape}).")
    return arr != 0


def mask_downsample(
    mask_shape: tuple[int, int], slide_dimensions: tuple[int, int], where: str = "mask"
) -> float:
    """Level-0 pixels per mask pixel, read from the size ratio of mask and slide.

    ``mask_shape`` is ``(H, W)``, ``slide_dimensions`` the level-0 ``(width, height)``. The two
    axes must agree (each mask side within one pixel of the slide side / downsample).

    Raises
    ------
    ConfigError
        When the aspect ratios differ: the mask belongs to another slide.
    """
    mh, mw = int(mask_shape[0]), int(mask_shape[1])
    w0, h0 = int(slide_dimensions[0]), int(slide_dimensions[1])
    ds = 0.5 * (w0 / mw + h0 / mh)
    if abs(w0 / ds - mw) > 1.0 or abs(h0 / ds - mh) > 1.0:
        raise ConfigError(
            f"{where} is {mw} x {mh} pixels but the slide is {w0} x {h0} at level 0: the aspect "
            f"ratios differ (downsample {w0 / mw:.3g} across, {h0 / mh:.3g} down), so the mask "
            "does not belong to this slide."
        )
    return ds


def tile_region_fraction(
    mask: np.ndarray, coords_level0: np.ndarray, tile_size_level0: int, downsample: float
) -> np.ndarray:
    """Fraction (0–1) of each tile's area inside the mask.

    ``mask`` covers the slide with one pixel per ``downsample`` × ``downsample`` level-0 pixels;
    tiles are ``tile_size_level0`` squares at ``coords_level0`` (x, y). Computed exactly on the
    mask grid with an integral image (partial mask pixels weighted by overlap).
    """
    m = np.asarray(mask, dtype=np.float64)
    h, w = m.shape
    ii = np.zeros((h + 1, w + 1))
    ii[1:, 1:] = m.cumsum(0).cumsum(1)

    def integral(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        # area integral of the piecewise-constant mask from (0, 0) to (x, y), mask px units
        x = np.clip(x, 0, w)
        y = np.clip(y, 0, h)
        x0 = np.floor(x).astype(np.int64)
        y0 = np.floor(y).astype(np.int64)
        fx, fy = x - x0, y - y0
        x1, y1 = np.minimum(x0 + 1, w), np.minimum(y0 + 1, h)
        a = ii[y0, x0]
        b = ii[y0, x1] - ii[y0, x0]
        c = ii[y1, x0] - ii[y0, x0]
        d = ii[y1, x1] - ii[y1, x0] - ii[y0, x1] + ii[y0, x0]
        return a + fx * b + fy * c + fx * fy * d

    c = np.asarray(coords_level0, dtype=np.float64) / float(downsample)
    s = float(tile_size_level0) / float(downsample)
    x0, y0 = c[:, 0], c[:, 1]
    x1, y1 = x0 + s, y0 + s
    area = integral(x1, y1) - integral(x0, y1) - integral(x1, y0) + integral(x0, y0)
    return np.clip(area / (s * s), 0.0, 1.0)


# --------------------------------------------------------------------------------------------
# per-slide metrics
# --------------------------------------------------------------------------------------------
def mass_ratio(values: np.ndarray, region: np.ndarray) -> float:
    """Share of the (non-negative) ``values``' sum on region tiles / the region's tile share."""
    v = np.asarray(values, dtype=np.float64)
    share = float(np.mean(region))
    total = float(v.sum())
    if share == 0.0 or total <= 0.0:
        return math.nan
    return float(v[region].sum()) / total / share


def deletion_effects(
    output: Any, n_tiles: int, order: np.ndarray, random_sets: list[np.ndarray], *,
    fraction: float = 0.1,
) -> tuple[float, float]:
    """Output change when the top ``fraction`` of tiles (by ``order``, best first) are removed,
    and the mean absolute change over random removals of as many tiles.

    ``output(keep)`` gives the displayed output of the slide restricted to the tiles where the
    bool mask ``keep [N]`` is True; ``random_sets`` are the tile indices of each random draw.
    Returns ``(full − output_without_top, mean |full − output_without_random|)``; the first is
    signed (> 0 when removing the top tiles lowered the output).
    """
    full = float(output(np.ones(n_tiles, dtype=bool)))

    def without(idx: np.ndarray) -> float:
        keep = np.ones(n_tiles, dtype=bool)
        keep[idx] = False
        return float(output(keep))

    top = full - without(np.asarray(order[: n_removed(n_tiles, fraction)]))
    rand = [abs(full - without(idx)) for idx in random_sets]
    return top, float(np.mean(rand))


def insertion_gain(
    output: Any, n_tiles: int, order: np.ndarray, random_sets: list[np.ndarray], *,
    fraction: float = 0.1,
) -> float:
    """The insertion counterpart of :func:`deletion_effects`: the output of a slide made of the
    top ``fraction`` of tiles only, minus the mean output of slides made of the random draws
    only (> 0: the map's top tiles alone push the output up more than as many random tiles)."""

    def only(idx: np.ndarray) -> float:
        keep = np.zeros(n_tiles, dtype=bool)
        keep[idx] = True
        return float(output(keep))

    top = only(np.asarray(order[: n_removed(n_tiles, fraction)]))
    return top - float(np.mean([only(idx) for idx in random_sets]))


def n_removed(n_tiles: int, fraction: float) -> int:
    """Tiles removed by the deletion test: ``ceil(fraction · N)``, at least 1."""
    return max(1, int(math.ceil(fraction * n_tiles)))


# --------------------------------------------------------------------------------------------
# the evaluation
# --------------------------------------------------------------------------------------------
@dataclass
class HeatmapEvaluation:
    """Result of :func:`evaluate_heatmaps`.

    Attributes
    ----------
    summary : dict
        ``{map_name: {metric: {"mean", "sd", "min_fold", "per_fold"}}}`` (what ``heatmaps.json``
        holds under ``"maps"``).
    slides : list of dict
        One record per held-out slide: fold, slide_id, true and predicted class, tiles, region
        share and every map's metrics.
    settings : dict
        How it was measured (threshold, deletion fraction, draws, input kind, ...).
    """

    summary: dict[str, dict[str, dict[str, Any]]]
    slides: list[dict[str, Any]]
    settings: dict[str, Any]
    descriptions: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA_VERSION,
            "maps": self.summary,
            "settings": self.settings,
            "descriptions": self.descriptions,
        }


def _summary_over_folds(per_fold: dict[int, float]) -> dict[str, Any]:
    vals = np.array([v for v in per_fold.values() if np.isfinite(v)], dtype=np.float64)
    if vals.size == 0:
        return {"mean": None, "sd": None, "min_fold": None, "per_fold": {}}
    return {
        "mean": float(vals.mean()),
        "sd": float(vals.std(ddof=1)) if vals.size > 1 else 0.0,
        "min_fold": float(vals.min()),
        "per_fold": {str(k): (float(v) if np.isfinite(v) else None) for k, v in per_fold.items()},
    }


def summarize_slides(records: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """Fold means of every map's per-slide metrics, summarised over folds.

    Deletion ratios are ratios of fold means (mean top-10 % change / mean random change),
    which stays finite when one slide's random change is ~0.
    """
    folds = sorted({int(r["fold"]) for r in records})
    out: dict[str, dict[str, dict[str, Any]]] = {}
    seen = list(dict.fromkeys(n for r in records for n in r["maps"]))
    names = [n for n in SCORED_MAPS if n in seen] + [n for n in seen if n not in SCORED_MAPS]
    for name in names:
        per: dict[str, dict[int, float]] = {m: {} for m in METRICS}
        for k in folds:
            rs = [r["maps"][name] for r in records if int(r["fold"]) == k and name in r["maps"]]
            if not rs:
                continue
            for m in ("auroc", "auroc_abs", "mass_ratio", "abs_mass_ratio"):
                v = np.array([x[m] for x in rs if x.get(m) is not None], dtype=np.float64)
                v = v[np.isfinite(v)]
                per[m][k] = float(v.mean()) if v.size else math.nan
            for m, top, rand in (
                ("deletion_ratio", "deletion_top", "deletion_random"),
                ("deletion_ratio_risk", "deletion_top_risk", "deletion_random_risk"),
            ):
                t = np.array([abs(x[top]) for x in rs if x.get(top) is not None], dtype=np.float64)
                d = np.array([x[rand] for x in rs if x.get(rand) is not None], dtype=np.float64)
                if t.size and d.size and d.mean() > 0:
                    per[m][k] = float(t.mean() / d.mean())
            low = [x["deletion_top"] > 0 for x in rs if x.get("deletion_top") is not None]
            if low:
                per["deletion_lowers"][k] = float(np.mean(low))
            ins = [x["insertion_gain"] for x in rs if x.get("insertion_gain") is not None]
            if ins:
                per["insertion_gain"][k] = float(np.mean(ins))
        out[name] = {m: _summary_over_folds(v) for m, v in per.items() if v}
    return out


def evaluate_heatmaps(
    run_dir: str | os.PathLike[str],
    cohort: str | os.PathLike[str],
    masks_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str] | None = None,
    *,
    features_dir: str | os.PathLike[str] | None = None,
    expression: str | os.PathLike[str] | None = None,
    threshold: float = 0.5,
    fraction: float = 0.1,
    draws: int = 10,
    skip_missing: bool = False,
    seed: int = 0,
    methods: tuple[str, ...] | list[str] | None = None,
    device: str = "cpu",
    progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
) -> HeatmapEvaluation:
    """Score a run's maps on its held-out slides against region masks (see the module doc).

    Parameters
    ----------
    run_dir : a ``mirror-train pretrain`` folder (all its trained folds are used).
    cohort : the cohort table (slide IDs, patients, ``subtype`` for the true-class map).
    masks_dir : one mask image per slide, ``<slide_id>.png`` / ``.tif``, non-zero = region, at
        any downsample of level 0 (read from the size ratio to the slide).
    out_dir : where the per-fold bundles are kept (``bundles/fold_<k>.mirror``; reused when
        present); None = a temporary folder.
    features_dir : the slides' feature files (default: the run's).
    expression : an expression table; when given the maps explain the combined (slide +
        expression) heads, otherwise the slide-only heads.
    threshold : region tiles have at least this fraction of their area in the mask.
    fraction, draws : the deletion test removes ``fraction`` of the tiles, ``draws`` random
        draws per slide.
    skip_missing : score only the slides that have a mask instead of raising.
    seed : of the random baseline and the random deletions.
    methods : map methods (:data:`mirror_model.maps.MAP_METHODS`); the first gives the plain
        map names, the others ``<name>@<method>``. Default: the method ``predict`` uses.
    """
    import tempfile

    from ..cohort import read_cohort
    from ..features import read_features
    from ..slide import open_slide
    from ..train.data import find_feature_files
    from ..train.run import load_run

    if not 0.0 < threshold <= 1.0:
        raise ConfigError(f"threshold must be in (0, 1]; got {threshold}.")
    if not 0.0 < fraction < 1.0:
        raise ConfigError(f"the deletion fraction must be in (0, 1); got {fraction}.")
    if int(draws) < 1:
        raise ConfigError(f"draws must be at least 1; got {draws}.")
    from ..maps import DEFAULT_MAP_METHOD, MAP_METHODS

    methods = tuple(methods) if methods else (DEFAULT_MAP_METHOD,)
    bad = [m for m in methods if m not in MAP_METHODS]
    if bad or len(set(methods)) != len(methods):
        raise ConfigError(
            f"map methods {', '.join(methods)} are invalid: give distinct names among "
            f"{', '.join(MAP_METHODS)}."
        )
    run = load_run(run_dir)
    if not run.folds:
        raise ConfigError(f"run {run_dir} has no trained fold yet; finish `mirror-train pretrain`.")
    if not any(len(run.splits.fold(k).test) for k in run.folds):
        raise ConfigError(
            f"run {run_dir} has no held-out (test) patients: heatmaps are scored only on slides "
            "the model never saw; pretrain with --folds >= 2."
        )
    coh = read_cohort(cohort)
    table = coh.table
    data = run.config.get("data", {}) or {}
    features_dir = features_dir or data.get("features_dir")
    if not features_dir:
        raise ConfigError("give --features: the run does not record its feature folder.")
    expr_table = None
    if expression is not None:
        from ..expression import read_expression

        expr_table = read_expression(expression)

    jobs: list[tuple[int, dict[str, Any]]] = []
    for k in run.folds:
        test = {str(p) for p in run.splits.fold(k).test}
        for _, row in table.iterrows():
            if str(row["patient_id"]) in test:
                jobs.append((k, dict(row)))
    if not jobs:
        raise ConfigError(
            f"none of the run's held-out patients is in {cohort}; is it the run's cohort?"
        )
    slide_ids = [str(r["slide_id"]) for _, r in jobs]
    if skip_missing:
        d = Path(masks_dir)
        if not d.is_dir():
            raise ConfigError(f"mask folder {d} does not exist.")
        from ..ids import files_by_slide

        have = set(files_by_slide(d, slide_ids, MASK_SUFFIXES)[0])
        jobs = [(k, r) for k, r in jobs if str(r["slide_id"]) in have]
        if not jobs:
            raise ConfigError(f"{d} has no mask for any held-out slide.")
        slide_ids = [str(r["slide_id"]) for _, r in jobs]
    masks = find_masks(masks_dir, slide_ids)
    feats = find_feature_files(features_dir, slide_ids)

    tmp = None
    if out_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="mirror-heatmaps-")
        bundle_dir = Path(tmp.name)
    else:
        bundle_dir = Path(out_dir) / "bundles"
    bundle_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    records: list[dict[str, Any]] = []
    descriptions: dict[str, str] = {}
    kinds: set[str] = set()
    try:
        bundles: dict[int, Any] = {}
        for i, (k, row) in enumerate(jobs):
            check_cancel(should_stop, "heatmap evaluation")
            if k not in bundles:
                report(progress, i, len(jobs), f"exporting fold {k}")
                bundles = {k: _fold_bundle(run.run_dir, k, bundle_dir, should_stop)}
            sid = str(row["slide_id"])
            rec = _score_slide(
                bundles[k],
                fold=k,
                row=row,
                features_path=feats[sid],
                mask_path=masks[sid],
                expression=expr_table,
                threshold=threshold,
                fraction=fraction,
                draws=draws,
                rng=rng,
                device=device,
                open_slide=open_slide,
                read_features=read_features,
                descriptions=descriptions,
                methods=methods,
            )
            kinds.add(rec["input_kind"])
            records.append(rec)
            report(progress, i + 1, len(jobs), "scoring held-out slides")
    finally:
        if tmp is not None:
            tmp.cleanup()
    settings = {
        "run": str(Path(run_dir).resolve()),
        "cohort": str(Path(cohort).resolve()),
        "masks": str(Path(masks_dir).resolve()),
        "folds": list(run.folds),
        "n_slides": len(records),
        "threshold": threshold,
        "deletion_fraction": fraction,
        "deletion_draws": int(draws),
        "seed": int(seed),
        "methods": list(methods),
        "expression": None if expression is None else str(Path(expression).resolve()),
        "input_kind": sorted(kinds),
        "region_share": float(np.mean([r["region_share"] for r in records])),
    }
    return HeatmapEvaluation(summarize_slides(records), records, settings, descriptions)


def _fold_bundle(run_dir: Path, fold: int, bundle_dir: Path, should_stop: StopFn | None) -> Any:
    """The fold's bundle, exported into ``bundle_dir`` once; a bundle found there is reused
    only when it is this run's fold (so an interrupted evaluation resumes cheaply, and bundles
    exported beforehand with ``mirror-train export --fold k`` are used)."""
    from ..bundle import load_bundle
    from ..errors import BundleError
    from .export import export_bundle

    path = bundle_dir / f"fold_{fold}.mirror"
    if path.is_file():
        try:
            b = load_bundle(path)
            info = json.loads((Path(run_dir) / f"fold_{fold}" / "model.json").read_text())
            src, tr = b.document.get("source") or {}, b.document.get("training") or {}
            same = (
                src.get("run") == Path(run_dir).resolve().name
                and src.get("fold") == fold
                and tr.get("best_val_loss") == info.get("best_val_loss")
            )
            if same:
                return b
        except (BundleError, OSError, ValueError):
            pass
    return export_bundle(run_dir, path, fold=fold, should_stop=should_stop).bundle


def _score_slide(
    bundle: Any,
    *,
    fold: int,
    row: dict[str, Any],
    features_path: Path,
    mask_path: Path,
    expression: Any,
    threshold: float,
    fraction: float,
    draws: int,
    rng: np.random.Generator,
    device: str,
    open_slide: Any,
    read_features: Any,
    descriptions: dict[str, str],
    methods: tuple[str, ...],
) -> dict[str, Any]:
    import torch

    from ..inference import predict
    from ..maps import encoder_kwargs, head_maps, slide_heads

    sid = str(row["slide_id"])
    kw: dict[str, Any] = {}
    if expression is not None:
        from ..ids import match_sample

        # the slide's own sample, else the patient's, matched by the table's rules (exact ID, TCGA
        # patient key, one tumour sample) as in training; predict names a patient without one
        sample = match_sample(expression, sid) or str(row["patient_id"])
        kw = {"expression_values": expression, "sample_id": sample}
    pred = predict(
        bundle, features_path=features_path, device=device, precision="fp32", maps=methods[0],
        **kw,
    )
    ff = read_features(features_path)
    dims = pred.slide_dimensions
    slide_path = row.get("slide_path")
    if dims is None and slide_path and Path(str(slide_path)).is_file():
        with open_slide(slide_path) as s:
            dims = (int(s.dimensions[0]), int(s.dimensions[1]))
    if dims is None:
        raise ConfigError(
            f"the size of slide {sid} is unknown (its feature file does not record it and the "
            "slide file is missing), so its mask's downsample cannot be read."
        )
    mask = read_region_mask(mask_path)
    ds = mask_downsample(mask.shape, dims, where=f"mask {mask_path}")
    frac = tile_region_fraction(mask, pred.coords_level0, int(pred.tile_size_level0), ds)
    region = frac >= threshold
    classes = list(pred.subtype_probabilities or {})
    true = str(row.get("subtype")) if row.get("subtype") not in (None, "") else None
    if true is not None and true not in classes:
        true = None
    heads = slide_heads(bundle, pred.input_kind, pred.rna_embedding)
    model = bundle.model
    x = torch.from_numpy(np.ascontiguousarray(ff.features, dtype=np.float32))
    cells = ff.grid_positions() if getattr(model, "needs_positions", False) else None

    def embedding(keep: np.ndarray) -> np.ndarray:
        kw = encoder_kwargs(model, None if cells is None else cells[keep], int(keep.sum()), x.device)
        with torch.no_grad():
            return model.encode_slide(x[torch.from_numpy(keep)], **kw).embedding[0].double().numpy()

    cache: dict[bytes, np.ndarray] = {}

    def emb_cached(keep: np.ndarray) -> np.ndarray:
        key = np.packbits(keep).tobytes()
        if key not in cache:
            cache[key] = embedding(keep)
        return cache[key]

    def prob_of(cls: str) -> Any:
        ci = heads.classes.index(cls)
        return lambda keep: heads.probabilities(emb_cached(keep))[ci]

    def risk(keep: np.ndarray) -> float:
        return float(heads.risk(emb_cached(keep)))

    maps: dict[str, np.ndarray] = {}
    outputs: dict[str, Any] = {}
    if true is not None:
        maps["subtype:true"] = pred.maps[f"subtype:{true}"].values
        outputs["subtype:true"] = prob_of(true)
    if pred.predicted_subtype is not None:
        maps["subtype:predicted"] = pred.maps[f"subtype:{pred.predicted_subtype}"].values
        outputs["subtype:predicted"] = prob_of(pred.predicted_subtype)
    if "risk" in pred.maps:
        maps["risk"] = pred.maps["risk"].values
        outputs["risk"] = risk
    for method in methods[1:]:
        other = head_maps(model, x, heads, method=method, precision="fp32", positions=cells)
        for name, cls in (("subtype:true", true), ("subtype:predicted", pred.predicted_subtype)):
            if name in maps:
                maps[f"{name}@{method}"] = other[f"subtype:{cls}"].values
                outputs[f"{name}@{method}"] = outputs[name]
        if "risk" in other:
            maps[f"risk@{method}"] = other["risk"].values
            outputs[f"risk@{method}"] = risk
    maps["attention"] = pred.maps["attention"].values
    maps["feature_norm"] = np.linalg.norm(np.asarray(ff.features, np.float64), axis=1)
    maps["random"] = rng.random(pred.n_tiles)
    for name in ("attention", "risk"):
        if name in pred.maps:
            descriptions[name] = pred.maps[name].description
    descriptions.setdefault("feature_norm", "L2 norm of each tile's feature vector (baseline).")
    descriptions.setdefault("random", "Uniform random values (chance baseline).")
    signed = {n: bool(pred.maps[n].signed) for n in pred.maps}
    n = pred.n_tiles
    random_sets = [rng.choice(n, n_removed(n, fraction), replace=False) for _ in range(draws)]
    default_out = outputs.get("subtype:true") or outputs.get("subtype:predicted")
    rec: dict[str, Any] = {
        "fold": int(fold),
        "slide_id": sid,
        "patient_id": str(row["patient_id"]),
        "true_subtype": true,
        "predicted_subtype": pred.predicted_subtype,
        "input_kind": pred.input_kind,
        "n_tiles": n,
        "region_share": float(region.mean()),
        "mask_downsample": ds,
        "features_path": str(features_path),
        "sample_id": pred.sample_id,
        "mask_path": str(mask_path),
        "maps": {},
    }
    for name, v in maps.items():
        base = name.split("@")[0]
        is_signed = signed.get(
            {"subtype:true": f"subtype:{true}", "subtype:predicted": f"subtype:{pred.predicted_subtype}"}.get(base, base),
            False,
        )
        order = np.lexsort((np.arange(n), -v))
        m: dict[str, Any] = {
            "auroc": binary_auroc(region, v),
            "auroc_abs": binary_auroc(region, np.abs(v)),
            "mass_ratio": mass_ratio(np.clip(v, 0.0, None) if is_signed else v - min(v.min(), 0.0), region),
            "abs_mass_ratio": mass_ratio(np.abs(v), region),
        }
        own = outputs.get(name, default_out)
        if own is not None:
            m["deletion_top"], m["deletion_random"] = deletion_effects(
                own, n, order, random_sets, fraction=fraction
            )
            m["insertion_gain"] = insertion_gain(own, n, order, random_sets, fraction=fraction)
        if name not in outputs and "risk" in outputs:
            m["deletion_top_risk"], m["deletion_random_risk"] = deletion_effects(
                risk, n, order, random_sets, fraction=fraction
            )
        rec["maps"][name] = m
    return rec


# --------------------------------------------------------------------------------------------
# files
# --------------------------------------------------------------------------------------------
def write_heatmap_results(out_dir: str | os.PathLike[str], result: HeatmapEvaluation) -> Path:
    """``DIR/heatmaps.json`` (summary) and ``DIR/heatmap_slides.json`` (per-slide records)."""
    from .._io import atomic_write_text, jsonable

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "heatmaps.json", json.dumps(jsonable(result.to_dict()), indent=1) + "\n")
    atomic_write_text(
        out / "heatmap_slides.json", json.dumps(jsonable(result.slides), indent=1) + "\n"
    )
    return out / "heatmaps.json"


_ROW_LABELS = {
    "subtype:true": "subtype map of the true class",
    "subtype:predicted": "subtype map of the predicted class",
    "risk": "risk map",
    "attention": "encoder attention",
    "feature_norm": "baseline: feature L2 norm",
    "random": "baseline: random",
}


def _row_label(name: str) -> str:
    base, _, method = name.partition("@")
    label = _ROW_LABELS.get(base, base)
    return f"{label}, {method}" if method else label


def _fmt(s: dict[str, Any] | None, digits: int = 3) -> str:
    if not s or s.get("mean") is None:
        return "–"
    return f"{s['mean']:.{digits}f} ± {s['sd']:.{digits}f} (min {s['min_fold']:.{digits}f})"


def summary_table(result: HeatmapEvaluation) -> str:
    """The Markdown table of :func:`write_heatmap_report` (also printed by the command)."""
    return "\n".join(map_rows(result.summary))


def map_rows(summary: dict[str, dict[str, dict[str, Any]]]) -> list[str]:
    """Markdown table rows (header first) of a ``heatmaps.json`` ``"maps"`` summary."""
    lines = [
        "| map | AUROC vs region | AUROC of \\|map\\| | mass / share | \\|mass\\| / share "
        "| deletion ratio | deletion ratio (risk) | top removal lowers output | insertion gain |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, m in summary.items():
        lines.append(
            f"| {_row_label(name)} (`{name}`) | {_fmt(m.get('auroc'))} "
            f"| {_fmt(m.get('auroc_abs'))} | {_fmt(m.get('mass_ratio'), 2)} "
            f"| {_fmt(m.get('abs_mass_ratio'), 2)} | {_fmt(m.get('deletion_ratio'), 2)} "
            f"| {_fmt(m.get('deletion_ratio_risk'), 2)} | {_fmt(m.get('deletion_lowers'), 2)} "
            f"| {_fmt(m.get('insertion_gain'), 3)} |"
        )
    return lines


def write_heatmap_report(
    out_dir: str | os.PathLike[str],
    result: HeatmapEvaluation,
    *,
    n_examples: int = 3,
    device: str = "cpu",
) -> Path:
    """``DIR/report.md`` with the summary table and example slides
    (``DIR/figures/heatmap_examples.png``: thumbnail with the region outlined, the true-class
    map, the risk map and the attention), using the per-fold bundles in ``DIR/bundles``."""
    from .._io import atomic_write_text

    out = Path(out_dir)
    s = result.settings
    fig_rel = "figures/heatmap_examples.png"
    made = _example_figure(out / fig_rel, result, n_examples, device) if n_examples > 0 else False
    kinds = ", ".join(s.get("input_kind", []))
    text = [
        "# Per-tile maps vs region masks (held-out slides)",
        "",
        f"Run `{s['run']}`, cohort `{s['cohort']}`, masks `{s['masks']}`: {s['n_slides']} "
        f"held-out slides over folds {', '.join(map(str, s['folds']))}, each scored with the "
        f"model of the fold that held it out (heads: {kinds}). A tile is in the region when at "
        f"least {s['threshold']:g} of it is; the region covers {100 * s['region_share']:.0f} % "
        "of the tiles on average.",
        "",
        "Each cell: mean ± sd over folds of the fold means (min = the worst fold). AUROC: 0.5 = "
        "chance. Mass / share: the map's positive mass on region tiles relative to the region's "
        "share of tiles (1 = no preference). Deletion ratio: how much the displayed output "
        f"changes when the map's top {100 * s['deletion_fraction']:g} % of tiles are removed, "
        f"over the mean change for {s['deletion_draws']} random removals of as many tiles "
        "(subtype maps: probability of their class; risk map: risk score; the other rows: "
        "probability of the true class, and the risk score in the next column). Insertion "
        "gain: the same output for a slide made of the top tiles only minus that for slides "
        "made of the random draws only (> 0 = the top tiles alone carry the output up).",
        "",
        summary_table(result),
        "",
        "What each map means:",
        "",
        *[f"- `{k}`: {v}" for k, v in result.descriptions.items()],
        "",
    ]
    if made:
        text += [
            "## Example slides",
            "",
            "Best, median and worst held-out slide by the true-class map's AUROC: slide with "
            "the region outlined; evidence for the true class and for higher risk (red = for, "
            "blue = against, colour range ±99th percentile of |value|); encoder attention.",
            "",
            f"![examples]({fig_rel})",
            "",
        ]
    path = out / "report.md"
    atomic_write_text(path, "\n".join(text))
    return path


def _example_figure(
    out_png: Path, result: HeatmapEvaluation, n: int, device: str
) -> bool:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    from .._io import atomic_path
    from ..bundle import load_bundle
    from ..cohort import read_cohort
    from ..inference import predict
    from ..slide import open_slide

    key = "subtype:true" if any("subtype:true" in r["maps"] for r in result.slides) else "risk"
    scored = [r for r in result.slides if key in r["maps"] and np.isfinite(r["maps"][key]["auroc"])]
    if not scored:
        return False
    scored.sort(key=lambda r: r["maps"][key]["auroc"])
    idx = np.unique(np.linspace(0, len(scored) - 1, n).round().astype(int))[::-1]
    chosen = [scored[i] for i in idx]
    out_dir = out_png.parent.parent
    table = read_cohort(result.settings["cohort"]).table.set_index("slide_id")
    cols = 4
    fig, axes = plt.subplots(len(chosen), cols, figsize=(3.2 * cols, 3.2 * len(chosen)), squeeze=False)
    for row, r in zip(axes, chosen, strict=True):
        sid = r["slide_id"]
        bundle = load_bundle(out_dir / "bundles" / f"fold_{r['fold']}.mirror")
        slide_path = str(table.loc[sid, "slide_path"])
        expr = result.settings.get("expression")
        pred = predict(
            bundle, features_path=r["features_path"], expression_path=expr,
            sample_id=r.get("sample_id") if expr else None, device=device, precision="fp32",
        )
        with open_slide(slide_path) as slide:
            thumb = np.asarray(slide.get_thumbnail(400))
            w0, h0 = slide.dimensions
        mask = read_region_mask(r["mask_path"])
        sx, sy = thumb.shape[1] / w0, thumb.shape[0] / h0
        size = int(pred.tile_size_level0)
        panels = [("slide + region", None, False)]
        if r["true_subtype"] is not None:
            panels.append((f"evidence for {r['true_subtype']}", f"subtype:{r['true_subtype']}", True))
        if "risk" in pred.maps:
            panels.append(("evidence for higher risk", "risk", True))
        panels.append(("attention", "attention", False))
        for ax, (title, name, signed) in zip(row, panels + [None] * (cols - len(panels)), strict=True):
            ax.set_axis_off()
            if title is None:
                continue
            ax.imshow(thumb)
            ax.contour(
                np.linspace(0, thumb.shape[1], mask.shape[1]),
                np.linspace(0, thumb.shape[0], mask.shape[0]),
                mask.astype(float), levels=[0.5], colors="lime", linewidths=0.8,
            )
            if name is not None:
                m = pred.maps[name]
                lo, hi = m.display_range()
                grid = np.full((int(np.ceil(h0 / size)), int(np.ceil(w0 / size))), np.nan)
                gx = (pred.coords_level0[:, 0] // size).astype(int)
                gy = (pred.coords_level0[:, 1] // size).astype(int)
                grid[gy, gx] = m.values
                ax.imshow(
                    grid, cmap="RdBu_r" if signed else "inferno", vmin=lo, vmax=hi, alpha=0.75,
                    extent=(0, grid.shape[1] * size * sx, grid.shape[0] * size * sy, 0),
                    interpolation="nearest",
                )
                au = r["maps"].get({"attention": "attention", "risk": "risk"}.get(name, "subtype:true"), {})
                title += f"\nAUROC {au.get('auroc', float('nan')):.2f}"
            else:
                title = f"{sid} (fold {r['fold']})\n{title}"
            ax.set_title(title, fontsize=8)
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, dpi=80, format="png")
    plt.close(fig)
    return True
