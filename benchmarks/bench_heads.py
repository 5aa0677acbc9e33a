"""Survival heads: the time of one ``CoxHead().fit`` (penalty and l1 ratio by inner CV).

Reported as a multiple of a reference measured in the same process on the same data: one
scikit-survival Coxnet path with the library's defaults (100 penalties, tolerance 1e-7,
l1 ratio 0.5) on the standardised matrix, i.e. what a single plain ``fit`` of the library
costs. The head fits 4 l1 ratios (0 = ridge, 0.05, 0.5, 1) x 5 inner folds + the final path
(21 paths), so a ratio below 21 means its paths are cheaper than the library default (shorter grid, looser inner
tolerance, ridge in the row space); its inner CV is what evaluate runs per fold, input kind
and task.

Shapes (patients x columns): 160 x 76 (a breast-cancer microarray cohort's training folds),
72 x 192 (the demo's slide + RNA embedding), 320 x 768 (a 400-patient cohort's RNA
embedding), 320 x 4,000 (its raw genes); tiny: 40 x 20.

Generative model (seed 0): columns in modules of 20 with within-module correlation 0.5
(module factor + noise); log hazard = 0.5 x (module 0 mean, standardised) - 0.4 x (module 1
mean, standardised) + 0.3 x column 0; Weibull(1.5) times, uniform censoring (~35 %).

Rows ``cox_head_fit_{n}x{g}`` (x one Coxnet path; target <= 21: the 21 paths of the inner
CV cost less than 21 library default paths) with the seconds of both in ``extra``.
"""

from __future__ import annotations

import warnings

from _harness import Case, Context, Row, time_fn

TARGET_RATIO = 21.0
SHAPES = [(160, 76), (72, 192), (320, 768), (320, 4000)]


def _shapes(ctx: Context) -> list[tuple[int, int]]:
    return [(40, 20)] if ctx.tiny else SHAPES


def cases(ctx: Context) -> list[Case]:
    t, c = (None, None) if ctx.tiny else (TARGET_RATIO, "<=")
    return [
        Case(
            f"cox_head_fit_{n}x{g}",
            "bench_heads:run",
            {"n": n, "g": g},
            timeout_s=600,
            expected_rows=[Row(f"cox_head_fit_{n}x{g}", None, "x one Coxnet path", t, c)],
        )
        for n, g in _shapes(ctx)
    ]


def cohort(n: int, g: int, seed: int = 0):
    """(X [n, g], time, event) of the documented generative model."""
    import numpy as np

    rng = np.random.default_rng(seed)
    n_mod = max(g // 20, 2)
    F = rng.normal(size=(n, n_mod))
    X = F[:, np.arange(g) % n_mod] * np.sqrt(0.5) + rng.normal(size=(n, g)) * np.sqrt(0.5)
    m0, m1 = X[:, np.arange(g) % n_mod == 0].mean(1), X[:, np.arange(g) % n_mod == 1].mean(1)
    lp = 0.5 * m0 / m0.std() - 0.4 * m1 / m1.std() + 0.3 * X[:, 0]
    T = (rng.exponential(1.0, n) / np.exp(lp)) ** (1 / 1.5)
    C = rng.uniform(0, np.quantile(T, 0.9) * 1.5, n)
    return X, np.minimum(T, C), (T <= C).astype(int)


def run(ctx: Context, n: int, g: int) -> list[Row]:
    import numpy as np
    from sksurv.linear_model import CoxnetSurvivalAnalysis

    from mirror_model.evaluation.survival import CoxHead

    X, t, e = cohort(n, g)
    Z = (X - X.mean(0)) / X.std(0)
    y = np.empty(n, dtype=[("event", bool), ("time", float)])
    y["event"], y["time"] = e.astype(bool), t
    heads: list[CoxHead] = []

    def reference() -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            CoxnetSurvivalAnalysis(l1_ratio=0.5, fit_baseline_model=False).fit(Z, y)

    budget = max(ctx.case_budget_s / 3, 1.0)
    repeats = 1 if ctx.tiny else 3
    ref = time_fn(reference, "cpu", repeats=repeats, budget_s=budget)
    head = time_fn(lambda: heads.append(CoxHead().fit(X, t, e)), "cpu", repeats, budget_s=budget)
    h = heads[-1]
    name = f"cox_head_fit_{n}x{g}"
    t_, c = (None, None) if ctx.tiny else (TARGET_RATIO, "<=")
    return [
        Row(
            name,
            head.median_s / ref.median_s,
            "x one Coxnet path",
            t_,
            c,
            note=f"head {head.median_s:.3g} s, one library path {ref.median_s:.3g} s",
            extra={
                "shape": [n, g],
                "head_s": round(head.median_s, 4),
                "coxnet_path_s": round(ref.median_s, 4),
                "head": head.extra(),
                "coxnet_path": ref.extra(),
                "chosen": {"l1_ratio": h.l1_ratio_, "penalizer": h.penalizer_,
                           "n_nonzero": h.n_nonzero_, "cv_edge": h.cv_edge_},
            },
        )  # fmt: skip
    ]
