"""Subtyping probes on frozen embeddings: a logistic-regression linear probe and k-shot draws.

:class:`LinearProbe` is fitted with scikit-learn but predicts with numpy only and serialises
to plain JSON (:meth:`LinearProbe.to_dict`), so a model bundle never stores a pickled
estimator and needs no scikit-learn at load time.

Regularisation strength ``C`` is never chosen on the patients that are reported: with
``C="cv"`` it is chosen by a stratified inner cross-validation (log-loss) on the training
patients passed to :meth:`LinearProbe.fit`.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np

from ..errors import ConfigError

__all__ = ["DEFAULT_CS", "LinearProbe", "sample_k_shot"]

#: Grid of inverse regularisation strengths searched by the inner CV (``C="cv"``).
DEFAULT_CS: tuple[float, ...] = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)


def _as_2d(X: Any, what: str = "X") -> np.ndarray:
    arr = np.asarray(X, dtype=np.float64)
    if arr.ndim != 2:
        raise ConfigError(
            f"{what} must be a 2-D array [n_samples, n_features]; got shape {arr.shape}."
        )
    if not np.all(np.isfinite(arr)):
        raise ConfigError(f"{what} contains NaN or inf values; embeddings must be finite.")
    return arr


def _as_fitted_2d(X: Any, fitted_dim: int, what: str) -> np.ndarray:
    """:func:`_as_2d` plus the check that X has the width the model ``what`` was fitted on."""
    X = _as_2d(X)
    if X.shape[1] != fitted_dim:
        raise ConfigError(f"{what} was fitted on {fitted_dim}-d embeddings; got {X.shape[1]}-d.")
    return X


class _FittedHead:
    """What the fitted heads (LinearProbe, CoxHead, DiscreteHazardHead) share: the error when
    one is used unfitted, and the check of its input's width. Numpy only."""

    _fitted_attr = "coef_"  # set by fit() and from_dict()
    _fit_hint = "fit or from_dict"  # what the not-fitted error tells the user to call
    _input_name = "the head"  # how the width error names the head
    _dict_version = 1  # of the to_dict layout
    mean_: np.ndarray

    def _check_fitted(self) -> None:
        if not hasattr(self, self._fitted_attr):
            raise ConfigError(f"this {type(self).__name__} is not fitted; call {self._fit_hint}.")

    def _fitted_input(self, X: Any) -> np.ndarray:
        """``X`` as [N, d] with d = the fitted width (after :meth:`_check_fitted`)."""
        self._check_fitted()
        return _as_fitted_2d(X, self.mean_.shape[0], self._input_name)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict of the fitted head (lists of floats), read back by ``from_dict``:
        ``type`` (the class name) and ``version`` first, then the head's own fields."""
        self._check_fitted()
        return {"type": type(self).__name__, "version": self._dict_version, **self._fields()}

    def _fields(self) -> dict[str, Any]:
        raise NotImplementedError

    @classmethod
    @contextmanager
    def _reading_dict(cls, d: dict[str, Any]) -> Iterator[None]:
        """Around ``from_dict``: a dict of another type, a missing key or a bad value is a
        ConfigError that names the head."""
        name = cls.__name__
        try:
            if d.get("type", name) != name:
                raise ConfigError(f"expected a {name} dict, got type {d.get('type')!r}.")
            yield
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"malformed {name} dict ({type(exc).__name__}: {exc}).") from None


def _standardize_fit(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean = X.mean(axis=0)
    scale = X.std(axis=0)
    # constant features carry no information; a unit scale keeps them at zero, not NaN
    scale = np.where(scale > 1e-12, scale, 1.0)
    return mean, scale


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    ez = np.exp(z)
    return ez / ez.sum(axis=1, keepdims=True)


def _probabilities(z: np.ndarray) -> np.ndarray:
    """Class probabilities from logits [N, 1] (of the second of two classes: sigmoid) or
    [N, C] (softmax), as scikit-learn's LogisticRegression."""
    if z.shape[1] == 1:
        p1 = 1.0 / (1.0 + np.exp(-z[:, 0]))
        return np.stack([1.0 - p1, p1], axis=1)
    return _softmax(z)


def _row_space(Z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(Z·V [N, R], V [D, R]): ``Z`` in an orthonormal basis V of its row space (thin SVD,
    R = rank ≤ min(N, D)). The weights of an L2-penalised linear model (logistic, Cox,
    discrete hazard) fitted on Z lie in this space and ‖V·θ‖ = ‖θ‖, so fitting on Z·V and
    mapping the weights back with V gives the same model, with at most N columns."""
    u, s, vt = np.linalg.svd(Z, full_matrices=False)
    r = max(int(np.sum(s > s[0] * 1e-10)), 1) if s.size and s[0] > 0 else 1
    return u[:, :r] * s[:r], vt[:r].T


class _Logistic:
    """A fitted logistic regression as plain arrays (scikit-learn's conventions: ``coef_``
    [1, D] for two classes, else [C, D]; probabilities by sigmoid / softmax)."""

    def __init__(self, classes: np.ndarray, coef: np.ndarray, intercept: np.ndarray) -> None:
        self.classes_, self.coef_, self.intercept_ = classes, coef, intercept

    def predict_proba(self, Z: np.ndarray) -> np.ndarray:
        return _probabilities(Z @ self.coef_.T + self.intercept_)


class LinearProbe(_FittedHead):
    """Standardisation + multinomial logistic regression; numpy prediction; JSON round trip.

    Parameters
    ----------
    C : float or "cv"
        Inverse L2 regularisation strength of scikit-learn's ``LogisticRegression``. ``"cv"``
        chooses it from ``Cs`` by stratified inner cross-validation (mean held-out log-loss)
        on the training data only; when a class has fewer than 2 training samples (e.g. a
        1-shot probe) inner CV is impossible and ``C_default`` is used.
    Cs : grid searched when ``C="cv"``.
    inner_folds : at most this many inner folds (fewer if the smallest class is smaller).
    C_default : C used when inner CV is impossible.
    class_weight : ``"balanced"`` (default; reweights classes by inverse frequency, so a
        rare subtype is not ignored) or ``None``.
    max_iter : lbfgs iterations.
    seed : seed of the inner-CV shuffling.

    Attributes
    ----------
    classes_ : np.ndarray [C] — class labels, column order of :meth:`predict_proba`.
    mean_, scale_ : np.ndarray [D] — standardisation fitted on the training data.
    coef_ : np.ndarray [1, D] for two classes (logit of ``classes_[1]``) or [C, D].
    intercept_ : np.ndarray [1] or [C].
    C_ : float — the C used for the final fit.
    C_selection_ : "fixed" | "inner_cv" | "fixed (too few samples for inner CV)".
    """

    _fit_hint = "fit(X, y) or from_dict first"
    _input_name = "the probe"

    def __init__(
        self,
        C: float | str = "cv",
        Cs: Sequence[float] = DEFAULT_CS,
        inner_folds: int = 5,
        C_default: float = 1.0,
        class_weight: str | None = "balanced",
        max_iter: int = 2000,
        seed: int = 0,
    ) -> None:
        if not (C == "cv" or (isinstance(C, (int, float)) and C > 0)):
            raise ConfigError(f"LinearProbe C must be a positive number or 'cv'; got {C!r}.")
        if class_weight not in ("balanced", None):
            raise ConfigError(f"class_weight must be 'balanced' or None; got {class_weight!r}.")
        self.C = C
        self.Cs = tuple(float(c) for c in Cs)
        self.inner_folds = int(inner_folds)
        self.C_default = float(C_default)
        self.class_weight = class_weight
        self.max_iter = int(max_iter)
        self.seed = int(seed)

    # -- fitting -------------------------------------------------------------------------
    def _fit_lr(self, Z: np.ndarray, y: np.ndarray, C: float) -> _Logistic:
        """scikit-learn's L2 logistic regression on ``Z``. A ``Z`` wider than it is tall is
        fitted in its row space (the same model: L2-penalised weights lie there; with
        4,000 genes and 75 patients the solver sees 75 columns instead of 4,000)."""
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.linear_model import LogisticRegression

        design, basis = _row_space(Z) if Z.shape[1] > Z.shape[0] else (Z, None)
        lr = LogisticRegression(C=C, class_weight=self.class_weight, max_iter=self.max_iter)
        with warnings.catch_warnings():
            # tiny or separable training sets hit max_iter without harm to the probe
            warnings.simplefilter("ignore", ConvergenceWarning)
            lr.fit(design, y)
        coef = np.asarray(lr.coef_, dtype=np.float64)
        return _Logistic(
            np.asarray(lr.classes_),
            coef if basis is None else coef @ basis.T,
            np.asarray(lr.intercept_, dtype=np.float64),
        )

    def _select_C(
        self, X: np.ndarray, y: np.ndarray, ref_stats: tuple[np.ndarray, np.ndarray] | None
    ) -> tuple[float, str]:
        if self.C != "cv":
            return float(self.C), "fixed"
        _, counts = np.unique(y, return_counts=True)
        n_splits = min(self.inner_folds, int(counts.min()))
        if n_splits < 2:
            return self.C_default, "fixed (too few samples for inner CV)"
        from sklearn.model_selection import StratifiedKFold

        skf = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=self.seed)
        losses = np.zeros(len(self.Cs))
        for tr, va in skf.split(X, y):
            mean, scale = ref_stats if ref_stats is not None else _standardize_fit(X[tr])
            Ztr, Zva = (X[tr] - mean) / scale, (X[va] - mean) / scale
            for j, c in enumerate(self.Cs):
                lr = self._fit_lr(Ztr, y[tr], c)
                p = lr.predict_proba(Zva)
                # the held-out fold may lack a class the model knows; index by label
                col = {lab: i for i, lab in enumerate(lr.classes_)}
                idx = np.array([col.get(lab, -1) for lab in y[va]])
                pv = np.where(idx >= 0, p[np.arange(len(va)), np.maximum(idx, 0)], 0.0)
                losses[j] += -np.mean(np.log(np.clip(pv, 1e-15, 1.0)))
        # ties go to the stronger regularisation (smaller C): listed first
        return float(self.Cs[int(np.argmin(losses))]), "inner_cv"

    def fit(self, X: Any, y: Sequence[Any], X_reference: Any = None) -> LinearProbe:
        """Fit on training embeddings ``X`` [N, D] and labels ``y`` [N]; returns self.

        ``X_reference`` (optional, [M, D], no labels): embeddings from which the
        standardisation is estimated instead of ``X`` — for k-shot probes pass all training
        patients' embeddings, because per-feature scales estimated from 2k samples are
        unstable (with k = 1 every feature would be divided by the gap between two points).
        Only the *training* patients may be passed here.
        """
        X = _as_2d(X)
        y = np.asarray(y)
        if y.ndim != 1 or y.shape[0] != X.shape[0]:
            raise ConfigError(
                f"y must have one label per row of X ({X.shape[0]}); got shape {y.shape}."
            )
        classes = np.unique(y)
        if classes.size < 2:
            raise ConfigError(
                f"a subtype probe needs at least two classes among the training patients; "
                f"found only {classes.tolist()}."
            )
        ref_stats = None
        if X_reference is not None:
            R = _as_2d(X_reference, "X_reference")
            if R.shape[1] != X.shape[1]:
                raise ConfigError(f"X_reference has {R.shape[1]} features but X has {X.shape[1]}.")
            ref_stats = _standardize_fit(R)
        self.C_, self.C_selection_ = self._select_C(X, y, ref_stats)
        self.mean_, self.scale_ = ref_stats if ref_stats is not None else _standardize_fit(X)
        lr = self._fit_lr((X - self.mean_) / self.scale_, y, self.C_)
        self.classes_, self.coef_, self.intercept_ = lr.classes_, lr.coef_, lr.intercept_
        return self

    # -- prediction (numpy only) ---------------------------------------------------------
    def decision_function(self, X: Any) -> np.ndarray:
        """Logits: [N] for two classes (of ``classes_[1]``), else [N, C]."""
        X = self._fitted_input(X)
        z = ((X - self.mean_) / self.scale_) @ self.coef_.T + self.intercept_
        return z[:, 0] if self.coef_.shape[0] == 1 else z

    def predict_proba(self, X: Any) -> np.ndarray:
        """Class probabilities [N, C] in the order of ``classes_`` (rows sum to 1)."""
        z = self.decision_function(X)
        return _probabilities(z[:, None] if z.ndim == 1 else z)

    def predict(self, X: Any) -> np.ndarray:
        """Most probable class label per row."""
        return self.classes_[np.argmax(self.predict_proba(X), axis=1)]

    # -- serialisation -------------------------------------------------------------------
    def _fields(self) -> dict[str, Any]:  # to_dict: lists of floats, class labels as given
        return {
            "classes": self.classes_.tolist(),
            "mean": self.mean_.tolist(),
            "scale": self.scale_.tolist(),
            "coef": self.coef_.tolist(),
            "intercept": self.intercept_.tolist(),
            "C": self.C_,
            "C_selection": self.C_selection_,
            "class_weight": self.class_weight,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LinearProbe:
        """Rebuild a fitted probe from :meth:`to_dict` output (no scikit-learn needed)."""
        with cls._reading_dict(d):
            probe = cls(C=float(d["C"]), class_weight=d.get("class_weight", "balanced"))
            probe.classes_ = np.asarray(d["classes"])
            probe.mean_ = np.asarray(d["mean"], dtype=np.float64)
            probe.scale_ = np.asarray(d["scale"], dtype=np.float64)
            probe.coef_ = np.atleast_2d(np.asarray(d["coef"], dtype=np.float64))
            probe.intercept_ = np.atleast_1d(np.asarray(d["intercept"], dtype=np.float64))
            probe.C_ = float(d["C"])
            probe.C_selection_ = str(d.get("C_selection", "fixed"))
        D = probe.mean_.shape[0]
        n_out = 1 if probe.classes_.size == 2 else probe.classes_.size
        if (
            probe.scale_.shape != (D,)
            or probe.coef_.shape != (n_out, D)
            or probe.intercept_.shape != (n_out,)
        ):
            raise ConfigError(
                "malformed LinearProbe dict: shapes of mean/scale/coef/intercept do not agree "
                f"({probe.mean_.shape}, {probe.scale_.shape}, {probe.coef_.shape}, "
                f"{probe.intercept_.shape}) for {probe.classes_.size} classes."
            )
        return probe


def sample_k_shot(labels: Sequence[Any], k: int, rng: np.random.Generator | int) -> np.ndarray:
    """Indices of exactly ``k`` samples of every class in ``labels``, drawn without replacement.

    Pass only the *training* patients' labels: the returned indices index into them.

    Parameters
    ----------
    labels : class label per training patient, shape [N].
    k : samples per class (≥ 1).
    rng : a numpy Generator or an integer seed (the same seed gives the same draw).

    Returns
    -------
    np.ndarray
        Sorted int64 indices, ``k × n_classes`` of them.

    Raises
    ------
    ConfigError
        If a class has fewer than ``k`` training samples.
    """
    if int(k) != k or k < 1:
        raise ConfigError(f"k (shots per class) must be a positive integer; got {k!r}.")
    y = np.asarray(labels)
    gen = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    out = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        if idx.size < k:
            raise ConfigError(
                f"{k}-shot probe: class '{c}' has only {idx.size} training patients (needs {k})."
            )
        out.append(gen.choice(idx, size=int(k), replace=False))
    return np.sort(np.concatenate(out)).astype(np.int64)
