"""The run folder written by :func:`mirror_model.train.pretrain` and the loaders that read it.

Layout (``RUN`` = the ``--out`` folder)::

    RUN/config.yaml        resolved configuration (YAML):
                             format: "mirror-run", version: 1
                             preset: str                       model preset name
                             model: dict                       ModelConfig dict (before patch_dim/n_genes
                                                               are set from the data; see fold_k/model.json)
                             model_overrides: dict
                             training: dict                    TrainConfig.to_dict()
                             data: {cohort, expression, features_dir}   absolute paths (None if in memory;
                                                               features_dir None: expression-only run)
                                   expression_nan_policy         how missing expression values were read
                             modalities: ["slide", "rna"] or ["rna"] (expression-only run)
                             losses: {used: [...], unavailable: [...]}  (unavailable: need slides)
                             seed: int, world_size: int, precision: "fp32"|"bf16"
                             package: {mirror_model, git, torch}        versions
    RUN/splits.json        {"folds": [{"fold": k, "train": [patient ids], "val": [...], "test": [...]}],
                            "seed": int, "stratified_by": "subtype"|null, "inner_val_fraction": float}
                           ``test`` = outer fold k (never read in pretraining; empty when folds == 1),
                           ``train``/``val`` = inner split of the rest (val picks the best epoch).
    RUN/fold_<k>/best.safetensors   model state_dict at the lowest inner-validation loss
    RUN/fold_<k>/model.json         {"format": "mirror-fold-model", "version": 1, "fold": k,
                                     "model_config": ModelConfig dict (exact: patch_dim, n_genes),
                                     "preprocessing": dict of mirror_model.genes' fitted
                                        preprocessing (genes in order, normaliser statistics),
                                     "encoder": {"name", "dim", "patch_size_level0", "target_mpp",
                                                 "tile_px", "encoder_spec", "source_format"}
                                        patch-encoder facts from the first training feature file,
                                     "training": TrainConfig dict, "n_train", "n_val",
                                     "best_epoch": int (0-based), "best_val_loss": float}
    RUN/fold_<k>/last.ckpt          resume state (torch.save of tensors and plain containers only;
                                    read with torch.load(weights_only=True)): model, optimizer,
                                    scheduler, RNG states, epoch / step, best so far
    RUN/fold_<k>/log.jsonl          one JSON object per finished epoch:
                                    epoch, step (global), train_loss, train_<term>..., val_loss,
                                    val_<term>..., lr, seconds (cumulative), best (bool)
    RUN/fold_<k>/log.csv            the same rows as CSV

Loss terms are the model's (``align``, ``ret_slide``, ``ret_rna``, ``style``, ``cluster``; only
the active ones); ``loss`` is the weighted total.

Loaders (used by ``mirror-train evaluate`` / ``export``): :func:`load_run`,
:func:`load_fold_model`, :func:`embed_patients`.
"""

from __future__ import annotations

import json
import math
import os
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._device import autocast, resolve_device, resolve_precision
from .._progress import ProgressFn, StopFn, check_cancel, report
from ..errors import ConfigError, FeatureFileError, TrainingError
from .config import TrainConfig
from .final import FINAL
from .splits import Splits

__all__ = [
    "CONFIG_FILE",
    "run_is_expression_only",
    "run_nan_policy",
    "SPLITS_FILE",
    "Embeddings",
    "FoldModel",
    "RunInfo",
    "embed_patients",
    "fold_dirname",
    "gene_selection_stability",
    "load_fold_model",
    "load_run",
]

CONFIG_FILE = "config.yaml"
SPLITS_FILE = "splits.json"


def fold_dirname(fold: int | str) -> str:
    """``fold_<k>``: the sub-folder of fold ``k``; ``"final"`` for :data:`FINAL`."""
    return FINAL if fold == FINAL else f"fold_{int(fold)}"


@dataclass(frozen=True)
class RunInfo:
    """What a run folder holds."""

    run_dir: Path
    config: dict[str, Any]
    splits: Splits
    folds: list[int]  # folds with a best model (best.safetensors + model.json), sorted

    @property
    def training(self) -> TrainConfig:
        return TrainConfig.from_dict(self.config.get("training", {}))

    @property
    def preset(self) -> str:
        return str(self.config.get("preset", ""))


@dataclass
class FoldModel:
    """A trained fold model ready for inference (eval mode, on ``device``); ``fold`` is
    :data:`FINAL` for the model trained on all patients."""

    fold: int | str
    model: torch.nn.Module
    model_config: Any
    preprocessing: Any  # fitted preprocessing of mirror_model.genes (.transform(values, genes))
    preprocessing_dict: dict[str, Any]
    encoder: dict[str, Any]
    best_epoch: int
    best_val_loss: float
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def genes(self) -> list[str]:
        return list(
            getattr(self.preprocessing, "genes", None) or self.preprocessing_dict.get("genes", [])
        )


@dataclass
class Embeddings:
    """Frozen embeddings of a set of patients (rows aligned with ``patient_ids``).

    ``slide``/``rna`` are float32 ``[P, D]`` or None when that modality was not computed.
    ``subtype`` is an object array (None = unlabelled), ``time`` float (NaN = unknown),
    ``event`` float (1 = death observed, 0 = censored, NaN = unknown); all None when the
    cohort lacks the column.
    """

    patient_ids: list[str]
    slide: np.ndarray | None
    rna: np.ndarray | None
    subtype: np.ndarray | None
    time: np.ndarray | None
    event: np.ndarray | None


def run_is_expression_only(config: dict[str, Any]) -> bool:
    """True for a run pretrained without slides (``pretrain`` without ``--features``)."""
    return list(config.get("modalities") or ["slide", "rna"]) == ["rna"]


def run_nan_policy(config: dict[str, Any]) -> Any:
    """How the run read its expression table's missing values (``config.yaml``)."""
    return (config.get("data") or {}).get("expression_nan_policy") or "error"


def gene_selection_stability(run_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    """:func:`mirror_model.genes.selection_stability` of the gene lists the run's trained
    folds chose (``model.json``), with the selection method; None with fewer than two folds."""
    from ..genes import selection_stability

    run = load_run(run_dir)
    sets, methods = [], set()
    for k in run.folds:
        try:
            info = json.loads((Path(run_dir) / fold_dirname(k) / "model.json").read_text())
        except (OSError, ValueError):
            continue  # a fold without a readable model.json tells nothing about genes
        prep = info.get("preprocessing") or {}
        sets.append(list(prep.get("genes") or []))
        methods.add(str((prep.get("selector") or {}).get("method", "?")))
    if len(sets) < 2:
        return None
    return {"method": ", ".join(sorted(methods)), **selection_stability(sets)}


def stability_text(st: dict[str, Any]) -> str:
    """One line for logs and reports."""
    mj, sd = st.get("mean_jaccard"), st.get("sd_jaccard")
    return (
        f"gene selection ({st['method']}) across {st['n_folds']} folds: "
        f"{min(st['n_genes'])}-{max(st['n_genes'])} genes per fold, mean pairwise Jaccard "
        f"{mj:.2f}" + (f" (sd {sd:.2f})" if sd is not None else "")
        + f"; {len(st['in_every_fold'])} genes chosen in every fold"
    )


def load_run(run_dir: str | os.PathLike[str]) -> RunInfo:
    """Read ``config.yaml``, ``splits.json`` and list the folds that have a best model."""
    import yaml

    d = Path(run_dir)
    cfg_path = d / CONFIG_FILE
    if not cfg_path.is_file():
        raise ConfigError(
            f"{d} is not a pretraining run folder (no {CONFIG_FILE}); run `mirror-train pretrain`."
        )
    try:
        config = yaml.safe_load(cfg_path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{cfg_path} is not valid YAML: {exc}") from None
    splits = Splits.load(d / SPLITS_FILE)
    folds = sorted(
        f.fold
        for f in splits.folds
        if (d / fold_dirname(f.fold) / "best.safetensors").is_file()
        and (d / fold_dirname(f.fold) / "model.json").is_file()
    )
    return RunInfo(d, config, splits, folds)


def _preprocessing_from_dict(doc: dict[str, Any]) -> Any:
    from ..genes import Preprocessing

    return Preprocessing.from_dict(doc)


def _float_or_nan(value: object) -> float:
    # model.json stores a missing validation loss as null (RUN/final has no validation patients)
    return math.nan if value is None else float(value)  # type: ignore[arg-type]


def load_fold_model(
    run_dir: str | os.PathLike[str], fold: int | str, device: str | torch.device = "cpu"
) -> FoldModel:
    """Rebuild the best model of ``fold`` (weights from ``best.safetensors``) in eval mode;
    ``fold="final"`` loads the model trained on all patients (``RUN/final``)."""
    from ..config import ModelConfig
    from ..models import create_model
    from .checkpoint import load_safetensors_state

    fdir = Path(run_dir) / fold_dirname(fold)
    mpath = fdir / "model.json"
    if not mpath.is_file():
        raise TrainingError(
            f"fold {fold} of {run_dir} has no trained model ({mpath} is missing); "
            "its pretraining has not finished an epoch."
        )
    try:
        info = json.loads(mpath.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise TrainingError(f"{mpath} cannot be read: {exc}") from None
    cfg = ModelConfig.from_dict(info["model_config"])
    model = create_model(cfg)
    state = load_safetensors_state(fdir / "best.safetensors")
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise TrainingError(
            f"{fdir / 'best.safetensors'} does not match its model.json (missing: {list(missing)[:5]}, "
            f"unexpected: {list(unexpected)[:5]})."
        )
    dev = resolve_device(device)
    model.to(dev).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    prep_doc = dict(info.get("preprocessing", {}))
    return FoldModel(
        fold if fold == FINAL else int(fold),
        model,
        cfg,
        _preprocessing_from_dict(prep_doc),
        prep_doc,
        dict(info.get("encoder", {})),
        int(info.get("best_epoch", -1)),
        _float_or_nan(info.get("best_val_loss")),
        info,
    )


def _subsample(n: int, max_tiles: int | None, seed: int) -> np.ndarray | None:
    if max_tiles is None or n <= max_tiles:
        return None
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=max_tiles, replace=False))


def _given_or_recorded(value: Any, data: dict[str, Any], key: str, what: str) -> Any:
    """``value``, else the input the run's config.yaml records under ``data.<key>``."""
    if value is not None:
        return value
    if not data.get(key):
        raise ConfigError(f"no {what} given and the run's config.yaml records none; pass {key}=.")
    return data[key]


def embed_patients(
    run_dir: str | os.PathLike[str],
    fold: int | str,
    cohort: Any = None,
    expression: Any = None,
    features_dir: str | os.PathLike[str] | None = None,
    device: str | torch.device = "cpu",
    max_tiles: int | None = None,
    *,
    patient_ids: Sequence[str] | None = None,
    modalities: Sequence[str] = ("slide", "rna"),
    precision: str = "fp32",
    progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
) -> Embeddings:
    """Embed patients with the frozen best model of ``fold`` (eval mode, no gradients).

    Parameters
    ----------
    run_dir, fold
        The run folder and the fold whose best model is used.
    cohort, expression, features_dir
        Inputs (paths or read objects); default: the ones recorded in ``config.yaml``. Pass
        ``expression=False`` / ``features_dir=False`` to skip a modality.
    device, precision
        Where and how to run (``precision="auto"`` uses bf16 where fast; default fp32).
    max_tiles
        Use at most this many tiles per slide (a seeded subset; None = **all** tiles).
    patient_ids
        Patients to embed (default: every patient of the cohort, in cohort order).
    modalities
        Which of ``"slide"``, ``"rna"`` to compute.

    Returns
    -------
    Embeddings
        Slide embedding of a patient with several slides = mean of its slide embeddings.
        RNA embeddings use the fold's stored gene list and normalisation.
    """
    from ..cohort import Cohort, read_cohort
    from ..expression import read_expression
    from ..features import read_features
    from .data import find_feature_files

    run = load_run(run_dir)
    data = run.config.get("data", {})
    cohort = _given_or_recorded(cohort, data, "cohort", "cohort")
    coh = cohort if isinstance(cohort, Cohort) else read_cohort(cohort)
    # an expression-only run (no feature folder recorded, no slide input to its model)
    rna_only = run_is_expression_only(run.config)
    want_slide = "slide" in modalities and features_dir is not False and not rna_only
    want_rna = "rna" in modalities and expression is not False
    fm = load_fold_model(run_dir, fold, device)
    dev = resolve_device(device)
    prec = resolve_precision(precision, dev)
    pat = coh.patients()
    all_ids = [str(p) for p in pat["patient_id"]]
    ids = all_ids if patient_ids is None else [str(p) for p in patient_ids]
    unknown = sorted(set(ids) - set(all_ids))
    if unknown:
        raise ConfigError(f"patients not in the cohort: {', '.join(unknown[:10])}.")
    row_of = {p: i for i, p in enumerate(all_ids)}
    sel = [row_of[p] for p in ids]

    def column(name: str, dtype: Any) -> np.ndarray | None:
        if name not in pat:
            return None
        vals = pat[name].to_numpy()[sel]
        if dtype is object:
            return np.asarray(
                [
                    None if (v is None or (isinstance(v, float) and np.isnan(v))) else str(v)
                    for v in vals
                ],
                dtype=object,
            )
        return np.asarray(vals, dtype=np.float64)

    slide_emb = rna_emb = None
    model = fm.model
    total = len(ids) * (int(want_slide) + int(want_rna))
    done = 0
    if want_rna:
        expression = _given_or_recorded(expression, data, "expression", "expression table")
        expr = (
            expression
            if hasattr(expression, "rows_for")
            else read_expression(expression, nan_policy=run_nan_policy(run.config))
        )
        x = np.asarray(fm.preprocessing.transform(expr, patient_ids=ids), dtype=np.float32)
        out = []
        with torch.no_grad():
            for s in range(0, len(ids), 256):
                check_cancel(should_stop, "embedding")
                xb = torch.from_numpy(x[s : s + 256]).to(dev)
                with autocast(dev, prec):
                    z = model.encode_rna(xb)
                out.append(z.float().cpu().numpy())
                done += xb.shape[0]
                report(progress, done, total, "embedding expression")
        rna_emb = (
            np.concatenate(out, axis=0)
            if out
            else np.zeros((0, fm.model_config.embed_dim), np.float32)
        )
    if want_slide:
        features_dir = _given_or_recorded(features_dir, data, "features_dir", "feature folder")
        slides = {
            str(p): [str(s) for s in sl]
            for p, sl in zip(pat["patient_id"], pat["slide_ids"], strict=True)
        }
        paths = find_feature_files(features_dir, [s for p in ids for s in slides[p]])
        want_dim = int(fm.model_config.patch_dim)
        out = []
        with torch.no_grad():
            for p in ids:
                embs = []
                for sid in slides[p]:
                    check_cancel(should_stop, "embedding")
                    ff = read_features(paths[sid])
                    feats = np.asarray(ff.features, dtype=np.float32)
                    if feats.ndim != 2 or feats.shape[1] != want_dim:
                        raise FeatureFileError(
                            f"feature file {paths[sid]} has features of shape {feats.shape}; the model of "
                            f"fold {fold} expects {want_dim}-d features (encoder "
                            f"{fm.encoder.get('name')!r})."
                        )
                    keep = _subsample(feats.shape[0], max_tiles, seed=zlib.crc32(sid.encode()))
                    cells = ff.grid_positions() if model.needs_positions else None
                    if keep is not None:
                        feats = feats[keep]
                        cells = None if cells is None else cells[keep]
                    xb = torch.from_numpy(feats).to(dev).unsqueeze(0)
                    kw = {} if cells is None else {"positions": torch.from_numpy(cells).to(dev)}
                    with autocast(dev, prec):
                        enc = model.encode_slide(xb, **kw)
                    embs.append(enc.embedding.float().cpu().numpy()[0])
                out.append(np.mean(embs, axis=0))
                done += 1
                report(progress, done, total, "embedding slides")
        slide_emb = (
            np.stack(out).astype(np.float32)
            if out
            else np.zeros((0, fm.model_config.embed_dim), np.float32)
        )
    return Embeddings(
        ids,
        slide_emb,
        rna_emb,
        column("subtype", object),
        column("time", float),
        column("event", float),
    )
