"""``mirror-train pretrain``: pretrain MIRROR (or another preset) with patient-level folds.

Option precedence (highest first): explicit flags (``--epochs`` ...) > ``--set key=value`` >
``--config`` YAML > preset/defaults. The resolved configuration is written to
``RUN/config.yaml``. The YAML may hold training options at the top level or under
``training:``, model-architecture overrides under ``model:`` and the preset under ``preset:``;
a run's own ``config.yaml`` is accepted too. ``--set model.embed_dim=256`` overrides the
model; ``--set lr=1e-4`` a training option.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ._options import add_device_option, add_nan_policy_option, add_precision_option

# flag dest -> TrainConfig field
_FLAG_FIELDS = {
    "epochs": "epochs",
    "batch_size": "batch_size",
    "lr": "lr",
    "weight_decay": "weight_decay",
    "schedule": "schedule",
    "warmup_epochs": "warmup_epochs",
    "optimizer": "optimizer",
    "folds": "folds",
    "fold": "fold",
    "inner_val_fraction": "inner_val_fraction",
    "tiles_per_slide": "tiles_per_slide",
    "device": "device",
    "precision": "precision",
    "seed": "seed",
    "num_workers": "num_workers",
    "max_steps": "max_steps",
    "feature_cache": "feature_cache",
}


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--cohort", required=True, help="cohort table (CSV: patient_id, slide_id, slide_path, ...)"
    )
    parser.add_argument("--expression", required=True, help="expression table (CSV/TSV/parquet)")
    add_nan_policy_option(parser)
    parser.add_argument(
        "--features",
        default=None,
        help="folder of <slide_id>.h5 feature files; leave out for an expression-only cohort "
        "(the RNA encoder alone learns from RNA retention and the style prior; alignment, slide "
        "retention and cluster agreement need slides)",
    )
    parser.add_argument(
        "--out", required=True, help="run folder to create (or continue with --resume)"
    )
    parser.add_argument(
        "--preset", default=None, help="model preset (mirror, tangle, mirror-align-only, ...)"
    )
    parser.add_argument(
        "--config", default=None, help="YAML file of training options / model overrides"
    )
    g = parser.add_argument_group("training options (override --config)")
    g.add_argument("--epochs", type=int, default=None, help="epochs per fold (default 100)")
    g.add_argument(
        "--batch-size", type=int, default=None, help="global batch size in patients (default 16)"
    )
    g.add_argument("--lr", type=float, default=None, help="learning rate (default 2e-5)")
    g.add_argument("--weight-decay", type=float, default=None)
    g.add_argument(
        "--schedule",
        choices=["constant", "cosine"],
        default=None,
        help="constant (authors) or warm-up + cosine decay",
    )
    g.add_argument("--warmup-epochs", type=float, default=None)
    g.add_argument("--optimizer", choices=["adam", "adamw"], default=None)
    g.add_argument(
        "--folds", type=int, default=None, help="outer folds (default 5; 1 = no CV, for deployment)"
    )
    g.add_argument("--fold", type=int, default=None, help="train only this fold (0-based)")
    g.add_argument("--inner-val-fraction", type=float, default=None)
    g.add_argument(
        "--tiles-per-slide", type=int, default=None, help="tiles sampled per slide per step (2048)"
    )
    add_device_option(g, default=None)
    add_precision_option(g, default=None)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument(
        "--num-workers", type=int, default=None, help="background batch-assembly threads"
    )
    g.add_argument(
        "--max-steps", type=int, default=None, help="stop (resumably) after this many steps"
    )
    g.add_argument("--feature-cache", choices=["memory", "lazy"], default=None)
    parser.add_argument(
        "--set",
        dest="set_",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any training option, or a model field as model.FIELD=VALUE",
    )
    parser.add_argument(
        "--resume", action="store_true", help="continue an interrupted run in --out"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _read_yaml(path: str) -> dict[str, Any]:
    import yaml

    from ..errors import ConfigError

    p = Path(path)
    try:
        doc = yaml.safe_load(p.read_text())
    except OSError as exc:
        raise ConfigError(f"--config {p}: cannot read it ({exc}).") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"--config {p}: not valid YAML ({exc}).") from None
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise ConfigError(f"--config {p}: expected a mapping of options, got {type(doc).__name__}.")
    return doc


def resolve_options(args: argparse.Namespace) -> tuple[str, Any, dict[str, Any]]:
    """Merge defaults < YAML < --set < flags into (preset, TrainConfig, model overrides)."""
    from ..errors import ConfigError
    from ..train.config import TrainConfig, parse_set_overrides

    training: dict[str, Any] = {}
    model: dict[str, Any] = {}
    preset = "mirror"
    if args.config:
        doc = _read_yaml(args.config)
        if doc.get("format") == "mirror-run":  # a previous run's config.yaml
            preset = doc.get("preset", preset)
            training.update(doc.get("training") or {})
            model.update(doc.get("model_overrides") or {})
            training.pop("fold", None)
        else:
            preset = doc.pop("preset", preset)
            model.update(doc.pop("model", None) or {})
            training.update(doc.pop("training", None) or {})
            training.update(doc)
    for key, value in parse_set_overrides(args.set_).items():
        if key.startswith("model."):
            model[key[len("model.") :]] = value
        elif key == "preset":
            preset = str(value)
        else:
            training[key] = value
    for dest, name in _FLAG_FIELDS.items():
        v = getattr(args, dest, None)
        if v is not None:
            training[name] = v
    if args.preset is not None:
        preset = args.preset
    if not isinstance(model, dict):
        raise ConfigError("model overrides must be a mapping of ModelConfig fields.")
    return str(preset), TrainConfig.from_dict(training), model


def run(args: argparse.Namespace) -> int:
    from ..errors import Cancelled
    from ..train.trainer import pretrain

    preset, tcfg, model = resolve_options(args)
    show = not args.no_progress and sys.stderr.isatty()
    try:
        result = pretrain(
            args.cohort,
            args.expression,
            args.features,
            args.out,
            preset=preset,
            config=tcfg,
            model_overrides=model,
            resume=args.resume,
            progress_bar=show,
            nan_policy=args.nan_policy,
            log=lambda msg: print(f"mirror-train pretrain: {msg}", file=sys.stderr, flush=True),
        )
    except Cancelled as exc:
        print(f"mirror-train pretrain: {exc}", file=sys.stderr)
        return 130
    import os

    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    for f in result.folds:
        print(
            f"fold {f.fold}: best epoch {f.best_epoch} (inner-val loss {f.best_val_loss:.4f}), "
            f"{f.epochs_done} epoch(s), {f.global_step} steps, {f.n_train} train / {f.n_val} val patients"
        )
    if not result.completed:
        print(f"stopped early (max_steps); continue with --resume --out {result.run_dir}")
    print(f"run folder: {result.run_dir}")
    return 0
