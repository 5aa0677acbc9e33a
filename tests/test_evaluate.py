"""Cross-validated evaluation on plain arrays, metrics.json layout, report, CLI glue."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from mirror_model.errors import ConfigError
from mirror_model.evaluation import evaluate as ev
from mirror_model.evaluation.evaluate import (
    EvaluationSettings,
    FoldEmbeddings,
    evaluate_embeddings,
    load_metrics,
    metrics_key_tree,
    save_evaluation,
)

FAST = dict(probe_C=1.0, cox_penalizer=0.1, hazard_weight_decay=0.01, k_shots=(1, 5), n_draws=2)
CLS = ["accuracy", "balanced_accuracy", "auroc_macro", "f1_macro"]


def _synthetic(n=90, n_folds=3, seed=0, rna=True):
    """Slide embedding: dim 0 separates the subtypes perfectly, dim 1 drives the hazard.
    RNA embedding: pure noise. Column 2 of the slide embedding is the patient's index."""
    rng = np.random.default_rng(seed)
    ids = [f"TCGA-{i:04d}" for i in range(n)]
    y = np.array(["IDC", "ILC"])[np.arange(n) % 2]
    slide = rng.normal(size=(n, 6))
    slide[:, 0] += np.where(y == "IDC", -10.0, 10.0)
    slide[:, 2] = np.arange(n)
    T = rng.exponential(np.exp(-1.5 * slide[:, 1]))
    C = rng.exponential(3.0, n)
    time, event = np.minimum(T, C), (T <= C).astype(float)
    rna_emb = rng.normal(size=(n, 4)) if rna else None
    perm = rng.permutation(n)
    splits, embs = [], []
    for k, test_idx in enumerate(np.array_split(perm, n_folds)):
        rest = [i for i in perm if i not in set(test_idx)]
        splits.append(
            {"fold": k, "train": [ids[i] for i in rest[:-8]], "val": [ids[i] for i in rest[-8:]],
             "test": [ids[i] for i in test_idx]}
        )  # fmt: skip
        embs.append(FoldEmbeddings(ids, slide.copy(), rna_emb, y.astype(object), time, event))
    return embs, splits


@pytest.fixture(scope="module")
def result():
    embs, splits = _synthetic()
    return evaluate_embeddings(embs, splits, **FAST)


def test_metrics_key_tree_is_stable(result):
    expected = {
        "subtype_linear": {"slide": CLS, "rna": CLS, "both": CLS},
        "subtype_1shot": {"slide": CLS, "rna": CLS, "both": CLS},
        "subtype_5shot": {"slide": CLS, "rna": CLS, "both": CLS},
        "survival_cox": {"slide": ["c_index"], "rna": ["c_index"], "both": ["c_index"]},
        "survival_hazard": {"slide": ["c_index"], "rna": ["c_index"], "both": ["c_index"]},
    }
    assert metrics_key_tree(EvaluationSettings(k_shots=(1, 5))) == expected
    tree = {t: {i: list(ms) for i, ms in inps.items()} for t, inps in result.metrics.items()}
    assert tree == expected
    for inps in result.metrics.values():
        for ms in inps.values():
            for cell in ms.values():
                assert set(cell) == {"mean", "sd", "per_fold"} and len(cell["per_fold"]) == 3
    # the default settings give the paper's k = 1, 10, 25
    assert list(metrics_key_tree()) == [
        "subtype_linear", "subtype_1shot", "subtype_10shot", "subtype_25shot",
        "survival_cox", "survival_hazard",
    ]  # fmt: skip


def test_planted_signal_is_found_and_noise_is_chance(result):
    m = result.metrics
    assert m["subtype_linear"]["slide"]["auroc_macro"]["per_fold"] == [1.0, 1.0, 1.0]
    assert m["subtype_linear"]["slide"]["accuracy"]["mean"] == 1.0
    assert m["subtype_5shot"]["slide"]["balanced_accuracy"]["mean"] > 0.85
    assert m["subtype_linear"]["both"]["auroc_macro"]["mean"] == 1.0
    assert abs(m["subtype_linear"]["rna"]["auroc_macro"]["mean"] - 0.5) < 0.2
    assert m["survival_cox"]["slide"]["c_index"]["mean"] > 0.7
    assert m["survival_hazard"]["slide"]["c_index"]["mean"] > 0.7
    assert abs(m["survival_cox"]["rna"]["c_index"]["mean"] - 0.5) < 0.2
    # every test patient appears once in the pooled out-of-fold predictions
    pooled = result.predictions["subtype_linear"]["slide"]["patient_id"]
    assert sorted(pooled) == sorted(f"TCGA-{i:04d}" for i in range(90))
    km = result.km["survival_cox"]["slide"]
    assert km["n_low"] + km["n_high"] == 90 and km["logrank_p"] < 0.05


def test_fits_use_training_patients_and_k_shots_draw_exactly_k(monkeypatch):
    embs, splits = _synthetic(n=60)
    seen: list[tuple[set, np.ndarray, np.ndarray]] = []

    class Recording(ev.LinearProbe):
        def fit(self, X, y, X_reference=None):
            ref = None if X_reference is None else set(np.asarray(X_reference)[:, 2].astype(int))
            seen.append((ref, np.asarray(X)[:, 2].astype(int), np.asarray(y)))
            return super().fit(X, y, X_reference=X_reference)

    from mirror_model.evaluation import heads

    monkeypatch.setattr(ev, "LinearProbe", Recording)  # k-shot probes
    monkeypatch.setattr(heads, "LinearProbe", Recording)  # the linear probe (shared with export)
    settings = EvaluationSettings(inputs=("slide",), **FAST)
    evaluate_embeddings(embs, splits, settings)
    per_fold = 1 + 2 * 2  # linear + (k = 1, 5) x 2 draws
    assert len(seen) == 3 * per_fold
    for f, split in enumerate(splits):
        train = {int(p[5:]) for p in split["train"] + split["val"]}
        calls = seen[f * per_fold : (f + 1) * per_fold]
        assert set(calls[0][1]) == train  # the linear probe sees all non-test patients
        for (ref, rows, y), k in zip(calls[1:], [1, 1, 5, 5], strict=True):
            assert set(rows) <= train
            assert ref == train  # label-free standardisation from training patients only
            assert sorted(y.tolist()) == ["IDC"] * k + ["ILC"] * k
    # seeded: a second evaluation draws the same patients
    first = [c[1].tolist() for c in seen]
    seen.clear()
    evaluate_embeddings(embs, splits, settings)
    assert [c[1].tolist() for c in seen] == first


def test_changing_test_times_changes_neither_bins_nor_choices():
    embs, splits = _synthetic(n=60)
    s = EvaluationSettings(
        inputs=("slide",), k_shots=(), **{k: v for k, v in FAST.items() if k not in ("k_shots",)}
    )
    a = evaluate_embeddings(embs, splits, s)
    test0 = {int(p[5:]) for p in splits[0]["test"]}
    t2 = embs[0].time.copy()
    t2[list(test0)] *= 7.0
    embs2 = [FoldEmbeddings(e.patient_ids, e.slide, e.rna, e.subtype, t2 if i == 0 else e.time, e.event)
             for i, e in enumerate(embs)]  # fmt: skip
    b = evaluate_embeddings(embs2, splits, s)
    fa, fb = a.folds[0]["slide"]["survival_hazard"], b.folds[0]["slide"]["survival_hazard"]
    assert fa["bin_edges"] == fb["bin_edges"]
    assert fa["risk_cutoff"] == fb["risk_cutoff"]
    ra = a.predictions["survival_hazard"]["slide"]["risk"]
    rb = b.predictions["survival_hazard"]["slide"]["risk"]
    np.testing.assert_allclose(ra, rb)


def test_missing_modality_keeps_keys_with_nulls_and_a_note():
    embs, splits = _synthetic(n=60, rna=False)
    r = evaluate_embeddings(embs, splits, **FAST)
    assert r.metrics["subtype_linear"]["rna"]["auroc_macro"] == {
        "mean": None,
        "sd": None,
        "per_fold": [None] * 3,
    }
    assert r.metrics["survival_cox"]["both"]["c_index"]["mean"] is None
    assert r.metrics["subtype_linear"]["slide"]["auroc_macro"]["mean"] == 1.0
    assert any("rna" in n for n in r.notes)


def test_undefined_fold_metric_is_null_and_json_stays_strict(tmp_path):
    embs, splits = _synthetic(n=60)
    y = {p: c for p, c in zip(embs[0].patient_ids, embs[0].subtype, strict=True)}
    s0 = dict(splits[0])
    ilc = [p for p in s0["test"] if y[p] == "ILC"]
    s0["test"] = [p for p in s0["test"] if y[p] == "IDC"]  # one class only: AUROC undefined
    s0["train"] = s0["train"] + ilc
    r = evaluate_embeddings(embs, [s0, *splits[1:]], **FAST)
    cell = r.metrics["subtype_linear"]["slide"]["auroc_macro"]
    assert cell["per_fold"][0] is None and cell["per_fold"][1:] == [1.0, 1.0]
    assert cell["mean"] == 1.0 and cell["sd"] == 0.0
    save_evaluation(tmp_path, {"r": r}, write_report_md=False)
    text = (tmp_path / "evaluation.json").read_text()
    assert "NaN" not in text and json.loads(text)["folds"][0]["n_test"] == len(s0["test"])


def test_bad_splits_give_clear_errors():
    embs, splits = _synthetic(n=30)
    bad = [dict(s) for s in splits]
    bad[1]["test"] = []
    with pytest.raises(ConfigError, match="fold 1 has no test patients"):
        evaluate_embeddings(embs, bad, **FAST)
    bad = [dict(s) for s in splits]
    bad[0]["test"] = bad[0]["test"] + ["NOPE-1"]
    with pytest.raises(ConfigError, match="no embedding"):
        evaluate_embeddings(embs, bad, **FAST)
    bad = [dict(s) for s in splits]
    bad[0]["test"] = bad[0]["test"] + bad[0]["train"][:1]
    with pytest.raises(ConfigError, match="both training and test"):
        evaluate_embeddings(embs, bad, **FAST)
    with pytest.raises(ConfigError, match="one set of embeddings per fold"):
        evaluate_embeddings(embs[:2], splits, **FAST)
    with pytest.raises(ConfigError, match="inputs"):
        EvaluationSettings(inputs=("wsi",))


def _fake_run(tmp_path: Path, name: str) -> Path:
    run = tmp_path / name
    for k in range(3):
        (run / f"fold_{k}").mkdir(parents=True)
        rows = [{"epoch": i, "step": 10 * i, "train_loss": 3 - 0.2 * i, "val_loss": 3.1 - 0.15 * i}
                for i in range(6)]  # fmt: skip
        text = "".join(json.dumps(r) + "\n" for r in rows) + '{"epoch": 6, "train_lo'  # torn tail
        (run / f"fold_{k}" / "log.jsonl").write_text(text)
    return run


def test_metrics_json_report_and_multi_run_table(result, tmp_path):
    out1 = tmp_path / "one"
    path = save_evaluation(out1, {"mirror": result}, {"mirror": _fake_run(tmp_path, "r1")})
    doc = json.loads(path.read_text())
    assert doc["subtype_linear"]["slide"]["auroc_macro"]["mean"] == 1.0
    assert load_metrics(path) == {"run": doc}
    details = json.loads((out1 / "evaluation.json").read_text())
    assert details["run"] == "mirror" and details["settings"]["k_shots"] == [1, 5]
    md = (out1 / "report.md").read_text()
    assert "### Choices made on training patients only" in md
    assert "| 0 | slide | 60 / 30 | 1.0 | 0.1 | 0.01 |" in md  # 52 train + 8 val, 30 test
    pngs = sorted(p.name for p in (out1 / "figures").glob("*.png"))
    assert pngs == [
        "mirror_confusion_subtype_linear.png", "mirror_km_survival_cox.png",
        "mirror_km_survival_hazard.png", "mirror_loss.png",
    ]  # fmt: skip
    for p in pngs:
        assert f"(figures/{p})" in md
        assert (out1 / "figures" / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    out2 = tmp_path / "cmp"
    runs = {"mirror": result, "tangle": result, "mirror-no-retention": result}
    path = save_evaluation(out2, runs)
    doc = json.loads(path.read_text())
    assert list(doc) == ["runs"] and list(doc["runs"]) == list(runs)
    assert load_metrics(path)["tangle"]["survival_cox"]["slide"]["c_index"]["mean"] > 0.7
    md = (out2 / "report.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| task | input | metric |"))
    assert header == "| task | input | metric | mirror | tangle | mirror-no-retention |"
    row = next(
        line for line in md.splitlines() if line.startswith("| subtype_linear | slide | accuracy |")
    )
    assert row.count("1.000 ± 0.000") == 3


def test_cli_evaluates_runs_through_the_run_folder_glue(tmp_path, monkeypatch, capsys):
    """The CLI glue over mirror_model.train.run (load_run / embed_patients replaced by fakes)."""
    from mirror_model import cli
    from mirror_model.train import run as run_mod

    embs, splits = _synthetic(n=60)
    fold_splits = [
        SimpleNamespace(fold=s["fold"], train=s["train"], val=s["val"], test=s["test"])
        for s in splits
    ]
    info = SimpleNamespace(
        splits=SimpleNamespace(folds=fold_splits, fold=lambda k: fold_splits[k]), folds=[0, 1]
    )
    calls = []
    monkeypatch.setattr(run_mod, "load_run", lambda d: info)

    def fake_embed(run_dir, fold, **kw):
        calls.append((Path(run_dir).name, fold, kw.get("max_tiles")))
        return embs[fold]

    monkeypatch.setattr(run_mod, "embed_patients", fake_embed)
    r1, r2 = _fake_run(tmp_path, "mirror_run"), _fake_run(tmp_path, "tangle_run")
    out = tmp_path / "cmp"
    argv = ["evaluate", str(r1), str(r2), "--out", str(out), "--name", "mirror", "--name", "tangle",
            "--inputs", "slide", "--k-shots", "2", "--draws", "1", "--probe-c", "1", "--cox-penalizer", "0.1",
            "--hazard-weight-decay", "0.01", "--device", "cpu"]  # fmt: skip
    assert cli.main(argv) == 0
    assert calls == [
        ("mirror_run", 0, None),
        ("mirror_run", 1, None),
        ("tangle_run", 0, None),
        ("tangle_run", 1, None),
    ]
    doc = json.loads((out / "metrics.json").read_text())
    assert list(doc["runs"]) == ["mirror", "tangle"]
    assert len(doc["runs"]["mirror"]["subtype_2shot"]["slide"]["accuracy"]["per_fold"]) == 2
    notes = json.loads((out / "evaluation.json").read_text())["runs"]["mirror"]["notes"]
    assert any("folds [2]" in n for n in notes)  # fold 2 has no trained model
    assert (out / "figures" / "mirror_loss.png").is_file()
    assert "subtype_linear" in capsys.readouterr().out

    # several runs without --out, or names that do not match, are user errors (exit 2)
    assert cli.main(["evaluate", str(r1), str(r2)]) == 2
    assert cli.main(["evaluate", str(r1), "--name", "a", "--name", "b"]) == 2
    assert "--name was given 2 times" in capsys.readouterr().err
