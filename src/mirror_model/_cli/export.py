"""``mirror-train export``: write one fold of a pretraining run as a model bundle (.mirror).

The bundle holds the fold's best model, subtype and Cox heads for slide-only, RNA-only and
combined inputs (fitted on that fold's training patients), the risk cut-off, the fold's
held-out patients as reference cohort, and the run's evaluate metrics when present.
See :func:`mirror_model.evaluation.export.export_bundle`.
"""

from __future__ import annotations

import argparse
import sys

from ._options import add_device_option


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--run", required=True, help="pretraining run folder (mirror-train pretrain --out)"
    )
    parser.add_argument(
        "--out",
        required=True,
        help="bundle to write: FILE.mirror (one file) or a folder (bundle.json + model.safetensors)",
    )
    parser.add_argument(
        "--fold",
        type=int,
        default=None,
        help="fold whose model goes into the bundle (default: 0, or the run's only model)",
    )
    parser.add_argument(
        "--metrics",
        default=None,
        help="metrics.json of mirror-train evaluate (default: looked for in the run folder)",
    )
    add_device_option(parser, default="cpu", purpose="where to embed the patients")
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the heads' inner cross-validation"
    )
    prov = parser.add_argument_group(
        "provenance", "what every prediction of the bundle shows about the model (plugin, reports)"
    )
    prov.add_argument("--name", default=None, help="display name of the model (default: the file name)")
    prov.add_argument(
        "--training-data",
        default=None,
        help="what the model was trained on, in words (default: patients, slides and subtypes of the run)",
    )
    prov.add_argument(
        "--intended-use",
        default=None,
        help="what the model may be used for (default: none stated; the plugin then warns)",
    )
    prov.add_argument(
        "--time-unit",
        default=None,
        help="unit of the cohort's survival times, e.g. months or days (default: not recorded)",
    )
    prov.add_argument(
        "--synthetic",
        action="store_true",
        help="the model was trained on synthetic data (the plugin shows a not-for-patients banner)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar, print only the path")


def _provenance(args: argparse.Namespace) -> dict:
    given = {
        "name": args.name,
        "training_data": args.training_data,
        "intended_use": args.intended_use,
        "survival_time_unit": args.time_unit,
    }
    out = {k: v for k, v in given.items() if v is not None}
    if args.synthetic:
        out["synthetic"] = True
    return out


def run(args: argparse.Namespace) -> int:
    from .._progress import TqdmProgress
    from ..evaluation.export import export_bundle

    with TqdmProgress(disable=True if args.quiet else None) as bar:
        res = export_bundle(
            args.run,
            args.out,
            fold=args.fold,
            metrics_path=args.metrics,
            device=args.device,
            seed=args.seed,
            provenance=_provenance(args),
            progress=bar,
        )
    if args.quiet:
        print(res.path)
        return 0
    print(res.bundle.summary())
    for kind, m in res.reference_metrics.items():
        parts = [f"{k} {v:.3f}" for k, v in m.items() if isinstance(v, float) and k != "n"]
        print(f"  held-out fold {res.fold} ({kind}, n={m.get('n')}): {', '.join(parts) or 'n/a'}")
    for note in res.notes:
        print(f"  note: {note}", file=sys.stderr)
    print(f"wrote {res.path}")
    return 0
