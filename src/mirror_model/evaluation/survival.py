"""Survival heads on frozen embeddings, Kaplan–Meier curves, log-rank test, C-index.

Kaplan–Meier, log-rank and the C-index are computed by lifelines; our wrappers keep only the
conventions (curves start at time 0, nan where a test is undefined, the risk direction).

Direction everywhere: a **risk score is higher for a worse prognosis** (earlier death).
:func:`c_index` of a good risk score is above 0.5.

Deployable heads (used by the model bundle; prediction needs numpy only, nothing pickled):

- :class:`CoxHead` — elastic-net Cox proportional-hazards model (scikit-survival's Coxnet,
  glmnet's path algorithm) on standardised inputs, penalty and l1 ratio chosen by inner
  cross-validation (cross-validated partial likelihood) on the training patients; no
  dimension reduction by default (``max_components`` optionally adds a PCA). Works on raw
  genes (thousands of columns) as on embeddings. ``predict_risk`` is the linear predictor
  x·β (log partial hazard up to a constant).
- :class:`DiscreteHazardHead` — the paper's head: follow-up cut into ``n_bins`` (4) bins at
  the quantiles of the *uncensored training* times, a linear layer gives one hazard logit
  per bin, h_t = sigmoid(logit_t), S_t = Π_{s≤t}(1 − h_s), trained with the discrete-time
  negative log-likelihood (:func:`discrete_hazard_nll`); risk = −Σ_t S_t.

Both choose their regularisation strength by inner cross-validation on the training
patients only when given ``"cv"``, extend their grid past an end that wins and record in
``cv_edge_`` when the optimum still lies at an end (evaluation notes it).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import ConfigError, TrainingError
from .metrics import c_index
from .probes import _as_2d, _FittedHead, _row_space, _standardize_fit

__all__ = [
    "CoxHead",
    "DiscreteHazardHead",
    "KMCurve",
    "LogRankResult",
    "assign_bins",
    "c_index",
    "choose_risk_cutoff",
    "cox_partial_loglik",
    "discrete_hazard_nll",
    "kaplan_meier",
    "logrank_p",
    "logrank_test",
    "risk_groups",
    "survival_bin_edges",
]


# ---------------------------------------------------------------------------------------
# input checks
# ---------------------------------------------------------------------------------------
def _survival_arrays(time: Any, event: Any, n: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    t = np.asarray(time, dtype=np.float64).ravel()
    e_raw = np.asarray(event).ravel()
    if t.shape != e_raw.shape:
        raise ConfigError(
            f"time and event must have the same length; got {t.size} and {e_raw.size}."
        )
    if n is not None and t.size != n:
        raise ConfigError(f"expected {n} survival times (one per embedding row); got {t.size}.")
    if not np.all(np.isfinite(t)) or np.any(t < 0):
        raise ConfigError("survival times must be finite and non-negative (found NaN, inf or < 0).")
    try:
        e_num = e_raw.astype(np.float64)
    except (TypeError, ValueError):
        raise ConfigError("event must be 0/1 (1 = death observed, 0 = censored).") from None
    if not np.all(np.isin(e_num, (0.0, 1.0))):
        raise ConfigError(
            "event must be 0/1 (1 = death observed, 0 = censored); found other values."
        )
    return t, e_num.astype(bool)


# ---------------------------------------------------------------------------------------
# Kaplan–Meier, log-rank, risk groups
# ---------------------------------------------------------------------------------------
@dataclass
class KMCurve:
    """Kaplan–Meier estimate as a right-continuous step function.

    Attributes
    ----------
    time : [T] float — 0 followed by every distinct follow-up time (events and censorings),
        ascending, in the unit of the input (e.g. months).
    survival : [T] float — S(t), the estimated probability of surviving beyond ``time[i]``.
    at_risk : [T] int — patients still under observation just before ``time[i]``.
    events : [T] int — observed deaths at ``time[i]``.
    """

    time: np.ndarray
    survival: np.ndarray
    at_risk: np.ndarray
    events: np.ndarray

    def survival_at(self, t: Any) -> np.ndarray:
        """S(t) at arbitrary times (step function, right-continuous)."""
        idx = np.searchsorted(self.time, np.asarray(t, dtype=np.float64), side="right") - 1
        return self.survival[np.clip(idx, 0, None)]

    def to_dict(self) -> dict[str, list]:
        return {
            "time": self.time.tolist(),
            "survival": self.survival.tolist(),
            "at_risk": self.at_risk.tolist(),
            "events": self.events.tolist(),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> KMCurve:
        n = len(d["time"])
        return cls(
            time=np.asarray(d["time"], dtype=np.float64),
            survival=np.asarray(d["survival"], dtype=np.float64),
            at_risk=np.asarray(d.get("at_risk", [0] * n), dtype=np.int64),
            events=np.asarray(d.get("events", [0] * n), dtype=np.int64),
        )


def kaplan_meier(time: Sequence[float], event: Sequence[Any]) -> KMCurve:
    """Kaplan–Meier survival curve (product-limit estimator) of one group.

    ``lifelines.KaplanMeierFitter`` on its default timeline (every distinct follow-up time);
    we add time 0 (S = 1) when no one's follow-up is 0, so every curve starts at 0. Ties:
    deaths at a time t are counted before censorings at t (censored patients are at risk at t).
    """
    from lifelines import KaplanMeierFitter

    t, e = _survival_arrays(time, event)
    if t.size == 0:
        raise ConfigError("kaplan_meier needs at least one patient.")
    kmf = KaplanMeierFitter().fit(t, e)
    table = kmf.event_table
    timeline = table.index.to_numpy(dtype=np.float64)
    survival = kmf.survival_function_.iloc[:, 0].reindex(table.index).to_numpy(np.float64)
    at_risk = table["at_risk"].to_numpy(np.int64)
    deaths = table["observed"].to_numpy(np.int64)
    if timeline[0] != 0:
        timeline = np.concatenate([[0.0], timeline])
        survival = np.concatenate([[1.0], survival])
        at_risk = np.concatenate([[t.size], at_risk])
        deaths = np.concatenate([[0], deaths])
    return KMCurve(time=timeline, survival=survival, at_risk=at_risk, events=deaths)


@dataclass
class LogRankResult:
    """Log-rank test of equal survival across groups: chi² ``statistic`` with ``df`` degrees
    of freedom (number of groups − 1) and its ``p_value``."""

    statistic: float
    p_value: float
    df: int


def logrank_test(
    time: Sequence[float], event: Sequence[Any], group: Sequence[Any]
) -> LogRankResult:
    """Log-rank (Mantel–Cox) test across the groups in ``group`` (any hashable labels).

    ``lifelines.statistics.multivariate_logrank_test`` (for two groups the same statistic as
    ``logrank_test``). ``statistic`` and ``p_value`` are nan with fewer than two groups or no
    observed death, where the test is undefined.
    """
    from lifelines.statistics import multivariate_logrank_test

    t, e = _survival_arrays(time, event)
    g = np.asarray(group)
    if g.shape != t.shape:
        raise ConfigError(f"group must have one label per patient ({t.size}); got {g.size}.")
    k = np.unique(g).size
    if k < 2 or not e.any():
        return LogRankResult(statistic=math.nan, p_value=math.nan, df=max(k - 1, 0))
    res = multivariate_logrank_test(t, g, e)
    return LogRankResult(
        statistic=float(res.test_statistic), p_value=float(res.p_value), df=int(k - 1)
    )


def logrank_p(time: Sequence[float], event: Sequence[Any], group: Sequence[Any]) -> float:
    """p-value of :func:`logrank_test` (nan when undefined)."""
    return logrank_test(time, event, group).p_value


def choose_risk_cutoff(train_risk: Sequence[float]) -> float:
    """Risk cut-off between the "low" and "high" groups: the median risk of the TRAINING
    patients (never of the patients being reported)."""
    r = np.asarray(train_risk, dtype=np.float64).ravel()
    if r.size == 0 or not np.all(np.isfinite(r)):
        raise ConfigError("choose_risk_cutoff needs a non-empty array of finite training risks.")
    return float(np.median(r))


def risk_groups(risk: Sequence[float], cutoff: float) -> np.ndarray:
    """``"high"`` where risk > cutoff, else ``"low"`` (array of str)."""
    r = np.asarray(risk, dtype=np.float64).ravel()
    return np.where(r > cutoff, "high", "low")


# ---------------------------------------------------------------------------------------
# inner CV helpers
# ---------------------------------------------------------------------------------------
def _inner_splits(
    e: np.ndarray, n_folds: int, seed: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Inner folds of the training patients, stratified by event when possible."""
    from sklearn.model_selection import KFold, StratifiedKFold

    idx = np.arange(e.size)
    if min(int(e.sum()), int((~e).sum())) >= n_folds:
        sp = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
        return list(sp.split(idx, e.astype(int)))
    return list(KFold(n_splits=n_folds, shuffle=True, random_state=seed).split(idx))


def _n_inner_folds(requested: int, e: np.ndarray) -> int:
    """Inner folds actually used: at most one per 2 deaths (each fold needs events)."""
    return min(int(requested), int(e.sum()) // 2)


def cox_partial_loglik(time: Any, event: Any, eta: Any) -> np.ndarray:
    """Breslow partial log-likelihood of linear predictors ``eta`` ([N] or [N, K] for K
    models at once): Σ over deaths of η_i − log Σ_{t_j ≥ t_i} exp(η_j). Returns [K] (or a
    0-d array for a single model)."""
    t = np.asarray(time, np.float64)
    e = np.asarray(event).astype(bool)
    eta = np.asarray(eta, np.float64)
    single = eta.ndim == 1
    E = eta[:, None] if single else eta
    order = np.argsort(t, kind="stable")
    ts, Es, es = t[order], E[order], e[order]
    m = Es.max(axis=0, keepdims=True)
    rev = np.cumsum(np.exp(Es - m)[::-1], axis=0)[::-1]  # Σ_{j >= i} in sorted order
    first = np.searchsorted(ts, ts, side="left")  # tied times share the whole risk set
    log_risk = np.log(rev[first]) + m
    ll = ((Es - log_risk) * es[:, None]).sum(axis=0)
    return ll[0] if single else ll


#: Coordinate-descent tolerance of the final fit on all training patients (scikit-survival's
#: default); the inner-CV paths use ``CoxHead.tol``.
_FINAL_TOL = 1e-7


def _surv_array(t: np.ndarray, e: np.ndarray) -> np.ndarray:
    y = np.empty(t.size, dtype=[("event", bool), ("time", np.float64)])
    y["event"], y["time"] = e, t
    return y


def _null_score(Z: np.ndarray, t: np.ndarray, e: np.ndarray) -> np.ndarray:
    """Score of the partial log-likelihood at β = 0 divided by N: Zᵀ(e − Λ)/N, with Λ the
    Nelson–Aalen cumulative hazard at each patient's time (Breslow ties). glmnet's largest
    useful penalty for an l1 ratio r is max|score| / r (every coefficient zero above it)."""
    uniq, inv = np.unique(t, return_inverse=True)
    deaths = np.bincount(inv, weights=e.astype(np.float64))
    at_risk = t.size - np.searchsorted(np.sort(t), uniq, side="left")
    hazard = np.cumsum(deaths / at_risk)[inv]
    return Z.T @ (e - hazard) / t.size


def _coxnet_path(
    Z: np.ndarray, t: np.ndarray, e: np.ndarray, l1_ratio: float, alphas: np.ndarray, tol: float
) -> np.ndarray:
    """Coefficients [D, A] of scikit-survival's Coxnet (glmnet's coordinate descent, warm
    started along the decreasing ``alphas``). Columns where the path stopped (a saturated
    fit, or numerical overflow at a weak penalty) are NaN."""
    from sklearn.exceptions import ConvergenceWarning
    from sksurv.linear_model import CoxnetSurvivalAnalysis

    model = CoxnetSurvivalAnalysis(
        l1_ratio=l1_ratio, alphas=alphas, normalize=False, fit_baseline_model=False,
        max_iter=100_000, tol=tol,
    )  # fmt: skip
    out = np.full((Z.shape[1], len(alphas)), np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        warnings.filterwarnings("ignore", "all coefficients are zero")
        try:
            model.fit(Z, _surv_array(t, e))
        except (ArithmeticError, ValueError):
            if len(alphas) >= 2:  # a weak penalty overflowed: keep the path up to it
                half = _coxnet_path(Z, t, e, l1_ratio, alphas[: len(alphas) // 2], tol)
                out[:, : half.shape[1]] = half
            return out
    coef = np.asarray(model.coef_, np.float64)
    out[:, : coef.shape[1]] = coef  # fewer columns: the path stopped early (saturated fit)
    return out


@dataclass
class _CoxProblem:
    """One l1 ratio's design: the standardised training inputs, or for ridge (l1 ratio 0)
    their rotation onto the row space, Z·V = U·S (exact for an L2 penalty: the solution lies in
    that space and ‖Vθ‖ = ‖θ‖; the columns are orthogonal, so coordinate descent converges in
    a few sweeps, and a wide input shrinks to at most N columns)."""

    l1_ratio: float
    design: np.ndarray  # [N, R]
    basis: np.ndarray | None  # [D, R] (β = basis · θ) or None (β = θ)

    @property
    def solver_l1(self) -> float:
        # Coxnet needs l1 > 0; at 1e-4 the l1 term is 1e-4 of the l2 term: ridge in effect
        return self.l1_ratio if self.l1_ratio > 0 else 1e-4

    def coef(self, theta: np.ndarray) -> np.ndarray:
        return theta if self.basis is None else self.basis @ theta

    def alpha_grid(self, t: np.ndarray, e: np.ndarray, n_alphas: int, ratio: float) -> np.ndarray:
        """Decreasing penalties from the null model (lasso/elastic net: glmnet's alpha_max;
        ridge: 100 × the score norm, where ‖β‖ ≤ 0.01) down to ``ratio`` of it."""
        score = _null_score(self.design, t, e)
        top = (
            float(np.max(np.abs(score))) / self.l1_ratio if self.l1_ratio > 0 else
            100.0 * float(np.linalg.norm(score))
        )  # fmt: skip
        return max(top, 1e-12) * np.geomspace(1.0, ratio, n_alphas)

    @classmethod
    def make(cls, Z: np.ndarray, l1_ratio: float) -> _CoxProblem:
        if l1_ratio > 0:
            return cls(l1_ratio, Z, None)
        return cls(0.0, *_row_space(Z))


# ---------------------------------------------------------------------------------------
# Cox head
# ---------------------------------------------------------------------------------------
class CoxHead(_FittedHead):
    """Elastic-net Cox model on standardised inputs (scikit-survival's Coxnet); numpy prediction.

    The penalty ``alpha`` and the elastic-net mixing ``l1_ratio`` are chosen by inner
    cross-validation on the training patients when given as ``"cv"``: for each l1 ratio a
    grid of ``n_alphas`` penalties from ``alpha_max`` (every coefficient zero: the null
    model) down to ``alpha_min_ratio · alpha_max`` is fitted on each inner fold's training
    part (one warm-started path per fold, all folds on the same grid), and the pair with the
    highest cross-validated partial log-likelihood (Verweij & van Houwelingen 1993; glmnet's
    ``cv.glmnet`` for Cox) wins; only the winner is then fitted on all training patients,
    down to its penalty, at the library's default tolerance. When the weakest penalty wins,
    the grid is extended two decades further (twice at most); if it still wins, ``cv_edge_``
    says so, and when the smallest non-zero l1 ratio of the grid wins, ``l1_edge_`` does
    (evaluation notes both). No dimension reduction unless ``max_components`` is given.

    l1 ratio 0 is ridge, solved exactly in the row space of the input (its SVD: at most N
    orthogonal columns however many genes, the weights mapped back; Coxnet needs l1 > 0, so
    the solver runs at l1 ratio 1e-4). Its grid starts at 100 × ‖score at β = 0‖, where
    ‖β‖ ≤ 0.01: the null model in effect.

    The objective (as glmnet's) is −ℓ(β)/N + α·(l1_ratio·‖β‖₁ + (1 − l1_ratio)/2·‖β‖²) with ℓ
    the Breslow partial log-likelihood of standardised inputs.

    Parameters
    ----------
    penalizer : float > 0 or "cv"
        ``alpha``; ``"cv"`` chooses it on the grid (or among ``penalizers`` when given).
    penalizers : explicit alpha grid for ``"cv"`` (default: the grid from alpha_max).
    l1_ratio : float in [0, 1] or "cv"
        Elastic-net mixing (1 = lasso, 0 = ridge); ``"cv"`` picks it from ``l1_ratios``.
    l1_ratios : grid for ``l1_ratio="cv"``.
    n_alphas, alpha_min_ratio : the penalty grid (two decades by default; extended when its
        weakest end wins).
    tol : coordinate-descent tolerance of the inner-CV paths (the final fit uses 1e-7).
    max_components : optional PCA to this many components first (None: never).
    inner_folds : inner CV folds (at most one per two deaths).
    seed : inner-CV shuffling seed.

    Attributes
    ----------
    mean_, scale_ : [D] standardisation of the raw input.
    components_ : [M, D] PCA axes or None.  component_scale_ : [M] (ones without PCA).
    coef_ : [M] coefficients on the standardised input (risk = z · coef_).
    penalizer_, l1_ratio_ : the chosen alpha and l1 ratio.
    penalizer_selection_ : ``"inner_cv"``, ``"fixed"`` or why CV was not possible.
    cv_edge_ : None, ``"weakest penalty"`` (the optimum may lie beyond the grid) or
        ``"null model"`` (no input beats the constant risk).
    l1_edge_ : None or ``"smallest l1 ratio"`` (the near-ridge end of a grid without 0 won).
    cv_table_ : list of (l1_ratio, alpha, cv partial log-likelihood) evaluated.
    n_nonzero_ : number of non-zero coefficients.
    """

    #: 0 (ridge) ends the grid: nothing lies beyond it, so the l1 ratio cannot sit on an open
    #: edge (with (0.05, 0.5, 1) the 0.05 end won in most folds of breast_cancer, NKI70, myeloma)
    DEFAULT_L1_RATIOS = (0.0, 0.05, 0.5, 1.0)
    _fit_hint = "fit(X, time, event) or from_dict"
    _input_name = "the Cox head"
    _dict_version = 2  # 1 = the earlier lifelines head (from_dict reads both)

    def __init__(
        self,
        penalizer: float | str = "cv",
        penalizers: Sequence[float] | None = None,
        l1_ratio: float | str = "cv",
        l1_ratios: Sequence[float] = DEFAULT_L1_RATIOS,
        n_alphas: int = 40,
        alpha_min_ratio: float = 0.01,
        tol: float = 1e-5,
        max_components: int | None = None,
        inner_folds: int = 5,
        seed: int = 0,
    ) -> None:
        if not (penalizer == "cv" or (isinstance(penalizer, (int, float)) and penalizer > 0)):
            raise ConfigError(f"CoxHead penalizer must be > 0 or 'cv'; got {penalizer!r}.")
        ratios = [float(r) for r in l1_ratios]
        if l1_ratio != "cv":
            ratios = [float(l1_ratio)]
        if not ratios or any(not 0 <= r <= 1 for r in ratios):
            raise ConfigError(
                f"CoxHead l1_ratio must be in [0, 1] (1 = lasso, 0 = ridge) or 'cv'; "
                f"got {l1_ratio!r} / {list(l1_ratios)}."
            )
        if int(n_alphas) < 2 or int(inner_folds) < 2:
            raise ConfigError("CoxHead needs n_alphas >= 2 and inner_folds >= 2.")
        if not 0 < float(alpha_min_ratio) < 1 or not 0 < float(tol) < 1:
            raise ConfigError("CoxHead needs 0 < alpha_min_ratio < 1 and 0 < tol < 1.")
        self.penalizer = penalizer
        self.penalizers = None if penalizers is None else tuple(float(p) for p in penalizers)
        self.l1_ratio = l1_ratio
        self.l1_ratios = tuple(ratios)
        self.n_alphas = int(n_alphas)
        self.alpha_min_ratio = float(alpha_min_ratio)
        self.tol = float(tol)
        self.max_components = max_components
        self.inner_folds = int(inner_folds)
        self.seed = int(seed)

    def _features(self, X: np.ndarray) -> np.ndarray:
        Z = (X - self.mean_) / self.scale_
        if self.components_ is not None:
            Z = Z @ self.components_.T
        return Z / self.component_scale_

    def fit(self, X: Any, time: Any, event: Any) -> CoxHead:
        """Fit on training inputs ``X`` [N, D], follow-up ``time`` [N] and ``event`` [N]
        (1 = death observed); returns self."""
        X = _as_2d(X)
        t, e = _survival_arrays(time, event, X.shape[0])
        if e.sum() < 1 or X.shape[0] < 3:
            raise ConfigError(
                f"a Cox model needs at least 3 training patients and one observed death; got "
                f"{X.shape[0]} patients with {int(e.sum())} deaths."
            )
        self.mean_, self.scale_ = _standardize_fit(X)
        Z = (X - self.mean_) / self.scale_
        n, d = Z.shape
        m = d if self.max_components is None else min(d, int(self.max_components), max(n - 1, 1))
        if m < d:  # optional PCA by SVD of the standardised training matrix
            _, _, vt = np.linalg.svd(Z, full_matrices=False)
            self.components_ = vt[:m]
            Z = Z @ self.components_.T
        else:
            self.components_ = None
        sd = Z.std(axis=0)
        self.component_scale_ = np.where(sd > 1e-12, sd, 1.0)
        Z = Z / self.component_scale_
        self.cv_edge_ = self.l1_edge_ = None
        self.cv_table_: list[tuple[float, float, float]] = []
        fixed = self.penalizer != "cv"
        n_folds = _n_inner_folds(self.inner_folds, e)
        if n_folds < 2 and (not fixed or len(self.l1_ratios) > 1):
            # too few deaths to cross-validate: a strong, fixed choice
            self.penalizer_selection_ = "fixed (too few deaths for inner CV)"
            prob = _CoxProblem.make(Z, max(self.l1_ratios))
            alphas = prob.alpha_grid(t, e, self.n_alphas, self.alpha_min_ratio)
            self._final_fit(prob, t, e, alphas, min(len(alphas) - 1, len(alphas) // 4))
        else:
            self._fit_cv(Z, t, e, n_folds if not (fixed and len(self.l1_ratios) == 1) else 0)
        self.n_nonzero_ = int(np.sum(self.coef_ != 0))
        return self

    def _fit_cv(self, Z: np.ndarray, t: np.ndarray, e: np.ndarray, n_folds: int) -> None:
        """Choose (l1 ratio, alpha) by the cross-validated partial log-likelihood of inner
        folds of the training patients; then fit the winner on all of them. Each l1 ratio's
        inner folds share one penalty grid and each fold is one warm-started path; the path on
        all training patients is fitted once, for the winner, down to its penalty."""
        fixed = self.penalizer != "cv"
        splits = _inner_splits(e, n_folds, self.seed) if n_folds >= 2 else []
        best: tuple[float, _CoxProblem, np.ndarray, int] | None = None  # (cvl, problem, alphas, k)
        for l1 in self.l1_ratios:
            prob = _CoxProblem.make(Z, l1)
            if fixed:
                alphas = np.array([float(self.penalizer)])
            elif self.penalizers is not None:
                alphas = np.array(sorted(self.penalizers, reverse=True), np.float64)
            else:
                alphas = prob.alpha_grid(t, e, self.n_alphas, self.alpha_min_ratio)
            for _extension in range(3):
                cvl = self._cv_loglik(prob, t, e, alphas, splits) if splits else np.zeros(1)
                self.cv_table_ += [
                    (float(l1), float(a), float(v)) for a, v in zip(alphas, cvl, strict=True)
                ]
                if not np.isfinite(cvl).any():
                    break
                k = int(np.argmax(np.where(np.isfinite(cvl), cvl, -np.inf)))
                at_weak = not fixed and k == len(alphas) - 1
                if at_weak and _extension < 2:
                    # the optimum may lie beyond the grid: two more decades of weaker penalties
                    step = alphas[-1] / alphas[-2] if len(alphas) > 1 else 0.1
                    more = alphas[-1] * step ** np.arange(1, int(round(2 / -np.log10(step))) + 1)
                    alphas = np.concatenate([alphas, more])
                    continue
                if best is None or cvl[k] > best[0]:
                    best = (float(cvl[k]), prob, alphas, k)
                break
        if best is None:
            raise TrainingError(
                "the Cox model could not be fitted for any penalty (numerical overflow); check "
                "the input for constant or duplicated columns."
            )
        _, prob, alphas, k = best
        self.penalizer_selection_ = "inner_cv" if splits else "fixed"
        if k == 0 and not fixed and self.penalizers is None:
            # a path starts at the null model (ridge: within ‖β‖ ≤ 0.01 of it)
            self.l1_ratio_, self.penalizer_ = prob.l1_ratio, float(alphas[0])
            self.coef_ = np.zeros(Z.shape[1])
        else:
            self._final_fit(prob, t, e, alphas, k)
        if not fixed and len(alphas) > 1 and k == len(alphas) - 1:
            self.cv_edge_ = "weakest penalty"
        elif not fixed and k == 0 and not np.any(self.coef_):
            self.cv_edge_ = "null model"
        if self.cv_edge_ != "null model" and len(self.l1_ratios) > 1 and splits:
            if prob.l1_ratio == min(self.l1_ratios) > 0:
                # the sparsity end toward ridge won: a smaller l1 ratio (or ridge) may fit better
                self.l1_edge_ = "smallest l1 ratio"

    def _final_fit(
        self, prob: _CoxProblem, t: np.ndarray, e: np.ndarray, alphas: np.ndarray, k: int
    ) -> None:
        """Coefficients at ``alphas[k]`` on all training patients (the path down to it, at
        the final tolerance); steps back to the weakest penalty that did not overflow."""
        theta = _coxnet_path(prob.design, t, e, prob.solver_l1, alphas[: k + 1], _FINAL_TOL)
        ok = np.flatnonzero(np.all(np.isfinite(theta), axis=0))
        if ok.size == 0:
            raise TrainingError(
                "the Cox model could not be fitted for any penalty (numerical overflow); check "
                "the input for constant or duplicated columns."
            )
        k = int(ok[-1])
        self.l1_ratio_, self.penalizer_ = prob.l1_ratio, float(alphas[k])
        self.coef_ = prob.coef(theta[:, k])

    def _cv_loglik(
        self, prob: _CoxProblem, t: np.ndarray, e: np.ndarray, alphas: np.ndarray,
        splits: list[tuple[np.ndarray, np.ndarray]],
    ) -> np.ndarray:  # fmt: skip
        """Cross-validated partial log-likelihood of each alpha: Σ_k ℓ(β_−k) − ℓ_−k(β_−k)."""
        Z = prob.design
        total = np.zeros(len(alphas))
        for tr, _va in splits:
            if e[tr].sum() < 1:
                continue
            theta = _coxnet_path(Z[tr], t[tr], e[tr], prob.solver_l1, alphas, self.tol)
            bad = ~np.all(np.isfinite(theta), axis=0)
            eta = Z @ np.nan_to_num(theta)
            full = cox_partial_loglik(t, e, eta)
            part = cox_partial_loglik(t[tr], e[tr], eta[tr])
            total += np.where(bad, -np.inf, full - part)
        return total

    def predict_risk(self, X: Any) -> np.ndarray:
        """Linear predictor x·β per patient, [N] (higher = worse prognosis)."""
        X = self._fitted_input(X)
        return self._features(X) @ self.coef_

    def _fields(self) -> dict[str, Any]:  # to_dict
        return {
            "mean": self.mean_.tolist(),
            "scale": self.scale_.tolist(),
            "components": None if self.components_ is None else self.components_.tolist(),
            "component_scale": self.component_scale_.tolist(),
            "coef": self.coef_.tolist(),
            "penalizer": self.penalizer_,
            "l1_ratio": self.l1_ratio_,
            "selection": self.penalizer_selection_,
            "cv_edge": self.cv_edge_,
            "l1_edge": self.l1_edge_,
            "solver": "scikit-survival CoxnetSurvivalAnalysis",
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CoxHead:
        """Rebuild a fitted head from :meth:`to_dict` output (numpy only; version-1 dicts of
        the earlier lifelines head load too)."""
        with cls._reading_dict(d):
            l1 = float(d.get("l1_ratio", 0.0))
            head = cls()  # fitted attributes below; the constructor's grid is unused
            head.penalizer_ = float(d["penalizer"])
            head.l1_ratio_ = l1
            head.penalizer_selection_ = str(d.get("selection", "fixed"))
            head.cv_edge_ = d.get("cv_edge")
            head.l1_edge_ = d.get("l1_edge")
            head.mean_ = np.asarray(d["mean"], dtype=np.float64)
            head.scale_ = np.asarray(d["scale"], dtype=np.float64)
            comps = d.get("components")
            head.components_ = None if comps is None else np.asarray(comps, dtype=np.float64)
            head.component_scale_ = np.asarray(d["component_scale"], dtype=np.float64)
            head.coef_ = np.asarray(d["coef"], dtype=np.float64)
        D = head.mean_.shape[0]
        M = D if head.components_ is None else head.components_.shape[0]
        ok = head.scale_.shape == (D,) and head.coef_.shape == (M,)
        ok = ok and head.component_scale_.shape == (M,)
        ok = ok and (head.components_ is None or head.components_.shape == (M, D))
        if not ok:
            raise ConfigError("malformed CoxHead dict: array shapes do not agree.")
        head.n_nonzero_ = int(np.sum(head.coef_ != 0))
        return head


# ---------------------------------------------------------------------------------------
# discrete-time hazard head
# ---------------------------------------------------------------------------------------
def survival_bin_edges(time: Any, event: Any, n_bins: int = 4) -> np.ndarray:
    """Inner bin edges: the 1/n_bins, …, (n_bins−1)/n_bins quantiles of the *uncensored*
    times given (pass the TRAINING patients only). Duplicate quantiles (heavily tied times)
    are merged, so fewer bins may result.

    A time t falls in bin ``b = #(edges ≤ t)`` (bins are [edge_{b−1}, edge_b), the first from
    0, the last to +∞); see :func:`assign_bins`.
    """
    t, e = _survival_arrays(time, event)
    if int(n_bins) < 1:
        raise ConfigError(f"n_bins must be >= 1; got {n_bins}.")
    dead = t[e]
    if dead.size < 2:
        raise ConfigError(
            f"the discrete-time hazard head needs at least 2 observed deaths among the training "
            f"patients to place its bins; found {dead.size}."
        )
    qs = np.arange(1, int(n_bins)) / int(n_bins)
    return np.unique(np.quantile(dead, qs))


def assign_bins(time: Any, edges: np.ndarray) -> np.ndarray:
    """Bin index per time: number of inner ``edges`` ≤ t (int64)."""
    return np.searchsorted(np.asarray(edges), np.asarray(time, dtype=np.float64), side="right")


def discrete_hazard_nll(
    hazards: Any, bin_index: Any, event: Any, alpha: float = 0.0, eps: float = 1e-7
) -> float:
    """Mean discrete-time survival negative log-likelihood (numpy reference).

    With S_{−1} = 1 and S_b = Π_{s≤b}(1 − h_s), a patient in bin y contributes
    −log S_{y−1} − log h_y if the death was observed, and −log S_y if censored (known to
    have survived through bin y). The total is (1 − alpha)·mean(all) + alpha·mean(uncensored
    part) (alpha = 0: the plain likelihood, as in the paper's head).

    Parameters
    ----------
    hazards : [N, K] per-bin hazards in (0, 1).
    bin_index : [N] bin of each patient's follow-up time.
    event : [N] 1 = death observed, 0 = censored.
    """
    h = np.clip(np.asarray(hazards, dtype=np.float64), eps, 1 - eps)
    y = np.asarray(bin_index, dtype=np.int64)
    e = np.asarray(event).astype(np.float64)
    S = np.cumprod(1.0 - h, axis=1)
    S_pad = np.concatenate([np.ones((h.shape[0], 1)), S], axis=1)
    rows = np.arange(h.shape[0])
    unc = -e * (np.log(S_pad[rows, y]) + np.log(h[rows, y]))
    cen = -(1.0 - e) * np.log(S_pad[rows, y + 1])
    return float((1 - alpha) * np.mean(unc + cen) + alpha * np.mean(unc))


def _hazard_objective(
    theta: np.ndarray, Z: np.ndarray, y: np.ndarray, e: np.ndarray, K: int, wd: float,
    alpha: float,
) -> tuple[float, np.ndarray]:  # fmt: skip
    """Penalised discrete-time NLL (:func:`discrete_hazard_nll` + wd·‖W‖²) and its gradient;
    ``theta`` = [W (K·D, row-major), b (K)].

    The NLL is a sum of binary cross-entropies: a patient in bin y contributes a "survived"
    term (target 0) for every bin s < y and, in bin y, target 1 if the death was observed
    and 0 if censored; the uncensored weight α adds α·e_i to each patient's weight."""
    N, D = Z.shape
    W, b = theta[: K * D].reshape(K, D), theta[K * D :]
    z = Z @ W.T + b
    bins = np.arange(K)
    mask = bins[None, :] <= y[:, None]
    target = (bins[None, :] == y[:, None]) & e[:, None].astype(bool)
    weight = ((1.0 - alpha) + alpha * e.astype(np.float64))[:, None] * mask / N
    loss = float(np.sum(weight * (np.logaddexp(0.0, z) - target * z))) + wd * float(np.sum(W * W))
    g = weight * (_sigmoid(z) - target)
    grad = np.concatenate([(g.T @ Z + 2.0 * wd * W).ravel(), g.sum(axis=0)])
    return loss, grad


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))


def _marginal_logits(y: np.ndarray, e: np.ndarray, K: int) -> np.ndarray:
    """Per-bin logits of the cohort's (smoothed) marginal hazards: the optimum for W = 0."""
    out = np.zeros(K)
    for k in range(K):
        h = (np.sum((y == k) & e) + 0.5) / (np.sum(y >= k) + 1.0)
        out[k] = math.log(h / (1 - h))
    return out


def _fit_hazard(
    Z: np.ndarray, y: np.ndarray, e: np.ndarray, K: int, wd: float, alpha: float,
    max_iter: int, theta0: np.ndarray | None = None, tight: bool = True,
) -> Any:  # fmt: skip
    """Minimise :func:`_hazard_objective` by L-BFGS from ``theta0`` (default: W = 0 and the
    marginal hazards). Returns scipy's OptimizeResult."""
    from scipy.optimize import minimize

    if theta0 is None:
        theta0 = np.concatenate([np.zeros(K * Z.shape[1]), _marginal_logits(y, e, K)])
    tol = {"gtol": 1e-7, "ftol": 1e-12} if tight else {"gtol": 1e-5, "ftol": 1e-10}
    with np.errstate(over="ignore"):
        return minimize(
            _hazard_objective, theta0, args=(Z, y, e, K, wd, alpha), jac=True,
            method="L-BFGS-B", options={"maxiter": max_iter, **tol},
        )  # fmt: skip





class DiscreteHazardHead(_FittedHead):
    """The paper's discrete-time hazard head: numpy training and prediction.

    The head is linear in the standardised embedding, so with the L2 penalty the objective
    (NLL + wd·‖W‖²) is strictly convex: it is minimised to convergence by full-batch L-BFGS
    (scipy, analytic gradient, float64). The result does not depend on an epoch count or
    learning rate, every training patient is used in every step (nothing dropped), and
    nothing is early-stopped on held-out data. An input wider than the number of patients is
    fitted in its row space (the same model: the L2-penalised weights lie there).

    Parameters
    ----------
    n_bins : number of time bins (4 = quartiles of the uncensored training times).
    weight_decay : L2 penalty on the weights (added to the mean NLL as wd·‖W‖²), or
        ``"cv"`` to pick it from ``weight_decays`` by inner CV on the training data: the
        penalty with the lowest held-out NLL (a proper score, steadier than the C-index of a
        small fold). When an end of the grid wins, the grid is extended by up to two decades
        in that direction; if an end still wins, ``cv_edge_`` says so.
    max_iter : L-BFGS iterations at most.
    alpha : weight of the extra uncensored term of the NLL (0 = plain likelihood).
    seed : seed of the inner-CV shuffling.

    Attributes
    ----------
    bin_edges_ : inner edges (time unit of the input), from the training patients only.
    weight_decay_, weight_decay_selection_ : the penalty used and how it was chosen.
    cv_edge_ : None, ``"weakest penalty"`` or ``"strongest penalty"`` (grid end chosen).
    n_bins_ : number of bins actually used (len(bin_edges_) + 1).
    mean_, scale_ : [D] standardisation.  weight_ : [n_bins_, D].  bias_ : [n_bins_].
    train_loss_ : final penalised training objective.
    """

    _fitted_attr = "weight_"
    _input_name = "the hazard head"

    def __init__(
        self,
        n_bins: int = 4,
        weight_decay: float | str = "cv",
        weight_decays: Sequence[float] = (100.0, 10.0, 1.0, 0.1, 0.01, 1e-3, 1e-4),
        max_iter: int = 500,
        alpha: float = 0.0,
        inner_folds: int = 5,
        seed: int = 0,
    ) -> None:
        if not (
            weight_decay == "cv" or (isinstance(weight_decay, (int, float)) and weight_decay >= 0)
        ):
            raise ConfigError(f"weight_decay must be >= 0 or 'cv'; got {weight_decay!r}.")
        if int(max_iter) < 1 or not 0 <= alpha <= 1:
            raise ConfigError("DiscreteHazardHead needs max_iter >= 1 and 0 <= alpha <= 1.")
        self.n_bins = int(n_bins)
        self.weight_decay = weight_decay
        self.weight_decays = tuple(float(w) for w in weight_decays)
        self.max_iter = int(max_iter)
        self.alpha = float(alpha)
        self.inner_folds = int(inner_folds)
        self.seed = int(seed)

    def fit(self, X: Any, time: Any, event: Any) -> DiscreteHazardHead:
        """Fit on training embeddings [N, D], times [N] and events [N]; returns self.

        The bins come from these training patients' uncensored times only."""
        X = _as_2d(X)
        t, e = _survival_arrays(time, event, X.shape[0])
        self.bin_edges_ = survival_bin_edges(t, e, self.n_bins)
        self.n_bins_ = int(self.bin_edges_.size + 1)
        self.cv_edge_ = None
        self.mean_, self.scale_ = _standardize_fit(X)
        Z = (X - self.mean_) / self.scale_
        # wide input: fit in the row space (exact under the L2 penalty; at most N columns)
        basis = _row_space(Z)[1] if Z.shape[1] > Z.shape[0] else None
        R = Z if basis is None else Z @ basis
        if self.weight_decay == "cv":
            n_folds = _n_inner_folds(self.inner_folds, e)
            if n_folds >= 2:
                self.weight_decay_ = self._choose_weight_decay(R, t, e, n_folds)
                self.weight_decay_selection_ = "inner_cv"
            else:
                self.weight_decay_ = self.weight_decays[0]
                self.weight_decay_selection_ = "fixed (too few deaths for inner CV)"
        else:
            self.weight_decay_ = float(self.weight_decay)
            self.weight_decay_selection_ = "fixed"
        K = self.n_bins_
        res = _fit_hazard(
            R, assign_bins(t, self.bin_edges_), e, K, self.weight_decay_, self.alpha, self.max_iter
        )
        if not np.isfinite(res.fun) or not np.all(np.isfinite(res.x)):
            raise TrainingError(
                "the discrete-time hazard head did not converge (non-finite loss); use a larger "
                "weight_decay."
            )
        W = res.x[: K * R.shape[1]].reshape(K, R.shape[1])
        self.weight_ = W if basis is None else W @ basis.T
        self.bias_ = res.x[K * R.shape[1] :].copy()
        self.train_loss_ = float(res.fun)
        self.converged_ = bool(res.success)
        return self

    def _choose_weight_decay(self, Z: np.ndarray, t: np.ndarray, e: np.ndarray, k: int) -> float:
        """Weight decay with the lowest mean held-out NLL over inner folds of the (already
        standardised) training inputs ``Z`` (extending the grid past an end that wins, by up
        to two decades). Each inner fold places its own bins on its own training part and
        warm-starts every penalty from the nearest one already fitted."""
        folds = []
        for tr, va in _inner_splits(e, k, self.seed):
            try:
                edges = survival_bin_edges(t[tr], e[tr], self.n_bins)
            except ConfigError:
                continue  # fewer than two deaths in this inner training part
            K = edges.size + 1
            y_va = np.minimum(assign_bins(t[va], edges), K - 1)
            folds.append((tr, va, K, assign_bins(t[tr], edges), y_va, {}))
        scores: dict[float, float] = {}

        def score(wd: float) -> float:
            if wd not in scores:
                vals = []
                for tr, va, K, y_tr, y_va, fitted in folds:
                    near = min(fitted, key=lambda w: abs(math.log(w / wd)), default=None)
                    res = _fit_hazard(
                        Z[tr], y_tr, e[tr], K, wd, self.alpha, self.max_iter,
                        theta0=None if near is None else fitted[near], tight=False,
                    )  # fmt: skip
                    if not np.isfinite(res.fun) or not np.all(np.isfinite(res.x)):
                        continue
                    fitted[wd] = res.x
                    W, b = res.x[: K * Z.shape[1]].reshape(K, -1), res.x[K * Z.shape[1] :]
                    h = _sigmoid(Z[va] @ W.T + b)
                    vals.append(discrete_hazard_nll(h, y_va, e[va], self.alpha))
                scores[wd] = float(np.mean(vals)) if vals else np.inf
            return scores[wd]

        grid = sorted(set(self.weight_decays), reverse=True)  # strongest first
        for _ in range(3):
            vals = [score(w) for w in grid]
            j = int(np.argmin(vals))  # ties: the stronger penalty (listed first)
            if 0 < j < len(grid) - 1 or len(grid) < 2:
                break
            ext = grid[0] * 10.0 if j == 0 else grid[-1] / 10.0
            if ext > 100 * max(self.weight_decays) or ext < min(self.weight_decays) / 100:
                break
            grid = [ext, *grid] if j == 0 else [*grid, ext]
        vals = [score(w) for w in grid]
        j = int(np.argmin(vals))
        if len(grid) > 1 and j in (0, len(grid) - 1):
            self.cv_edge_ = "strongest penalty" if j == 0 else "weakest penalty"
        self.cv_scores_ = sorted(scores.items(), reverse=True)
        return float(grid[j])

    def predict_hazards(self, X: Any) -> np.ndarray:
        """Per-bin hazards h_t in (0, 1), [N, n_bins_]."""
        X = self._fitted_input(X)
        z = ((X - self.mean_) / self.scale_) @ self.weight_.T + self.bias_
        return 1.0 / (1.0 + np.exp(-z))

    def predict_survival(self, X: Any) -> np.ndarray:
        """S_t = Π_{s≤t}(1 − h_s): probability of surviving through bin t, [N, n_bins_]."""
        return np.cumprod(1.0 - self.predict_hazards(X), axis=1)

    def predict_risk(self, X: Any) -> np.ndarray:
        """risk = −Σ_t S_t, [N] (higher = worse prognosis)."""
        return -self.predict_survival(X).sum(axis=1)

    def _fields(self) -> dict[str, Any]:  # to_dict
        return {
            "bin_edges": self.bin_edges_.tolist(),
            "mean": self.mean_.tolist(),
            "scale": self.scale_.tolist(),
            "weight": self.weight_.tolist(),
            "bias": self.bias_.tolist(),
            "weight_decay": self.weight_decay_,
            "alpha": self.alpha,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DiscreteHazardHead:
        with cls._reading_dict(d):
            edges = np.asarray(d["bin_edges"], dtype=np.float64)
            head = cls(
                n_bins=edges.size + 1,
                weight_decay=float(d["weight_decay"]),
                alpha=float(d.get("alpha", 0.0)),
            )
            head.bin_edges_ = edges
            head.n_bins_ = int(edges.size + 1)
            head.weight_decay_ = float(d["weight_decay"])
            head.weight_decay_selection_ = "fixed"
            head.mean_ = np.asarray(d["mean"], dtype=np.float64)
            head.scale_ = np.asarray(d["scale"], dtype=np.float64)
            head.weight_ = np.asarray(d["weight"], dtype=np.float64)
            head.bias_ = np.asarray(d["bias"], dtype=np.float64)
        D = head.mean_.shape[0]
        if head.weight_.shape != (head.n_bins_, D) or head.bias_.shape != (head.n_bins_,):
            raise ConfigError("malformed DiscreteHazardHead dict: array shapes do not agree.")
        return head
