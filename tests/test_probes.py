"""LinearProbe (numpy prediction, JSON round trip, inner-CV C) and k-shot sampling."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from mirror_model.errors import ConfigError
from mirror_model.evaluation.metrics import classification_metrics
from mirror_model.evaluation.probes import DEFAULT_CS, LinearProbe, sample_k_shot


def _blobs(n_per: int, classes: list[str], dim: int, sep: float, seed: int):
    rng = np.random.default_rng(seed)
    X, y = [], []
    for i, c in enumerate(classes):
        center = np.zeros(dim)
        center[i] = sep
        X.append(rng.normal(size=(n_per, dim)) + center)
        y += [c] * n_per
    return np.concatenate(X), np.array(y)


def test_separable_embeddings_give_perfect_test_metrics():
    X, y = _blobs(40, ["LUAD", "LUSC", "X"], 8, sep=20.0, seed=0)
    Xt, yt = _blobs(20, ["LUAD", "LUSC", "X"], 8, sep=20.0, seed=1)
    probe = LinearProbe(C=1.0).fit(X, y)
    m = classification_metrics(yt, probe.predict_proba(Xt), probe.classes_.tolist())
    assert m["accuracy"] == 1.0 and m["auroc_macro"] == 1.0 and m["f1_macro"] == 1.0
    assert probe.classes_.tolist() == ["LUAD", "LUSC", "X"]


@pytest.mark.parametrize("classes", [["IDC", "ILC"], ["a", "b", "c"]])
def test_numpy_probabilities_equal_sklearn(classes):
    X, y = _blobs(30, classes, 5, sep=1.5, seed=2)
    probe = LinearProbe(C=0.3, class_weight=None).fit(X, y)
    Z = (X - X.mean(0)) / X.std(0)
    ref = LogisticRegression(C=0.3, max_iter=2000).fit(Z, y)
    np.testing.assert_allclose(probe.predict_proba(X), ref.predict_proba(Z), atol=1e-6)
    np.testing.assert_allclose(probe.predict_proba(X).sum(1), 1.0)
    assert (probe.predict(X) == ref.predict(Z)).all()


@pytest.mark.parametrize("classes", [["IDC", "ILC"], ["a", "b", "c"]])
def test_to_dict_from_dict_round_trip_gives_identical_predictions(classes):
    X, y = _blobs(25, classes, 6, sep=1.0, seed=3)
    probe = LinearProbe(C="cv").fit(X, y)
    doc = json.loads(json.dumps(probe.to_dict()))  # must be plain JSON
    back = LinearProbe.from_dict(doc)
    Xn = np.random.default_rng(9).normal(size=(15, 6))
    np.testing.assert_array_equal(back.predict_proba(Xn), probe.predict_proba(Xn))
    assert back.classes_.tolist() == probe.classes_.tolist()


def test_inner_cv_picks_c_from_grid_and_one_shot_falls_back():
    X, y = _blobs(20, ["a", "b"], 4, sep=2.0, seed=4)
    probe = LinearProbe(C="cv").fit(X, y)
    assert probe.C_selection_ == "inner_cv" and probe.C_ in DEFAULT_CS
    one = LinearProbe(C="cv", C_default=0.5).fit(X[[0, 20]], y[[0, 20]])
    assert one.C_selection_.startswith("fixed") and one.C_ == 0.5


def test_inner_cv_prefers_strong_regularisation_on_pure_noise():
    rng = np.random.default_rng(5)
    X = rng.normal(size=(80, 40))
    y = rng.integers(0, 2, 80).astype(str)
    probe = LinearProbe(C="cv").fit(X, y)
    assert probe.C_ <= 0.01  # noise: the held-out log-loss is best with the smallest C


def test_probe_errors_are_clear():
    X, y = _blobs(5, ["a", "b"], 3, sep=1.0, seed=0)
    with pytest.raises(ConfigError, match="two classes"):
        LinearProbe(C=1.0).fit(X, ["a"] * 10)
    with pytest.raises(ConfigError, match="one label per row"):
        LinearProbe(C=1.0).fit(X, y[:4])
    with pytest.raises(ConfigError, match="NaN"):
        LinearProbe(C=1.0).fit(np.where(X > 0, np.nan, X), y)
    probe = LinearProbe(C=1.0).fit(X, y)
    with pytest.raises(ConfigError, match="3-d"):
        probe.predict_proba(np.zeros((2, 4)))
    with pytest.raises(ConfigError, match="malformed"):
        LinearProbe.from_dict({"classes": ["a", "b"], "mean": [0.0]})
    with pytest.raises(ConfigError, match="not fitted"):
        LinearProbe().predict_proba(X)


def test_k_shot_draws_exactly_k_per_class_and_are_seeded():
    labels = np.array(["a"] * 30 + ["b"] * 12 + ["c"] * 10)
    idx = sample_k_shot(labels, 10, 7)
    assert idx.size == 30 and np.unique(idx).size == 30
    assert {c: int(np.sum(labels[idx] == c)) for c in "abc"} == {"a": 10, "b": 10, "c": 10}
    np.testing.assert_array_equal(idx, sample_k_shot(labels, 10, 7))
    assert not np.array_equal(idx, sample_k_shot(labels, 10, 8))
    with pytest.raises(ConfigError, match="'c' has only 10"):
        sample_k_shot(labels, 11, 0)
    with pytest.raises(ConfigError, match="positive integer"):
        sample_k_shot(labels, 0, 0)


def test_reference_standardisation_for_few_shot_probes():
    X, y = _blobs(50, ["a", "b"], 10, sep=3.0, seed=6)
    Xt, yt = _blobs(50, ["a", "b"], 10, sep=3.0, seed=7)
    idx = sample_k_shot(y, 1, 0)
    probe = LinearProbe(C=1.0).fit(X[idx], y[idx], X_reference=X)
    np.testing.assert_allclose(probe.mean_, X.mean(0))
    np.testing.assert_allclose(probe.scale_, X.std(0))
    # with a well-conditioned scale, one shot per class already beats chance clearly
    aucs = []
    for seed in range(20):
        idx = sample_k_shot(y, 1, seed)
        p = LinearProbe(C=1.0).fit(X[idx], y[idx], X_reference=X)
        aucs.append(classification_metrics(yt, p.predict_proba(Xt), ["a", "b"])["auroc_macro"])
    assert np.mean(aucs) > 0.8
    with pytest.raises(ConfigError, match="X_reference has 3 features"):
        LinearProbe(C=1.0).fit(X[idx], y[idx], X_reference=X[:, :3])


@pytest.mark.parametrize("classes", [["IDC", "ILC"], ["a", "b", "c"]])
def test_wide_input_is_fitted_in_its_row_space_and_gives_the_same_probe(classes):
    # 300 features, 36 patients: the solver sees the 36-column row-space design, yet the
    # probe equals scikit-learn fitted on all 300 standardised features
    X, y = _blobs(12, classes, 300, sep=3.0, seed=5)
    probe = LinearProbe(C=0.05).fit(X, y)
    assert probe.coef_.shape[1] == 300
    Z = (X - X.mean(0)) / X.std(0)
    ref = LogisticRegression(C=0.05, class_weight="balanced", max_iter=10_000, tol=1e-10).fit(Z, y)
    np.testing.assert_allclose(probe.coef_, ref.coef_, rtol=1e-3, atol=1e-5)
    # (the probe solver stops at scikit-learn's default tolerance, the reference at 1e-10)
    np.testing.assert_allclose(probe.predict_proba(X), ref.predict_proba(Z), atol=5e-4)
