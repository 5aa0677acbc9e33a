"""Normalisation and gene selection fitted on training patients only (mirror_model.genes)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mirror_model.errors import CohortError, ConfigError, ExpressionError
from mirror_model.expression import ExpressionTable
from mirror_model.genes import (
    ExpressionNormalizer,
    GeneSelector,
    Preprocessing,
    describe_scale,
    fit_preprocessing,
    read_gene_list,
)


def counts(rng, n, g):
    return rng.poisson(rng.uniform(5, 500, g), size=(n, g)).astype(np.float64)


# ---------------------------------------------------------------------------- normaliser


def test_normaliser_counts_fit_on_train_rows_only():
    rng = np.random.default_rng(0)
    X = counts(rng, 50, 8)
    X[40:] *= 10  # the held-out rows differ: statistics must ignore them
    train = np.arange(40)
    n = ExpressionNormalizer().fit(X[train])
    assert n.log1p_ is True and "counts" in n.log1p_reason_
    L = np.log1p(X[train])
    np.testing.assert_allclose(n.mean_, L.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(n.std_, L.std(axis=0), rtol=1e-12)
    assert not np.allclose(n.mean_, np.log1p(X).mean(axis=0))
    Z = n.transform(X)
    assert Z.dtype == np.float32
    np.testing.assert_allclose(Z, (np.log1p(X) - L.mean(0)) / L.std(0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(Z[train].mean(0), 0, atol=1e-5)
    # no rows (a model refitted on all patients has no validation patients): an empty result
    assert n.transform(X[:0]).shape == (0, 8)


@pytest.mark.parametrize(
    "values, expected",
    [
        (np.array([[0.5, 2.0], [1.5, 12.0]]), False),  # log2-scale values
        (np.array([[-1.0, 2.0], [1.5, 3.0]]), False),  # centred / z-scored
        (np.array([[0.0, 2.0], [7.0, 3.0]]), True),  # small integer counts
        (np.array([[0.1, 2000.5], [3.3, 120.25]]), True),  # FPKM-like
    ],
)
def test_log1p_decision(values, expected):
    assert ExpressionNormalizer().fit(values).log1p_ is expected


def test_std_floor_constant_gene_maps_to_zero():
    X = np.array([[1.0, 5.0], [2.0, 5.0], [3.0, 5.0]])
    n = ExpressionNormalizer(log1p=False, std_floor=1e-3).fit(X)
    assert n.std_[1] == 1e-3
    np.testing.assert_array_equal(n.transform(X)[:, 1], 0.0)


def test_normaliser_json_roundtrip_and_errors():
    rng = np.random.default_rng(1)
    X = counts(rng, 20, 5)
    n = ExpressionNormalizer().fit(X, genes=list("ABCDE"))
    d = json.loads(json.dumps(n.to_dict()))
    m = ExpressionNormalizer.from_dict(d)
    np.testing.assert_array_equal(m.transform(X), n.transform(X))
    assert m.genes_ == list("ABCDE") and m.log1p_
    with pytest.raises(ExpressionError, match="gene C, sample row 1"):
        bad = X.copy()
        bad[0, 2] = -2.0
        n.transform(bad)
    with pytest.raises(ExpressionError, match="5 genes|fitted on 5"):
        n.transform(X[:, :3])
    with pytest.raises(ExpressionError, match="missing or infinite"):
        bad = X.copy()
        bad[1, 1] = np.nan
        n.transform(bad)
    with pytest.raises(ConfigError):
        ExpressionNormalizer.from_dict({**d, "std": [0.0] * 5})
    with pytest.raises(ConfigError, match="newer"):
        ExpressionNormalizer.from_dict({**d, "version": 99})
    with pytest.raises(ConfigError, match="not fitted"):
        ExpressionNormalizer().transform(X)


# ---------------------------------------------------------------------------- selector


def planted(rng, n=90, g=60, informative=(3, 17, 42, 47, 55), shift=2.5):
    y = np.array(["A", "B", "C"] * (n // 3))
    X = rng.normal(0, 1, (n, g))
    for k, j in enumerate(informative):
        X[y == ["A", "B", "C"][k % 3], j] += shift
    return X, y, [f"G{j:03d}" for j in range(g)]


def test_selector_recovers_planted_genes():
    rng = np.random.default_rng(2)
    inf = (3, 17, 42, 47, 55)
    X, y, genes = planted(rng, informative=inf)
    sel = GeneSelector(min_genes=1, seed=0).fit(X, y, genes)
    assert sel.method_ == "rfecv"
    assert {genes[j] for j in inf} <= set(sel.rfe_genes_)
    assert len(sel.rfe_genes_) <= 15  # noise genes are mostly eliminated
    assert sel.genes_ == sorted(sel.genes_, key=genes.index)  # input (table) order
    assert sel.cv_scores_ and max(s for _, s in sel.cv_scores_) > 0.9
    assert sel.classes_ == ["A", "B", "C"]


def test_selector_curated_union_constant_genes_and_cap():
    rng = np.random.default_rng(3)
    X, y, genes = planted(rng)
    X[:, 5] = 0.0  # all-zero gene
    sel = GeneSelector(min_genes=1, max_genes=3, curated=["G010", "G005", "NOTAGENE"]).fit(
        X, y, genes
    )
    assert len(sel.rfe_genes_) == 3
    assert "G010" in sel.genes_ and sel.curated_added_ == ["G010"]
    assert "G005" not in sel.genes_ and "G005" in sel.dropped_constant_
    assert sel.curated_missing_ == ["NOTAGENE"]
    assert any("NOTAGENE" in n for n in sel.notes_)
    d = json.loads(json.dumps(sel.to_dict()))
    assert GeneSelector.from_dict(d).genes_ == sel.genes_


def test_selector_without_labels_uses_variance():
    rng = np.random.default_rng(4)
    X = rng.normal(0, 1, (30, 50)) * np.linspace(0.1, 5, 50)
    genes = [f"G{j}" for j in range(50)]
    sel = GeneSelector(n_top_unsupervised=7).fit(X, None, genes)
    assert sel.method_ == "top-variance"
    assert set(sel.genes_) == {genes[j] for j in np.argsort(-X.var(0))[:7]}
    one_class = GeneSelector(n_top_unsupervised=7).fit(X, ["A"] * 30, genes)
    assert one_class.method_ == "top-variance" and any("two subtype" in n for n in one_class.notes_)


def test_selector_prefilter_and_small_class():
    rng = np.random.default_rng(5)
    X, y, genes = planted(rng, g=200)
    sel = GeneSelector(prefilter_genes=40, min_genes=1).fit(X, y, genes)
    assert sel.prefiltered_n_ == 40 and any("pre-filter" in n for n in sel.notes_)
    y2 = y.astype(object)
    y2[0] = "RARE"
    with pytest.raises(CohortError, match="RARE"):
        GeneSelector().fit(X, y2, genes)


def test_rfe_never_sees_validation_patients(monkeypatch):
    """A gene informative only in the validation patients is never selected, and the RFECV
    estimator is fitted on exactly the training patients' rows."""
    from sklearn.feature_selection import RFECV

    rng = np.random.default_rng(6)
    n, g = 120, 60
    pids = [f"TCGA-AA-{i:04d}" for i in range(n)]
    y = np.array(["A", "B"] * (n // 2))
    X = rng.poisson(100, (n, g)).astype(np.float64)
    train, val = np.arange(0, 80), np.arange(80, n)
    X[train[y[train] == "A"], 7] *= 4  # informative in training patients
    X[val[y[val] == "A"], 30] *= 8  # informative ONLY in validation patients
    table = ExpressionTable(
        values=X, sample_ids=[p + "-01A" for p in pids], genes=[f"G{j}" for j in range(g)]
    )

    seen = {}
    orig = RFECV.fit

    def spy(self, Xf, yf, **kw):
        seen["n"], seen["y"] = Xf.shape[0], list(yf)
        return orig(self, Xf, yf, **kw)

    monkeypatch.setattr(RFECV, "fit", spy)
    train_ids = [pids[i] for i in train]
    pp = fit_preprocessing(table, train_ids, list(y[train]), min_genes=1, seed=0)
    assert seen["n"] == len(train) and seen["y"] == list(y[train])
    assert "G7" in pp.genes and "G30" not in pp.genes
    # normalisation statistics come from the training rows of the selected genes only
    cols = [table.genes.index(gn) for gn in pp.genes]
    L = np.log1p(X[np.ix_(train, cols)])
    np.testing.assert_allclose(pp.normalizer.mean_, L.mean(0), rtol=1e-10)
    np.testing.assert_allclose(pp.normalizer.std_, L.std(0), rtol=1e-10)
    assert pp.train_patient_ids == train_ids


def test_preprocessing_transform_roundtrip_and_missing_genes():
    rng = np.random.default_rng(7)
    X = counts(rng, 24, 12)
    genes = [f"G{j}" for j in range(12)]
    pids = [f"P{i}" for i in range(24)]
    table = ExpressionTable(values=X, sample_ids=pids, genes=genes)
    pp = fit_preprocessing(
        table,
        pids[:18],
        {p: "AB"[i % 2] for i, p in enumerate(pids)},
        curated=["G11"],
        min_genes=2,
        cv_folds=3,
    )
    assert "G11" in pp.genes
    Z = pp.transform(table)
    assert Z.shape == (24, len(pp.genes))
    Z2 = Preprocessing.from_dict(json.loads(json.dumps(pp.to_dict()))).transform(table)
    np.testing.assert_array_equal(Z, Z2)
    np.testing.assert_array_equal(pp.transform(table, patient_ids=["P3"]), Z[3:4])
    # an array with named columns in another order
    perm = rng.permutation(12)
    np.testing.assert_allclose(pp.transform(X[:, perm], genes=[genes[j] for j in perm]), Z)
    short = table.subset(genes=[gn for gn in genes if gn != pp.genes[0]])
    with pytest.raises(
        ExpressionError, match=f"lacks 1 of the model's {len(pp.genes)} genes: {pp.genes[0]}"
    ):
        pp.transform(short)
    with pytest.raises(ExpressionError, match="pass the column names"):
        pp.transform(X)


def test_fit_preprocessing_without_selection_and_bad_args():
    rng = np.random.default_rng(8)
    X = counts(rng, 10, 4)
    X[:, 2] = 0
    pp = fit_preprocessing(X, [f"P{i}" for i in range(10)], None, genes=list("ABCD"), select=False)
    assert pp.genes == ["A", "B", "D"]
    with pytest.raises(ConfigError, match="genes="):
        fit_preprocessing(X, [f"P{i}" for i in range(10)], None)
    with pytest.raises(ConfigError, match="duplicates"):
        fit_preprocessing(X, ["P0"] * 10, None, genes=list("ABCD"))


def test_read_gene_list(tmp_path):
    p = tmp_path / "g.txt"
    p.write_text("gene\nTP53\n# comment\nEGFR, KRAS\n\nTP53\n")
    assert read_gene_list(p) == ["TP53", "EGFR", "KRAS"]
    (tmp_path / "e.txt").write_text("# nothing\n")
    with pytest.raises(ExpressionError, match="lists no gene"):
        read_gene_list(tmp_path / "e.txt")
    with pytest.raises(ExpressionError, match="does not exist"):
        read_gene_list(tmp_path / "none.txt")


def test_select_genes_cli(tmp_path):
    from mirror_model.cli import main
    from mirror_model.synth import synthesize_cohort

    s = synthesize_cohort(tmp_path / "c", n_patients=24, n_genes=40, write_slides=False)
    out = tmp_path / "genes.json"
    rc = main(
        [
            "select-genes",
            "--cohort",
            str(s.cohort_csv),
            "--expression",
            str(s.expression_csv),
            "--out",
            str(out),
            "--folds",
            "3",
            "--curated",
            str(s.curated_genes),
            "--inner-folds",
            "3",
            "--min-genes",
            "2",
        ]
    )
    assert rc == 0
    doc = json.loads(out.read_text())
    assert doc["n_folds"] == 3 and len(doc["folds"]) == 3
    for f in doc["folds"]:
        train, val, test = set(f["train_patients"]), set(f["val_patients"]), set(f["test_patients"])
        assert not (train & val) and not (train & test) and not (val & test)
        assert f["preprocessing"]["train_patient_ids"] == f["train_patients"]
        pp = Preprocessing.from_dict(f["preprocessing"])
        assert pp.genes == f["genes"] and pp.normalizer.log1p_
    rc = main(
        [
            "select-genes",
            "--cohort",
            str(s.cohort_csv),
            "--expression",
            str(tmp_path / "missing.csv"),
            "--out",
            str(out),
        ]
    )
    assert rc == 2


# ---------------------------------------------------------------------------- missing values, scale


def test_median_policy_fills_with_training_medians_only(tmp_path):
    from mirror_model.expression import read_expression

    p = tmp_path / "e.csv"
    p.write_text(
        "sample_id,G1,G2,G3\nP1,1.5,NA,5.5\nP2,3.5,2.5,6.5\nP3,NA,4.5,7.5\nP4,5.5,6.5,8.5\n"
        "T1,NA,NA,9.5\n"
    )
    t = read_expression(p, nan_policy="median")
    pp = fit_preprocessing(t, ["P1", "P2", "P3", "P4"], None, select=False)
    # medians of the training patients (P1..P4), never of T1
    np.testing.assert_allclose(pp.fill_values, [3.5, 4.5, 7.0])
    assert any("2 missing training values in 2 genes" in n for n in pp.selector["notes"])
    x = pp.transform(t, patient_ids=["T1"])
    ref = pp.normalizer.transform(np.array([[3.5, 4.5, 9.5]]))
    np.testing.assert_allclose(x, ref)
    back = Preprocessing.from_dict(json.loads(json.dumps(pp.to_dict())))
    np.testing.assert_allclose(back.transform(t, patient_ids=["T1"]), ref)
    assert back.scale == pp.scale and back.scale["kind"] == "log"


def test_describe_scale_kinds():
    assert describe_scale([[0, 5, 1200]])["kind"] == "counts"
    assert describe_scale([[0.5, 80.25]])["kind"] == "linear"
    assert describe_scale([[0.5, 12.25]])["kind"] == "log"
    assert describe_scale([[-1.5, 2.0]])["kind"] == "centred"


def test_input_warnings_name_scale_and_dead_genes():
    rng = np.random.default_rng(0)
    X = rng.uniform(2, 12, size=(30, 4))  # log2-like training values, never 0
    pp = fit_preprocessing(X, [f"P{i}" for i in range(30)], None, genes=list("ABCD"), select=False)
    assert pp.input_warnings(X[:3], "table t.csv") == []
    raw = 2.0 ** X[:1] * 50  # the same sample on a linear scale
    (w,) = pp.input_warnings(raw, "table t.csv")
    assert "table t.csv looks like linear values" in w and "trained on log-scale values" in w
    dead = X[:1].copy()
    dead[0, 2] = 0
    (w,) = pp.input_warnings(dead, "sample S")
    assert "1 of the model's 4 genes are 0" in w and "C" in w
    (w,) = pp.input_warnings(np.repeat(X[:1], 3, axis=0) * [[1, 1, 1, 1]] + [[0, 1, 2, 0]] * np.arange(3)[:, None], "t")
    assert "constant across its 3 samples" in w and "A, D" in w


# ---------------------------------------------------------------------------- survival selection


def test_cox_score_z_equals_logrank_for_a_binary_gene():
    from mirror_model.evaluation.survival import logrank_test
    from mirror_model.genes import cox_score_z

    rng = np.random.default_rng(0)
    n = 80
    x = rng.normal(size=n)
    t = rng.exponential(np.exp(-0.8 * x))
    e = (rng.random(n) < 0.7).astype(int)
    b = (x > 0).astype(float)
    z = cox_score_z(np.c_[x, b, np.ones(n)], t, e)
    assert z[1] ** 2 == pytest.approx(logrank_test(t, e, b).statistic, rel=1e-9)
    assert z[0] > 3 and z[2] == 0.0  # higher expression, earlier death; constant gene: 0


def test_survival_selection_finds_the_prognostic_genes_and_reports_stability():
    from mirror_model.genes import selection_stability

    rng = np.random.default_rng(1)
    n, g = 150, 60
    X = rng.normal(5.0, 1.0, size=(n, g))
    lp = 0.9 * (X[:, 3] - 5) - 0.9 * (X[:, 7] - 5)
    t = rng.exponential(np.exp(-lp))
    e = (rng.random(n) < 0.8).astype(float)
    genes = [f"G{i}" for i in range(g)]
    sets = []
    for k in range(3):
        rows = np.arange(n) % 3 != k
        pp = fit_preprocessing(
            X[rows], [f"P{i}" for i in np.flatnonzero(rows)], None, genes=genes,
            survival=(t[rows], e[rows]), n_top_unsupervised=5,
        )  # fmt: skip
        assert pp.selector["method"] == "cox-screen" and {"G3", "G7"} <= set(pp.genes)
        sets.append(pp.genes)
    st = selection_stability(sets)
    assert st["n_genes"] == [5, 5, 5] and {"G3", "G7"} <= set(st["in_every_fold"])
    assert 0 < st["mean_jaccard"] <= 1
    assert selection_stability([["a", "b"], ["b", "c"]])["mean_jaccard"] == pytest.approx(1 / 3)
