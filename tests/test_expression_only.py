"""Expression-only cohorts end to end, and runs that never leave a half-written folder.

The toy cohort of ``_train_helpers`` without its slide columns: pretrain trains the RNA
encoder alone (RNA retention + the RNA half of the style prior), evaluate scores the RNA input,
export writes a bundle with only RNA heads, and predict serves ``--expression``.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml
from _train_helpers import TINY_MODEL, make_toy, one_thread  # noqa: F401

from mirror_model.errors import ConfigError, FeatureFileError
from mirror_model.train import TrainConfig, pretrain

pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(**kw):
    base = dict(epochs=2, batch_size=4, lr=1e-3, tiles_per_slide=16, folds=3, precision="fp32",
                device="cpu", seed=0)  # fmt: skip
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def rna_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("rna-only")
    toy = make_toy(root / "toy", n_patients=24, multi_slide_every=0)
    # the same patients without slide columns: one row per patient
    import pandas as pd

    t = pd.read_csv(toy.cohort).drop(columns=["slide_id", "slide_path"])
    cohort = root / "cohort.csv"
    t.to_csv(cohort, index=False)
    log: list[str] = []
    res = pretrain(
        cohort, toy.expression, None, root / "run", config=_cfg(),
        model_overrides=TINY_MODEL, log=log.append,
    )  # fmt: skip
    return root, toy, cohort, res, log


def test_pretrain_without_features_trains_the_rna_side(rna_run):
    root, toy, cohort, res, log = rna_run
    assert res.completed and len(res.folds) == 3
    cfg = yaml.safe_load((root / "run" / "config.yaml").read_text())
    assert cfg["modalities"] == ["rna"] and cfg["data"]["features_dir"] is None
    assert cfg["losses"] == {"used": ["ret_rna", "style"], "unavailable": ["align", "ret_slide", "cluster"]}
    said = " ".join(log)
    assert "expression-only run" in said and "need slides and are off" in said
    assert "plan: 3 fold(s) x 2 epoch(s)" in said and "s per step on cpu" in said
    # the step-based figure says what it leaves out; the first epoch gives the whole run
    assert "training steps and validation alone about" in said
    assert "first epoch took" in said and "the whole run about" in said
    assert res.extra["estimate_h"] > 0
    rows = [json.loads(x) for x in (root / "run" / "fold_0" / "log.jsonl").read_text().splitlines()]
    assert {"train_ret_rna", "train_style", "val_loss"} <= set(rows[-1])
    assert "train_align" not in rows[-1]


def test_evaluate_and_export_and_predict_an_rna_only_run(rna_run, tmp_path):
    from mirror_model.bundle import load_bundle
    from mirror_model.evaluation import evaluate_run
    from mirror_model.evaluation.export import export_bundle
    from mirror_model.inference import predict

    root, toy, cohort, res, _ = rna_run
    ev = evaluate_run(root / "run", inputs=("slide", "rna"), k_shots=(), probe_C=1.0,
                      cox_penalizer=0.05, cox_l1_ratio=0.5, hazard_weight_decay=0.01)  # fmt: skip
    m = ev.metrics
    assert m["subtype_linear"]["rna"]["auroc_macro"]["mean"] > 0.7  # subtype = sign of z0
    assert m["subtype_linear"]["slide"]["auroc_macro"]["mean"] is None
    assert any("no slide" in n for n in ev.notes)
    out = export_bundle(root / "run", tmp_path / "rna.mirror")
    b = load_bundle(out.path)
    assert b.expression_only and b.input_kinds == ("rna",) and not b.has_slide_encoder
    assert b.target_mpp is None and "expression-only model" in b.summary()
    # the cohort has no slides: the bundle does not count its patient rows as slides
    assert b.document["training"]["n_slides"] == 0
    assert "24 patients, no slides (expression only)" in b.summary()
    assert "slides" not in b.provenance.training_data
    pid = res.splits.fold(0).test[0]
    pred = predict(b, expression_path=toy.expression, sample_id=pid, device="cpu")
    assert pred.modalities == ("rna",) and pred.predicted_subtype in ("A", "B")
    assert pred.risk_score is not None and np.isfinite(pred.risk_score)
    with pytest.raises(ConfigError, match="expression only"):
        predict(b, features_path=next(toy.features.glob("*.h5")), device="cpu")
    # the plugin's expression-only run goes through the same API (no Qt here)
    from napari_mirror._run import RunRequest, input_sentence, run_prediction

    got = run_prediction(RunRequest(bundle_path=str(out.path), expression_path=str(toy.expression),
                                    sample_id=pid, device="cpu"))  # fmt: skip
    assert got.prediction.risk_score == pytest.approx(pred.risk_score)
    assert got.bundle.expression_only and input_sentence(got.prediction.input_kind).startswith(
        "Expression only"
    )
    # a table on another scale than training is flagged in Prediction.warnings
    import pandas as pd

    t = pd.read_csv(toy.expression)
    lin = t.copy()
    lin.iloc[:, 1:] = (2.0 ** t.iloc[:, 1:]).round(0) * 100  # log-scale training, counts now
    lin_path = tmp_path / "linear.csv"
    lin.to_csv(lin_path, index=False)
    warned = predict(b, expression_path=lin_path, sample_id=pid, device="cpu")
    assert any("looks like raw counts" in w and "trained on centred" in w for w in warned.warnings), (
        warned.warnings
    )


def test_expression_only_needs_an_rna_loss_and_writes_nothing(rna_run, tmp_path):
    _, toy, cohort, _, _ = rna_run
    with pytest.raises(ConfigError, match="need slides.*--preset"):
        pretrain(cohort, toy.expression, None, tmp_path / "run", preset="tangle",
                 config=_cfg(), model_overrides=TINY_MODEL)  # fmt: skip
    assert not (tmp_path / "run").exists()
    with pytest.raises(ConfigError, match="no slide columns"):
        pretrain(cohort, toy.expression, toy.features, tmp_path / "run2", config=_cfg())
    assert not (tmp_path / "run2").exists()


def test_a_bad_feature_file_leaves_no_run_folder(tmp_path):
    toy = make_toy(tmp_path / "toy", n_patients=12)
    victim = sorted(toy.features.glob("*.h5"))[-1]
    victim.unlink()  # a slide of some fold (maybe not the first) has no features
    run = tmp_path / "run"
    with pytest.raises(FeatureFileError, match=victim.stem):
        pretrain(toy.cohort, toy.expression, toy.features, run, config=_cfg(),
                 model_overrides=TINY_MODEL)  # fmt: skip
    assert not run.exists()
    # fixed, the same command runs (no "already holds a run")
    from _train_helpers import write_h5

    write_h5(victim, np.random.default_rng(0).normal(size=(20, 16)))
    res = pretrain(toy.cohort, toy.expression, toy.features, run, config=_cfg(epochs=1, fold=0),
                   model_overrides=TINY_MODEL)  # fmt: skip
    assert res.completed and (run / "fold_0" / "best.safetensors").is_file()


def test_survival_gene_selection_reports_its_stability(rna_run, tmp_path):
    _, toy, cohort, _, _ = rna_run
    log: list[str] = []
    res = pretrain(cohort, toy.expression, None, tmp_path / "run",
                   config=_cfg(epochs=1, gene_selection="survival", n_genes=8),
                   model_overrides=TINY_MODEL, log=log.append)  # fmt: skip
    st = res.extra["gene_stability"]
    assert st["method"] == "cox-screen" and st["n_genes"] == [8, 8, 8]
    assert any("gene selection (cox-screen) across 3 folds" in m for m in log)


def test_raw_input_baseline_of_an_rna_only_run(rna_run, tmp_path):
    """evaluate --raw-inputs on an expression-only run: the raw row scores the normalised
    genes on the run's folds; the slide input is null (no features)."""
    from mirror_model.cli import main

    root, *_ = rna_run
    rc = main(["evaluate", str(root / "run"), "--raw-inputs", "--out", str(tmp_path / "ev"),
               "--inputs", "slide", "rna", "--k-shots", "--probe-c", "1", "--cox-penalizer",
               "0.05", "--cox-l1-ratio", "0.5", "--hazard-weight-decay", "0.01", "--no-report",
               "--device", "cpu"])  # fmt: skip
    assert rc == 0
    runs = json.loads((tmp_path / "ev" / "metrics.json").read_text())["runs"]
    raw = next(v for k, v in runs.items() if k.startswith("raw"))
    assert raw["subtype_linear"]["rna"]["auroc_macro"]["mean"] > 0.7
    assert raw["subtype_linear"]["slide"]["auroc_macro"]["mean"] is None


def test_cpu_estimate_warns_with_remedies(rna_run, tmp_path, monkeypatch):
    import torch

    from mirror_model.train import trainer as trainer_mod

    text, hours = trainer_mod._plan_text(5, 100, 17, 3, 0.7, torch.device("cpu"))
    assert hours == pytest.approx(5 * 100 * (17 + 0.5 * 3) * 0.7 / 3600)
    assert "5 fold(s) x 100 epoch(s) x 17 step(s) = 8500 training steps" in text
    assert "about 1.8 h" in text
    # the whole run: reading/checking 30 s + 5 x 100 epochs of 2 s + 4 more fold set-ups of 10 s
    text, hours = trainer_mod._whole_run_text(5, 100, 2.0, 10.0, 30.0)
    assert hours == pytest.approx((30 + 5 * 100 * 2 + 4 * 10) / 3600)
    assert text.endswith("the whole run about 18 min")
    # any real run past the threshold says which options shrink it
    _, toy, cohort, _, _ = rna_run
    monkeypatch.setattr(trainer_mod, "CPU_WARN_HOURS", 0.0)
    log: list[str] = []
    pretrain(cohort, toy.expression, None, tmp_path / "run", config=_cfg(epochs=1, fold=0),
             model_overrides=TINY_MODEL, log=log.append)  # fmt: skip
    (warn,) = [m for m in log if m.startswith("warning:")]
    for option in ("--epochs", "--fold 0", "--tiles-per-slide", "model.embed_dim", "--device cuda"):
        assert option in warn


def test_a_cohort_with_slides_but_no_features_trains_the_rna_side_and_says_so(tmp_path):
    toy = make_toy(tmp_path / "toy", n_patients=12)
    log: list[str] = []
    res = pretrain(toy.cohort, toy.expression, None, tmp_path / "run",
                   config=_cfg(epochs=1, fold=0), model_overrides=TINY_MODEL, log=log.append)  # fmt: skip
    assert res.completed and res.extra["losses"]["used"] == ["ret_rna", "style"]
    assert any("slides are not used" in m for m in log)
