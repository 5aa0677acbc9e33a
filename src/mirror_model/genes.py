"""Transcriptomics preprocessing: normalisation and gene selection, fitted on training patients.

Design §1.8: genes are chosen by recursive feature elimination with cross-validation (RFECV)
using a linear SVM supervised by the subtype (5 % of the genes removed per step, stratified
5-fold CV, balanced accuracy), united with a curated gene list. The reference implementation
ran the selection on all patients, so genes were chosen with the validation patients' labels;
here :func:`fit_preprocessing` sees the training patients only, and the resulting
:class:`Preprocessing` (gene list in order + normalisation statistics) is stored with the model.

Normalisation (:class:`ExpressionNormalizer`): ``log1p`` when the data look like counts or
FPKM/TPM (non-negative with large values, or integer-valued), decided on the training data
and stored as ``log1p_``; then a per-gene z-score with the training mean and standard
deviation (floored, so constant genes map to 0 instead of dividing by zero).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from ._progress import ProgressFn, StopFn, check_cancel, report
from .errors import CohortError, ConfigError, ExpressionError

__all__ = [
    "ExpressionNormalizer",
    "GeneSelector",
    "Preprocessing",
    "cox_score_z",
    "describe_scale",
    "fit_preprocessing",
    "read_gene_list",
    "scale_warnings",
    "selection_stability",
]

FORMAT_VERSION = 1


def _check_version(d: Mapping[str, Any], what: str) -> None:
    if int(d.get("version", 1)) > FORMAT_VERSION:
        raise ConfigError(
            f"{what} format version {d['version']} is newer than this software "
            f"({FORMAT_VERSION}); update napari-mirror."
        )
_MAX_LISTED = 10


def _as_matrix(X: Any, what: str = "expression matrix") -> np.ndarray:
    X = np.asarray(X, dtype=np.float64)
    if X.ndim == 1:
        X = X[None, :]
    if X.ndim != 2:
        raise ExpressionError(f"The {what} must be 2-D [samples, genes], got shape {X.shape}.")
    return X


def _check_finite(X: np.ndarray, genes: Sequence[str] | None, what: str) -> None:
    bad = ~np.isfinite(X)
    if bad.any():
        i, j = np.argwhere(bad)[0]
        g = genes[j] if genes is not None else f"column {j}"
        raise ExpressionError(
            f"The {what} has {int(bad.sum())} missing or infinite values (first: sample row "
            f"{i + 1}, gene {g}). Fill or remove them before normalising."
        )


# ---------------------------------------------------------------------------- scale


def describe_scale(X: Any) -> dict[str, Any]:
    """What scale raw expression values are on, from their finite values.

    ``kind``: ``"centred"`` (negative values: log-ratios, z-scores), ``"counts"``
    (non-negative integers above 1), ``"linear"`` (non-negative, values above 50:
    FPKM/TPM), or ``"log"`` (non-negative, at most 50: log2 TPM, log-intensities). Also
    ``min``, ``max``, ``median`` and ``integer``.
    """
    v = np.asarray(X, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return {"kind": "unknown", "min": None, "max": None, "median": None, "integer": False}
    lo, hi, med = float(v.min()), float(v.max()), float(np.median(v))
    integer = bool(np.all(v == np.round(v)))
    if lo < 0:
        kind = "centred"
    elif integer and hi > 1:
        kind = "counts"
    elif hi > 50:
        kind = "linear"
    else:
        kind = "log"
    return {"kind": kind, "min": lo, "max": hi, "median": med, "integer": integer}


_KIND_WORDS = {
    "centred": "centred / log-ratio values (with negatives)",
    "counts": "raw counts (non-negative integers)",
    "linear": "linear values (FPKM/TPM-like, up to thousands)",
    "log": "log-scale values (non-negative, at most 50)",
}


def scale_warnings(X: Any, trained: Mapping[str, Any] | None, what: str) -> list[str]:
    """Warnings when ``X`` (raw values of the model's genes) is not on the training scale.

    ``trained`` is :func:`describe_scale` of the training patients' values of the same genes
    (stored in the model's preprocessing). A different kind (log vs linear/counts, centred vs
    non-negative) or a median / spread a factor of 4 away from training is reported.
    """
    if not trained or trained.get("kind") in (None, "unknown"):
        return []
    now = describe_scale(X)
    if now["kind"] == "unknown":
        return []
    out: list[str] = []
    linearish = {"counts", "linear"}
    tk, nk = trained["kind"], now["kind"]
    if (tk in linearish) != (nk in linearish) or (tk == "centred") != (nk == "centred"):
        out.append(
            f"{what} looks like {_KIND_WORDS[nk]} (values {now['min']:.3g} to {now['max']:.3g}) "
            f"but the model was trained on {_KIND_WORDS[tk]} (values {trained['min']:.3g} to "
            f"{trained['max']:.3g}); its predictions are meaningless unless the table is "
            "transformed the same way as the training data."
        )
    elif tk != "centred" and trained.get("median") and now["median"] is not None:
        ratio = (now["median"] + 1e-9) / (float(trained["median"]) + 1e-9)
        if ratio > 4 or ratio < 0.25:
            out.append(
                f"{what} has a median of {now['median']:.3g} over the model's genes, but the "
                f"training patients had {float(trained['median']):.3g}: probably another scale "
                "or normalisation (e.g. log10 vs log2, other units); predictions may be off."
            )
    return out


# ---------------------------------------------------------------------------- survival screening


def cox_score_z(X: Any, time: Any, event: Any) -> np.ndarray:
    """Univariate Cox score-test statistic of every column of ``X`` [n, genes] (Breslow ties).

    For gene g, U = Σ_deaths (x_i − x̄_R(t_i)) and I = Σ_deaths Var_R(t_i)(x), the mean and
    variance over the patients at risk; z = U / √I (positive: higher expression, earlier
    death). Vectorised over genes with cumulative sums over the time-sorted patients, so
    60,000 genes take one pass. Equals the log-rank statistic for a binary covariate.
    """
    X = _as_matrix(X, "expression matrix")
    t = np.asarray(time, np.float64).ravel()
    e = np.asarray(event).astype(bool).ravel()
    if t.shape[0] != X.shape[0] or e.shape[0] != X.shape[0]:
        raise ExpressionError(f"{t.shape[0]} survival times for {X.shape[0]} samples.")
    order = np.argsort(-t, kind="stable")  # descending: cumulative sums = risk sets
    Xs, ts, es = X[order], t[order], e[order]
    n_risk = np.arange(1, len(ts) + 1, dtype=np.float64)
    s1 = np.cumsum(Xs, axis=0)
    s2 = np.cumsum(Xs * Xs, axis=0)
    # risk set of time t: every patient with time >= t = up to the last index with that time
    last = np.searchsorted(-ts, -ts, side="right") - 1
    idx = last[es]
    n = n_risk[idx][:, None]
    mean = s1[idx] / n
    var = np.maximum(s2[idx] / n - mean**2, 0.0)
    U = (Xs[es] - mean).sum(axis=0)
    info = var.sum(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.where(info > 1e-12, U / np.sqrt(info), 0.0)
    return z


def selection_stability(gene_sets: Sequence[Sequence[str]]) -> dict[str, Any]:
    """How alike the gene sets chosen in different folds are.

    Returns ``mean_jaccard`` / ``sd_jaccard`` over all pairs of folds (1 = identical sets),
    ``n_genes`` per fold, ``in_every_fold`` (genes chosen in all folds) and ``frequency``
    (gene → number of folds that chose it, for genes chosen at least twice, most frequent first).
    """
    sets = [set(map(str, g)) for g in gene_sets]
    pairs = [
        len(a & b) / max(len(a | b), 1) for i, a in enumerate(sets) for b in sets[i + 1 :]
    ]
    freq: dict[str, int] = {}
    for st in sets:
        for g in st:
            freq[g] = freq.get(g, 0) + 1
    common = sorted((g for g, c in freq.items() if c == len(sets)), key=str) if sets else []
    return {
        "n_folds": len(sets),
        "n_genes": [len(st) for st in sets],
        "mean_jaccard": float(np.mean(pairs)) if pairs else None,
        "sd_jaccard": float(np.std(pairs, ddof=1)) if len(pairs) > 1 else None,
        "in_every_fold": common,
        "frequency": dict(sorted(((g, c) for g, c in freq.items() if c > 1), key=lambda x: (-x[1], x[0]))),
    }


# ---------------------------------------------------------------------------- normaliser


class ExpressionNormalizer:
    """``log1p`` (when the data look like counts/FPKM) followed by a per-gene z-score.

    Parameters
    ----------
    log1p
        ``"auto"`` (decide in :meth:`fit` from the training data), True or False.
    std_floor
        Lower bound for the per-gene standard deviation (in the log1p'd units), so near-
        constant genes are not blown up. Genes with std below it are divided by it.

    Attributes
    ----------
    log1p_ : bool
        Whether ``log1p`` is applied before the z-score.
    log1p_reason_ : str
        Why (for logs and the model bundle).
    mean_, std_ : np.ndarray [n_genes]
        Per-gene mean and (floored, ddof=0) standard deviation of the (log1p'd) training data.
    genes_ : list[str] | None
        Gene names in column order, when given to :meth:`fit`.
    n_samples_ : int
        Number of training samples.
    """

    def __init__(self, log1p: bool | Literal["auto"] = "auto", std_floor: float = 1e-3) -> None:
        if log1p not in ("auto", True, False):
            raise ConfigError(f"log1p must be 'auto', True or False, not {log1p!r}.")
        if not std_floor > 0:
            raise ConfigError(f"std_floor must be > 0, got {std_floor}.")
        self.log1p = log1p
        self.std_floor = float(std_floor)

    # -- decision rule, exposed for tests and for the selector
    @staticmethod
    def looks_like_counts(X: np.ndarray) -> tuple[bool, str]:
        """(apply log1p?, reason) for a matrix of training values.

        Negative values mean the data are already on a log or centred scale; values above 50
        cannot be log2 expression (log2 of 1e15) and mean counts/FPKM/TPM; integer values
        above 1 mean counts.
        """
        X = np.asarray(X)
        lo, hi = float(np.min(X)), float(np.max(X))
        if lo < 0:
            return False, f"values include negatives (min {lo:.3g}): already log/centred scale"
        if hi > 50:
            return (
                True,
                f"non-negative values up to {hi:.4g}: counts/FPKM-like scale, log1p applied",
            )
        if hi > 1 and np.all(X == np.round(X)):
            return True, f"non-negative integer values up to {hi:.4g}: counts, log1p applied"
        return False, f"values within [{lo:.3g}, {hi:.3g}]: already log scale"

    def fit(self, X: Any, genes: Sequence[str] | None = None) -> ExpressionNormalizer:
        """Fit on the training samples ``X`` [n_samples, n_genes] (raw values)."""
        X = _as_matrix(X, "training expression matrix")
        if X.shape[0] < 1 or X.shape[1] < 1:
            raise ExpressionError(f"Cannot fit the normaliser on an empty matrix {X.shape}.")
        if genes is not None and len(genes) != X.shape[1]:
            raise ExpressionError(f"{len(genes)} gene names for {X.shape[1]} columns.")
        _check_finite(X, genes, "training expression matrix")
        if self.log1p == "auto":
            self.log1p_, self.log1p_reason_ = self.looks_like_counts(X)
        else:
            self.log1p_ = bool(self.log1p)
            self.log1p_reason_ = "set by the caller"
            if self.log1p_ and X.min() < 0:
                raise ExpressionError(
                    "log1p was requested but the training values include negatives "
                    f"(min {X.min():.3g}); the data are already on a log scale."
                )
        Z = np.log1p(X) if self.log1p_ else X
        self.mean_ = Z.mean(axis=0)
        self.std_ = np.maximum(Z.std(axis=0), self.std_floor)
        self.genes_ = list(map(str, genes)) if genes is not None else None
        self.n_samples_ = int(X.shape[0])
        return self

    def _check_fitted(self) -> None:
        if not hasattr(self, "mean_"):
            raise ConfigError("The ExpressionNormalizer is not fitted; call fit() first.")

    @property
    def n_genes(self) -> int:
        self._check_fitted()
        return int(self.mean_.shape[0])

    def transform(self, X: Any) -> np.ndarray:
        """Normalise ``X`` [n_samples, n_genes] (same gene order as in fit) -> float32."""
        self._check_fitted()
        X = _as_matrix(X)
        if X.shape[1] != self.mean_.shape[0]:
            raise ExpressionError(
                f"Expression matrix has {X.shape[1]} genes but the normaliser was fitted on "
                f"{self.mean_.shape[0]}; align the genes first (ExpressionTable.align_genes)."
            )
        _check_finite(X, self.genes_, "expression matrix")
        if self.log1p_:
            if X.size and X.min() < 0:  # no rows (e.g. no validation patients): nothing to check
                i, j = np.unravel_index(int(np.argmin(X)), X.shape)
                g = self.genes_[j] if self.genes_ else f"column {j}"
                raise ExpressionError(
                    f"The model expects non-negative counts/FPKM (it applies log1p, as fitted on "
                    f"its training data) but the expression values include negatives (e.g. "
                    f"{X[i, j]:.3g} for gene {g}, sample row {i + 1}); the file looks already "
                    "log-transformed or centred. Provide the raw values."
                )
            X = np.log1p(X)
        return ((X - self.mean_) / self.std_).astype(np.float32)

    def fit_transform(self, X: Any, genes: Sequence[str] | None = None) -> np.ndarray:
        return self.fit(X, genes).transform(X)

    def subset(self, indices: Sequence[int]) -> ExpressionNormalizer:
        """A fitted normaliser restricted to the given gene columns (same statistics)."""
        self._check_fitted()
        idx = np.asarray(indices, dtype=np.int64)
        new = ExpressionNormalizer(log1p=self.log1p, std_floor=self.std_floor)
        new.log1p_, new.log1p_reason_ = self.log1p_, self.log1p_reason_
        new.mean_, new.std_ = self.mean_[idx].copy(), self.std_[idx].copy()
        new.genes_ = [self.genes_[i] for i in idx] if self.genes_ is not None else None
        new.n_samples_ = self.n_samples_
        return new

    def to_dict(self) -> dict:
        """JSON-able state (floats as lists)."""
        self._check_fitted()
        return {
            "type": "ExpressionNormalizer",
            "version": FORMAT_VERSION,
            "log1p": bool(self.log1p_),
            "log1p_reason": self.log1p_reason_,
            "log1p_setting": self.log1p,
            "std_floor": self.std_floor,
            "mean": [float(x) for x in self.mean_],
            "std": [float(x) for x in self.std_],
            "genes": self.genes_,
            "n_samples": self.n_samples_,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ExpressionNormalizer:
        """Rebuild from :meth:`to_dict`; ConfigError on malformed input."""
        try:
            _check_version(d, "normaliser")
            mean = np.asarray(d["mean"], dtype=np.float64)
            std = np.asarray(d["std"], dtype=np.float64)
            setting = d.get("log1p_setting", "auto")
            obj = cls(
                log1p=setting if setting in ("auto", True, False) else "auto",
                std_floor=float(d.get("std_floor", 1e-3)),
            )
            obj.log1p_ = bool(d["log1p"])
            obj.log1p_reason_ = str(d.get("log1p_reason", ""))
            genes = d.get("genes")
            obj.genes_ = [str(g) for g in genes] if genes is not None else None
            obj.n_samples_ = int(d.get("n_samples", 0))
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, ConfigError):
                raise
            raise ConfigError(f"malformed normaliser statistics ({exc!r}).") from None
        if (
            mean.ndim != 1
            or mean.shape != std.shape
            or (obj.genes_ is not None and len(obj.genes_) != len(mean))
        ):
            raise ConfigError(
                "malformed normaliser statistics: mean, std and genes differ in length."
            )
        if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(std)) and np.all(std > 0)):
            raise ConfigError("malformed normaliser statistics: non-finite mean/std or std <= 0.")
        obj.mean_, obj.std_ = mean, std
        return obj


# ---------------------------------------------------------------------------- selector


class GeneSelector:
    """RFECV gene selection (linear SVM, supervised by subtype) united with a curated list.

    Parameters
    ----------
    step
        Fraction (0 < step < 1) or number of genes removed per elimination step (authors: 5 %).
    cv_folds
        Inner stratified folds inside the training patients (authors: 5); reduced to the size
        of the smallest class when a class is smaller (noted in ``notes_``).
    scoring
        sklearn scorer name (authors: balanced accuracy).
    curated
        Gene names always kept (those absent from the table are listed in ``curated_missing_``).
    max_genes
        Cap on the RFE-selected genes (kept by the final SVM's coefficient norm); curated genes
        come on top. None = no cap.
    min_genes
        Smallest gene count RFECV may choose.
    prefilter_genes
        Before RFE, keep only this many highest-variance genes (a 20k-gene table would
        otherwise take long); None = no pre-filter.
    n_top_unsupervised
        Genes kept by variance when there are no subtype labels (or only one class).
    C
        SVM regularisation.
    seed
        Seed of the inner fold shuffling and the SVM.

    Attributes
    ----------
    genes_ : list[str]
        Selected genes, in the input (table) order.
    method_ : str
        ``"rfecv"`` or ``"top-variance"`` (no usable labels).
    rfe_genes_ : list[str]
        Genes chosen by RFECV (or by variance) before adding the curated list.
    curated_added_, curated_missing_ : list[str]
    dropped_constant_ : list[str]
        Genes constant in the training samples (e.g. all zero), never selected.
    cv_scores_ : list[tuple[int, float]]
        (number of genes, mean inner-CV score) for each RFECV step.
    n_train_ : int
    classes_ : list[str]
    notes_ : list[str]
    """

    def __init__(
        self,
        step: float = 0.05,
        cv_folds: int = 5,
        scoring: str = "balanced_accuracy",
        curated: Sequence[str] | None = None,
        max_genes: int | None = None,
        min_genes: int = 10,
        prefilter_genes: int | None = 2000,
        n_top_unsupervised: int = 200,
        C: float = 1.0,
        seed: int = 0,
    ) -> None:
        if not (0 < step < 1 or (float(step).is_integer() and step >= 1)):
            raise ConfigError(
                f"step must be a fraction in (0, 1) or a whole number >= 1, got {step}."
            )
        if cv_folds < 2:
            raise ConfigError(f"cv_folds must be >= 2, got {cv_folds}.")
        if max_genes is not None and max_genes < 1:
            raise ConfigError(f"max_genes must be >= 1, got {max_genes}.")
        if min_genes < 1:
            raise ConfigError(f"min_genes must be >= 1, got {min_genes}.")
        if prefilter_genes is not None and prefilter_genes < 1:
            raise ConfigError(f"prefilter_genes must be >= 1 or None, got {prefilter_genes}.")
        self.step = step
        self.cv_folds = int(cv_folds)
        self.scoring = scoring
        self.curated = list(curated) if curated is not None else None
        self.max_genes = max_genes
        self.min_genes = int(min_genes)
        self.prefilter_genes = prefilter_genes
        self.n_top_unsupervised = int(n_top_unsupervised)
        self.C = float(C)
        self.seed = int(seed)

    def fit(
        self,
        X: Any,
        y: Sequence | None,
        genes: Sequence[str],
        progress: ProgressFn | None = None,
        should_stop: StopFn | None = None,
        survival: tuple[Any, Any] | None = None,
    ) -> GeneSelector:
        """Select genes from training samples.

        Parameters
        ----------
        X
            [n_train, n_genes] training expression on a log scale (e.g. log1p counts); the
            selector standardises the genes itself (training statistics).
        y
            Subtype label per row (None / NaN / "" = unlabelled, ignored by RFE), or None.
        genes
            Names of the columns of ``X``.
        survival
            ``(time, event)`` per row: select by univariate Cox screening instead (method
            ``"cox-screen"``: the genes with the largest |score-test z| among the rows with
            known survival, ``max_genes`` or ``n_top_unsupervised`` of them); subtype labels
            are then not used.
        """
        X = _as_matrix(X, "training expression matrix")
        genes = [str(g) for g in genes]
        if len(genes) != X.shape[1]:
            raise ExpressionError(f"{len(genes)} gene names for {X.shape[1]} columns.")
        if len(set(genes)) != len(genes):
            dup = sorted({g for g in genes if genes.count(g) > 1})[:_MAX_LISTED]
            raise ExpressionError(f"duplicate gene names: {', '.join(dup)}.")
        _check_finite(X, genes, "training expression matrix")
        self.notes_: list[str] = []
        self.n_train_ = int(X.shape[0])
        check_cancel(should_stop, "gene selection")
        report(progress, 0, 3, "selecting genes")

        var = X.var(axis=0)
        const = var <= 1e-12 * np.maximum(1.0, np.abs(X).max(axis=0)) ** 2
        self.dropped_constant_ = [g for g, c in zip(genes, const, strict=True) if c]
        if self.dropped_constant_:
            self.notes_.append(
                f"{len(self.dropped_constant_)} genes constant in the training "
                f"samples were dropped (e.g. {', '.join(self.dropped_constant_[:5])})"
            )
        cand = np.flatnonzero(~const)
        if len(cand) == 0:
            raise ExpressionError(
                "Every gene is constant in the training samples; nothing to select."
            )

        # labels: only labelled rows supervise the selection
        labels = None
        if y is not None:
            y_arr = np.asarray([None if _missing(v) else str(v) for v in y], dtype=object)
            if len(y_arr) != X.shape[0]:
                raise ExpressionError(f"{len(y_arr)} labels for {X.shape[0]} training samples.")
            labelled = np.array([v is not None for v in y_arr])
            classes = sorted({v for v in y_arr[labelled]})
            if len(classes) >= 2:
                labels = (labelled, y_arr)
                if (~labelled).any():
                    self.notes_.append(
                        f"{int((~labelled).sum())} unlabelled training samples were not used by RFE"
                    )
            else:
                self.notes_.append(
                    "fewer than two subtype classes among the training patients; genes were "
                    "chosen by variance instead of RFECV"
                )
        self.classes_ = sorted({v for v in labels[1][labels[0]]}) if labels else []

        if self.prefilter_genes is not None and len(cand) > self.prefilter_genes:
            top = np.argsort(-var[cand], kind="stable")[: self.prefilter_genes]
            cand = np.sort(cand[top])
            self.notes_.append(
                f"variance pre-filter kept {self.prefilter_genes} of "
                f"{int((~const).sum())} genes before RFE"
            )
        self.prefiltered_n_ = int(len(cand))

        self.cv_scores_: list[tuple[int, float]] = []
        if survival is not None:
            self.method_ = "cox-screen"
            t = np.asarray(survival[0], np.float64)
            e = np.asarray(survival[1], np.float64)
            known = np.isfinite(t) & np.isfinite(e)
            if int(e[known].sum()) < 2:
                raise ExpressionError(
                    "survival gene selection needs at least 2 observed deaths among the training "
                    f"patients; found {int(e[known].sum())}."
                )
            z = cox_score_z(X[known][:, cand], t[known], e[known])
            n = min(self.max_genes or self.n_top_unsupervised, len(cand))
            top = np.argsort(-np.abs(z), kind="stable")[:n]
            chosen = cand[top]
            self.screen_z_ = {genes[cand[i]]: float(z[i]) for i in top}
            self.notes_.append(
                f"univariate Cox screening on {int(known.sum())} training patients "
                f"({int(e[known].sum())} deaths): kept the {n} genes with the largest |z| "
                f"(|z| >= {float(np.abs(z[top]).min()):.2f})"
            )
        elif labels is None:
            self.method_ = "top-variance"
            n = min(self.max_genes or self.n_top_unsupervised, len(cand))
            top = np.argsort(-var[cand], kind="stable")[:n]
            chosen = cand[top]
            self.notes_.append(f"no subtype labels: kept the {n} most variable genes")
        else:
            self.method_ = "rfecv"
            chosen = self._rfecv(X, labels, cand, should_stop)
        report(progress, 2, 3, "selecting genes")

        self.rfe_genes_ = [genes[i] for i in sorted(chosen.tolist())]
        chosen_set = set(chosen.tolist())
        self.curated_added_, self.curated_missing_ = [], []
        if self.curated:
            index = {g: i for i, g in enumerate(genes)}
            upper = {g.upper(): i for i, g in enumerate(genes)}
            for g in dict.fromkeys(str(c).strip() for c in self.curated if str(c).strip()):
                i = index.get(g, upper.get(g.upper()))
                if i is None:
                    self.curated_missing_.append(g)
                elif const[i]:
                    self.notes_.append(
                        f"curated gene {g} is constant in the training samples; skipped"
                    )
                elif i not in chosen_set:
                    chosen_set.add(i)
                    self.curated_added_.append(genes[i])
            if self.curated_missing_:
                self.notes_.append(
                    f"{len(self.curated_missing_)} curated genes are not in the expression "
                    f"table: {', '.join(self.curated_missing_[:_MAX_LISTED])}"
                    + (" ..." if len(self.curated_missing_) > _MAX_LISTED else "")
                )
        self.genes_ = [genes[i] for i in sorted(chosen_set)]
        self.input_genes_n_ = len(genes)
        report(progress, 3, 3, "selecting genes")
        return self

    def _rfecv(
        self,
        X: np.ndarray,
        labels: tuple[np.ndarray, np.ndarray],
        cand: np.ndarray,
        should_stop: StopFn | None,
    ) -> np.ndarray:
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.feature_selection import RFECV
        from sklearn.model_selection import StratifiedKFold
        from sklearn.svm import LinearSVC

        labelled, y_arr = labels
        Xl = X[labelled][:, cand]
        yl = y_arr[labelled].astype(str)
        counts = {c: int((yl == c).sum()) for c in self.classes_}
        smallest = min(counts.values())
        if smallest < 2:
            small = [c for c, n in counts.items() if n < 2]
            raise CohortError(
                f"subtype(s) {', '.join(small)} have fewer than 2 training patients; RFECV needs "
                "at least 2 per class. Merge rare subtypes or leave them unlabelled."
            )
        folds = min(self.cv_folds, smallest)
        if folds < self.cv_folds:
            self.notes_.append(
                f"inner CV used {folds} folds (smallest class has {smallest} training patients)"
            )
        mu, sd = Xl.mean(axis=0), Xl.std(axis=0)
        Z = (Xl - mu) / np.maximum(sd, 1e-8)
        check_cancel(should_stop, "gene selection")
        # the dual solver is the fast one with patients <~ genes (our regime: tens to hundreds of
        # patients, hundreds to thousands of genes)
        svc = LinearSVC(C=self.C, dual=True, max_iter=20000, random_state=self.seed)
        rfecv = RFECV(
            svc,
            step=self.step,
            min_features_to_select=min(self.min_genes, Z.shape[1]),
            cv=StratifiedKFold(n_splits=folds, shuffle=True, random_state=self.seed),
            scoring=self.scoring,
            n_jobs=None,
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", category=ConvergenceWarning)
            rfecv.fit(Z, yl)
        check_cancel(should_stop, "gene selection")
        n_feat = rfecv.cv_results_["n_features"]
        mean_score = rfecv.cv_results_["mean_test_score"]
        self.cv_scores_ = [(int(n), float(s)) for n, s in zip(n_feat, mean_score, strict=True)]
        self.rfe_n_features_ = int(rfecv.n_features_)
        self.rfe_cv_score_ = float(np.max(mean_score))
        support = np.flatnonzero(rfecv.support_)
        if self.max_genes is not None and len(support) > self.max_genes:
            coef = np.atleast_2d(rfecv.estimator_.coef_)
            weight = (coef**2).sum(axis=0)
            keep = np.sort(np.argsort(-weight, kind="stable")[: self.max_genes])
            support = support[keep]
            self.notes_.append(
                f"RFECV chose {self.rfe_n_features_} genes; capped at "
                f"max_genes={self.max_genes} by SVM weight"
            )
        return cand[support]

    def to_dict(self) -> dict:
        """JSON-able summary (settings and the selection)."""
        if not hasattr(self, "genes_"):
            raise ConfigError("The GeneSelector is not fitted; call fit() first.")
        return {
            "type": "GeneSelector",
            "version": FORMAT_VERSION,
            "method": self.method_,
            "genes": list(self.genes_),
            "rfe_genes": list(self.rfe_genes_),
            "curated_added": list(self.curated_added_),
            "curated_missing": list(self.curated_missing_),
            "dropped_constant": list(self.dropped_constant_),
            "cv_scores": [[n, s] for n, s in self.cv_scores_],
            "classes": list(self.classes_),
            "n_train": self.n_train_,
            "notes": list(self.notes_),
            "params": {
                "step": self.step,
                "cv_folds": self.cv_folds,
                "scoring": self.scoring,
                "max_genes": self.max_genes,
                "min_genes": self.min_genes,
                "prefilter_genes": self.prefilter_genes,
                "n_top_unsupervised": self.n_top_unsupervised,
                "C": self.C,
                "seed": self.seed,
                "n_curated": len(self.curated) if self.curated else 0,
            },
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> GeneSelector:
        """Rebuild a fitted selector (its selection, not the SVM) from :meth:`to_dict`."""
        try:
            p = dict(d.get("params", {}))
            p.pop("n_curated", None)
            obj = cls(**p)
            obj.method_ = str(d["method"])
            obj.genes_ = [str(g) for g in d["genes"]]
            obj.rfe_genes_ = [str(g) for g in d.get("rfe_genes", d["genes"])]
            obj.curated_added_ = list(d.get("curated_added", []))
            obj.curated_missing_ = list(d.get("curated_missing", []))
            obj.dropped_constant_ = list(d.get("dropped_constant", []))
            obj.cv_scores_ = [(int(n), float(s)) for n, s in d.get("cv_scores", [])]
            obj.classes_ = list(d.get("classes", []))
            obj.n_train_ = int(d.get("n_train", 0))
            obj.notes_ = list(d.get("notes", []))
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, ConfigError):
                raise
            raise ConfigError(f"malformed gene-selector record ({exc!r}).") from None
        return obj


def _missing(v: object) -> bool:
    if v is None:
        return True
    if isinstance(v, float) and math.isnan(v):
        return True
    return isinstance(v, str) and not v.strip()


# ---------------------------------------------------------------------------- preprocessing


@dataclass
class Preprocessing:
    """Selected genes (in order) plus the normaliser fitted on them — what a model stores.

    ``transform`` maps raw expression (an :class:`~mirror_model.expression.ExpressionTable` or
    a matrix with its gene names) to the model's normalised input [n_samples, len(genes)].

    ``fill_values`` [n_genes]: each gene's median over the training patients (raw scale):
    missing values (``nan_policy="median"``) are filled with them, in training and at
    inference alike. ``scale``: :func:`describe_scale` of the training values of these genes;
    ``gene_min`` [n_genes]: each gene's smallest training value (a model gene that is 0 in an
    input but never was in training is reported by :meth:`input_warnings`).
    """

    genes: list[str]
    normalizer: ExpressionNormalizer
    selector: dict = field(default_factory=dict)
    train_patient_ids: list[str] = field(default_factory=list)
    fill_values: np.ndarray | None = None
    scale: dict = field(default_factory=dict)
    gene_min: np.ndarray | None = None

    def fill_missing(self, X: np.ndarray) -> tuple[np.ndarray, int]:
        """``X`` [n, n_genes] (model gene order) with NaN replaced by the training medians;
        returns (filled copy, number of cells filled). Without stored medians NaN stay."""
        X = np.array(X, dtype=np.float64)
        nan = np.isnan(X)
        n = int(nan.sum())
        if n and self.fill_values is not None:
            X[nan] = np.broadcast_to(self.fill_values, X.shape)[nan]
        return X, n if self.fill_values is not None else 0

    def _listed(self, flags: np.ndarray, template: str) -> list[str]:
        """``template`` with ``{n}`` and ``{names}`` (first genes flagged), or [] if none is."""
        names = [g for g, f in zip(self.genes, flags, strict=True) if f]
        if not names:
            return []
        shown = ", ".join(names[:_MAX_LISTED]) + (" ..." if len(names) > _MAX_LISTED else "")
        return [template.format(n=len(names), names=shown)]

    def input_warnings(self, X: Any, what: str) -> list[str]:
        """Plain-language warnings about raw model-gene values ``X`` [n, n_genes] (model gene
        order): another scale than training, model genes 0 that never were in training, and
        (with several samples) model genes constant across them."""
        X = np.atleast_2d(np.asarray(X, dtype=np.float64))
        out = scale_warnings(X, self.scale, what)
        if self.gene_min is not None and X.shape[1] == len(self.gene_min):
            zero = np.all(X == 0, axis=0) & (self.gene_min > 0)
            out += self._listed(zero, f"{what}: {{n}} of the model's {len(self.genes)} genes "
                                "are 0 but never were among the training patients: {names} "
                                "(absent from the assay or renamed?); their input is off-distribution.")  # fmt: skip
        if X.shape[0] > 1:
            const = np.nanstd(X, axis=0) == 0
            out += self._listed(const, f"{what}: {{n}} of the model's genes are constant across "
                                f"its {X.shape[0]} samples: {{names}}.")  # fmt: skip
        return out

    @property
    def n_genes(self) -> int:
        return len(self.genes)

    def transform(
        self,
        data: Any,
        genes: Sequence[str] | None = None,
        patient_ids: Sequence[str] | None = None,
    ) -> np.ndarray:
        """Normalised float32 [n_samples, n_genes] in the order of :attr:`genes`.

        Parameters
        ----------
        data
            An ExpressionTable (genes matched by name; missing genes raise ExpressionError
            naming them), or an array [n_samples, n_columns].
        genes
            Column names of ``data`` when it is an array; without them the array must already
            be in the order of :attr:`genes`.
        patient_ids
            With a table: only these patients' rows (TCGA 12-character matching), in order.
        """
        from .expression import ExpressionTable

        if isinstance(data, ExpressionTable):
            X = data.values if patient_ids is None else data.values[data.rows_for(patient_ids)]
            X = X[:, data.gene_indices(self.genes, what="model's")]
        else:
            X = _as_matrix(data)
            if genes is not None:
                tmp = ExpressionTable(
                    values=np.zeros((0, len(genes)), np.float32), sample_ids=[], genes=list(genes)
                )
                X = X[:, tmp.gene_indices(self.genes, what="model's")]
            elif X.shape[1] != len(self.genes):
                raise ExpressionError(
                    f"Expression matrix has {X.shape[1]} columns but the model uses "
                    f"{len(self.genes)} genes; pass the column names (genes=...)."
                )
        X, _ = self.fill_missing(X)  # nan_policy="median": the training medians
        return self.normalizer.transform(X)

    def to_dict(self) -> dict:
        return {
            "type": "Preprocessing",
            "version": FORMAT_VERSION,
            "genes": list(self.genes),
            "normalizer": self.normalizer.to_dict(),
            "selector": dict(self.selector),
            "train_patient_ids": list(self.train_patient_ids),
            "fill_values": None if self.fill_values is None else [float(v) for v in self.fill_values],
            "scale": dict(self.scale),
            "gene_min": None if self.gene_min is None else [float(v) for v in self.gene_min],
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Preprocessing:
        try:
            _check_version(d, "preprocessing")
            genes = [str(g) for g in d["genes"]]
            norm = ExpressionNormalizer.from_dict(d["normalizer"])
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, ConfigError):
                raise
            raise ConfigError(f"malformed preprocessing record ({exc!r}).") from None
        if norm.n_genes != len(genes):
            raise ConfigError(
                f"malformed preprocessing record: {len(genes)} genes but "
                f"normalisation statistics for {norm.n_genes}."
            )
        extra: dict[str, Any] = {}
        for key in ("fill_values", "gene_min"):
            v = d.get(key)
            if v is not None:
                arr = np.asarray(v, dtype=np.float64).ravel()
                if arr.shape != (len(genes),) or not np.all(np.isfinite(arr)):
                    raise ConfigError(f"malformed preprocessing record: bad {key}.")
                extra[key] = arr
        return cls(
            genes=genes,
            normalizer=norm,
            selector=dict(d.get("selector", {})),
            train_patient_ids=[str(p) for p in d.get("train_patient_ids", [])],
            scale=dict(d.get("scale") or {}),
            **extra,
        )


def fit_preprocessing(
    table: Any,
    train_patient_ids: Sequence[str],
    labels: Sequence | Mapping[str, Any] | None,
    curated: Sequence[str] | None = None,
    *,
    genes: Sequence[str] | None = None,
    select: bool = True,
    log1p: bool | Literal["auto"] = "auto",
    progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
    survival: tuple[Any, Any] | None = None,
    **selector_params: Any,
) -> Preprocessing:
    """Fit gene selection and normalisation on the training patients only.

    Parameters
    ----------
    table
        An ExpressionTable (rows matched to ``train_patient_ids``, TCGA 12-character
        matching), or an array [len(train_patient_ids), n_genes] with ``genes`` given.
    train_patient_ids
        The training patients of this fold. No other row of ``table`` is looked at.
    labels
        Subtype per training patient (same order), or a mapping patient_id -> subtype, or
        None (genes chosen by variance).
    curated
        Curated gene names united with the selection.
    select
        False keeps all non-constant genes (plus nothing else): normalisation only.
    survival
        ``(time, event)`` of the training patients (same order): select genes by univariate
        Cox screening on them (see :meth:`GeneSelector.fit`).
    **selector_params
        Passed to :class:`GeneSelector` (step, cv_folds, max_genes, prefilter_genes, seed ...).
    """
    from .expression import ExpressionTable

    pids = [str(p) for p in train_patient_ids]
    if len(pids) == 0:
        raise ConfigError("fit_preprocessing needs at least one training patient.")
    if len(set(pids)) != len(pids):
        raise ConfigError("train_patient_ids contains duplicates.")
    if isinstance(table, ExpressionTable):
        X = table.values[table.rows_for(pids)].astype(np.float64)
        all_genes = list(table.genes)
    else:
        X = _as_matrix(table)
        if genes is None:
            raise ConfigError("fit_preprocessing with an array needs genes=[...] (column names).")
        all_genes = [str(g) for g in genes]
        if X.shape[0] != len(pids):
            raise ExpressionError(f"{X.shape[0]} rows for {len(pids)} training patients.")
    if isinstance(labels, Mapping):
        y = [labels.get(p) for p in pids]
    elif labels is not None:
        y = list(labels)
        if len(y) != len(pids):
            raise ConfigError(f"{len(y)} labels for {len(pids)} training patients.")
    else:
        y = None

    # missing values (nan_policy="median"): each gene's median over these training patients
    nan = np.isnan(X)
    fill_notes: list[str] = []
    if nan.any():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN genes: median NaN
            med = np.nanmedian(X, axis=0)
        empty = np.isnan(med)
        med[empty] = 0.0  # no training value at all: constant after filling, never selected
        X = np.where(nan, med[None, :], X)
        fill_notes.append(
            f"{int(nan.sum())} missing training values in {int(nan.any(axis=0).sum())} genes "
            "were filled with each gene's median over the training patients"
            + (f"; {int(empty.sum())} genes had no training value at all" if empty.any() else "")
        )
    else:
        med = np.median(X, axis=0)
    probe = ExpressionNormalizer(log1p=log1p).fit(X, all_genes)
    X_log = np.log1p(X) if probe.log1p_ else X
    if select:
        sel = GeneSelector(curated=curated, **selector_params).fit(
            X_log, y, all_genes, progress=progress, should_stop=should_stop, survival=survival
        )
        chosen = sel.genes_
        summary = sel.to_dict()
    else:
        const = X_log.var(axis=0) <= 1e-12
        chosen = [g for g, c in zip(all_genes, const, strict=True) if not c]
        dropped = [g for g, c in zip(all_genes, const, strict=True) if c]
        summary = {
            "type": "GeneSelector",
            "method": "all-genes",
            "genes": chosen,
            "dropped_constant": dropped,
            "notes": [
                f"{len(dropped)} genes constant in the training patients (e.g. all 0) were "
                f"dropped: {', '.join(dropped[:_MAX_LISTED])}" + (" ..." if len(dropped) > _MAX_LISTED else "")
            ]
            if dropped
            else [],
        }
    index = {g: i for i, g in enumerate(all_genes)}
    cols = [index[g] for g in chosen]
    norm = probe.subset(cols)
    if fill_notes:
        summary.setdefault("notes", [])
        summary["notes"] = [*fill_notes, *summary["notes"]]
    return Preprocessing(
        genes=list(chosen),
        normalizer=norm,
        selector=summary,
        train_patient_ids=pids,
        fill_values=med[cols].astype(np.float64),
        scale=describe_scale(X[:, cols]),
        gene_min=X[:, cols].min(axis=0).astype(np.float64),
    )


def read_gene_list(path: Any) -> list[str]:
    """Read a curated gene list: one gene per line or comma/tab separated; '#' starts a comment.

    A header cell named gene/genes/symbol is skipped. Raises ExpressionError if the file is
    missing or lists no gene.
    """
    from pathlib import Path

    p = Path(path)
    if not p.is_file():
        raise ExpressionError(f"Gene list {p} does not exist.")
    try:
        text = p.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ExpressionError(f"Gene list {p} is not UTF-8 text ({exc}).") from None
    out: list[str] = []
    for line in text.splitlines():
        line = line.split("#", 1)[0]
        for cell in line.replace("\t", ",").replace(";", ",").split(","):
            c = cell.strip().strip('"').strip("'")
            if c and c.lower() not in ("gene", "genes", "symbol", "gene_symbol", "hugo_symbol"):
                out.append(c)
    out = list(dict.fromkeys(out))
    if not out:
        raise ExpressionError(f"Gene list {p} lists no gene.")
    return out
