"""Survival heads, Kaplan–Meier, log-rank, bins and the discrete-time NLL."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from lifelines import KaplanMeierFitter
from lifelines.statistics import logrank_test as ll_logrank_test
from lifelines.statistics import multivariate_logrank_test

from mirror_model.errors import ConfigError
from mirror_model.evaluation.survival import (
    CoxHead,
    DiscreteHazardHead,
    KMCurve,
    _hazard_objective,
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
    # the training objective (W = 0, bias = the logits of each bin) gives the same value
    K = 4
    for patient, y, ev, ref in ((0, 2, 1, p0), (1, 1, 0, p1)):
        theta = np.concatenate([np.zeros(K), np.log(h[patient] / (1 - h[patient]))])
        got, _ = _hazard_objective(theta, np.zeros((1, 1)), np.array([y]), np.array([ev]), K, 0.0, 0.0)
        assert got == pytest.approx(ref, rel=1e-12)


def test_hazard_objective_gradient_matches_finite_differences():
    rng = np.random.default_rng(3)
    Z, K = rng.normal(size=(30, 5)), 3
    y, e = rng.integers(0, K, 30), rng.integers(0, 2, 30)
    theta = rng.normal(size=K * 5 + K) * 0.5
    for wd, alpha in ((0.0, 0.0), (0.3, 0.4)):
        _, grad = _hazard_objective(theta, Z, y, e, K, wd, alpha)
        eps = 1e-6
        num = [
            (_hazard_objective(theta + eps * d, Z, y, e, K, wd, alpha)[0]
             - _hazard_objective(theta - eps * d, Z, y, e, K, wd, alpha)[0]) / (2 * eps)
            for d in np.eye(theta.size)
        ]  # fmt: skip
        np.testing.assert_allclose(grad, num, rtol=1e-6, atol=1e-8)
        # the value is the NLL of the numpy reference plus the penalty
        W, b = theta[: K * 5].reshape(K, 5), theta[K * 5 :]
        ref = discrete_hazard_nll(1 / (1 + np.exp(-(Z @ W.T + b))), y, e, alpha)
        got, _ = _hazard_objective(theta, Z, y, e, K, wd, alpha)
        assert got == pytest.approx(ref + wd * np.sum(W**2), rel=1e-10)


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


def test_cox_head_inner_cv_is_reproduced_by_hand_on_the_training_patients():
    """The penalty is chosen as documented, from the training patients passed to fit only:
    an independent scikit-survival computation of the cross-validated partial likelihood
    (Verweij & van Houwelingen) on the same inner folds picks the same alpha."""
    from sklearn.model_selection import StratifiedKFold
    from sksurv.linear_model import CoxnetSurvivalAnalysis

    X, t, e = _cohort(150, 6, 1.0, seed=21)
    tr = np.arange(110)  # the "test" patients 110..149 are never passed to fit
    head = CoxHead(l1_ratio=0.5, seed=3).fit(X[tr], t[tr], e[tr])
    alphas = np.array([a for _, a, _ in head.cv_table_])
    cvl_head = np.array([v for *_, v in head.cv_table_])
    Z = (X[tr] - X[tr].mean(0)) / X[tr].std(0)
    y = np.empty(tr.size, dtype=[("event", bool), ("time", float)])
    y["event"], y["time"] = e[tr].astype(bool), t[tr]
    cvl = np.zeros(alphas.size)
    for itr, _ in StratifiedKFold(5, shuffle=True, random_state=3).split(Z, e[tr]):
        m = CoxnetSurvivalAnalysis(
            l1_ratio=0.5, alphas=alphas, normalize=False, fit_baseline_model=False, tol=1e-9
        ).fit(Z[itr], y[itr])
        eta = Z @ m.coef_
        cvl += cox_partial_loglik(t[tr], e[tr], eta) - cox_partial_loglik(t[itr], e[itr], eta[itr])
    np.testing.assert_allclose(cvl_head, cvl, rtol=1e-3)
    assert head.penalizer_ == alphas[np.argmax(cvl)]
    # the grid starts at the null model (glmnet's alpha_max: every coefficient zero)
    m0 = CoxnetSurvivalAnalysis(l1_ratio=0.5, n_alphas=3, normalize=False).fit(Z, y)
    assert alphas[0] == pytest.approx(m0.alphas_[0], rel=1e-10)


def test_ridge_in_the_row_space_solves_the_ridge_problem_on_all_columns():
    """l1 ratio 0 (ridge) is solved on the row-space rotation of the input (60 patients, 300
    columns -> 60): the coefficients satisfy the ridge optimality condition on all 300
    columns, -score(beta)/N + alpha * beta = 0 (Breslow score, no ties here)."""
    X, t, e = _cohort(60, 300, 1.5, seed=22)
    alpha = 0.5
    head = CoxHead(penalizer=alpha, l1_ratio=0.0).fit(X, t, e)
    assert head.coef_.shape == (300,) and head.l1_ratio_ == 0.0
    Z = (X - X.mean(0)) / X.std(0)
    w = np.exp(Z @ head.coef_)
    score = np.zeros(300)
    for i in np.flatnonzero(e):
        at_risk = t >= t[i]
        score += Z[i] - (w[at_risk] @ Z[at_risk]) / w[at_risk].sum()
    grad = -score / 60 + alpha * head.coef_
    # 0 up to the solver's tolerance and its 1e-4 l1 share: under 1 % of either term
    assert np.linalg.norm(grad) < 0.01 * alpha * np.linalg.norm(head.coef_)
    assert np.linalg.norm(grad) < 0.01 * np.linalg.norm(score / 60)


def test_cox_head_flags_the_near_ridge_end_of_its_l1_grid():
    """Many small effects of correlated genes (a ridge-like truth): when the smallest l1
    ratio of the grid wins, l1_edge_ says so (and evaluation notes it); with ridge (0) in
    the grid there is nothing beyond, so no flag."""
    from mirror_model.evaluation.evaluate import _edge_notes

    rng = np.random.default_rng(23)
    n, d = 160, 40
    F = rng.normal(size=(n, 1))
    X = 0.7 * F + 0.7 * rng.normal(size=(n, d))
    T = rng.exponential(np.exp(-0.15 * X.sum(1)))
    C = rng.exponential(2.0, n)
    t, e = np.minimum(T, C), (T <= C).astype(int)
    head = CoxHead(l1_ratios=(0.2, 1.0)).fit(X, t, e)
    assert head.l1_ratio_ == 0.2 and head.l1_edge_ == "smallest l1 ratio"
    assert any("smallest l1 ratio of its grid (0.2" in m for m in _edge_notes("survival_cox", head))
    ridge = CoxHead(l1_ratios=(0.0, 0.2, 1.0)).fit(X, t, e)
    assert ridge.l1_ratio_ == 0.0 and ridge.l1_edge_ is None
    assert _edge_notes("survival_cox", ridge) == []


def test_cox_head_flags_a_weakest_penalty_that_still_wins_after_two_extensions(monkeypatch):
    """A cross-validated log-likelihood that keeps rising toward weaker penalties (replaced
    here by -log(alpha), a known answer): the grid grows by two decades twice, the weakest
    penalty still wins, cv_edge_ says so and evaluation notes it with the penalty."""
    from mirror_model.evaluation.evaluate import _edge_notes

    X, t, e = _cohort(80, 3, 1.0, seed=24)
    monkeypatch.setattr(
        CoxHead, "_cv_loglik", lambda self, prob, t, e, alphas, splits: -np.log(alphas)
    )
    head = CoxHead(l1_ratio=1.0, n_alphas=10).fit(X, t, e)
    alphas = np.array([a for _, a, _ in head.cv_table_])
    assert alphas[0] / alphas.min() == pytest.approx(1e6, rel=1e-6)  # 2 + 2 + 2 decades
    # the final fit on all patients stops where the path saturates (as the library's path
    # does), so the reported penalty lies in the extension, at or above its weakest end
    assert alphas.min() <= head.penalizer_ < alphas[9]
    assert head.cv_edge_ == "weakest penalty" and head.l1_edge_ is None
    (note,) = _edge_notes("survival_cox", head)
    assert "weakest penalty of its grid even after extending it" in note
    assert f"penalty {head.penalizer_:g}" in note
