"""Survival heads on frozen embeddings, Kaplan–Meier curves, log-rank test, C-index.

Kaplan–Meier, log-rank and the C-index are computed by lifelines; our wrappers keep only the
conventions (curves start at time 0, nan where a test is undefined, the risk direction).

Direction everywhere: a **risk score is higher for a worse prognosis** (earlier death).
:func:`c_index` of a good risk score is above 0.5.

Deployable heads (used by the model bundle; prediction needs numpy only, nothing pickled):

- :class:`CoxHead` — penalised Cox proportional-hazards model (lifelines ``CoxPHFitter``)
  on standardised embeddings. When the embedding has more dimensions than
  ``max_components`` (default 32), it is first reduced by PCA fitted on the training
  patients, then the components are standardised. Why: with D ≈ 768 dimensions and a few
  hundred patients (often fewer events) the Cox partial likelihood is not identifiable
  without strong penalisation, and lifelines' Newton steps cost O(D³) per iteration; a
  32-component PCA keeps the fit fast and stable while the penalty (chosen by inner CV)
  handles the rest. ``predict_risk`` is the linear predictor x·β (log partial hazard up
  to a constant).
- :class:`DiscreteHazardHead` — the paper's head: follow-up cut into ``n_bins`` (4) bins at
  the quantiles of the *uncensored training* times, a linear layer gives one hazard logit
  per bin, h_t = sigmoid(logit_t), S_t = Π_{s≤t}(1 − h_s), trained with the discrete-time
  negative log-likelihood (:func:`discrete_hazard_nll`); risk = −Σ_t S_t.

Both choose their regularisation strength by inner cross-validation (held-out C-index) on
the training patients only when given ``"cv"``.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import ConfigError, TrainingError
from .metrics import c_index
from .probes import _as_2d, _as_fitted_2d, _standardize_fit

__all__ = [
    "CoxHead",
    "DiscreteHazardHead",
    "KMCurve",
    "LogRankResult",
    "assign_bins",
    "c_index",
    "choose_risk_cutoff",
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


@contextlib.contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(min(n, old))
    try:
        yield
    finally:
        torch.set_num_threads(old)


# ---------------------------------------------------------------------------------------
# inner CV helper
# ---------------------------------------------------------------------------------------
def _inner_cv_choice(
    candidates: Sequence[float],
    make_head: Any,
    X: np.ndarray,
    t: np.ndarray,
    e: np.ndarray,
    n_folds: int,
    seed: int,
) -> float:
    """Pick the candidate with the best mean held-out C-index over inner folds of the
    training data (stratified by event). Ties go to the first (strongest) candidate."""
    from sklearn.model_selection import StratifiedKFold

    n_ev, n_cens = int(e.sum()), int((~e).sum())
    strata_ok = min(n_ev, n_cens) >= n_folds
    if strata_ok:
        splitter = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
        splits = list(splitter.split(X, e.astype(int)))
    else:
        from sklearn.model_selection import KFold

        splits = list(KFold(n_splits=n_folds, shuffle=True, random_state=seed).split(X))
    scores = np.zeros(len(candidates))
    for j, cand in enumerate(candidates):
        vals = []
        for tr, va in splits:
            if e[tr].sum() < 2:
                continue
            try:
                head = make_head(cand).fit(X[tr], t[tr], e[tr])
            except (ConfigError, TrainingError):
                continue
            ci = c_index(t[va], e[va], head.predict_risk(X[va]))
            if not math.isnan(ci):
                vals.append(ci)
        scores[j] = np.mean(vals) if vals else -np.inf
    return float(candidates[int(np.argmax(scores))])


# ---------------------------------------------------------------------------------------
# Cox head
# ---------------------------------------------------------------------------------------
class CoxHead:
    """Penalised Cox model on (PCA-reduced) standardised embeddings; numpy prediction.

    Parameters
    ----------
    penalizer : float or "cv"
        lifelines ``CoxPHFitter(penalizer=...)`` (L2 unless ``l1_ratio`` > 0). ``"cv"``
        picks it from ``penalizers`` by inner CV (held-out C-index) on the training patients.
    penalizers : grid for ``"cv"``, strongest first.
    l1_ratio : elastic-net mixing of lifelines (0 = ridge).
    max_components : PCA to this many components when the embedding has more dimensions
        (also capped at n_train − 1); ``None`` never reduces.
    inner_folds : inner CV folds for ``"cv"``.
    seed : inner-CV shuffling seed.

    Attributes
    ----------
    mean_, scale_ : [D] standardisation of the raw embedding.
    components_ : [M, D] PCA axes (in standardised space) or None when not reduced.
    component_scale_ : [M] standard deviation of each component on the training data.
    coef_ : [M] (or [D]) Cox coefficients on the standardised components.
    penalizer_ : the penalizer used for the final fit.
    """

    def __init__(
        self,
        penalizer: float | str = "cv",
        penalizers: Sequence[float] = (10.0, 1.0, 0.1, 0.01),
        l1_ratio: float = 0.0,
        max_components: int | None = 32,
        inner_folds: int = 3,
        seed: int = 0,
    ) -> None:
        if not (penalizer == "cv" or (isinstance(penalizer, (int, float)) and penalizer >= 0)):
            raise ConfigError(f"CoxHead penalizer must be >= 0 or 'cv'; got {penalizer!r}.")
        self.penalizer = penalizer
        self.penalizers = tuple(float(p) for p in penalizers)
        self.l1_ratio = float(l1_ratio)
        self.max_components = max_components
        self.inner_folds = int(inner_folds)
        self.seed = int(seed)

    def _features(self, X: np.ndarray) -> np.ndarray:
        Z = (X - self.mean_) / self.scale_
        if self.components_ is not None:
            Z = Z @ self.components_.T
        return Z / self.component_scale_

    def fit(self, X: Any, time: Any, event: Any) -> CoxHead:
        """Fit on training embeddings ``X`` [N, D], follow-up ``time`` [N] and ``event`` [N]
        (1 = death observed); returns self."""
        X = _as_2d(X)
        t, e = _survival_arrays(time, event, X.shape[0])
        if e.sum() < 1 or X.shape[0] < 3:
            raise ConfigError(
                f"a Cox model needs at least 3 training patients and one observed death; got "
                f"{X.shape[0]} patients with {int(e.sum())} deaths."
            )
        if self.penalizer == "cv":
            n_folds = min(self.inner_folds, int(e.sum()) // 2)
            if n_folds >= 2:
                self.penalizer_ = _inner_cv_choice(
                    self.penalizers,
                    lambda p: CoxHead(
                        p, l1_ratio=self.l1_ratio, max_components=self.max_components
                    ),
                    X,
                    t,
                    e,
                    n_folds,
                    self.seed,
                )
                self.penalizer_selection_ = "inner_cv"
            else:
                self.penalizer_ = self.penalizers[0]
                self.penalizer_selection_ = "fixed (too few deaths for inner CV)"
        else:
            self.penalizer_ = float(self.penalizer)
            self.penalizer_selection_ = "fixed"

        self.mean_, self.scale_ = _standardize_fit(X)
        Z = (X - self.mean_) / self.scale_
        n, d = Z.shape
        m = d if self.max_components is None else min(d, int(self.max_components), max(n - 1, 1))
        if m < d:
            # PCA by SVD of the (already centred) standardised training matrix
            _, _, vt = np.linalg.svd(Z, full_matrices=False)
            self.components_ = vt[:m]
            Z = Z @ self.components_.T
        else:
            self.components_ = None
        sd = Z.std(axis=0)
        self.component_scale_ = np.where(sd > 1e-12, sd, 1.0)
        Z = Z / self.component_scale_
        self.coef_ = self._fit_lifelines(Z, t, e)
        return self

    def _fit_lifelines(self, Z: np.ndarray, t: np.ndarray, e: np.ndarray) -> np.ndarray:
        import pandas as pd
        from lifelines import CoxPHFitter
        from lifelines.exceptions import ConvergenceError

        cols = [f"z{i}" for i in range(Z.shape[1])]
        df = pd.DataFrame(Z, columns=cols)
        df["_time"] = t
        df["_event"] = e.astype(int)
        pen = self.penalizer_
        last_exc: Exception | None = None
        # an unpenalised or weakly penalised fit can diverge on separable data; stronger
        # penalties always converge, so retry up the ladder and record what was used
        for _ in range(4):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    cph = CoxPHFitter(penalizer=pen, l1_ratio=self.l1_ratio)
                    cph.fit(df, duration_col="_time", event_col="_event")
                self.penalizer_ = float(pen)
                return cph.params_.reindex(cols).to_numpy(dtype=np.float64)
            except (ConvergenceError, np.linalg.LinAlgError, ValueError) as exc:
                last_exc = exc
                pen = max(pen * 10.0, 0.1)
        raise TrainingError(
            f"the Cox model did not converge even with penalizer {pen / 10:g} "
            f"({type(last_exc).__name__}: {last_exc}); check the embeddings for constant or "
            "duplicated columns."
        )

    def _check_fitted(self) -> None:
        if not hasattr(self, "coef_"):
            raise ConfigError("this CoxHead is not fitted; call fit(X, time, event) or from_dict.")

    def predict_risk(self, X: Any) -> np.ndarray:
        """Linear predictor x·β per patient, [N] (higher = worse prognosis)."""
        self._check_fitted()
        X = _as_fitted_2d(X, self.mean_.shape[0], "the Cox head")
        return self._features(X) @ self.coef_

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict of the fitted head (lists of floats)."""
        self._check_fitted()
        return {
            "type": "CoxHead",
            "version": 1,
            "mean": self.mean_.tolist(),
            "scale": self.scale_.tolist(),
            "components": None if self.components_ is None else self.components_.tolist(),
            "component_scale": self.component_scale_.tolist(),
            "coef": self.coef_.tolist(),
            "penalizer": self.penalizer_,
            "l1_ratio": self.l1_ratio,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CoxHead:
        """Rebuild a fitted head from :meth:`to_dict` output (no lifelines needed)."""
        try:
            if d.get("type", "CoxHead") != "CoxHead":
                raise ConfigError(f"expected a CoxHead dict, got type {d.get('type')!r}.")
            head = cls(penalizer=float(d["penalizer"]), l1_ratio=float(d.get("l1_ratio", 0.0)))
            head.penalizer_ = float(d["penalizer"])
            head.penalizer_selection_ = "fixed"
            head.mean_ = np.asarray(d["mean"], dtype=np.float64)
            head.scale_ = np.asarray(d["scale"], dtype=np.float64)
            comps = d.get("components")
            head.components_ = None if comps is None else np.asarray(comps, dtype=np.float64)
            head.component_scale_ = np.asarray(d["component_scale"], dtype=np.float64)
            head.coef_ = np.asarray(d["coef"], dtype=np.float64)
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"malformed CoxHead dict ({type(exc).__name__}: {exc}).") from None
        D = head.mean_.shape[0]
        M = D if head.components_ is None else head.components_.shape[0]
        ok = head.scale_.shape == (D,) and head.coef_.shape == (M,)
        ok = ok and head.component_scale_.shape == (M,)
        ok = ok and (head.components_ is None or head.components_.shape == (M, D))
        if not ok:
            raise ConfigError("malformed CoxHead dict: array shapes do not agree.")
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


def _nll_torch(logits: Any, y: Any, e: Any, alpha: float) -> Any:
    """Same as :func:`discrete_hazard_nll` from logits, computed stably in log space."""
    import torch
    import torch.nn.functional as F

    log_h = F.logsigmoid(logits)
    log_1mh = F.logsigmoid(-logits)
    log_S = torch.cumsum(log_1mh, dim=1)
    log_S_pad = torch.cat([torch.zeros_like(log_S[:, :1]), log_S], dim=1)
    rows = torch.arange(logits.shape[0])
    unc = -e * (log_S_pad[rows, y] + log_h[rows, y])
    cen = -(1 - e) * log_S_pad[rows, y + 1]
    return (1 - alpha) * (unc + cen).mean() + alpha * unc.mean()


class DiscreteHazardHead:
    """The paper's discrete-time hazard head: torch training, numpy prediction.

    The head is linear in the standardised embedding, so with the L2 penalty the objective
    (NLL + wd·‖W‖²) is strictly convex: it is minimised to convergence by full-batch L-BFGS
    (scipy, gradients by torch autograd, float64). The result does not depend on an epoch count or learning rate, every
    training patient is used in every step (nothing dropped), and nothing is early-stopped
    on held-out data.

    Parameters
    ----------
    n_bins : number of time bins (4 = quartiles of the uncensored training times).
    weight_decay : L2 penalty on the weights (added to the mean NLL as wd·‖W‖²), or
        ``"cv"`` to pick it from ``weight_decays`` by inner CV (held-out C-index) on the
        training data.
    max_iter : L-BFGS iterations at most.
    alpha : weight of the extra uncensored term of the NLL (0 = plain likelihood).
    seed : seed of the inner-CV shuffling.

    Attributes
    ----------
    bin_edges_ : inner edges (time unit of the input), from the training patients only.
    n_bins_ : number of bins actually used (len(bin_edges_) + 1).
    mean_, scale_ : [D] standardisation.  weight_ : [n_bins_, D].  bias_ : [n_bins_].
    train_loss_ : final penalised training objective.
    """

    def __init__(
        self,
        n_bins: int = 4,
        weight_decay: float | str = "cv",
        weight_decays: Sequence[float] = (1.0, 0.1, 0.01, 0.001),
        max_iter: int = 500,
        alpha: float = 0.0,
        inner_folds: int = 3,
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

    def _sub(self, wd: float) -> DiscreteHazardHead:
        return DiscreteHazardHead(
            self.n_bins, wd, max_iter=self.max_iter, alpha=self.alpha, seed=self.seed
        )

    def fit(self, X: Any, time: Any, event: Any) -> DiscreteHazardHead:
        """Fit on training embeddings [N, D], times [N] and events [N]; returns self.

        The bins come from these training patients' uncensored times only."""
        X = _as_2d(X)
        t, e = _survival_arrays(time, event, X.shape[0])
        self.bin_edges_ = survival_bin_edges(t, e, self.n_bins)
        self.n_bins_ = int(self.bin_edges_.size + 1)
        if self.weight_decay == "cv":
            n_folds = min(self.inner_folds, int(e.sum()) // 2)
            if n_folds >= 2:
                self.weight_decay_ = _inner_cv_choice(
                    self.weight_decays, self._sub, X, t, e, n_folds, self.seed
                )
                self.weight_decay_selection_ = "inner_cv"
            else:
                self.weight_decay_ = self.weight_decays[0]
                self.weight_decay_selection_ = "fixed (too few deaths for inner CV)"
        else:
            self.weight_decay_ = float(self.weight_decay)
            self.weight_decay_selection_ = "fixed"
        self.mean_, self.scale_ = _standardize_fit(X)
        with _torch_threads(1):  # tiny problem: extra threads only add contention
            self._optimize((X - self.mean_) / self.scale_, assign_bins(t, self.bin_edges_), e)
        return self

    def _optimize(self, Z_np: np.ndarray, y_np: np.ndarray, e_np: np.ndarray) -> None:
        import torch
        from scipy.optimize import minimize

        Z = torch.as_tensor(Z_np, dtype=torch.float64)
        y = torch.as_tensor(y_np, dtype=torch.long)
        ev = torch.as_tensor(e_np, dtype=torch.float64)
        K, D = self.n_bins_, Z.shape[1]
        wd = self.weight_decay_

        def objective(theta: np.ndarray) -> tuple[float, np.ndarray]:
            # value and gradient by torch autograd; parameters flattened as [W (K*D), b (K)]
            p = torch.as_tensor(theta, dtype=torch.float64).requires_grad_(True)
            W, b = p[: K * D].view(K, D), p[K * D :]
            loss = _nll_torch(Z @ W.T + b, y, ev, self.alpha) + wd * (W**2).sum()
            (grad,) = torch.autograd.grad(loss, p)
            return float(loss.detach()), grad.numpy()

        # start at W = 0 with the training cohort's marginal hazards (the optimum for W = 0)
        theta0 = np.concatenate([np.zeros(K * D), self._marginal_logits(y_np, e_np)])
        res = minimize(
            objective, theta0, jac=True, method="L-BFGS-B",
            options={"maxiter": self.max_iter, "gtol": 1e-7, "ftol": 1e-12},
        )  # fmt: skip
        if not np.isfinite(res.fun) or not np.all(np.isfinite(res.x)):
            raise TrainingError(
                "the discrete-time hazard head did not converge (non-finite loss); use a larger "
                "weight_decay."
            )
        self.weight_ = res.x[: K * D].reshape(K, D).copy()
        self.bias_ = res.x[K * D :].copy()
        self.train_loss_ = float(res.fun)
        self.converged_ = bool(res.success)

    def _marginal_logits(self, y: np.ndarray, e: np.ndarray) -> np.ndarray:
        out = np.zeros(self.n_bins_)
        for k in range(self.n_bins_):
            at_risk = np.sum(y >= k)
            deaths = np.sum((y == k) & e)
            h = (deaths + 0.5) / (at_risk + 1.0)
            out[k] = math.log(h / (1 - h))
        return out

    def _check_fitted(self) -> None:
        if not hasattr(self, "weight_"):
            raise ConfigError("this DiscreteHazardHead is not fitted; call fit or from_dict.")

    def predict_hazards(self, X: Any) -> np.ndarray:
        """Per-bin hazards h_t in (0, 1), [N, n_bins_]."""
        self._check_fitted()
        X = _as_fitted_2d(X, self.mean_.shape[0], "the hazard head")
        z = ((X - self.mean_) / self.scale_) @ self.weight_.T + self.bias_
        return 1.0 / (1.0 + np.exp(-z))

    def predict_survival(self, X: Any) -> np.ndarray:
        """S_t = Π_{s≤t}(1 − h_s): probability of surviving through bin t, [N, n_bins_]."""
        return np.cumprod(1.0 - self.predict_hazards(X), axis=1)

    def predict_risk(self, X: Any) -> np.ndarray:
        """risk = −Σ_t S_t, [N] (higher = worse prognosis)."""
        return -self.predict_survival(X).sum(axis=1)

    def to_dict(self) -> dict[str, Any]:
        self._check_fitted()
        return {
            "type": "DiscreteHazardHead",
            "version": 1,
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
        try:
            if d.get("type", "DiscreteHazardHead") != "DiscreteHazardHead":
                raise ConfigError(
                    f"expected a DiscreteHazardHead dict, got type {d.get('type')!r}."
                )
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
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(
                f"malformed DiscreteHazardHead dict ({type(exc).__name__}: {exc})."
            ) from None
        D = head.mean_.shape[0]
        if head.weight_.shape != (head.n_bins_, D) or head.bias_.shape != (head.n_bins_,):
            raise ConfigError("malformed DiscreteHazardHead dict: array shapes do not agree.")
        return head
