"""Pretraining end to end on a tiny paired toy cohort: run folder, honesty, errors, learning."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from _train_helpers import (
    TINY_MODEL,
    make_toy,
    pretrain_toy,
    toy_cli_args,
    toy_config,
    write_h5,
)

from mirror_model.cli import main as cli_main
from mirror_model.errors import CohortError, ExpressionError, FeatureFileError, TrainingError
from mirror_model.train import (
    embed_patients,
    load_fold_model,
    load_run,
    make_splits,
    pretrain,
)
from mirror_model.train import trainer as trainer_mod
from mirror_model.train.checkpoint import load_checkpoint
from mirror_model.train.splits import patient_subtypes


def _cfg(**kw):
    return toy_config(**{**dict(epochs=2, folds=3, fold=0, seed=0), **kw})


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return make_toy(tmp_path_factory.mktemp("toy"), n_patients=16)


def test_cli_run_writes_the_run_folder_contract(toy, tmp_path, capsys):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(
        yaml.safe_dump({"model": TINY_MODEL, "lr": 1e-3, "tiles_per_slide": 16, "batch_size": 4})
    )
    run = tmp_path / "run"
    rc = cli_main(
        [
            "pretrain",
            *toy_cli_args(toy),
            "--out",
            str(run),
            "--config",
            str(cfg),
            "--epochs",
            "2",
            "--folds",
            "3",
            "--device",
            "cpu",
            "--precision",
            "fp32",
            "--seed",
            "1",
            "--no-progress",
        ]
    )
    assert rc == 0, capsys.readouterr().err
    assert "fold 2: best epoch" in capsys.readouterr().out
    conf = yaml.safe_load((run / "config.yaml").read_text())
    assert conf["preset"] == "mirror" and conf["seed"] == 1
    assert conf["training"]["epochs"] == 2 and conf["training"]["lr"] == 1e-3
    assert conf["model"]["embed_dim"] == 24 and conf["data"]["features_dir"] == str(
        toy.features.resolve()
    )
    assert conf["package"]["mirror_model"]
    splits = json.loads((run / "splits.json").read_text())
    assert (
        splits["seed"] == 1 and splits["stratified_by"] == "subtype" and len(splits["folds"]) == 3
    )
    info = load_run(run)
    assert info.folds == [0, 1, 2] and info.training.epochs == 2
    for k in range(3):
        fdir = run / f"fold_{k}"
        for name in ("best.safetensors", "model.json", "last.ckpt", "log.jsonl", "log.csv"):
            assert (fdir / name).is_file(), name
        rows = [json.loads(x) for x in (fdir / "log.jsonl").read_text().splitlines()]
        assert [r["epoch"] for r in rows] == [0, 1]
        for key in (
            "step",
            "train_loss",
            "train_align",
            "train_ret_slide",
            "train_cluster",
            "val_loss",
            "val_align",
            "lr",
            "seconds",
        ):
            assert key in rows[0]
        csv_lines = (fdir / "log.csv").read_text().splitlines()
        assert len(csv_lines) == 3 and csv_lines[0].startswith("epoch,step,")
        mj = json.loads((fdir / "model.json").read_text())
        best = min(rows, key=lambda r: r["val_loss"])
        assert mj["best_epoch"] == best["epoch"] and mj["best_val_loss"] == pytest.approx(
            best["val_loss"]
        )
        assert mj["model_config"]["patch_dim"] == 16 and mj["encoder"]["name"] == "toy-encoder"
        assert mj["preprocessing"]
    # the loaders used by evaluate/export
    fm = load_fold_model(run, 0)
    assert not fm.model.training and fm.best_epoch in (0, 1)
    emb = embed_patients(run, 0)
    assert emb.patient_ids == toy.patients
    assert emb.slide.shape == (16, 24) and emb.rna.shape == (16, 24)
    assert np.isfinite(emb.slide).all() and np.isfinite(emb.rna).all()
    assert set(emb.subtype) <= {"A", "B"} and emb.time.shape == (16,) and emb.event.shape == (16,)
    # a patient with two slides gets the mean of its two slide embeddings (all tiles, eval mode)
    from mirror_model.features import read_features

    p0 = toy.patients[0]
    assert len(toy.slides[p0]) == 2
    with torch.no_grad():
        per = [
            fm.model.encode_slide(
                torch.from_numpy(read_features(toy.features / f"{s}.h5").features)
            )
            .embedding[0]
            .numpy()
            for s in toy.slides[p0]
        ]
    np.testing.assert_allclose(emb.slide[0], np.mean(per, axis=0), rtol=1e-5, atol=1e-6)


def test_test_patients_are_never_read_and_selection_uses_inner_val(toy, tmp_path):
    # copy the toy, then delete the feature files of fold 0's test patients
    import shutil

    root = tmp_path / "toy"
    shutil.copytree(toy.root, root)
    import pandas as pd

    table = pd.read_csv(root / "cohort.csv")
    splits = make_splits(table["patient_id"].tolist(), patient_subtypes(table), 3, 0.15, seed=0)
    test = splits.fold(0).test
    for p in test:
        for s in toy.slides[p]:
            (root / "features" / f"{s}.h5").unlink()
    run = tmp_path / "run"
    calls = []
    res = pretrain(
        root / "cohort.csv",
        root / "expression.csv",
        root / "features",
        run,
        config=_cfg(),
        model_overrides=TINY_MODEL,
        progress=lambda done, total, stage: calls.append((done, total, stage)),
        progress_bar=True,
    )
    assert calls[-1] == (4, 4, "pretraining fold 0")  # 8 inner-train patients, batch 4, 2 epochs
    f = res.folds[0]
    assert f.completed and f.n_train + f.n_val + len(test) == 16
    saved = json.loads((run / "splits.json").read_text())["folds"][0]
    assert sorted(saved["test"]) == sorted(test)
    assert not set(saved["test"]) & (set(saved["train"]) | set(saved["val"]))
    rows = [json.loads(x) for x in (run / "fold_0" / "log.jsonl").read_text().splitlines()]
    assert f.best_epoch == int(np.argmin([r["val_loss"] for r in rows]))
    # the other folds do need those files: a clear error lists them
    with pytest.raises(FeatureFileError, match="no feature file"):
        pretrain(
            root / "cohort.csv",
            root / "expression.csv",
            root / "features",
            tmp_path / "run2",
            config=_cfg(fold=1),
            model_overrides=TINY_MODEL,
        )


def test_non_finite_loss_names_step_and_term_and_keeps_checkpoint(toy, tmp_path, monkeypatch):
    real = trainer_mod._forward_losses
    calls = {"train": 0}

    def poisoned(model, batch, device, precision):
        loss, terms = real(model, batch, device, precision)
        if model.training:
            calls["train"] += 1
            if (
                calls["train"] == 6
            ):  # 8 training patients, batch 2: 4 steps per epoch -> epoch 1, step 1
                terms = dict(terms)
                terms["ret_rna"] = torch.tensor(float("nan"))
                loss = loss + terms["ret_rna"]
        return loss, terms

    monkeypatch.setattr(trainer_mod, "_forward_losses", poisoned)
    run = tmp_path / "run"
    with pytest.raises(
        TrainingError, match=r"epoch 1, step 1 .*term 'ret_rna'.*last good checkpoint"
    ) as ei:
        pretrain_toy(toy, run, config=_cfg(epochs=2, batch_size=2))
    assert "global step 5" in str(ei.value)
    ckpt = load_checkpoint(run / "fold_0" / "last.ckpt")
    assert ckpt["train_state"].epoch == 1 and ckpt["train_state"].global_step == 4
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    assert (run / "fold_0" / "best.safetensors").is_file()


def test_clear_input_errors(toy, tmp_path):
    # expression rows missing for patients
    lines = toy.expression.read_text().splitlines()
    bad_expr = tmp_path / "expr.csv"
    bad_expr.write_text("\n".join(lines[:-2]) + "\n")
    with pytest.raises(ExpressionError, match="P014, P015"):
        pretrain(
            toy.cohort,
            bad_expr,
            toy.features,
            tmp_path / "r1",
            config=_cfg(),
            model_overrides=TINY_MODEL,
        )
    # fewer patients than folds
    with pytest.raises(CohortError, match="16 patient.*20 folds"):
        pretrain_toy(toy, tmp_path / "r2", config=_cfg(folds=20, fold=None))
    # features of another dimension
    import shutil

    feats = tmp_path / "feats"
    shutil.copytree(toy.features, feats)
    write_h5(feats / f"{toy.slides['P001'][0]}.h5", np.zeros((20, 8)))
    with pytest.raises(FeatureFileError, match="P001-S0.*has 8"):
        pretrain(
            toy.cohort,
            toy.expression,
            feats,
            tmp_path / "r3",
            config=_cfg(folds=1, fold=None),
            model_overrides=TINY_MODEL,
        )
    # an existing run is never overwritten silently
    (tmp_path / "r4").mkdir()
    (tmp_path / "r4" / "config.yaml").write_text("{}")
    with pytest.raises(Exception, match="already holds a run"):
        pretrain_toy(toy, tmp_path / "r4", config=_cfg())


def test_training_lowers_the_loss_on_paired_toy_data(tmp_path):
    toy = make_toy(tmp_path / "toy", n_patients=24, seed=3, multi_slide_every=0)
    cfg = _cfg(
        epochs=12,
        batch_size=8,
        lr=2e-3,
        folds=1,
        fold=None,
        inner_val_fraction=0.25,
        schedule="cosine",
        warmup_epochs=1,
        optimizer="adamw",
    )
    res = pretrain_toy(toy, tmp_path / "run", preset="mirror-align-only", config=cfg)
    rows = [
        json.loads(x) for x in (tmp_path / "run" / "fold_0" / "log.jsonl").read_text().splitlines()
    ]
    first, last = rows[0]["train_align"], rows[-1]["train_align"]
    assert last < 0.7 * first, (first, last)
    assert res.folds[0].best_val_loss == pytest.approx(min(r["val_loss"] for r in rows))
    # cosine schedule with one warm-up epoch: peak lr after warm-up, decayed at the end
    assert rows[-1]["lr"] < 0.1 * 2e-3


def test_ctrl_c_checkpoints_and_resume_continues(toy, tmp_path):
    import os
    import signal

    from mirror_model.errors import Cancelled

    polls = {"n": 0}

    def press_ctrl_c():  # the "user" presses Ctrl-C during step 2; training stops before step 3
        polls["n"] += 1
        if polls["n"] == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return False

    run = tmp_path / "run"
    # default_int_handler normally; SIG_IGN when the test process was started in the background
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(Cancelled, match="stopped at epoch 1, step 0"):
        pretrain_toy(toy, run, config=_cfg(), should_stop=press_ctrl_c)
    assert signal.getsignal(signal.SIGINT) is before  # the caller's handler is restored
    state = load_checkpoint(run / "fold_0" / "last.ckpt")["train_state"]
    assert (state.epoch, state.global_step) == (1, 2)
    res = pretrain_toy(toy, run, config=_cfg(), resume=True)
    assert res.completed and res.folds[0].global_step == 4


def test_one_more_fold_can_be_added_to_a_run(toy, tmp_path):
    run = tmp_path / "run"
    pretrain_toy(toy, run, config=_cfg(epochs=1))
    pretrain_toy(toy, run, config=_cfg(epochs=1, fold=2))
    assert load_run(run).folds == [0, 2]


@pytest.mark.parametrize("optimizer, weight_decay", [("adam", 0.0), ("adam", 0.01), ("adamw", 0.05)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_trainer_optimizer_is_fused_and_steps_like_the_plain_loop(optimizer, weight_decay, dtype):
    """make_optimizer's fused kernel gives the parameters of torch's plain (for-loop) Adam/AdamW
    after 20 steps with the same gradients: float64 to 1e-12, float32 to 1e-6 (relative)."""
    from mirror_model.train.trainer import make_optimizer

    g = torch.Generator().manual_seed(0)
    shapes = [(7, 5), (5,), (3, 4, 2)]
    start = [torch.randn(s, generator=g, dtype=dtype) for s in shapes]
    grads = [[torch.randn(s, generator=g, dtype=dtype) for s in shapes] for _ in range(20)]
    fused = [torch.nn.Parameter(t.clone()) for t in start]
    plain = [torch.nn.Parameter(t.clone()) for t in start]
    kw = dict(lr=1e-2, betas=(0.9, 0.99), weight_decay=weight_decay)
    opt = make_optimizer(fused, optimizer=optimizer, **kw)
    assert opt.defaults["fused"] is True
    assert isinstance(opt, torch.optim.AdamW if optimizer == "adamw" else torch.optim.Adam)
    ref = (torch.optim.AdamW if optimizer == "adamw" else torch.optim.Adam)(
        plain, foreach=False, **kw
    )
    for step_grads in grads:
        for params, o in ((fused, opt), (plain, ref)):
            for p, gr in zip(params, step_grads, strict=True):
                p.grad = gr.clone()
            o.step()
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    for a, b, s in zip(fused, plain, start, strict=True):
        assert not torch.equal(a, s)
        assert ((a - b).norm() / b.norm()).item() < tol
