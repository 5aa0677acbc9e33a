"""A stopped and resumed run reaches bit for bit the result of an uninterrupted run."""

from __future__ import annotations

import json

import pytest
import torch
from _train_helpers import make_toy, pretrain_toy, toy_config
from safetensors.torch import load_file

from mirror_model.errors import Cancelled, TrainingError
from mirror_model.train.checkpoint import load_checkpoint

_LOSS_KEYS = (
    "train_loss",
    "train_align",
    "train_ret_slide",
    "train_ret_rna",
    "train_style",
    "train_cluster",
    "val_loss",
    "val_align",
    "lr",
    "step",
    "epoch",
    "best",
)


def _cfg(**kw):
    options = dict(epochs=3, folds=1, inner_val_fraction=0.15, seed=5, schedule="cosine",
                   warmup_epochs=0.5)  # fmt: skip
    return toy_config(**{**options, **kw})


def _rows(run):
    return [json.loads(x) for x in (run / "fold_0" / "log.jsonl").read_text().splitlines()]


def _assert_same(run_a, run_b):
    wa = load_file(str(run_a / "fold_0" / "best.safetensors"))
    wb = load_file(str(run_b / "fold_0" / "best.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    la = load_checkpoint(run_a / "fold_0" / "last.ckpt")
    lb = load_checkpoint(run_b / "fold_0" / "last.ckpt")
    for k in la["model"]:
        assert torch.equal(la["model"][k], lb["model"][k]), k
    ra, rb = _rows(run_a), _rows(run_b)
    assert len(ra) == len(rb) == 3
    for x, y in zip(ra, rb, strict=True):
        assert {k: x[k] for k in _LOSS_KEYS} == {k: y[k] for k in _LOSS_KEYS}


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return make_toy(tmp_path_factory.mktemp("toy"), n_patients=14, seed=1)


@pytest.fixture(scope="module")
def reference(toy, tmp_path_factory):
    run = tmp_path_factory.mktemp("ref") / "run"
    pretrain_toy(toy, run, config=_cfg())
    return run


def test_stop_mid_epoch_then_resume_is_bitwise_identical(toy, reference, tmp_path):
    run = tmp_path / "run"
    polls = {"n": 0}

    def should_stop():  # polled before every step; 3 steps per epoch: stop before epoch 1, step 1
        polls["n"] += 1
        return polls["n"] == 5

    with pytest.raises(Cancelled, match="--resume"):
        pretrain_toy(toy, run, config=_cfg(), should_stop=should_stop)
    state = load_checkpoint(run / "fold_0" / "last.ckpt")["train_state"]
    assert (state.epoch, state.step_in_epoch, state.global_step) == (1, 1, 4)
    assert len(_rows(run)) == 1
    res = pretrain_toy(toy, run, config=_cfg(), resume=True)
    assert res.completed and res.folds[0].global_step == 9
    _assert_same(reference, run)


def test_max_steps_then_resume_is_bitwise_identical(toy, reference, tmp_path):
    run = tmp_path / "run"
    # the first part reads only the sampled rows from the h5 files (no cache) in 2 background
    # threads: the data pipeline must give the very same batches as the in-memory cache
    lazy = _cfg(max_steps=3, feature_cache="lazy", cache_gb=0.0, num_workers=2)
    res = pretrain_toy(toy, run, config=lazy)
    assert not res.completed and res.folds[0].global_step == 3
    # a torn extra log line written after the checkpoint is dropped on resume
    with open(run / "fold_0" / "log.jsonl", "a") as fh:
        fh.write('{"epoch": 1, "step": 99}\n')
    res = pretrain_toy(toy, run, config=_cfg(), resume=True)
    assert res.completed
    _assert_same(reference, run)
    # resuming a finished run is a no-op that reports it
    again = pretrain_toy(toy, run, config=_cfg(), resume=True)
    assert again.folds[0].global_step == 9


def test_resume_refuses_changed_options(toy, tmp_path):
    run = tmp_path / "run"
    pretrain_toy(toy, run, config=_cfg(max_steps=2))
    with pytest.raises(TrainingError, match="lr 0.001 -> 0.01"):
        pretrain_toy(toy, run, config=_cfg(lr=1e-2), resume=True)
