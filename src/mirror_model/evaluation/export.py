"""Export one fold of a pretraining run as a deployable model bundle (``mirror-train export``).

Training-side work: it embeds the fold's patients with the fold's frozen encoders and fits
the bundle's heads with the same functions as the evaluation (:mod:`.heads`), then writes
the bundle with :func:`mirror_model.bundle.save_bundle`. Loading a bundle for inference never
imports this module.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .._kinds import INPUT_KINDS, input_matrix
from .._progress import ProgressFn, StopFn, check_cancel, report
from ..bundle import Bundle, build_document, headline_metrics, load_bundle, save_bundle
from ..errors import BundleError, MirrorError
from ..train.final import FINAL
from .evaluate import FoldEmbeddings
from .heads import HeadTargets, finite_rows, fit_subtype_probe, fit_survival_head, km_by_risk_group
from .metrics import c_index, classification_metrics
from .survival import CoxHead, logrank_test, risk_groups

__all__ = ["ExportResult", "export_bundle"]


@dataclass
class ExportResult:
    """What :func:`export_bundle` wrote.

    Attributes
    ----------
    path : the bundle written.  fold : the fold whose model it holds (``"final"``: the model
        trained on all patients).
    bundle : the bundle as loaded back from ``path`` (validated).
    reference_metrics : held-out numbers per input kind (``auroc_macro``, ``accuracy``,
        ``c_index``, ``n``): of this fold's heads on its test patients, or for ``"final"`` the
        folds' pooled out-of-fold predictions.
    notes : choices worth telling the user (e.g. no test patients in a no-CV run).
    """

    path: Path
    fold: int | str
    bundle: Bundle
    reference_metrics: dict[str, dict[str, Any]]
    notes: list[str]


_METRICS_CANDIDATES = ("metrics.json", "evaluation/metrics.json", "eval/metrics.json")


def _find_metrics(run_dir: Path, metrics_path: str | os.PathLike[str] | None) -> dict[str, Any]:
    if metrics_path is not None:
        p = Path(metrics_path)
        if not p.is_file():
            raise BundleError(f"metrics file {p} does not exist (from mirror-train evaluate).")
        cands = [p]
    else:
        cands = [run_dir / c for c in _METRICS_CANDIDATES if (run_dir / c).is_file()]
    for p in cands:
        try:
            doc = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise BundleError(f"cannot read validation metrics {p}: {exc}") from None
        if isinstance(doc, dict) and "runs" in doc and isinstance(doc["runs"], dict):
            # a comparison file: take the entry of this run (by folder name) if present
            doc = doc["runs"].get(run_dir.name) or next(iter(doc["runs"].values()), {})
        if isinstance(doc, dict):
            # the file name only: a shipped bundle must not carry the builder's folder layout
            return {"source": p.name, **doc}
    return {}


def _encoder_spec(enc: Mapping[str, Any]) -> dict[str, Any]:
    """The patch-encoder spec of a run: from the feature files' attrs, else the registry."""
    attrs = dict(enc.get("attrs") or {})
    spec = enc.get("encoder_spec") or attrs.get("encoder_spec")
    if isinstance(spec, str):
        try:
            spec = json.loads(spec)
        except ValueError:
            spec = None
    if not isinstance(spec, dict):
        spec = None
        name = enc.get("name")
        if name:
            try:  # weight-free encoders (stain-texture) can describe themselves
                from ..patch_encoders import create_patch_encoder

                spec = create_patch_encoder(str(name)).spec.to_dict()
            except Exception:
                spec = None
        if spec is None:
            spec = {"name": str(name or "unknown")}
    spec = dict(spec)
    spec.setdefault("name", str(enc.get("name") or "unknown"))
    if enc.get("dim") is not None:
        spec["dim"] = int(enc["dim"])
    return spec


def _anonymous_preprocessing(d: Mapping[str, Any]) -> dict[str, Any]:
    """The preprocessing record without the training patients' IDs (only their number):
    a bundle is shared beyond the institution that trained it."""
    out = dict(d)
    ids = out.pop("train_patient_ids", None)
    if ids is not None:
        out["n_train_patients"] = len(ids)
    return out


def _feature_attrs(features_dir: Any) -> dict[str, Any]:
    """Attributes of one of the run's feature files (tiling facts such as tissue_threshold)."""
    if not features_dir or not Path(features_dir).is_dir():
        return {}
    from ..errors import MirrorError
    from ..features import read_features

    for p in sorted(Path(features_dir).glob("*.h5"))[:1]:
        try:
            ff = read_features(p, load_features=False)
        except MirrorError:
            return {}
        return {k: v for k, v in ff.attrs.items() if k in ("tissue_threshold", "tile_px")} | (
            {"target_mpp": ff.target_mpp} if ff.target_mpp else {}
        )
    return {}


# --------------------------------------------------------------------------------------------
# the export, step by step
# --------------------------------------------------------------------------------------------
@dataclass
class _PatientSets:
    """Whom the heads are fitted on and who forms the reference cohort (ids and rows)."""

    fit_ids: list[str]
    ref_ids: list[str]
    notes: list[str] = field(default_factory=list)


def _final_patient_sets(patient_ids: list[str]) -> _PatientSets:
    return _PatientSets(
        list(patient_ids),
        [],
        [
            "the model was trained on all patients (RUN/final); its heads were fitted on all "
            "patients' embeddings. Reference cohort: the risk percentile is taken among the "
            "training patients' own (in-sample) risks; the Kaplan-Meier curves, risk groups' "
            "log-rank test and reference metrics are out-of-fold (each patient scored by the "
            "fold model and heads that never saw it)."
        ],
    )


def _patient_sets(split: Any) -> _PatientSets:
    fit_ids = [str(p) for p in list(split.train) + list(split.val)]
    ref_ids = [str(p) for p in split.test]
    if ref_ids:
        return _PatientSets(fit_ids, ref_ids)
    return _PatientSets(
        [str(p) for p in split.train],
        [str(p) for p in split.val],
        [
            "the run has no test patients (no cross-validation): heads were fitted on the "
            "training patients and the inner-validation patients form the reference cohort."
        ],
    )


def _load_fold(run_path: Path, fold: int | str | None) -> tuple[Any, int | str]:
    """The run (``load_run``) and the fold to export (default: 0, or the only model;
    ``"final"``: the model trained on all patients)."""
    from ..train.run import load_run

    try:
        run = load_run(run_path)
    except MirrorError as exc:
        raise BundleError(f"cannot export {run_path}: {exc}") from None
    if not run.folds:
        raise BundleError(
            f"run {run_path} has no trained fold model yet (no fold_<k>/best.safetensors); "
            "finish `mirror-train pretrain` first."
        )
    if fold == FINAL:
        if not (run_path / FINAL / "model.json").is_file():
            raise BundleError(
                f"run {run_path} has no final model (trained on all patients) yet; export with "
                "--refit to train it first."
            )
        return run, FINAL
    if fold is None:
        fold = 0 if 0 in run.folds else run.folds[0]
    if fold not in run.folds:
        raise BundleError(
            f"fold {fold} of run {run_path} has no trained model; available folds: "
            f"{', '.join(map(str, run.folds))}."
        )
    return run, int(fold)  # type: ignore[arg-type]


@dataclass
class _KindHeads:
    """The heads of one input kind and what the reference cohort says about them."""

    heads: dict[str, Any] = field(default_factory=dict)
    risk: dict[str, Any] | None = None
    reference: dict[str, Any] | None = None
    metrics: dict[str, Any] = field(default_factory=dict)


def _fit_kind(
    kind: str,
    X: np.ndarray,
    targets: HeadTargets,
    fit: np.ndarray,
    ref: np.ndarray,
    seed: int,
    notes: list[str],
) -> _KindHeads:
    """Subtype probe and Cox head of one input kind, fitted on ``fit`` rows, scored on ``ref``."""
    fit_ok, ref_ok = finite_rows(X, fit), finite_rows(X, ref)
    out = _KindHeads(metrics={"n": int(ref_ok.size)})
    tr, te = targets.subtype_rows(fit_ok), targets.subtype_rows(ref_ok)
    probe = fit_subtype_probe(X, targets, tr, C="cv", seed=seed)
    if probe is not None:
        out.heads["subtype"] = probe
        if te.size:
            assert targets.labels is not None
            m = classification_metrics(
                targets.labels[te], probe.predict_proba(X[te]), probe.classes_.tolist()
            )
            out.metrics.update({k: m.get(k) for k in ("auroc_macro", "accuracy", "f1_macro")})
    if not targets.has_survival:
        return out
    tr_s, te_s = targets.survival_rows(fit_ok), targets.survival_rows(ref_ok)
    try:
        surv = fit_survival_head(CoxHead(penalizer="cv", seed=seed), X, targets, tr_s)
    except MirrorError as exc:
        notes.append(f"no survival head for input {kind!r}: {exc}")
        return out
    out.heads["survival"] = surv.head
    out.risk = {
        "cutoff": surv.risk_cutoff,
        "method": "median risk of the training patients",
        "groups": ["low", "high"],
        "direction": "higher = worse prognosis",
    }
    if te_s.size:
        r = surv.head.predict_risk(X[te_s])
        out.reference = _reference_cohort(targets, te_s, r, surv.risk_cutoff)
        assert targets.time is not None and targets.event is not None
        out.metrics["c_index"] = c_index(targets.time[te_s], targets.event[te_s], r)
    return out


def _reference_cohort(
    targets: HeadTargets, rows: np.ndarray, risk: np.ndarray, cutoff: float
) -> dict[str, Any]:
    """Risk, outcome, group and KM curves of the reference patients — anonymous on purpose:
    a shared bundle must not carry patient barcodes."""
    assert targets.time is not None and targets.event is not None
    t, e = targets.time[rows], targets.event[rows]
    g = risk_groups(risk, cutoff)
    curves = km_by_risk_group(t, e, g)
    for grp, curve in curves.items():
        curve.update(n=int(np.sum(g == grp)), n_events=int(np.sum(e[g == grp])))
    lr = logrank_test(t, e, g)
    return {
        "risk": np.asarray(risk, np.float64),
        "time": t,
        "event": e.astype(np.int64),
        "group": g.tolist(),
        "km": curves,
        "logrank_p": None if not np.isfinite(lr.p_value) else lr.p_value,
    }


def _bundle_metrics(
    run_path: Path,
    metrics_path: str | os.PathLike[str] | None,
    fold: int | str,
    ref_metrics: Mapping[str, Any],
    notes: list[str],
) -> dict[str, Any]:
    """The run's evaluate metrics (+ headline) and this fold's reference-cohort numbers."""
    metrics = _find_metrics(run_path, metrics_path)
    if metrics:
        metrics["headline"] = headline_metrics(metrics)
    else:
        notes.append(
            "no metrics.json from `mirror-train evaluate` was found: the bundle carries only this "
            "fold's reference-cohort numbers (run evaluate first for cross-validated metrics)."
        )
    metrics["reference_fold"] = {
        "fold": fold,
        **({"source": "out-of-fold predictions of the cross-validation"} if fold == FINAL else {}),
        **ref_metrics,
    }
    return metrics


def _n_slides(data: Mapping[str, Any]) -> int | None:
    from ..cohort import read_cohort

    try:
        cohort = read_cohort(data["cohort"]) if data.get("cohort") else None
    except MirrorError:
        return None
    if cohort is None:
        return None
    return len(cohort) if cohort.has_slides else 0  # an expression-only cohort: no slides


def _tiling(run_path: Path, enc: Mapping[str, Any], attrs: Mapping[str, Any]) -> dict[str, Any]:
    target_mpp = enc.get("target_mpp") or attrs.get("target_mpp")
    tile_px = enc.get("tile_px") or attrs.get("tile_px") or attrs.get("patch_size")
    if target_mpp is None or tile_px is None:
        raise BundleError(
            f"run {run_path}: the feature files do not record their tiling (target_mpp "
            f"{target_mpp}, tile_px {tile_px}); re-extract them with `mirror-train extract`."
        )
    tiling = {"target_mpp": float(target_mpp), "tile_px": int(tile_px)}
    if attrs.get("tissue_threshold") is not None:
        tiling["tissue_threshold"] = float(attrs["tissue_threshold"])
    return tiling


def _provenance(
    given: Mapping[str, Any] | None, out: str | os.PathLike[str], training: Mapping[str, Any]
) -> dict[str, Any]:
    from ..bundle._provenance import ModelProvenance, describe_training

    part = ModelProvenance.check(dict(given or {}), "export_bundle(provenance=...)")
    part.setdefault("name", Path(out).stem)
    part.setdefault("synthetic", False)
    part.setdefault("training_data", describe_training(training, part["synthetic"]))
    return part
def _out_of_fold(
    run_path: Path,
    metrics_path: str | os.PathLike[str] | None,
    evaluation_path: str | os.PathLike[str] | None,
    device: str,
    should_stop: StopFn | None,
) -> dict[str, Any]:
    """Out-of-fold test predictions of the run's folds: ``{task: {kind: columns}}``.

    From ``evaluation_path`` or the ``evaluation.json`` beside the run's ``metrics.json``
    (``mirror-train evaluate``) when it has them, else evaluated here (subtype probe and Cox
    head, the evaluate defaults).
    """
    cands = []
    if evaluation_path is not None:
        p = Path(evaluation_path)
        if not p.is_file():
            raise BundleError(f"evaluation file {p} does not exist (from mirror-train evaluate).")
        cands.append(p)
    if metrics_path is not None:
        cands.append(Path(metrics_path).with_name("evaluation.json"))
    cands += [run_path / Path(c).with_name("evaluation.json") for c in _METRICS_CANDIDATES]
    for p in cands:
        if not p.is_file():
            continue
        try:
            doc = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(doc.get("runs"), dict):
            doc = doc["runs"].get(run_path.name) or {}
        pred = doc.get("predictions") if isinstance(doc, dict) else None
        if isinstance(pred, dict) and pred.get("survival_cox") or pred and pred.get("subtype_linear"):
            return pred
    from .evaluate import evaluate_run

    res = evaluate_run(run_path, None, device=device, should_stop=should_stop, k_shots=())
    return res.predictions


def _final_reference(
    kind: str,
    kh: _KindHeads,
    X: np.ndarray | None,
    targets: HeadTargets,
    fit: np.ndarray,
    oof: Mapping[str, Any],
) -> None:
    """Reference cohort and metrics of the final model's heads for one input kind.

    Percentile basis: the final Cox head's (in-sample) risks of the training patients. Kaplan-
    Meier curves, log-rank p and metrics: the folds' out-of-fold predictions (honest).
    """
    sub = (oof.get("subtype_linear") or {}).get(kind)
    if sub and sub.get("proba"):
        m = classification_metrics(
            np.asarray(sub["y_true"], dtype=object), np.asarray(sub["proba"]), sub["classes"]
        )
        kh.metrics.update({k: m.get(k) for k in ("auroc_macro", "accuracy", "f1_macro")})
    kh.metrics["n"] = int(len((sub or {}).get("y_true", [])))
    surv = (oof.get("survival_cox") or {}).get(kind)
    head = kh.heads.get("survival")
    if head is None or X is None or not surv or not surv.get("risk"):
        return
    rows = targets.survival_rows(finite_rows(X, fit))
    assert targets.time is not None and targets.event is not None
    risk_in = head.predict_risk(X[rows])
    t, e = np.asarray(surv["time"], np.float64), np.asarray(surv["event"], np.float64)
    g = np.asarray(surv["group"])
    curves = km_by_risk_group(t, e, g)
    for grp, curve in curves.items():
        curve.update(n=int(np.sum(g == grp)), n_events=int(np.sum(e[g == grp])))
    lr = logrank_test(t, e, g)
    kh.reference = {
        "risk": np.asarray(risk_in, np.float64),
        "time": targets.time[rows],
        "event": targets.event[rows].astype(np.int64),
        "group": risk_groups(risk_in, kh.risk["cutoff"] if kh.risk else float("nan")).tolist(),
        "km": curves,
        "logrank_p": None if not np.isfinite(lr.p_value) else lr.p_value,
        "source": {
            "risk": "the final model's Cox head on its training patients (in-sample); the basis "
            "of the risk percentile",
            "km": "out-of-fold: each patient grouped by the fold model and heads that never saw "
            "it (cross-validation)",
        },
    }
    kh.metrics["c_index"] = c_index(t, e, np.asarray(surv["risk"], np.float64))
    kh.metrics["n"] = int(t.size)


def export_bundle(
    run_dir: str | os.PathLike[str],
    out: str | os.PathLike[str],
    fold: int | str | None = None,
    *,
    refit: bool = False,
    metrics_path: str | os.PathLike[str] | None = None,
    evaluation_path: str | os.PathLike[str] | None = None,
    device: str = "cpu",
    seed: int = 0,
    provenance: Mapping[str, Any] | None = None,
    progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
) -> ExportResult:
    """Export a pretraining run's deployable model as a bundle.

    Which model: with ``refit=True`` (or ``fold="final"``, or by default when ``RUN/final``
    exists) the **model trained on all patients** for the number of epochs the folds validated
    (:func:`mirror_model.train.refit_final`, trained first when missing). Its heads are
    fitted on all patients' embeddings; the risk cut-off is their median risk; the risk
    percentile is taken among their (in-sample) risks; the reference Kaplan-Meier curves,
    log-rank test and ``metrics["reference_fold"]`` are **out-of-fold** — every patient scored
    by the fold model and heads that never saw it (from the run's ``evaluation.json`` next to
    its ``metrics.json``, or computed here).

    Otherwise the best checkpoint of ``fold`` (default: fold 0, or the single model of a
    no-CV run). Heads: a :class:`~mirror_model.evaluation.probes.LinearProbe` (subtype) and a
    :class:`~mirror_model.evaluation.survival.CoxHead` (survival) for each input kind
    (``slide``, ``rna``, ``both`` = concatenation), fitted on the frozen embeddings of that
    fold's **non-test** patients (train + val) with :mod:`.heads`, as in the evaluation.
    Risk cut-off: median risk of those patients. Reference cohort: the fold's **test**
    patients (never seen by the model or the heads); for a no-CV run (no test patients) the
    heads are fitted on the training patients and the inner-validation patients serve as
    reference. Validation metrics: the run's ``metrics.json`` from ``mirror-train evaluate``
    (all folds, honest) when present.

    Parameters
    ----------
    run_dir : the ``mirror-train pretrain`` output folder.
    out : the ``.mirror`` file to write (or a folder: see :func:`save_bundle`).
    fold : the fold to export.
    refit : train (if needed) and export the model trained on all patients.
    metrics_path : an evaluate ``metrics.json`` (default: looked for in ``run_dir``).
    evaluation_path : the evaluate ``evaluation.json`` whose out-of-fold predictions give the
        final model's reference curves (default: beside ``metrics_path`` or in ``run_dir``).
    device : where to embed the patients.
    seed : seed of the heads' inner cross-validation.
    provenance : what every prediction of the bundle will show about the model: ``name``
        (default: the output file's stem), ``training_data`` (default: the patients, slides
        and subtypes of the run, in words), ``intended_use`` (default: none stated, which the
        plugin flags), ``synthetic`` (default False) and ``survival_time_unit`` (e.g.
        ``"months"``; default: not recorded). The bundle records no path of this machine:
        the run is named by its folder name only.
    """
    from ..train.run import embed_patients, load_fold_model, run_is_expression_only

    run_path = Path(run_dir)
    if refit:
        if fold not in (None, FINAL):
            raise BundleError(
                f"refit exports the model trained on all patients; it cannot export fold {fold}."
            )
        from ..train.final import refit_final

        refit_final(run_path, progress=progress, should_stop=should_stop)
        fold = FINAL
    elif fold is None and (run_path / FINAL / "model.json").is_file():
        fold = FINAL
    run, fold = _load_fold(run_path, fold)
    final = fold == FINAL
    check_cancel(should_stop, "export")
    report(progress, 0, 3, "loading model")
    fm = load_fold_model(run_path, fold, "cpu")
    report(progress, 1, 3, "embedding patients")
    emb = FoldEmbeddings.from_any(
        embed_patients(run_path, fold, device=device, precision="fp32", should_stop=should_stop)
    )
    report(progress, 2, 3, "fitting heads")
    if final:
        sets = _final_patient_sets(emb.patient_ids)
    else:
        sets = _patient_sets(run.splits.fold(fold))
        if any(f.test for f in run.splits.folds):
            sets.notes.append(
                f"the bundle holds fold {fold}'s model (trained on its training patients only); "
                "export with --refit for the model trained on all patients."
            )
    notes = sets.notes
    row = {p: i for i, p in enumerate(emb.patient_ids)}
    missing = [p for p in sets.fit_ids + sets.ref_ids if p not in row]
    if missing:
        raise BundleError(
            f"{len(missing)} patients of fold {fold} have no embedding (e.g. {missing[:3]}); the "
            "run's cohort changed since pretraining."
        )
    fit = np.array([row[p] for p in sets.fit_ids], dtype=np.int64)
    ref = np.array([row[p] for p in sets.ref_ids], dtype=np.int64)
    targets = HeadTargets.from_arrays(len(row), emb.subtype, emb.time, emb.event)

    per_kind: dict[str, _KindHeads] = {}
    for kind in INPUT_KINDS:
        check_cancel(should_stop, "export")
        X = input_matrix(emb.slide, emb.rna, kind)
        if X is not None:
            kh = _fit_kind(kind, X, targets, fit, ref, seed, notes)
            if kh.heads:
                per_kind[kind] = kh
    if not per_kind:
        raise BundleError(
            f"run {run_path} fold {fold}: no head could be fitted (the cohort has no subtype "
            "labels with two classes and no survival data); a bundle needs at least one."
        )
    if final:
        oof = _out_of_fold(run_path, metrics_path, evaluation_path, device, should_stop)
        for kind, kh in per_kind.items():
            _final_reference(kind, kh, input_matrix(emb.slide, emb.rna, kind), targets, fit, oof)
    ref_metrics = {k: kh.metrics for k, kh in per_kind.items()}
    metrics = _bundle_metrics(run_path, metrics_path, fold, ref_metrics, notes)

    labelled_fit = targets.subtype_rows(fit)
    counts: dict[str, int] = {}
    if targets.labels is not None:
        for i in labelled_fit:
            counts[str(targets.labels[i])] = counts.get(str(targets.labels[i]), 0) + 1
    data = run.config.get("data", {}) or {}
    enc = fm.encoder
    expression_only = run_is_expression_only(run.config)
    attrs = {**_feature_attrs(data.get("features_dir")), **dict(enc.get("attrs") or {})}
    spec = (
        {"name": "none", "dim": int(enc.get("dim") or 1), "expression_only": True}
        if expression_only
        else _encoder_spec(enc)
    )
    training = {
        # the folder's name only: a bundle never records a path of the machine that built it
        "run": run_path.resolve().name,
        "fold": fold,
        **({"final": fm.info.get("final")} if final else {}),
        "n_patients": len(emb.patient_ids),
        "n_slides": _n_slides(data),
        "n_fit_patients": int(fit.size),
        "n_reference_patients": int(ref.size),
        "subtype_counts": dict(sorted(counts.items())),
        "feature_encoder": spec.get("name"),
        "best_epoch": fm.best_epoch,
        "best_val_loss": fm.best_val_loss,
        "training_config": run.config.get("training", {}),
        "preset": run.preset,
    }
    tiling = (
        {"target_mpp": None, "tile_px": None}
        if expression_only
        else _tiling(run_path, enc, attrs)
    )
    from ..models import inference_state_dict

    # the encoders only: pretraining heads, decoders and prototypes stay in the run folder
    state = {k: v.detach().cpu() for k, v in inference_state_dict(fm.model.state_dict()).items()}
    doc = build_document(
        config=fm.model_config,
        preset=run.preset or getattr(fm.model_config, "name", "custom"),
        patch_encoder=spec,
        target_mpp=tiling["target_mpp"],
        tile_px=tiling["tile_px"],
        class_names=sorted(counts),
        heads={k: kh.heads for k, kh in per_kind.items()},
        genes=fm.genes,
        preprocessing=_anonymous_preprocessing(fm.preprocessing_dict) if fm.genes else None,
        risk={k: kh.risk for k, kh in per_kind.items() if kh.risk is not None},
        reference_cohort={k: kh.reference for k, kh in per_kind.items() if kh.reference},
        metrics=metrics,
        training=training,
        source={"run": run_path.resolve().name, "fold": fold, "notes": notes},
        n_parameters=int(sum(v.numel() for v in state.values())),
        provenance=_provenance(provenance, out, training),
    )
    doc["tiling"].update(tiling)
    path = save_bundle(doc, out, state)
    report(progress, 3, 3, "bundle written")
    return ExportResult(
        path=path, fold=fold, bundle=load_bundle(path), reference_metrics=ref_metrics, notes=notes
    )
