"""``mirror-train export``: write a pretraining run's deployable model as a bundle (.mirror).

``--refit`` (recommended after cross-validation): the model trained on **all** patients for the
number of epochs the folds validated (trained into ``RUN/final`` first, resumable), heads fitted
on all patients, out-of-fold reference curves and metrics. Without it: ``RUN/final`` when it
exists, else one fold's model (``--fold``, default 0) with heads fitted on that fold's training
patients and its held-out patients as reference cohort. The run's evaluate metrics go in too.
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
        "--refit",
        action="store_true",
        help="export the model trained on all patients for the median of the folds' selected "
        "epochs (trains RUN/final first if needed)",
    )
    parser.add_argument(
        "--fold",
        type=int,
        default=None,
        help="export this fold's model instead (default: RUN/final if trained, else fold 0)",
    )
    parser.add_argument(
        "--metrics",
        default=None,
        help="metrics.json of mirror-train evaluate (default: looked for in the run folder)",
    )
    parser.add_argument(
        "--evaluation",
        default=None,
        help="evaluation.json of mirror-train evaluate: out-of-fold predictions for --refit's "
        "reference curves (default: beside --metrics or in the run folder; else computed)",
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
    from ..errors import ConfigError
    from ..evaluation.export import export_bundle

    if args.refit and args.fold is not None:
        raise ConfigError("--refit exports the model trained on all patients; drop --fold.")
    with TqdmProgress(disable=True if args.quiet else None) as bar:
        res = export_bundle(
            args.run,
            args.out,
            fold=args.fold,
            refit=args.refit,
            metrics_path=args.metrics,
            evaluation_path=args.evaluation,
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
        where = "out-of-fold" if res.fold == "final" else f"held-out fold {res.fold}"
        print(f"  {where} ({kind}, n={m.get('n')}): {', '.join(parts) or 'n/a'}")
    for note in res.notes:
        print(f"  note: {note}", file=sys.stderr)
    print(f"wrote {res.path}")
    return 0
