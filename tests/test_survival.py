"""Survival heads, Kaplan–Meier, log-rank, bins and the discrete-time NLL."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from lifelines import KaplanMeierFitter
from lifelines.statistics import logrank_test as ll_logrank_test
from lifelines.statistics import multivariate_logrank_test

from mirror_model.errors import ConfigError
from mirror_model.evaluation.survival import (
    CoxHead,
    DiscreteHazardHead,
    KMCurve,
    _nll_torch,
    assign_bins,
    c_index,
    choose_risk_cutoff,
    cox_partial_loglik,
    discrete_hazard_nll,
    kaplan_meier,
    logrank_p,
    logrank_test,
    risk_groups,
    survival_bin_edges,
)


def _cohort(n: int, dim: int, beta0: float, seed: int):
    """Exponential survival with hazard exp(beta0 * x0), independent exponential censoring."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, dim))
    T = rng.exponential(np.exp(-beta0 * X[:, 0]))
    C = rng.exponential(2.0, n)
    return X, np.minimum(T, C), (T <= C).astype(int)


# -- Kaplan–Meier / log-rank ----------------------------------------------------------------
def test_kaplan_meier_equals_lifelines_on_small_example_with_ties():
    t = np.array([2, 3, 3, 3, 5, 6, 6, 8, 9, 12], float)
    e = np.array([1, 1, 0, 1, 0, 1, 1, 0, 1, 0])
    km = kaplan_meier(t, e)
    ref = KaplanMeierFitter().fit(t, e)
    np.testing.assert_allclose(km.time, ref.timeline)
    np.testing.assert_allclose(km.survival, ref.survival_function_.to_numpy()[:, 0])
    np.testing.assert_array_equal(km.at_risk, ref.event_table["at_risk"].to_numpy())
    # hand check: S(3) = (1 - 1/10) * (1 - 2/9) = 0.7
    assert km.survival_at(3.0) == pytest.approx(0.7)
    assert km.survival_at(2.5) == pytest.approx(0.9)
    back = KMCurve.from_dict(json.loads(json.dumps(km.to_dict())))
    np.testing.assert_array_equal(back.survival, km.survival)


def test_logrank_p_matches_lifelines_two_and_three_groups():
    for seed in range(5):
        rng = np.random.default_rng(seed)
        t = rng.integers(1, 15, 60).astype(float)
        e = rng.integers(0, 2, 60)
        g = rng.integers(0, 2, 60)
        ref = ll_logrank_test(t[g == 0], t[g == 1], e[g == 0], e[g == 1])
        assert logrank_p(t, e, g) == pytest.approx(ref.p_value, rel=1e-9)
        assert logrank_test(t, e, g).statistic == pytest.approx(ref.test_statistic, rel=1e-9)
        g3 = np.array(["low", "mid", "high"])[rng.integers(0, 3, 60)]
        assert logrank_p(t, e, g3) == pytest.approx(
            multivariate_logrank_test(t, g3, e).p_value, rel=1e-9
        )
    assert math.isnan(logrank_p([1, 2], [1, 1], ["a", "a"]))


def test_risk_cutoff_is_training_median_and_groups_split_on_it():
    assert choose_risk_cutoff([3.0, 1.0, 2.0, 10.0]) == 2.5
    assert risk_groups([1.0, 2.5, 4.0], 2.5).tolist() == ["low", "low", "high"]
    with pytest.raises(ConfigError):
        choose_risk_cutoff([])


# -- Cox head -------------------------------------------------------------------------------
@pytest.mark.parametrize("beta0", [1.0, -1.0])
def test_cox_head_recovers_sign_of_planted_coefficient(beta0):
    X, t, e = _cohort(200, 3, beta0, seed=1)
    head = CoxHead(penalizer=0.01, max_components=None).fit(X, t, e)
    assert np.sign(head.coef_[0]) == np.sign(beta0)
    assert abs(head.coef_[0]) > 3 * max(abs(head.coef_[1]), abs(head.coef_[2]))
    Xt, tt, et = _cohort(200, 3, beta0, seed=2)
    assert c_index(tt, et, head.predict_risk(Xt)) > 0.65  # higher risk = earlier death


def test_cox_head_reduces_wide_embeddings_by_pca_and_round_trips():
    X, t, e = _cohort(60, 100, 1.5, seed=3)
    head = CoxHead(penalizer=0.1, max_components=16).fit(X, t, e)
    assert head.components_.shape == (16, 100)
    back = CoxHead.from_dict(json.loads(json.dumps(head.to_dict())))
    Xn = np.random.default_rng(4).normal(size=(10, 100))
    np.testing.assert_array_equal(back.predict_risk(Xn), head.predict_risk(Xn))
    with pytest.raises(ConfigError, match="100-d"):
        head.predict_risk(np.zeros((2, 5)))


def test_cox_head_penalty_and_l1_ratio_by_inner_cv_on_training_data():
    X, t, e = _cohort(80, 4, 1.0, seed=5)
    head = CoxHead().fit(X, t, e)
    assert head.penalizer_selection_ == "inner_cv"
    assert head.l1_ratio_ in CoxHead.DEFAULT_L1_RATIOS
    tried = {(l1, a) for l1, a, _ in head.cv_table_}
    assert (head.l1_ratio_, head.penalizer_) in tried
    # the winner has the best cross-validated partial log-likelihood of everything tried
    assert max(v for *_, v in head.cv_table_) == pytest.approx(
        max(v for l1, a, v in head.cv_table_ if (l1, a) == (head.l1_ratio_, head.penalizer_))
    )
    assert head.cv_edge_ is None


def test_partial_loglik_equals_lifelines_without_ties():
    import pandas as pd
    from lifelines import CoxPHFitter

    X, t, e = _cohort(60, 2, 1.0, seed=11)
    df = pd.DataFrame({"a": X[:, 0], "b": X[:, 1], "T": t, "E": e})
    cph = CoxPHFitter().fit(df, "T", "E")
    eta = X @ cph.params_.to_numpy()
    assert float(cox_partial_loglik(t, e, eta)) == pytest.approx(cph.log_likelihood_, rel=1e-6)
    # several models at once, and ties share the risk set (Breslow): hand example
    ll = cox_partial_loglik([1, 1, 2], [1, 1, 0], np.zeros((3, 2)))
    np.testing.assert_allclose(ll, 2 * -np.log(3))


def test_cox_head_on_wide_input_finds_planted_genes():
    """400 'genes', 6 carry the hazard: the lasso end of the grid keeps them, no PCA."""
    rng = np.random.default_rng(12)
    n, d = 240, 400
    X = rng.normal(size=(n, d))
    beta = np.zeros(d)
    beta[:6] = [0.8, -0.8, 0.6, -0.6, 0.5, 0.5]
    T = rng.exponential(np.exp(-X @ beta))
    C = rng.exponential(2.0, n)
    t, e = np.minimum(T, C), (T <= C).astype(int)
    head = CoxHead().fit(X[:160], t[:160], e[:160])
    assert head.components_ is None and head.coef_.shape == (d,)
    top = set(np.argsort(-np.abs(head.coef_))[:6].tolist())
    assert len(top & set(range(6))) >= 5
    assert c_index(t[160:], e[160:], head.predict_risk(X[160:])) > 0.75
    back = CoxHead.from_dict(json.loads(json.dumps(head.to_dict())))
    np.testing.assert_array_equal(back.predict_risk(X[160:]), head.predict_risk(X[160:]))


def test_cox_head_extends_a_grid_whose_weakest_penalty_wins():
    X, t, e = _cohort(200, 2, 2.0, seed=13)
    head = CoxHead(penalizers=(0.05, 0.04), l1_ratio=1.0).fit(X, t, e)
    alphas = sorted({a for _, a, _ in head.cv_table_})
    assert alphas[0] < 0.04 / 50  # the grid grew by two decades, twice
    assert head.penalizer_ < 0.04 and head.cv_edge_ is None  # the optimum lies in between


def test_cox_head_on_noise_chooses_the_null_model():
    rng = np.random.default_rng(14)
    X = rng.normal(size=(200, 5))
    t, e = rng.exponential(1.0, 200), (rng.random(200) < 0.7).astype(int)
    head = CoxHead(l1_ratio=1.0).fit(X, t, e)
    assert head.cv_edge_ == "null model" and head.n_nonzero_ == 0


def test_cox_head_clear_errors():
    with pytest.raises(ConfigError, match="one observed death"):
        CoxHead(0.1).fit(np.zeros((5, 2)) + np.arange(5)[:, None], np.arange(1.0, 6), np.zeros(5))
    with pytest.raises(ConfigError, match="0/1"):
        CoxHead(0.1).fit(np.eye(3), [1, 2, 3], [0, 2, 1])
    with pytest.raises(ConfigError, match="non-negative"):
        CoxHead(0.1).fit(np.eye(3), [1, -2, 3], [0, 1, 1])


# -- discrete-time hazard -------------------------------------------------------------------
def test_discrete_hazard_nll_two_patient_hand_computation():
    h = np.array([[0.1, 0.2, 0.3, 0.4], [0.5, 0.5, 0.5, 0.5]])
    # patient 0: death in bin 2 -> -log[(0.9)(0.8)] - log 0.3
    # patient 1: censored in bin 1 -> survived bins 0 and 1 -> -log[(0.5)(0.5)]
    p0 = -math.log(0.9 * 0.8) - math.log(0.3)
    p1 = -math.log(0.25)
    assert discrete_hazard_nll(h, [2, 1], [1, 0]) == pytest.approx((p0 + p1) / 2)
    # alpha adds weight to the uncensored part: (1 - a) * mean(all) + a * mean(uncensored)
    assert discrete_hazard_nll(h, [2, 1], [1, 0], alpha=0.4) == pytest.approx(
        0.6 * (p0 + p1) / 2 + 0.4 * p0 / 2
    )
    logits = torch.tensor(np.log(h / (1 - h)))
    got = _nll_torch(logits, torch.tensor([2, 1]), torch.tensor([1.0, 0.0]), 0.0)
    assert float(got) == pytest.approx((p0 + p1) / 2, rel=1e-9)


def test_bins_are_quartiles_of_uncensored_training_times_only():
    t = np.array([1, 2, 3, 4, 5, 100, 200, 300], float)
    e = np.array([1, 1, 1, 1, 1, 0, 0, 0])
    edges = survival_bin_edges(t, e, 4)
    np.testing.assert_allclose(edges, np.quantile([1, 2, 3, 4, 5], [0.25, 0.5, 0.75]))
    # changing censored times does not move the bins
    t2 = t.copy()
    t2[5:] = [7, 8, 9]
    np.testing.assert_allclose(survival_bin_edges(t2, e, 4), edges)
    assert assign_bins([0.5, 2.0, 2.5, 4.0, 99.0], edges).tolist() == [0, 1, 1, 3, 3]
    with pytest.raises(ConfigError, match="at least 2 observed deaths"):
        survival_bin_edges([1, 2, 3], [1, 0, 0])


def test_hazard_head_bins_depend_on_its_training_patients_only():
    X, t, e = _cohort(120, 4, 1.0, seed=6)
    head = DiscreteHazardHead(weight_decay=0.01).fit(X[:80], t[:80], e[:80])
    np.testing.assert_allclose(head.bin_edges_, survival_bin_edges(t[:80], e[:80], 4))
    risk_before = head.predict_risk(X[80:])
    t_test = t.copy()
    t_test[80:] *= 10  # test times are never seen by the head
    head2 = DiscreteHazardHead(weight_decay=0.01).fit(X[:80], t_test[:80], e[:80])
    np.testing.assert_array_equal(head2.bin_edges_, head.bin_edges_)
    np.testing.assert_allclose(head2.predict_risk(X[80:]), risk_before)


def test_hazard_head_learns_planted_risk_and_round_trips():
    X, t, e = _cohort(300, 5, 1.2, seed=7)
    head = DiscreteHazardHead(weight_decay="cv").fit(X[:200], t[:200], e[:200])
    assert head.weight_decay_selection_ == "inner_cv"
    risk = head.predict_risk(X[200:])
    np.testing.assert_allclose(risk, -head.predict_survival(X[200:]).sum(1))
    assert c_index(t[200:], e[200:], risk) > 0.65
    S = head.predict_survival(X[200:])
    assert np.all(np.diff(S, axis=1) <= 0) and np.all((S > 0) & (S < 1))
    back = DiscreteHazardHead.from_dict(json.loads(json.dumps(head.to_dict())))
    np.testing.assert_array_equal(back.predict_risk(X[200:]), risk)


def test_hazard_head_grid_reaches_past_its_ends():
    # no signal and a grid of weak penalties: the strongest wins, the grid grows by two
    # decades (its limit) and the end that still wins is reported
    rng = np.random.default_rng(14)
    X = rng.normal(size=(200, 5))
    t, e = rng.exponential(1.0, 200), (rng.random(200) < 0.7).astype(int)
    head = DiscreteHazardHead(weight_decays=(1e-4, 1e-5)).fit(X, t, e)
    assert [w for w, _ in head.cv_scores_] == [0.01, 0.001, 0.0001, 1e-05]
    assert head.weight_decay_ == 0.01 and head.cv_edge_ == "strongest penalty"
    # a planted signal inside the default grid: no edge
    X, t, e = _cohort(300, 5, 1.2, seed=7)
    assert DiscreteHazardHead().fit(X, t, e).cv_edge_ is None


def test_hazard_head_optimum_beats_perturbations():
    # the objective is convex: the fitted parameters must be a (numerical) minimum
    X, t, e = _cohort(100, 3, 1.0, seed=8)
    head = DiscreteHazardHead(weight_decay=0.05).fit(X, t, e)
    Z = (X - head.mean_) / head.scale_
    y = assign_bins(t, head.bin_edges_)

    def objective(W, b):
        h = 1 / (1 + np.exp(-(Z @ W.T + b)))
        return discrete_hazard_nll(h, y, e) + 0.05 * np.sum(W**2)

    best = objective(head.weight_, head.bias_)
    assert best == pytest.approx(head.train_loss_, rel=1e-6)
    rng = np.random.default_rng(0)
    for _ in range(5):
        assert (
            objective(head.weight_ + 1e-2 * rng.normal(size=head.weight_.shape), head.bias_) > best
        )
