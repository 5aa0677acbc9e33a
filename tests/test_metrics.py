"""Metrics on planted answers, hand-computed examples and references (sklearn, lifelines)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from lifelines.utils import concordance_index
from sklearn.metrics import balanced_accuracy_score, f1_score, roc_auc_score

from mirror_model.errors import ConfigError
from mirror_model.evaluation.metrics import (
    accuracy,
    auroc_macro,
    balanced_accuracy,
    c_index,
    classification_metrics,
    confusion_matrix,
    f1_macro,
    summarize,
)


def test_perfect_probabilities_give_one():
    y = np.array(["a", "b", "c", "a", "b", "c"])
    proba = np.eye(3)[[0, 1, 2, 0, 1, 2]] * 0.8 + 0.2 / 3
    m = classification_metrics(y, proba, ["a", "b", "c"])
    assert m == {"accuracy": 1.0, "balanced_accuracy": 1.0, "auroc_macro": 1.0, "f1_macro": 1.0}


def test_random_scores_are_chance_within_tolerance_over_many_seeds():
    # 300 seeds x 200 samples: the mean of a chance metric has sd ~ 0.003, so +-0.015 is ~5 sd
    aucs, baccs = [], []
    for seed in range(300):
        rng = np.random.default_rng(seed)
        y = rng.integers(0, 2, 200)
        p1 = rng.random(200)
        aucs.append(auroc_macro(y, np.stack([1 - p1, p1], 1), [0, 1]))
        baccs.append(balanced_accuracy(y, (p1 > 0.5).astype(int)))
    assert abs(np.mean(aucs) - 0.5) < 0.015
    assert abs(np.mean(baccs) - 0.5) < 0.015


def test_balanced_accuracy_and_macro_f1_hand_computed():
    y_true = ["a", "a", "a", "a", "b", "b"]
    y_pred = ["a", "a", "a", "b", "b", "a"]
    # recall a = 3/4, recall b = 1/2 -> 0.625
    assert balanced_accuracy(y_true, y_pred) == pytest.approx(0.625)
    # F1 a = 2*3/(6+1+1) = 0.75 ; F1 b = 2*1/(2+1+1) = 0.5 -> 0.625
    assert f1_macro(y_true, y_pred) == pytest.approx(0.625)
    assert accuracy(y_true, y_pred) == pytest.approx(4 / 6)
    assert balanced_accuracy(y_true, y_pred) == pytest.approx(
        balanced_accuracy_score(y_true, y_pred)
    )
    assert f1_macro(y_true, y_pred) == pytest.approx(f1_score(y_true, y_pred, average="macro"))


def test_three_class_metrics_match_sklearn():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 3, 60)
    logits = rng.normal(size=(60, 3)) + np.eye(3)[y] * 0.8
    proba = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    # round to create tied scores, which AUROC counts as one half
    proba = np.round(proba, 1)
    proba = proba / proba.sum(1, keepdims=True)
    ref = roc_auc_score(y, proba, multi_class="ovr", average="macro")
    assert auroc_macro(y, proba, [0, 1, 2]) == pytest.approx(ref)
    pred = proba.argmax(1)
    assert f1_macro(y, pred, [0, 1, 2]) == pytest.approx(f1_score(y, pred, average="macro"))


def test_auroc_hand_example_with_tie_and_undefined_case():
    # positives scores 0.8, 0.4; negatives 0.4, 0.1: pairs (0.8>0.4, 0.8>0.1, 0.4=0.4, 0.4>0.1) = 3.5/4
    y = [1, 1, 0, 0]
    p1 = np.array([0.8, 0.4, 0.4, 0.1])
    assert auroc_macro(y, np.stack([1 - p1, p1], 1), [0, 1]) == pytest.approx(0.875)
    assert math.isnan(auroc_macro([1, 1], np.array([[0.2, 0.8], [0.4, 0.6]]), [0, 1]))
    with pytest.raises(ConfigError, match="shape"):
        auroc_macro(y, np.ones((4, 3)), [0, 1])


def test_confusion_matrix_rows_true_columns_predicted():
    cm = confusion_matrix(["a", "a", "b", "c"], ["a", "b", "b", "a"], ["a", "b", "c"])
    assert cm.tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 0]]


def test_c_index_hand_example_with_ties_and_censoring():
    time = [1, 2, 2, 3, 4]
    event = [1, 1, 0, 1, 0]
    risk = [5, 3, 4, 3, 1]
    # comparable (i first, event_i = 1): (0,1),(0,2),(0,3),(0,4) -> all concordant (5 > ...)
    # (1,2): equal time, 2 censored -> comparable, 3 < 4 discordant
    # (1,3): 3 = 3 tie -> 0.5 ; (1,4): concordant ; (3,4): concordant
    # total 8 pairs, concordant 4 + 0 + 0.5 + 1 + 1 = 6.5
    assert c_index(time, event, risk) == pytest.approx(6.5 / 8)
    assert c_index(time, event, risk) == pytest.approx(
        concordance_index(time, -np.asarray(risk, float), event)
    )


def test_c_index_matches_lifelines_on_random_data_with_ties():
    for seed in range(20):
        rng = np.random.default_rng(seed)
        t = rng.integers(1, 8, 50).astype(float)
        e = rng.integers(0, 2, 50)
        r = rng.integers(0, 4, 50).astype(float)
        assert c_index(t, e, r) == pytest.approx(concordance_index(t, -r, e), abs=1e-12)


def test_c_index_direction_higher_risk_earlier_death():
    t = np.array([1.0, 2.0, 3.0, 5.0, 8.0])
    e = np.ones(5)
    assert c_index(t, e, -t) == 1.0  # risk = -time: the earliest death has the highest risk
    assert c_index(t, e, t) == 0.0
    assert math.isnan(c_index(t, np.zeros(5), -t))  # no event, no comparable pair


def test_c_index_rejects_mismatched_or_nan_input():
    with pytest.raises(ConfigError, match="same length"):
        c_index([1, 2], [1, 1], [0.1])
    with pytest.raises(ConfigError, match="finite"):
        c_index([1, 2], [1, 1], [0.1, float("nan")])


def test_summarize_mean_sample_sd_and_nulls():
    s = summarize([0.6, 0.8, float("nan"), None])
    assert s["mean"] == pytest.approx(0.7)
    assert s["sd"] == pytest.approx(np.std([0.6, 0.8], ddof=1))
    assert s["per_fold"] == [0.6, 0.8, None, None]
    assert summarize([0.5]) == {"mean": 0.5, "sd": None, "per_fold": [0.5]}
    assert summarize([None]) == {"mean": None, "sd": None, "per_fold": [None]}
