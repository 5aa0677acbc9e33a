"""Raw-input baselines (mean-pooled tile features, normalised genes) on the runs' own folds."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
from _train_helpers import TINY_MODEL, make_toy, one_thread

from mirror_model.cli import main as cli_main
from mirror_model.cohort import read_cohort
from mirror_model.evaluation import evaluate_raw, mean_pooled_features
from mirror_model.evaluation.evaluate import FoldEmbeddings, evaluate_embeddings, evaluate_runs
from mirror_model.expression import read_expression
from mirror_model.genes import fit_preprocessing
from mirror_model.train import TrainConfig, pretrain
from mirror_model.train.splits import make_splits, patient_subtypes

pytestmark = pytest.mark.usefixtures("one_thread")
_ = one_thread

FAST = dict(probe_C=1.0, cox_penalizer=0.1, hazard_weight_decay=0.01, k_shots=(2,), n_draws=2)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    # 40 patients; every 4th has two slides; subtype = sign of the latent dim 0 that the tiles carry
    return make_toy(tmp_path_factory.mktemp("rawtoy"), n_patients=40)


def _h5_mean(path):
    with h5py.File(path, "r") as fh:
        return np.asarray(fh["features"], dtype=np.float64).mean(axis=0)


def test_mean_pooling_is_the_mean_of_each_patients_slide_means(toy):
    slides = [toy.slides[p] for p in toy.patients]
    got = mean_pooled_features(toy.features, slides)
    two = [i for i, sl in enumerate(slides) if len(sl) == 2]
    assert two and got.shape == (40, 16)
    for i, sl in enumerate(slides):
        expected = np.mean([_h5_mean(toy.features / f"{s}.h5") for s in sl], axis=0)
        np.testing.assert_allclose(got[i], expected, rtol=1e-6, atol=1e-7)
    # a patient without slides (an expression-only patient) is a NaN row, not an error
    got = mean_pooled_features(toy.features, [slides[0], []])
    assert np.isfinite(got[0]).all() and np.isnan(got[1]).all()
    # max_tiles: a seeded subset, different from the full mean, identical on a second call
    sub = mean_pooled_features(toy.features, slides[:3], max_tiles=5)
    assert not np.allclose(sub, mean_pooled_features(toy.features, slides[:3]))
    np.testing.assert_array_equal(sub, mean_pooled_features(toy.features, slides[:3], max_tiles=5))


def test_raw_row_is_the_same_heads_on_hand_pooled_inputs_and_finds_the_planted_subtype(toy):
    res = evaluate_raw(
        cohort=toy.cohort, expression=toy.expression, features_dir=toy.features,
        folds=4, seed=3, **FAST,
    )  # fmt: skip
    # by hand: the folds pretrain would make, the mean tile feature, genes normalised per fold
    coh = read_cohort(toy.cohort)
    ids = [str(p) for p in coh.patients()["patient_id"]]
    splits = make_splits(ids, patient_subtypes(coh.table), 4, 0.15, 3)
    pat = coh.patients()
    slide = np.stack(
        [
            np.mean([_h5_mean(toy.features / f"{s}.h5") for s in sl], axis=0)
            for sl in pat["slide_ids"]
        ]
    )
    expr = read_expression(toy.expression)
    embs = []
    for f in splits.folds:
        prep = fit_preprocessing(expr, [*f.train, *f.val], None, None, select=False)
        rna = prep.transform(expr, patient_ids=ids)
        embs.append(
            FoldEmbeddings(ids, slide, rna, pat["subtype"].to_numpy(object),
                           pat["time"].to_numpy(float), pat["event"].to_numpy(float))
        )  # fmt: skip
    ref = evaluate_embeddings(embs, splits.folds, **FAST)
    for task, inps in ref.metrics.items():
        for inp, ms in inps.items():
            for m, cell in ms.items():
                np.testing.assert_allclose(
                    np.asarray(res.metrics[task][inp][m]["per_fold"], float),
                    np.asarray(cell["per_fold"], float),
                    rtol=1e-6, err_msg=f"{task}/{inp}/{m}",
                )  # fmt: skip
    # the subtype is sign(z0) and every tile carries z @ W: the pooled features separate it
    assert res.metrics["subtype_linear"]["slide"]["auroc_macro"]["mean"] > 0.95
    assert res.notes[0].startswith("raw inputs: slide = mean of each slide's 16-d tile features")


def test_expression_only_cohort_needs_no_features(toy):
    res = evaluate_raw(
        cohort=toy.cohort, expression=toy.expression, features_dir=False, folds=3, seed=0, **FAST
    )
    slide = res.metrics["subtype_linear"]["slide"]["auroc_macro"]
    assert slide["mean"] is None and slide["per_fold"] == [None] * 3
    assert res.metrics["subtype_linear"]["rna"]["auroc_macro"]["mean"] > 0.8
    assert any("no feature folder" in n for n in res.notes)
    with pytest.raises(Exception, match="expression table or a feature folder"):
        evaluate_raw(cohort=toy.cohort, expression=False, features_dir=False)


@pytest.fixture(scope="module")
def run(toy, tmp_path_factory):
    out = tmp_path_factory.mktemp("rawrun") / "run"
    cfg = TrainConfig(
        epochs=1, batch_size=4, lr=1e-3, tiles_per_slide=8, folds=3, precision="fp32",
        device="cpu", seed=5, gene_selection="variance", n_genes=12,
    )  # fmt: skip
    pretrain(toy.cohort, toy.expression, toy.features, out, config=cfg, model_overrides=TINY_MODEL)
    return out


def test_raw_row_uses_the_runs_folds_and_each_folds_genes(run, tmp_path):
    results = evaluate_runs([run], tmp_path / "ev", names=["mirror"], raw_inputs=True, **FAST)
    assert list(results) == ["raw", "mirror"]
    raw, mirror = results["raw"], results["mirror"]
    splits = json.loads((run / "splits.json").read_text())["folds"]
    for k, f in enumerate(splits):
        assert raw.folds[k]["n_test"] == mirror.folds[k]["n_test"] == len(f["test"])
        assert raw.folds[k]["n_train"] == len(f["train"]) + len(f["val"])
    # the rna input is each fold's own preprocessing: 12 variance-selected genes
    doc = json.loads((run / "fold_0" / "model.json").read_text())
    assert len(doc["preprocessing"]["genes"]) == 12
    assert any("stored gene preprocessing" in n for n in raw.notes)
    table = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert list(table["runs"]) == ["raw", "mirror"]
    md = (tmp_path / "ev" / "report.md").read_text()
    assert "| task | input | metric | raw | mirror |" in md


def test_cli_raw_inputs_with_and_without_runs(run, toy, tmp_path, capsys):
    fast = ["--k-shots", "2", "--draws", "1", "--probe-c", "1", "--cox-penalizer", "0.1",
            "--hazard-weight-decay", "0.01", "--no-report"]  # fmt: skip
    out = tmp_path / "a"
    assert cli_main(["evaluate", str(run), "--raw-inputs", "--out", str(out), *fast]) == 0
    header = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("task"))
    assert header.split()[3:] == ["raw", "run"]
    out = tmp_path / "b"
    argv = ["evaluate", "--raw-inputs", "--cohort", str(toy.cohort), "--expression",
            str(toy.expression), "--folds", "3", "--split-seed", "5", "--out", str(out), *fast]  # fmt: skip
    assert cli_main(argv) == 0
    doc = json.loads((out / "metrics.json").read_text())
    assert doc["subtype_linear"]["slide"]["auroc_macro"]["mean"] is None  # no --features
    assert len(doc["subtype_linear"]["rna"]["auroc_macro"]["per_fold"]) == 3
    capsys.readouterr()
    # user errors: exit 2 with a message naming the fix
    assert cli_main(["evaluate", "--out", str(tmp_path / "c")]) == 2
    assert "--raw-inputs" in capsys.readouterr().err
    assert cli_main(["evaluate", "--raw-inputs", "--out", str(tmp_path / "c")]) == 2
    assert "--cohort" in capsys.readouterr().err
    assert cli_main(["evaluate", str(run), "--raw-inputs", "--cohort", str(toy.cohort),
                     "--out", str(tmp_path / "d")]) == 2  # fmt: skip
    assert "only apply without a RUN" in capsys.readouterr().err
