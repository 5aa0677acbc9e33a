"""Cross-validated downstream evaluation of frozen encoders → ``metrics.json``.

The core, :func:`evaluate_embeddings`, works on plain arrays: one set of patient embeddings
per fold (each fold's own frozen encoder embeds every patient) and the fold's patient split.
For each fold, probes and survival heads are fitted on the fold's **non-test** patients
(train + val) and scored on its **test** patients only. Every choice (regularisation
strength by inner CV, survival bins, risk cut-off) is made on the training patients; no
epoch or hyperparameter is ever chosen on the patients reported, and no patient is dropped
(no "last batch" is lost: all fits are full-batch).

Tasks (keys of ``metrics.json``):

- ``subtype_linear`` — :class:`~.probes.LinearProbe` (C by inner CV) on all training patients.
- ``subtype_{k}shot`` — the same probe on exactly ``k`` training patients per class, repeated
  over ``n_draws`` seeded draws (the same draws for every input); a fold's value is the mean
  over its draws. The standardisation uses all training patients' embeddings (no labels):
  scales estimated from 2k points are unstable.
- ``survival_cox`` — :class:`~.survival.CoxHead` (elastic-net Cox; penalty and l1 ratio by
  inner CV; a grid end that wins is listed in ``notes``).
- ``survival_hazard`` — :class:`~.survival.DiscreteHazardHead` (4 bins from the training
  patients' uncensored times; risk = −Σ_t S_t).

Inputs: ``slide``, ``rna`` and ``both`` (slide and RNA embeddings concatenated).
Metrics: subtyping ``accuracy``, ``balanced_accuracy``, ``auroc_macro``, ``f1_macro``;
survival ``c_index`` (Harrell; higher risk = earlier death).

``metrics.json`` layout (stable)
--------------------------------
One run::

    {task: {input: {metric: {"mean": float|null, "sd": float|null, "per_fold": [float|null, ...]}}}}

e.g. ``metrics["subtype_linear"]["slide"]["auroc_macro"]["mean"]``. Several runs compared::

    {"runs": {run_name: <the one-run tree>}}

The key tree depends only on the settings (inputs, k-shots): a task or input that cannot be
computed (no subtype labels, no survival data, a modality the run lacks, a class with fewer
than k training patients) keeps its keys with ``null`` values and the reason is listed in
``evaluation.json["notes"]``. ``sd`` is the sample standard deviation over folds (ddof = 1).
:func:`load_metrics` reads either layout. ``evaluation.json`` holds the settings, the
choices made per fold (C, penaliser, cut-off), pooled out-of-fold test predictions,
Kaplan–Meier curves of the risk groups and their log-rank p-values.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .._io import atomic_write_text, jsonable
from .._kinds import INPUT_KINDS, input_matrix
from .._progress import ProgressFn, StopFn, check_cancel, report
from .._validation import FieldChecker
from ..errors import ConfigError, MirrorError
from .heads import (
    HeadTargets,
    finite_rows,
    fit_subtype_probe,
    fit_survival_head,
    km_by_risk_group,
)
from .metrics import CLASSIFICATION_METRICS, c_index, classification_metrics, summarize
from .probes import LinearProbe, sample_k_shot
from .survival import CoxHead, DiscreteHazardHead, logrank_test, risk_groups

__all__ = [
    "INPUTS",
    "SURVIVAL_METRICS",
    "EvaluationResult",
    "EvaluationSettings",
    "FoldEmbeddings",
    "evaluate_embeddings",
    "evaluate_run",
    "evaluate_runs",
    "load_metrics",
    "metrics_key_tree",
    "save_evaluation",
]

INPUTS: tuple[str, ...] = INPUT_KINDS
SURVIVAL_METRICS: tuple[str, ...] = ("c_index",)
SURVIVAL_TASKS: tuple[str, ...] = ("survival_cox", "survival_hazard")


# ---------------------------------------------------------------------------------------
# inputs and settings
# ---------------------------------------------------------------------------------------
@dataclass
class FoldEmbeddings:
    """Embeddings of patients by ONE fold's frozen encoders, with their labels.

    Attributes
    ----------
    patient_ids : [P] patient ids (row order of the arrays).
    slide : [P, D] slide embeddings or None (a row of NaN = patient without a slide).
    rna : [P, D'] RNA embeddings or None (a row of NaN = patient without expression).
    subtype : [P] labels or None (None / "" / NaN = unlabelled).
    time : [P] follow-up time (any unit) or None (NaN = unknown).
    event : [P] 1 = death observed, 0 = censored, or None.
    """

    patient_ids: list[str]
    slide: np.ndarray | None = None
    rna: np.ndarray | None = None
    subtype: np.ndarray | None = None
    time: np.ndarray | None = None
    event: np.ndarray | None = None

    @classmethod
    def from_any(cls, obj: Any) -> FoldEmbeddings:
        """Accept a FoldEmbeddings, any object with the same attributes (e.g. the
        ``Embeddings`` of :func:`mirror_model.train.run.embed_patients`) or a mapping."""
        if isinstance(obj, FoldEmbeddings):
            return obj
        get = obj.get if isinstance(obj, Mapping) else (lambda k, d=None: getattr(obj, k, d))
        ids = get("patient_ids")
        if ids is None:
            raise ConfigError("embeddings must have patient_ids.")
        ids = [str(p) for p in ids]

        def arr(name: str, dtype: Any = np.float64) -> np.ndarray | None:
            v = get(name)
            if v is None:
                return None
            if hasattr(v, "detach"):  # a torch tensor
                v = v.detach().cpu().float().numpy()
            a = np.asarray(v, dtype=dtype)
            if a.shape[0] != len(ids):
                raise ConfigError(
                    f"embeddings.{name} has {a.shape[0]} rows for {len(ids)} patient ids."
                )
            return a

        return cls(ids, arr("slide"), arr("rna"), arr("subtype", object), arr("time"), arr("event"))


@dataclass
class EvaluationSettings:
    """Everything that shapes an evaluation (recorded in ``evaluation.json``)."""

    inputs: tuple[str, ...] = INPUTS
    k_shots: tuple[int, ...] = (1, 10, 25)
    n_draws: int = 10
    seed: int = 0
    probe_C: float | str = "cv"
    cox_penalizer: float | str = "cv"
    cox_l1_ratio: float | str = "cv"
    cox_max_components: int | None = None
    hazard_weight_decay: float | str = "cv"
    hazard_max_iter: int = 500
    hazard_bins: int = 4

    def __post_init__(self) -> None:
        self.inputs = tuple(self.inputs)
        self.k_shots = tuple(int(k) for k in self.k_shots)
        v = FieldChecker(self, "EvaluationSettings")
        v.rule(
            "inputs",
            bool(self.inputs) and all(i in INPUTS for i in self.inputs),
            f"must be a non-empty subset of {list(INPUTS)}",
        )
        v.rule("k_shots", all(k >= 1 for k in self.k_shots), "k-shot values must be >= 1")
        v.integer("n_draws", 1)

    @property
    def tasks(self) -> list[str]:
        return ["subtype_linear", *[f"subtype_{k}shot" for k in self.k_shots], *SURVIVAL_TASKS]

    def to_dict(self) -> dict[str, Any]:
        return {
            "inputs": list(self.inputs),
            "k_shots": list(self.k_shots),
            "n_draws": self.n_draws,
            "seed": self.seed,
            "probe_C": self.probe_C,
            "cox_penalizer": self.cox_penalizer,
            "cox_l1_ratio": self.cox_l1_ratio,
            "cox_max_components": self.cox_max_components,
            "hazard_weight_decay": self.hazard_weight_decay,
            "hazard_max_iter": self.hazard_max_iter,
            "hazard_bins": self.hazard_bins,
        }


def metrics_key_tree(settings: EvaluationSettings | None = None) -> dict[str, dict[str, list[str]]]:
    """The task → input → [metric] skeleton that ``metrics.json`` always has for ``settings``."""
    s = settings or EvaluationSettings()
    return {
        task: {
            inp: list(SURVIVAL_METRICS if task.startswith("survival") else CLASSIFICATION_METRICS)
            for inp in s.inputs
        }
        for task in s.tasks
    }


@dataclass
class EvaluationResult:
    """Result of one run's evaluation.

    Attributes
    ----------
    metrics : the ``metrics.json`` tree (task → input → metric → {mean, sd, per_fold}).
    settings : the :class:`EvaluationSettings` used.
    folds : per-fold facts (numbers of patients, choices made on training data).
    predictions : pooled out-of-fold test predictions, ``predictions[task][input]`` with
        lists ``patient_id``, ``fold`` and ``y_true`` + ``proba`` + ``classes`` (subtyping) or
        ``time``, ``event``, ``risk``, ``group`` (survival).
    km : ``km[task][input] = {"low": KMCurve dict, "high": ..., "logrank_p", "logrank_chi2"}``
        of the pooled test patients grouped by each fold's training-median cut-off.
    notes : human-readable reasons for null values.
    """

    metrics: dict[str, Any]
    settings: EvaluationSettings
    folds: list[dict[str, Any]] = field(default_factory=list)
    predictions: dict[str, Any] = field(default_factory=dict)
    km: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "settings": self.settings.to_dict(),
            "metrics": self.metrics,
            "folds": self.folds,
            "km": self.km,
            "predictions": self.predictions,
            "notes": self.notes,
        }


# ---------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------
def _split_sets(split: Any, k: int) -> tuple[list[str], list[str]]:
    """(training ids = train + val, test ids) of a FoldSplit-like object or mapping."""
    get = split.get if isinstance(split, Mapping) else (lambda n, d=None: getattr(split, n, d))
    train = [str(p) for p in (get("train") or [])] + [str(p) for p in (get("val") or [])]
    test = [str(p) for p in (get("test") or [])]
    if not test:
        raise ConfigError(
            f"fold {k} has no test patients; an honest evaluation needs cross-validation folds "
            "(pretrain with n_folds >= 2)."
        )
    overlap = set(train) & set(test)
    if overlap:
        raise ConfigError(
            f"fold {k}: {len(overlap)} patients are both training and test patients "
            f"(e.g. {sorted(overlap)[:3]}); the splits file is inconsistent."
        )
    return train, test


def _fold_number(split: Any, pos: int) -> int:
    """The run's own fold number when the split carries one, else its position."""
    raw = split.get("fold", pos) if isinstance(split, Mapping) else getattr(split, "fold", pos)
    return int(pos if raw is None else raw)


@dataclass
class _Collected:
    """What :func:`evaluate_embeddings` gathers fold by fold.

    ``values[task][input][metric]`` holds one value per fold (None = undefined), ``notes``
    the reasons for None values (each once), ``predictions`` the pooled test predictions.
    """

    values: dict[str, dict[str, dict[str, list]]]
    notes: list[str] = field(default_factory=list)
    predictions: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)

    @classmethod
    def empty(cls, settings: EvaluationSettings) -> _Collected:
        tree = metrics_key_tree(settings)
        return cls(
            {t: {i: {m: [] for m in ms} for i, ms in inp.items()} for t, inp in tree.items()}
        )

    def note(self, msg: str) -> None:
        if msg not in self.notes:
            self.notes.append(msg)

    def add(self, task: str, inp: str, values: Mapping[str, float | None]) -> None:
        for m, vals in self.values[task][inp].items():
            vals.append(values[m])

    def null(self, inp: str, tasks: Sequence[str]) -> None:
        for t in tasks:
            self.add(t, inp, dict.fromkeys(self.values[t][inp]))

    def add_predictions(self, task: str, inp: str, **cols: Any) -> None:
        d = self.predictions.setdefault(task, {}).setdefault(inp, {})
        for k, v in cols.items():
            if k == "classes":
                d["classes"] = v
            else:
                d.setdefault(k, []).extend(v)

    def metrics(self) -> dict[str, Any]:
        return {
            t: {i: {m: summarize(v) for m, v in ms.items()} for i, ms in inps.items()}
            for t, inps in self.values.items()
        }


@dataclass
class _FoldInput:
    """One fold, one input kind: the head inputs ``X`` [P, D], the targets, and the training
    and test rows whose input is finite."""

    fold: int
    inp: str
    X: np.ndarray
    targets: HeadTargets
    train: np.ndarray
    test: np.ndarray
    patient_ids: list[str]
    settings: EvaluationSettings


# ---------------------------------------------------------------------------------------
# core
# ---------------------------------------------------------------------------------------
def evaluate_embeddings(
    per_fold_embeddings: Sequence[Any],
    splits: Sequence[Any],
    settings: EvaluationSettings | None = None,
    *,
    progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
    **overrides: Any,
) -> EvaluationResult:
    """Evaluate frozen embeddings fold by fold (fit on non-test patients, score on test).

    Parameters
    ----------
    per_fold_embeddings : one :class:`FoldEmbeddings` (or ``Embeddings``-like) per fold, made
        by that fold's encoders; it must contain every train, val and test patient of the fold.
    splits : one split per fold, in the same order, with ``train``, ``val``, ``test`` patient
        ids (``FoldSplit`` objects or mappings).
    settings : :class:`EvaluationSettings`; keyword ``overrides`` replace its fields.
    progress, should_stop : progress callback and cancellation check.

    Returns
    -------
    EvaluationResult
    """
    if settings is None:
        settings = EvaluationSettings(**overrides)
    elif overrides:
        settings = EvaluationSettings(**{**settings.__dict__, **overrides})
    folds_emb = [FoldEmbeddings.from_any(e) for e in per_fold_embeddings]
    splits = list(splits)
    if len(folds_emb) != len(splits) or not splits:
        raise ConfigError(
            f"need one set of embeddings per fold: got {len(folds_emb)} embeddings for {len(splits)} folds."
        )
    s = settings
    out = _Collected.empty(s)
    fold_info: list[dict[str, Any]] = []
    n_units = len(splits) * len(s.inputs)
    unit = 0
    for pos, (emb, split) in enumerate(zip(folds_emb, splits, strict=True)):
        k = _fold_number(split, pos)
        train_ids, test_ids = _split_sets(split, k)
        row = {p: i for i, p in enumerate(emb.patient_ids)}
        missing = [p for p in train_ids + test_ids if p not in row]
        if missing:
            raise ConfigError(
                f"fold {k}: {len(missing)} patients of the split have no embedding "
                f"(e.g. {missing[:3]}); re-embed with the same cohort as pretraining."
            )
        tr = np.array([row[p] for p in train_ids], dtype=np.int64)
        te = np.array([row[p] for p in test_ids], dtype=np.int64)
        targets = HeadTargets.from_arrays(len(row), emb.subtype, emb.time, emb.event)
        info: dict[str, Any] = {"fold": k, "n_train": int(tr.size), "n_test": int(te.size)}
        for inp in s.inputs:
            check_cancel(should_stop, "evaluation")
            report(progress, unit, n_units, f"fold {k}: {inp}")
            unit += 1
            X = input_matrix(emb.slide, emb.rna, inp)
            if X is None:
                out.note(
                    f"input '{inp}': the run has no {'slide and RNA' if inp == 'both' else inp} embeddings."
                )
                out.null(inp, s.tasks)
                info[inp] = {}
                continue
            tr_i, te_i = finite_rows(X, tr), finite_rows(X, te)
            if tr_i.size < tr.size or te_i.size < te.size:
                out.note(
                    f"fold {k}, input '{inp}': {tr.size - tr_i.size} training and "
                    f"{te.size - te_i.size} test patients lack this modality and were left out."
                )
            f = _FoldInput(k, inp, X, targets, tr_i, te_i, emb.patient_ids, s)
            info[inp] = {**_subtype_tasks(f, out), **_survival_tasks(f, out)}
        fold_info.append(info)
    report(progress, n_units, n_units, "evaluation done")
    return EvaluationResult(
        out.metrics(), s, fold_info, out.predictions, _pooled_km(out.predictions), out.notes
    )


def _subtype_tasks(f: _FoldInput, out: _Collected) -> dict[str, Any]:
    """Linear and k-shot probes of one fold and input; returns the choices made per task."""
    s = f.settings
    tasks = ["subtype_linear", *[f"subtype_{q}shot" for q in s.k_shots]]
    if f.targets.labels is None:
        out.note("subtyping: no subtype labels in the embeddings; subtype tasks are null.")
        out.null(f.inp, tasks)
        return {}
    tr, te = f.targets.subtype_rows(f.train), f.targets.subtype_rows(f.test)
    probe = fit_subtype_probe(f.X, f.targets, tr, C=s.probe_C, seed=s.seed) if te.size else None
    if probe is None:
        out.note(
            f"fold {f.fold}: fewer than two subtypes among training patients or no labelled test patient; subtype tasks are null."
        )
        out.null(f.inp, tasks)
        return {}
    X, y = f.X, f.targets.labels
    proba = probe.predict_proba(X[te])
    out.add("subtype_linear", f.inp, classification_metrics(y[te], proba, probe.classes_.tolist()))
    chosen: dict[str, Any] = {
        "subtype_linear": {
            "C": probe.C_,
            "C_selection": probe.C_selection_,
            "n_train": int(tr.size),
            "n_test": int(te.size),
        }
    }
    out.add_predictions(
        "subtype_linear",
        f.inp,
        patient_id=[f.patient_ids[i] for i in te],
        fold=[f.fold] * te.size,
        y_true=y[te].tolist(),
        proba=proba.tolist(),
        classes=probe.classes_.tolist(),
    )
    for q in s.k_shots:
        task = f"subtype_{q}shot"
        try:
            draws = _k_shot_draws(f, tr, te, q)
        except ConfigError as exc:
            out.note(f"fold {f.fold}, {task}: {exc} Values are null.")
            out.null(f.inp, [task])
            continue
        mean_over_draws = {}
        for name in CLASSIFICATION_METRICS:
            vals = [dr[name] for dr in draws if not math.isnan(dr[name])]
            mean_over_draws[name] = float(np.mean(vals)) if vals else None
        out.add(task, f.inp, mean_over_draws)
        chosen[task] = {name: [dr[name] for dr in draws] for name in CLASSIFICATION_METRICS}
    return chosen


def _k_shot_draws(f: _FoldInput, tr: np.ndarray, te: np.ndarray, q: int) -> list[dict[str, float]]:
    """Test metrics of the probe fitted on ``q`` training patients per class, per draw."""
    s, X, y = f.settings, f.X, f.targets.labels
    assert y is not None
    draws = []
    for d in range(s.n_draws):
        # same draws for every input, so slide / rna / both see the same patients
        idx = sample_k_shot(y[tr], q, np.random.default_rng([s.seed, f.fold, q, d]))
        # standardisation from all training patients' embeddings (no labels used)
        pr = LinearProbe(C=s.probe_C, seed=s.seed).fit(X[tr][idx], y[tr][idx], X_reference=X[tr])
        draws.append(classification_metrics(y[te], pr.predict_proba(X[te]), pr.classes_.tolist()))
    return draws


def _survival_head(task: str, s: EvaluationSettings) -> Any:
    """The unfitted head of a survival task, with the settings' regularisation."""
    if task == "survival_cox":
        return CoxHead(
            penalizer=s.cox_penalizer,
            l1_ratio=s.cox_l1_ratio,
            max_components=s.cox_max_components,
            seed=s.seed,
        )
    return DiscreteHazardHead(
        n_bins=s.hazard_bins,
        weight_decay=s.hazard_weight_decay,
        max_iter=s.hazard_max_iter,
        seed=s.seed,
    )


def _survival_choices(task: str, head: Any) -> dict[str, Any]:
    if task == "survival_cox":
        return {
            "penalizer": head.penalizer_,
            "l1_ratio": head.l1_ratio_,
            "n_nonzero": head.n_nonzero_,
            "selection": head.penalizer_selection_,
            "cv_edge": head.cv_edge_,
            "l1_edge": getattr(head, "l1_edge_", None),
        }
    return {
        "weight_decay": head.weight_decay_,
        "selection": head.weight_decay_selection_,
        "cv_edge": head.cv_edge_,
        "bin_edges": head.bin_edges_.tolist(),
    }


def _edge_notes(task: str, head: Any) -> list[str]:
    """Why a grid end won, in words (empty when every choice lies inside its grid)."""
    notes = []
    edge = getattr(head, "cv_edge_", None)
    if edge == "null model":
        notes.append(
            f"{task}: inner CV chose the null model (every coefficient zero: this input "
            "predicts survival no better than a constant on the training patients)"
        )
    elif edge is not None:
        what, value = (
            ("penalty", head.penalizer_) if task == "survival_cox" else
            ("weight decay", head.weight_decay_)
        )  # fmt: skip
        notes.append(
            f"{task}: inner CV chose the {edge} of its grid even after extending it (the "
            f"optimum may lie beyond: {what} {value:g})"
        )
    if getattr(head, "l1_edge_", None) is not None:
        notes.append(
            f"{task}: inner CV chose the smallest l1 ratio of its grid ({head.l1_ratio_:g}; "
            "the optimum may lie nearer ridge: add a smaller l1 ratio or 0 = ridge)"
        )
    return notes


def _survival_tasks(f: _FoldInput, out: _Collected) -> dict[str, Any]:
    """Cox and discrete-hazard heads of one fold and input; returns the choices made per task."""
    if not f.targets.has_survival:
        out.note("survival: no time/event in the embeddings; survival tasks are null.")
        out.null(f.inp, SURVIVAL_TASKS)
        return {}
    tr, te = f.targets.survival_rows(f.train), f.targets.survival_rows(f.test)
    t, e = f.targets.time, f.targets.event
    assert t is not None and e is not None
    chosen: dict[str, Any] = {}
    for task in SURVIVAL_TASKS:
        try:
            fit = fit_survival_head(_survival_head(task, f.settings), f.X, f.targets, tr)
        except MirrorError as exc:
            out.note(f"fold {f.fold}, {task}, input '{f.inp}': {exc} Values are null.")
            out.null(f.inp, [task])
            continue
        if te.size == 0:
            out.note(f"fold {f.fold}: no test patient with survival data; {task} is null.")
            out.null(f.inp, [task])
            continue
        for edge in _edge_notes(task, fit.head):
            out.note(f"fold {f.fold}, input '{f.inp}', {edge}.")
        risk_te = fit.head.predict_risk(f.X[te])
        out.add(task, f.inp, {"c_index": c_index(t[te], e[te], risk_te)})
        chosen[task] = {
            **_survival_choices(task, fit.head),
            "risk_cutoff": fit.risk_cutoff,
            "n_train": int(tr.size),
            "n_test": int(te.size),
        }
        out.add_predictions(
            task,
            f.inp,
            patient_id=[f.patient_ids[i] for i in te],
            fold=[f.fold] * te.size,
            time=t[te].tolist(),
            event=e[te].astype(int).tolist(),
            risk=risk_te.tolist(),
            group=risk_groups(risk_te, fit.risk_cutoff).tolist(),
        )
    return chosen


def _pooled_km(pred: dict[str, Any]) -> dict[str, Any]:
    """KM curves of the pooled test patients per risk group (each fold's own training cut-off)."""
    out: dict[str, Any] = {}
    for task in SURVIVAL_TASKS:
        for inp, d in pred.get(task, {}).items():
            t = np.asarray(d["time"])
            e = np.asarray(d["event"])
            g = np.asarray(d["group"])
            lr = logrank_test(t, e, g)
            out.setdefault(task, {})[inp] = {
                **km_by_risk_group(t, e, g),
                "n_low": int(np.sum(g == "low")),
                "n_high": int(np.sum(g == "high")),
                "logrank_p": None if math.isnan(lr.p_value) else lr.p_value,
                "logrank_chi2": None if math.isnan(lr.statistic) else lr.statistic,
            }
    return out


# ---------------------------------------------------------------------------------------
# run folders (thin glue over mirror_model.train.run)
# ---------------------------------------------------------------------------------------
def evaluate_run(
    run_dir: str | os.PathLike[str],
    settings: EvaluationSettings | None = None,
    *,
    device: str = "auto",
    precision: str = "fp32",
    max_tiles: int | None = None,
    progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
    **overrides: Any,
) -> EvaluationResult:
    """Embed every patient with each fold's frozen best encoder and evaluate.

    Thin glue: :func:`mirror_model.train.run.load_run` gives the splits and the folds with a
    trained model, :func:`mirror_model.train.run.embed_patients` the embeddings (all tiles
    unless ``max_tiles``), :func:`evaluate_embeddings` the rest. Folds without a trained
    model are left out (listed in ``notes``); a run with none is an error.
    """
    from ..train.run import embed_patients, load_run

    run = Path(run_dir)
    if not run.is_dir():
        raise ConfigError(f"run folder {run} does not exist.")
    info = load_run(run)
    all_folds = [f.fold for f in info.splits.folds]
    if not info.folds:
        raise ConfigError(
            f"no fold of {run} has a trained model (fold_k/best.safetensors); finish "
            "`mirror-train pretrain` first."
        )
    skipped = [k for k in all_folds if k not in info.folds]
    embs, splits = [], []
    for i, k in enumerate(info.folds):
        check_cancel(should_stop, "evaluation")
        report(progress, i, len(info.folds), f"embedding patients (fold {k})")
        embs.append(
            embed_patients(
                run, k, device=device, precision=precision, max_tiles=max_tiles,
                should_stop=should_stop,
            )
        )  # fmt: skip
        splits.append(info.splits.fold(k))
    result = evaluate_embeddings(
        embs, splits, settings, progress=progress, should_stop=should_stop, **overrides
    )
    from ..train.run import gene_selection_stability, stability_text

    st = gene_selection_stability(run)
    if st is not None and st["method"] not in ("all-genes",):
        result.notes.append(stability_text(st))
    if skipped:
        result.notes.insert(
            0, f"folds {skipped} of {run} have no trained model and were not evaluated."
        )
    return result


def save_evaluation(
    out_dir: str | os.PathLike[str],
    results: Mapping[str, EvaluationResult],
    run_dirs: Mapping[str, str | os.PathLike[str]] | None = None,
    *,
    write_report_md: bool = True,
) -> Path:
    """Write ``metrics.json``, ``evaluation.json`` and (optionally) ``report.md`` + figures.

    One result → the one-run layout; several → ``{"runs": {name: tree}}`` (see module doc).
    Returns the path of ``metrics.json``.
    """
    if not results:
        raise ConfigError("nothing to save: no evaluation results.")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if len(results) == 1:
        metrics_doc: dict[str, Any] = next(iter(results.values())).metrics
        details: dict[str, Any] = next(iter(results.values())).to_dict()
        details["run"] = next(iter(results))
    else:
        metrics_doc = {"runs": {name: r.metrics for name, r in results.items()}}
        details = {"runs": {name: r.to_dict() for name, r in results.items()}}
    path = out / "metrics.json"
    atomic_write_text(path, json.dumps(jsonable(metrics_doc), indent=2, allow_nan=False) + "\n")
    atomic_write_text(
        out / "evaluation.json", json.dumps(jsonable(details), indent=1, allow_nan=False) + "\n"
    )
    if write_report_md:
        from .report import write_report

        write_report(out, results, run_dirs=run_dirs)
    return path


def evaluate_runs(
    run_dirs: Sequence[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    names: Sequence[str] | None = None,
    settings: EvaluationSettings | None = None,
    *,
    device: str = "auto",
    write_report_md: bool = True,
    raw_inputs: bool = False,
    progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
    **run_kwargs: Any,
) -> dict[str, EvaluationResult]:
    """Evaluate several runs with identical settings and write one comparison
    (``run_kwargs``: ``precision``, ``max_tiles`` of :func:`evaluate_run`; any other keyword
    replaces a field of ``settings``).

    ``raw_inputs=True`` puts raw-input rows first (:func:`~.raw.evaluate_raw`: mean-pooled tile
    features and normalised genes, same heads): one row ``"raw"`` on the runs' folds, or, when
    the runs were made with different folds (e.g. other seeds), one row per set of folds named
    ``"raw (<first run with those folds>)"``.
    """
    runs = [Path(r) for r in run_dirs]
    if names is None:
        names = [r.name or str(r) for r in runs]
    names = list(names)
    if len(names) != len(runs):
        raise ConfigError(f"got {len(names)} names for {len(runs)} runs; give one name per run.")
    if len(set(names)) != len(names):
        raise ConfigError(f"run names must be unique (got {names}); pass --name for each run.")
    # settings overrides among run_kwargs apply to every row alike (raw rows included)
    overrides = {
        k: run_kwargs.pop(k) for k in list(run_kwargs) if k not in ("precision", "max_tiles")
    }
    if overrides:
        base = settings.__dict__ if settings is not None else {}
        settings = EvaluationSettings(**{**base, **overrides})
    results: dict[str, EvaluationResult] = {}
    if raw_inputs:
        results.update(
            _raw_rows(runs, names, settings, run_kwargs.get("max_tiles"), progress, should_stop)
        )
        if set(results) & set(names):
            raise ConfigError(
                f"a run is named like a raw-input row ({sorted(set(results) & set(names))}); "
                "pass another --name."
            )
    for n, r in zip(names, runs, strict=True):
        results[n] = evaluate_run(
            r, settings, device=device, progress=progress, should_stop=should_stop, **run_kwargs
        )
    save_evaluation(
        out_dir, results, dict(zip(names, runs, strict=True)), write_report_md=write_report_md
    )
    return results


def _raw_rows(
    runs: Sequence[Path],
    names: Sequence[str],
    settings: EvaluationSettings | None,
    max_tiles: int | None,
    progress: ProgressFn | None,
    should_stop: StopFn | None,
) -> dict[str, EvaluationResult]:
    """One raw-input evaluation per distinct set of folds among ``runs``."""
    from ..train.run import load_run
    from .raw import RAW_NAME, evaluate_raw

    groups: list[tuple[Any, list[str], Path]] = []  # (fold lists, run names, first run)
    for name, run in zip(names, runs, strict=True):
        if not run.is_dir():
            raise ConfigError(f"run folder {run} does not exist.")
        key = [f.to_dict() for f in load_run(run).splits.folds]
        for g in groups:
            if g[0] == key:
                g[1].append(name)
                break
        else:
            groups.append((key, [name], run))
    out: dict[str, EvaluationResult] = {}
    for _, members, run in groups:
        label = RAW_NAME if len(groups) == 1 else f"{RAW_NAME} ({members[0]})"
        res = evaluate_raw(
            run, settings, max_tiles=max_tiles, progress=progress, should_stop=should_stop
        )
        res.notes.insert(0, f"raw-input row on the folds of: {', '.join(members)}.")
        out[label] = res
    return out


def load_metrics(path: str | os.PathLike[str]) -> dict[str, dict[str, Any]]:
    """Read a ``metrics.json`` of either layout as ``{run_name: tree}`` (one run → ``"run"``)."""
    p = Path(path)
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read metrics file {p}: {exc}") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{p} is not a metrics.json document.")
    if "runs" in doc:
        return dict(doc["runs"])
    return {"run": doc}
