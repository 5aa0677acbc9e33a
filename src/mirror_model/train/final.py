"""The deployable model: one model trained on **all** patients with the recipe the folds validated.

Cross-validation trains one model per fold to *measure* the recipe; none of them is the model a
user should deploy (each saw only 80 % of the patients, minus its inner-validation share).
:func:`refit_final` trains ``RUN/final/`` on every patient of the run's cohort with the run's
own preset, overrides and training options, and takes the number of epochs from the folds:

**Epoch rule.** ``E = ceil(median_k(best_epoch_k + 1))`` — the median over the folds of the
number of epochs each fold trained until its selected (lowest inner-validation loss) epoch.
The final model follows the same ``epochs``-long learning-rate schedule as the folds (warm-up,
cosine) and stops after ``E`` epochs (``TrainConfig.stop_after_epochs``); there are no
validation patients, so the model of epoch ``E`` is kept. Gene selection and expression
normalisation are fitted on all patients. The final model has no held-out patients of its own:
its honest performance figures are the folds' (``mirror-train evaluate``).

``RUN/final/`` has the layout of a fold folder (``best.safetensors``, ``model.json``,
``last.ckpt``, ``log.jsonl``); ``model.json["final"]`` records the rule, each fold's selected
epoch and ``E``. An interrupted refit resumes from its ``last.ckpt``.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .._io import atomic_write_text
from .._progress import ProgressFn, StopFn
from ..errors import ConfigError, TrainingError

__all__ = ["EPOCH_RULE", "FINAL", "FinalResult", "final_epochs", "refit_final"]

#: The model trained on all patients: its sub-folder of the run, and the name that
#: :func:`~mirror_model.train.run.load_fold_model` / ``embed_patients`` accept for a fold.
FINAL = "final"
#: The stated rule, as recorded in ``final/model.json``.
EPOCH_RULE = "ceil(median over folds of (selected epoch + 1))"


@dataclass(frozen=True)
class FinalResult:
    """Outcome of :func:`refit_final`.

    Attributes
    ----------
    run_dir, final_dir : the run and its ``final/`` folder.
    epochs : E, the epochs the final model was trained for.
    fold_epochs : each fold's selected epoch + 1 (the numbers the rule took the median of).
    n_patients : patients the final model was trained on (all of the cohort).
    trained : False when ``final/`` was already complete and nothing was trained.
    """

    run_dir: Path
    final_dir: Path
    epochs: int
    fold_epochs: list[int]
    n_patients: int
    trained: bool


def final_epochs(best_epochs: list[int]) -> int:
    """E for the folds' selected 0-based ``best_epochs`` (see :data:`EPOCH_RULE`)."""
    if not best_epochs or min(best_epochs) < 0:
        raise TrainingError("every fold needs a selected epoch before a final model can be trained.")
    return int(math.ceil(float(np.median([e + 1 for e in best_epochs]))))


def _fold_best_epochs(run: Any) -> list[int]:
    from .run import fold_dirname

    folds = [f.fold for f in run.splits.folds]
    missing = [k for k in folds if k not in run.folds]
    if missing:
        raise TrainingError(
            f"folds {missing} of {run.run_dir} have no trained model; finish the cross-validation "
            "(`mirror-train pretrain ... --resume`) before training the final model — its number "
            "of epochs comes from the folds."
        )
    out = []
    for k in folds:
        doc = json.loads((Path(run.run_dir) / fold_dirname(k) / "model.json").read_text())
        out.append(int(doc["best_epoch"]))
    return out


def refit_final(
    run_dir: str | os.PathLike[str],
    *,
    device: str | None = None,
    progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
    progress_bar: bool = False,
) -> FinalResult:
    """Train (or resume, or reuse) ``RUN/final``: all patients, ``E`` epochs (see module doc).

    Parameters
    ----------
    run_dir
        A cross-validation run of ``mirror-train pretrain`` with every fold trained.
    device
        Overrides the run's training device (e.g. ``"cpu"``); None keeps it.
    progress, should_stop, progress_bar
        As :func:`mirror_model.train.pretrain`.

    Raises
    ------
    TrainingError
        A fold is not trained yet, or the run has no cross-validation (``folds = 1``).
    """
    from .._device import resolve_device, resolve_precision
    from .checkpoint import load_checkpoint
    from .config import TrainConfig
    from .run import load_run, run_nan_policy
    from .splits import FoldSplit
    from .trainer import _load_inputs, _resolve_model_config, _StopFlag, prepare_fold, train_fold

    run_path = Path(run_dir)
    run = load_run(run_path)
    if run.splits.n_folds < 2 or not any(f.test for f in run.splits.folds):
        raise TrainingError(
            f"{run_path} was trained without cross-validation; its model is already trained on "
            "the training patients — export it directly."
        )
    fold_best = _fold_best_epochs(run)
    epochs = final_epochs(fold_best)
    cfg = dict(run.config.get("training", {}))
    cfg.update(fold=None, stop_after_epochs=min(epochs, int(cfg.get("epochs", epochs))))
    if device is not None:
        cfg["device"] = device
    tcfg = TrainConfig.from_dict(cfg)
    data = dict(run.config.get("data", {}) or {})
    for key in ("cohort", "expression"):
        if not data.get(key):
            raise ConfigError(f"{run_path}/config.yaml records no {key}; cannot retrain.")
    coh, expr = _load_inputs(data["cohort"], data["expression"], run_nan_policy(run.config))
    patients = sorted(str(p) for p in coh.patient_ids)
    final_dir = run_path / FINAL
    fold_id = run.splits.n_folds  # its own seeds, distinct from every CV fold's
    info = {
        "rule": EPOCH_RULE,
        "fold_epochs": [e + 1 for e in fold_best],
        "epochs": tcfg.last_epoch,
        "schedule_epochs": tcfg.epochs,
        "n_patients": len(patients),
    }
    mpath = final_dir / "model.json"
    ckpt = final_dir / "last.ckpt"
    if mpath.is_file():
        recorded = json.loads(mpath.read_text()).get("final")
        if recorded == info and ckpt.is_file():
            if load_checkpoint(ckpt)["train_state"].epoch >= tcfg.last_epoch:
                return FinalResult(run_path, final_dir, tcfg.last_epoch, info["fold_epochs"],
                                   len(patients), trained=False)  # fmt: skip
        elif recorded is not None:
            raise TrainingError(
                f"{final_dir} holds a final model made with other settings ({recorded}); the "
                f"folds now give {info}. Delete {final_dir} to train it again."
            )
    split = FoldSplit(fold=fold_id, train=patients, val=[], test=[])
    fold_data = prepare_fold(coh, expr, data.get("features_dir") or None, split, tcfg)
    from ..config import ModelConfig

    mcfg = _resolve_model_config(
        ModelConfig.from_dict(run.config["model"]),
        fold_data.encoder_spec["dim"],
        fold_data.train.rna.shape[1],
        None,
    )
    dev = resolve_device(tcfg.device)
    stop = _StopFlag(should_stop)
    with stop.catch_sigint():
        res = train_fold(
            mcfg,
            fold_data,
            tcfg,
            final_dir,
            device=dev,
            precision=resolve_precision(tcfg.precision, dev),
            resume=ckpt.is_file(),
            progress=progress,
            should_stop=should_stop,
            stop_flag=stop,
            progress_bar=progress_bar,
        )
    if not res.completed:
        raise TrainingError(f"the final model of {run_path} stopped before epoch {epochs}.")
    doc = json.loads(mpath.read_text())
    doc["final"] = info
    atomic_write_text(mpath, json.dumps(doc, indent=2) + "\n")
    return FinalResult(run_path, final_dir, tcfg.last_epoch, info["fold_epochs"], len(patients), True)
