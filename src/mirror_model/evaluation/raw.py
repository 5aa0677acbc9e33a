"""Raw-input baselines on the same folds as the pretrained encoders they are compared with.

A pretrained encoder is only worth its training if its frozen embedding beats its own inputs.
:func:`evaluate_raw` evaluates, with exactly the heads and folds of
:func:`~mirror_model.evaluation.evaluate.evaluate_embeddings`, two embeddings that need no
training:

- ``slide``: the **mean of the tile features** of each slide (all tiles, or the same seeded
  ``max_tiles`` subset that ``evaluate`` uses), averaged over a patient's slides — what mean
  pooling keeps of the patch encoder's output;
- ``rna``: the **normalised genes** — with a run, each fold's own stored preprocessing (the
  genes and normalisation that fold's model was given, fitted on its training patients);
  without a run, all non-constant genes normalised on each fold's training patients (train +
  val; log1p decided from the data, then z-scores).
- ``both``: the two concatenated, as for the encoders.

The heads standardise their inputs themselves (fitted on the training patients), so raw
features with very different scales per dimension are compared fairly.

Folds: a run's ``splits.json``; without a run, :func:`~mirror_model.train.splits.make_splits`
with the given ``folds`` / ``seed`` / ``inner_val_fraction`` — the folds a ``pretrain`` with the
same options makes, so the raw row can be computed before any pretraining.

Either modality may be missing: without a feature folder the slide input is null (a note says
so), without an expression table the RNA input is null.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .._progress import ProgressFn, StopFn, check_cancel, report
from ..errors import ConfigError, FeatureFileError
from .evaluate import EvaluationResult, EvaluationSettings, FoldEmbeddings, evaluate_embeddings

__all__ = ["RAW_NAME", "evaluate_raw", "mean_pooled_features"]

#: Display name of the raw-input row in a comparison (``metrics.json["runs"]["raw"]``).
RAW_NAME = "raw"


def _subsample(n: int, max_tiles: int | None, seed: int) -> np.ndarray | None:
    from ..train.run import _subsample as run_subsample

    return run_subsample(n, max_tiles, seed)


def mean_pooled_features(
    features_dir: str | os.PathLike[str],
    slides: Sequence[Sequence[str]],
    *,
    max_tiles: int | None = None,
    progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
) -> np.ndarray:
    """Mean tile feature of each patient: ``[P, D]`` float64 (a row of NaN = no slide).

    ``slides[i]`` are patient i's slide ids; a patient's value is the mean over its slides of
    each slide's mean tile feature (as ``evaluate`` averages a patient's slide embeddings).
    ``max_tiles`` takes the same seeded tile subset per slide as ``evaluate --max-tiles``.
    """
    from ..features import read_features
    from ..train.data import find_feature_files

    wanted = [str(s) for sl in slides for s in sl if s is not None and str(s)]
    paths = find_feature_files(features_dir, wanted)
    rows: list[np.ndarray | None] = []
    dim: int | None = None
    for i, sl in enumerate(slides):
        check_cancel(should_stop, "raw features")
        means = []
        for sid in [str(s) for s in sl if s is not None and str(s)]:
            feats = np.asarray(read_features(paths[sid]).features, dtype=np.float64)
            if dim is None:
                dim = feats.shape[1]
            elif feats.shape[1] != dim:
                raise FeatureFileError(
                    f"feature file {paths[sid]} has {feats.shape[1]}-d features but others have "
                    f"{dim}-d; extract all slides with one patch encoder."
                )
            keep = _subsample(feats.shape[0], max_tiles, seed=zlib.crc32(sid.encode()))
            means.append((feats if keep is None else feats[keep]).mean(axis=0))
        rows.append(np.mean(means, axis=0) if means else None)
        report(progress, i + 1, len(slides), "mean-pooling tile features")
    if dim is None:
        raise ConfigError("no patient has a slide; the slide input cannot be evaluated.")
    return np.stack([r if r is not None else np.full(dim, np.nan) for r in rows])


def _labels(pat: Any, name: str, dtype: Any) -> np.ndarray | None:
    if name not in pat:
        return None
    vals = pat[name].to_numpy()
    if dtype is object:
        return np.asarray(
            [None if v is None or (isinstance(v, float) and np.isnan(v)) else str(v) for v in vals],
            dtype=object,
        )
    return np.asarray(vals, dtype=np.float64)


def evaluate_raw(
    run_dir: str | os.PathLike[str] | None = None,
    settings: EvaluationSettings | None = None,
    *,
    cohort: Any = None,
    expression: Any = None,
    features_dir: str | os.PathLike[str] | None | bool = None,
    splits: Any = None,
    folds: int = 5,
    seed: int = 42,
    inner_val_fraction: float = 0.15,
    max_tiles: int | None = None,
    progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
    **overrides: Any,
) -> EvaluationResult:
    """Evaluate the raw inputs (mean-pooled tile features, normalised genes) on CV folds.

    Parameters
    ----------
    run_dir
        A pretraining run whose folds (``splits.json``), per-fold gene preprocessing and input
        paths (``config.yaml``) are used; None evaluates a cohort without any run.
    settings, overrides
        :class:`~mirror_model.evaluation.evaluate.EvaluationSettings` (heads, k-shots, seed).
    cohort, expression, features_dir
        Inputs (paths or read objects). With a run they default to the run's own; pass
        ``features_dir=False`` / ``expression=False`` to leave a modality out. Without a run a
        missing ``features_dir`` / ``expression`` leaves that modality out.
    splits
        A :class:`~mirror_model.train.splits.Splits` to use instead of the run's / new ones.
    folds, seed, inner_val_fraction
        How new splits are made when there is neither a run nor ``splits`` (as ``pretrain``).
    max_tiles
        Mean over the same seeded subset of at most this many tiles per slide as ``evaluate``.

    Returns
    -------
    EvaluationResult
        The same metric tree as a run's evaluation; ``notes`` start with what the raw inputs are.
    """
    from ..cohort import Cohort, read_cohort
    from ..expression import read_expression
    from ..train.splits import make_splits, patient_subtypes

    run = None
    data: dict[str, Any] = {}
    if run_dir is not None:
        from ..train.run import load_run

        if not Path(run_dir).is_dir():
            raise ConfigError(f"run folder {run_dir} does not exist.")
        run = load_run(run_dir)
        data = dict(run.config.get("data", {}) or {})
    if cohort is None:
        cohort = data.get("cohort")
        if not cohort:
            raise ConfigError(
                "raw-input evaluation needs a cohort table: pass cohort= (--cohort) or a run folder."
            )
    coh = cohort if isinstance(cohort, Cohort) else read_cohort(cohort)
    if expression is None:
        expression = data.get("expression") or False
    if features_dir is None:
        features_dir = data.get("features_dir") or False
    if expression is False and features_dir is False:
        raise ConfigError(
            "raw-input evaluation needs an expression table or a feature folder (or both)."
        )

    pat = coh.patients()
    ids = [str(p) for p in pat["patient_id"]]
    if splits is None:
        splits = (
            run.splits
            if run is not None
            else make_splits(ids, patient_subtypes(coh.table), folds, inner_val_fraction, seed)
        )
    fold_splits = list(splits.folds)
    notes: list[str] = []

    slide = None
    if features_dir is not False:
        slides = [list(v) if isinstance(v, (list, tuple)) else [] for v in pat["slide_ids"]]
        slide = mean_pooled_features(
            features_dir, slides, max_tiles=max_tiles, progress=progress, should_stop=should_stop
        )
        notes.append(
            f"raw inputs: slide = mean of each slide's {slide.shape[1]}-d tile features"
            + (f" (at most {max_tiles} tiles per slide)" if max_tiles else " (all tiles)")
            + ", averaged over a patient's slides."
        )
    else:
        notes.append("raw inputs: no feature folder; the slide input is not evaluated.")

    expr = None
    if expression is not False:
        expr = (
            expression
            if hasattr(expression, "rows_for")
            # a run's table is read as the run read it (its missing-value policy)
            else read_expression(expression, nan_policy=data.get("expression_nan_policy") or "error")
        )
        notes.append(
            "raw inputs: rna = "
            + (
                "each fold's stored gene preprocessing (the genes and normalisation its model saw)."
                if run is not None
                else "all non-constant genes, normalised on each fold's training patients."
            )
        )
    else:
        notes.append("raw inputs: no expression table; the RNA input is not evaluated.")

    subtype = _labels(pat, "subtype", object)
    time = _labels(pat, "time", float)
    event = _labels(pat, "event", float)
    per_fold: list[FoldEmbeddings] = []
    for fs in fold_splits:
        check_cancel(should_stop, "raw-input evaluation")
        rna = None
        if expr is not None:
            prep = _fold_preprocessing(run, fs, expr)
            rna = np.asarray(prep.transform(expr, patient_ids=ids), dtype=np.float64)
        per_fold.append(FoldEmbeddings(ids, slide, rna, subtype, time, event))
    result = evaluate_embeddings(
        per_fold, fold_splits, settings, progress=progress, should_stop=should_stop, **overrides
    )
    result.notes[:0] = notes
    return result


def _fold_preprocessing(run: Any, split: Any, expr: Any) -> Any:
    """The gene preprocessing of one fold: the run's stored one, or fitted on its training patients."""
    from ..genes import Preprocessing, fit_preprocessing

    if run is not None:
        import json

        from ..train.run import fold_dirname

        mpath = Path(run.run_dir) / fold_dirname(split.fold) / "model.json"
        if mpath.is_file():
            try:
                doc = json.loads(mpath.read_text())
            except (OSError, ValueError) as exc:
                raise ConfigError(f"{mpath} cannot be read: {exc}") from None
            if doc.get("preprocessing"):
                return Preprocessing.from_dict(doc["preprocessing"])
    train = [*split.train, *split.val]
    return fit_preprocessing(expr, train, None, None, select=False)
