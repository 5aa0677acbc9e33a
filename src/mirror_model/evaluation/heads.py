"""Fitting the downstream heads on frozen embeddings — the one place both users share.

:func:`mirror_model.evaluation.evaluate.evaluate_embeddings` (heads scored on each fold's test
patients) and :func:`mirror_model.evaluation.export.export_bundle` (the heads shipped in a
bundle) select patients and fit heads through these functions, so the two cannot drift apart:

- a patient counts for a head only if its input row is finite (it has the modality);
- a subtype label is missing when it is None, NaN, empty, or the text ``"nan"`` / ``"NaN"`` /
  ``"None"`` (how pandas and CSV files spell a missing value) — such patients are left out
  of subtype heads, never turned into a class named ``"nan"``;
- a survival head uses the patients whose time and event are both finite;
- the risk cut-off between the ``"low"`` and ``"high"`` groups is the median risk of the
  patients the head was fitted on (never of the patients reported).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .probes import LinearProbe
from .survival import choose_risk_cutoff, kaplan_meier

__all__ = [
    "HeadTargets",
    "SurvivalFit",
    "finite_rows",
    "fit_subtype_probe",
    "fit_survival_head",
    "has_label",
    "km_by_risk_group",
]


def has_label(v: Any) -> bool:
    """False for a missing subtype label (None, NaN, "", "nan", "NaN", "None")."""
    if v is None:
        return False
    if isinstance(v, float) and math.isnan(v):
        return False
    return not (isinstance(v, str) and v.strip() in ("", "nan", "NaN", "None"))


@dataclass
class HeadTargets:
    """What the heads predict, one entry per embedding row.

    Attributes
    ----------
    labels : [P] subtype labels as str (object array), or None without labels.
    labelled : [P] bool, True where the label is present (see :func:`has_label`).
    time, event : [P] float64 follow-up and event (1 = death observed), or None.
    known : [P] bool, True where time and event are both finite.
    """

    labels: np.ndarray | None
    labelled: np.ndarray
    time: np.ndarray | None
    event: np.ndarray | None
    known: np.ndarray

    @classmethod
    def from_arrays(
        cls, n: int, subtype: Any = None, time: Any = None, event: Any = None
    ) -> HeadTargets:
        if subtype is None:
            labels, labelled = None, np.zeros(n, bool)
        else:
            labelled = np.array([has_label(v) for v in subtype], dtype=bool)
            labels = np.array([str(v) for v in subtype], dtype=object)
        if time is None or event is None:
            t = e = None
            known = np.zeros(n, bool)
        else:
            t = np.asarray(time, np.float64)
            e = np.asarray(event).astype(np.float64)
            known = np.isfinite(t) & np.isfinite(e)
        return cls(labels, labelled, t, e, known)

    @property
    def has_survival(self) -> bool:
        return self.time is not None and self.event is not None

    def subtype_rows(self, rows: np.ndarray) -> np.ndarray:
        """The rows among ``rows`` that have a subtype label."""
        return rows[self.labelled[rows]]

    def survival_rows(self, rows: np.ndarray) -> np.ndarray:
        """The rows among ``rows`` with finite time and event."""
        return rows[self.known[rows]]


def finite_rows(X: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """The rows among ``rows`` whose input is finite (patients that have the modality)."""
    ok = np.all(np.isfinite(X), axis=1)
    return rows[ok[rows]]


def fit_subtype_probe(
    X: np.ndarray, targets: HeadTargets, rows: np.ndarray, *, C: float | str, seed: int
) -> LinearProbe | None:
    """A :class:`LinearProbe` on ``rows`` (finite, labelled); None with fewer than two classes."""
    if targets.labels is None or np.unique(targets.labels[rows]).size < 2:
        return None
    return LinearProbe(C=C, seed=seed).fit(X[rows], targets.labels[rows])


@dataclass
class SurvivalFit:
    """A fitted survival head and the risk cut-off chosen on its training rows.

    ``head.predict_risk(X)``: higher = worse prognosis (earlier death); a patient is in the
    ``"high"`` group when its risk is above ``risk_cutoff``.
    """

    head: Any
    risk_cutoff: float


def fit_survival_head(
    head: Any, X: np.ndarray, targets: HeadTargets, rows: np.ndarray
) -> SurvivalFit:
    """Fit an unfitted survival head (CoxHead, DiscreteHazardHead) on ``rows`` (finite X,
    known time and event) and choose the risk cut-off on the same rows."""
    assert targets.time is not None and targets.event is not None
    head.fit(X[rows], targets.time[rows], targets.event[rows])
    return SurvivalFit(head, choose_risk_cutoff(head.predict_risk(X[rows])))


def km_by_risk_group(
    time: Sequence[float], event: Sequence[Any], group: Sequence[str]
) -> dict[str, dict[str, Any]]:
    """Kaplan–Meier curve (``KMCurve.to_dict()``) of each of ``"low"``/``"high"`` present."""
    t, e, g = np.asarray(time), np.asarray(event), np.asarray(group)
    return {
        grp: kaplan_meier(t[g == grp], e[g == grp]).to_dict()
        for grp in ("low", "high")
        if np.any(g == grp)
    }
