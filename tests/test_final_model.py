"""The deployable model: trained on all patients for the epochs the folds validated; its export."""

from __future__ import annotations

import json

import h5py
import pytest
from _train_helpers import TINY_MODEL, make_toy, one_thread

from mirror_model.cli import main as cli_main
from mirror_model.errors import BundleError, TrainingError
from mirror_model.evaluation.export import export_bundle
from mirror_model.train import TrainConfig, final_epochs, pretrain, refit_final
from mirror_model.train.run import embed_patients, load_fold_model

pytestmark = pytest.mark.usefixtures("one_thread")
_ = one_thread


def test_epoch_rule_is_the_ceiled_median_of_the_folds_epoch_counts():
    assert final_epochs([2, 4, 9]) == 5  # median of 3, 5, 10
    assert final_epochs([0, 1]) == 2  # median 1.5 -> 2
    assert final_epochs([7]) == 8
    with pytest.raises(TrainingError):
        final_epochs([3, -1])


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("final")
    toy = make_toy(root / "toy", n_patients=20)
    for p in toy.features.glob("*.h5"):  # tiling facts the bundle records
        with h5py.File(p, "a") as fh:
            fh.attrs["tile_px"] = 256
    cfg = TrainConfig(
        epochs=4, batch_size=4, lr=1e-3, tiles_per_slide=16, folds=3, precision="fp32",
        device="cpu", seed=0, schedule="cosine",
    )  # fmt: skip
    res = pretrain(toy.cohort, toy.expression, toy.features, root / "run", config=cfg,
                   model_overrides=TINY_MODEL)  # fmt: skip
    return root / "run", toy, [f.best_epoch for f in res.folds]


def test_refit_trains_on_every_patient_for_the_rule_s_epochs(run):
    run_dir, toy, best = run
    with pytest.raises(BundleError, match="--refit"):
        export_bundle(run_dir, run_dir.parent / "x.mirror", fold="final")
    res = refit_final(run_dir)
    expected = final_epochs(best)
    assert res.trained and res.epochs == expected and res.fold_epochs == [b + 1 for b in best]
    doc = json.loads((run_dir / "final" / "model.json").read_text())
    assert doc["n_train"] == 20 and doc["n_val"] == 0
    assert sorted(doc["preprocessing"]["train_patient_ids"]) == sorted(toy.patients)
    assert doc["final"]["rule"].startswith("ceil(median") and doc["final"]["epochs"] == expected
    assert doc["best_epoch"] == expected - 1  # the last epoch trained is the model kept
    rows = [json.loads(x) for x in (run_dir / "final" / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == list(range(expected))
    assert [r["best"] for r in rows] == [False] * (expected - 1) + [True]
    assert not any(k.startswith("val_") for r in rows for k in r)
    # the folds' cosine schedule over 4 epochs, cut at E: the lr has not decayed to its minimum
    if expected < 4:
        assert rows[-1]["lr"] > 1e-6
    # a second call reuses the finished model
    assert refit_final(run_dir).trained is False
    fm = load_fold_model(run_dir, "final")
    assert fm.fold == "final" and embed_patients(run_dir, "final").slide.shape == (20, 24)


def test_refit_needs_every_fold(run, tmp_path):
    run_dir, toy, _ = run
    partial = tmp_path / "partial"
    cfg = TrainConfig(epochs=1, batch_size=4, lr=1e-3, tiles_per_slide=8, folds=3, fold=1,
                      precision="fp32", device="cpu", seed=0)  # fmt: skip
    pretrain(toy.cohort, toy.expression, toy.features, partial, config=cfg,
             model_overrides=TINY_MODEL)  # fmt: skip
    with pytest.raises(TrainingError, match=r"folds \[0, 2\]"):
        refit_final(partial)


def test_export_refit_bundle_says_where_its_numbers_come_from(run, capsys):
    run_dir, _, _ = run
    # the documented order: evaluate (its out-of-fold predictions feed the reference), export
    fast = ["--k-shots", "--probe-c", "1", "--cox-penalizer", "0.1", "--hazard-weight-decay",
            "0.01", "--no-report"]  # fmt: skip
    assert cli_main(["evaluate", str(run_dir), *fast]) == 0
    oof = json.loads((run_dir / "evaluation" / "evaluation.json").read_text())["predictions"]
    out = run_dir.parent / "final.mirror"
    assert cli_main(["export", "--run", str(run_dir), "--out", str(out), "--refit"]) == 0
    printed = capsys.readouterr().out
    assert "out-of-fold (both, n=20)" in printed
    from mirror_model.bundle import load_bundle

    b = load_bundle(out)
    assert b.document["training"]["fold"] == "final"
    assert b.document["training"]["final"]["rule"].startswith("ceil(median")
    assert b.metrics["reference_fold"]["source"].startswith("out-of-fold")
    ref = b.reference("both")
    assert len(ref["risk"]) == 20 and "in-sample" in ref["source"]["risk"]
    assert ref["source"]["km"].startswith("out-of-fold")
    assert sum(c["n"] for c in ref["km"].values()) == 20
    groups = oof["survival_cox"]["both"]["group"]  # the curves are evaluate's out-of-fold groups
    assert {g: c["n"] for g, c in ref["km"].items()} == {g: groups.count(g) for g in set(groups)}
    # the default export now takes the final model; --fold still exports a fold
    assert export_bundle(run_dir, run_dir.parent / "d.mirror").fold == "final"
    f1 = export_bundle(run_dir, run_dir.parent / "f1.mirror", fold=1)
    assert f1.fold == 1 and any("--refit" in n for n in f1.notes)
    assert cli_main(["export", "--run", str(run_dir), "--out", str(out), "--refit", "--fold", "1"]) == 2
