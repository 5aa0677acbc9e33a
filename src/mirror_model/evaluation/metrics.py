"""Classification and survival metrics, and their mean ± sd summary over folds.

Thin wrappers over scikit-learn (classification) and lifelines (C-index) that keep only our
rules: plain numpy arrays in, Python floats out, ``nan`` where a metric is undefined on the
data (AUROC when the test set holds one class only, C-index without a comparable pair) instead
of the libraries' errors, and the direction of the risk score stated below. Results go
straight into JSON (``nan`` is written as ``null`` by :func:`summarize`). The libraries are
imported on first use, so loading a bundle for prediction does not import them.

Directions
----------
- Classification metrics: higher is better; 1.0 is perfect, 0.5 is chance for
  balanced accuracy / AUROC of an uninformative score.
- :func:`c_index`: the ``risk`` score means **higher risk = worse prognosis = earlier
  event**; a perfect risk score (e.g. ``risk = -time`` with all events observed) gives 1.0,
  a random one ≈ 0.5, a reversed one 0.0.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import ConfigError

__all__ = [
    "CLASSIFICATION_METRICS",
    "accuracy",
    "auroc_macro",
    "balanced_accuracy",
    "binary_auroc",
    "c_index",
    "classification_metrics",
    "confusion_matrix",
    "f1_macro",
    "summarize",
]

#: Metric keys written for every subtyping task, in this order (stable; metrics.json uses them).
CLASSIFICATION_METRICS: tuple[str, ...] = (
    "accuracy",
    "balanced_accuracy",
    "auroc_macro",
    "f1_macro",
)


def _labels(y_true: Sequence[Any], y_pred: Sequence[Any]) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(y_true)
    b = np.asarray(y_pred)
    if a.shape != b.shape or a.ndim != 1:
        raise ConfigError(
            f"y_true and y_pred must be 1-D arrays of equal length; got shapes {a.shape} and {b.shape}."
        )
    if a.size == 0:
        raise ConfigError("cannot compute a metric on zero samples.")
    return a, b


def accuracy(y_true: Sequence[Any], y_pred: Sequence[Any]) -> float:
    """Fraction of samples whose predicted label equals the true label (0–1)."""
    from sklearn.metrics import accuracy_score

    a, b = _labels(y_true, y_pred)
    return float(accuracy_score(a, b))


def balanced_accuracy(y_true: Sequence[Any], y_pred: Sequence[Any]) -> float:
    """Mean over the classes present in ``y_true`` of the per-class recall (0–1).

    scikit-learn's ``balanced_accuracy_score``: classes that only occur in ``y_pred`` do not
    add a term (its warning about them is silenced: that is the definition we want).
    """
    from sklearn.metrics import balanced_accuracy_score

    a, b = _labels(y_true, y_pred)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return float(balanced_accuracy_score(a, b))


def f1_macro(
    y_true: Sequence[Any], y_pred: Sequence[Any], classes: Sequence[Any] | None = None
) -> float:
    """Unweighted mean over ``classes`` of the per-class F1 = 2·TP / (2·TP + FP + FN).

    ``classes`` defaults to the union of labels in ``y_true`` and ``y_pred``. A class with no
    true and no predicted sample has F1 = 0 (scikit-learn's ``f1_score`` with
    ``average="macro", zero_division=0``).
    """
    from sklearn.metrics import f1_score

    a, b = _labels(y_true, y_pred)
    labels = None if classes is None else list(classes)
    return float(f1_score(a, b, labels=labels, average="macro", zero_division=0))


def binary_auroc(positive: Sequence[Any], score: Sequence[float]) -> float:
    """AUROC of ``score`` for the ``positive`` (True) samples: P(score_pos > score_neg) +
    0.5·P(tie) (scikit-learn's ``roc_auc_score``); ``nan`` when either class is absent."""
    from sklearn.metrics import roc_auc_score

    y = np.asarray(positive, dtype=bool).ravel()
    if y.all() or not y.any():
        return math.nan
    return float(roc_auc_score(y, np.asarray(score, dtype=np.float64).ravel()))


def auroc_macro(y_true: Sequence[Any], proba: np.ndarray, classes: Sequence[Any]) -> float:
    """Macro-averaged one-vs-rest AUROC (0–1).

    Parameters
    ----------
    y_true : labels, shape [N].
    proba : predicted class probabilities, shape [N, C], column ``j`` for ``classes[j]``.
    classes : the C class labels in column order.

    Returns
    -------
    float
        For two classes the AUROC of ``proba[:, 1]`` for ``classes[1]``; for more classes the
        unweighted mean of the one-vs-rest AUROCs over the classes present in ``y_true``
        (a class absent from the test set has no defined AUROC and is left out, where
        scikit-learn's multi-class ``roc_auc_score`` refuses). ``nan`` when ``y_true`` holds
        fewer than two classes.
    """
    a = np.asarray(y_true)
    p = np.asarray(proba, dtype=np.float64)
    cls = list(classes)
    if p.ndim != 2 or p.shape != (a.size, len(cls)):
        raise ConfigError(
            f"proba must have shape [n_samples, n_classes] = [{a.size}, {len(cls)}]; got {p.shape}."
        )
    present = [c for c in cls if np.any(a == c)]
    if len(present) < 2:
        return math.nan
    if len(cls) == 2:
        return binary_auroc(a == cls[1], p[:, 1])
    return float(np.nanmean([binary_auroc(a == c, p[:, cls.index(c)]) for c in present]))


def confusion_matrix(
    y_true: Sequence[Any], y_pred: Sequence[Any], classes: Sequence[Any]
) -> np.ndarray:
    """Counts [C, C]: row = true class, column = predicted class, in the order of ``classes``
    (samples with a label outside ``classes`` are not counted)."""
    from sklearn.metrics import confusion_matrix as sk_confusion_matrix

    a, b = _labels(y_true, y_pred)
    cls = list(classes)
    if not any(np.any(a == c) for c in cls):  # scikit-learn refuses; nothing to count
        return np.zeros((len(cls), len(cls)), dtype=np.int64)
    return sk_confusion_matrix(a, b, labels=cls).astype(np.int64)


def classification_metrics(
    y_true: Sequence[Any], proba: np.ndarray, classes: Sequence[Any]
) -> dict[str, float]:
    """All :data:`CLASSIFICATION_METRICS` from class probabilities (prediction = argmax)."""
    p = np.asarray(proba, dtype=np.float64)
    cls = np.asarray(list(classes))
    y_pred = cls[np.argmax(p, axis=1)]
    return {
        "accuracy": accuracy(y_true, y_pred),
        "balanced_accuracy": balanced_accuracy(y_true, y_pred),
        "auroc_macro": auroc_macro(y_true, p, list(classes)),
        "f1_macro": f1_macro(y_true, y_pred, classes=list(classes)),
    }


def c_index(time: Sequence[float], event: Sequence[Any], risk: Sequence[float]) -> float:
    """Harrell's concordance index of a risk score (0–1; higher risk = earlier event).

    A pair (i, j) is comparable when patient i had an observed event (``event[i] = 1``)
    strictly before j's time, or at the same time as j when j was censored (j is then known
    to have outlived i). Two events at the same time are not comparable. A comparable pair
    is concordant when ``risk[i] > risk[j]``; a tie in risk counts one half. Computed by
    ``lifelines.utils.concordance_index(time, -risk, event)`` (lifelines scores *survival*,
    so its score is the negated risk).

    Parameters
    ----------
    time : follow-up time per patient (any unit, e.g. months), shape [N].
    event : 1/True if the event (death) was observed, 0/False if censored, shape [N].
    risk : risk score, **higher = worse prognosis**, shape [N].

    Returns
    -------
    float
        The C-index; ``nan`` when no pair is comparable (e.g. no observed event).
    """
    t = np.asarray(time, dtype=np.float64).ravel()
    e = np.asarray(event).astype(bool).ravel()
    r = np.asarray(risk, dtype=np.float64).ravel()
    if not (t.shape == e.shape == r.shape):
        raise ConfigError(
            f"time, event and risk must have the same length; got {t.size}, {e.size}, {r.size}."
        )
    if not (np.all(np.isfinite(t)) and np.all(np.isfinite(r))):
        raise ConfigError("time and risk must be finite numbers (found NaN or inf).")
    if not _has_comparable_pair(t, e):
        return math.nan
    from lifelines.utils import concordance_index

    return float(concordance_index(t, -r, e))


def _has_comparable_pair(t: np.ndarray, e: np.ndarray) -> bool:
    """Some observed event strictly before another time, or tied with a censoring."""
    if not e.any():
        return False
    first = t[e].min()
    return bool(np.any(t > first) or np.any((t == first) & ~e))


def summarize(per_fold: Sequence[float | None]) -> dict[str, Any]:
    """``{"mean", "sd", "per_fold"}`` of one metric over folds (JSON-ready).

    ``sd`` is the sample standard deviation (ddof = 1) over the folds where the metric is
    defined; with a single defined fold it is ``None``. Undefined values (``nan``/``None``)
    are written as ``None`` in ``per_fold`` and left out of mean and sd; ``mean`` is ``None``
    if no fold defines the metric.
    """
    vals: list[float | None] = []
    for v in per_fold:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            vals.append(None)
        else:
            vals.append(float(v))
    defined = np.asarray([v for v in vals if v is not None], dtype=np.float64)
    mean = float(defined.mean()) if defined.size else None
    sd = float(defined.std(ddof=1)) if defined.size > 1 else None
    return {"mean": mean, "sd": sd, "per_fold": vals}
