"""The head fitting shared by evaluation and export: which patients count, what is fitted."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mirror_model.evaluation.heads import (
    HeadTargets,
    finite_rows,
    fit_subtype_probe,
    fit_survival_head,
    has_label,
    km_by_risk_group,
)
from mirror_model.evaluation.survival import CoxHead


@pytest.mark.parametrize(
    ("value", "expected"),
    [("solid", True), ("0", True), (0, True), (None, False), (math.nan, False), ("", False),
     ("  ", False), ("nan", False), ("NaN", False), ("None", False)],
)  # fmt: skip
def test_missing_labels_are_the_ways_pandas_and_csv_spell_them(value, expected):
    assert has_label(value) is expected


def test_targets_select_labelled_and_known_rows():
    t = HeadTargets.from_arrays(
        5,
        subtype=np.array(["a", None, "b", math.nan, "nan"], dtype=object),
        time=[1.0, 2.0, math.nan, 4.0, 5.0],
        event=[1, 0, 1, math.nan, 0],
    )
    rows = np.array([4, 3, 2, 1, 0])  # order is kept
    assert t.subtype_rows(rows).tolist() == [2, 0]
    assert t.survival_rows(rows).tolist() == [4, 1, 0]
    assert t.has_survival
    none = HeadTargets.from_arrays(3)
    assert (
        none.labels is None and not none.has_survival and none.subtype_rows(np.arange(3)).size == 0
    )


def test_finite_rows_drop_patients_without_the_modality():
    X = np.array([[0.0, 1.0], [np.nan, np.nan], [2.0, 3.0], [4.0, np.inf]])
    assert finite_rows(X, np.array([3, 2, 1, 0])).tolist() == [2, 0]


def test_subtype_probe_needs_two_classes_and_fits_the_rows_given():
    rng = np.random.default_rng(0)
    X = np.r_[rng.normal(-2, 1, (20, 3)), rng.normal(2, 1, (20, 3))]
    t = HeadTargets.from_arrays(40, subtype=["a"] * 20 + ["b"] * 20)
    assert fit_subtype_probe(X, t, np.arange(20), C=1.0, seed=0) is None  # one class only
    probe = fit_subtype_probe(X, t, np.arange(0, 40, 2), C=1.0, seed=0)
    assert probe is not None and probe.classes_.tolist() == ["a", "b"]
    assert (probe.predict_proba(X[1::2]).argmax(1) == np.repeat([0, 1], 10)).mean() > 0.9


def test_survival_cutoff_is_the_median_training_risk():
    rng = np.random.default_rng(1)
    X = rng.normal(size=(30, 2))
    time = np.exp(-X[:, 0]) * 10 + rng.uniform(0, 1, 30)  # higher x0 = earlier death
    t = HeadTargets.from_arrays(30, time=time, event=np.ones(30))
    rows = np.arange(20)
    fit = fit_survival_head(CoxHead(penalizer=0.1, max_components=None), X, t, rows)
    r = fit.head.predict_risk(X[rows])
    assert fit.risk_cutoff == pytest.approx(float(np.median(r)))
    # direction: a higher risk score means an earlier death
    assert np.corrcoef(fit.head.predict_risk(X), X[:, 0])[0, 1] > 0.5


def test_km_by_risk_group_has_only_groups_present():
    km = km_by_risk_group([1, 2, 3], [1, 1, 0], np.array(["low", "low", "low"]))
    assert set(km) == {"low"}
    assert km["low"]["survival"][-1] == pytest.approx(1 / 3)
