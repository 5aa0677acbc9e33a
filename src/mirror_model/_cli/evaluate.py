"""``mirror-train evaluate RUN [RUN ...] [--raw-inputs]``: honest downstream evaluation.

Per fold, probes and survival heads are fitted on the fold's training patients and scored on
its test patients. Writes ``metrics.json`` (layout in
:mod:`mirror_model.evaluation.evaluate`), ``evaluation.json`` and ``report.md`` with PNG
figures. Several runs (e.g. mirror vs tangle vs ablations) are compared in one report.

``--raw-inputs`` adds the baseline every pretrained encoder must beat: the same heads on the
raw inputs (mean-pooled tile features, normalised genes) on the same folds
(:mod:`mirror_model.evaluation.raw`). Without any RUN it evaluates a cohort's raw inputs alone
(``--cohort`` with ``--expression`` and/or ``--features``; folds made as ``pretrain`` makes them
from ``--folds`` / ``--split-seed``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ._options import add_device_option, add_nan_policy_option, add_precision_option


def _c_value(text: str) -> float | str:
    if text == "cv":
        return "cv"
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'cv', got {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative number or 'cv', got {text!r}")
    return v


def _ratio_value(text: str) -> float | str:
    v = _c_value(text)
    if v != "cv" and not 0 < float(v) <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1] or 'cv', got {text!r}")
    return v


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "runs", nargs="*", metavar="RUN", help="pretraining run folder(s) (none: --raw-inputs only)"
    )
    raw = parser.add_argument_group("raw-input baseline")
    raw.add_argument(
        "--raw-inputs",
        action="store_true",
        help="also evaluate the raw inputs (mean-pooled tile features, normalised genes) with "
        "the same heads on the same folds, as rows named 'raw'",
    )
    raw.add_argument("--cohort", default=None, help="cohort table for --raw-inputs without a RUN")
    raw.add_argument(
        "--expression", default=None, help="expression table for --raw-inputs without a RUN"
    )
    add_nan_policy_option(raw, default=None)
    raw.add_argument(
        "--features", default=None, help="feature folder for --raw-inputs without a RUN"
    )
    raw.add_argument(
        "--folds", type=int, default=5, help="outer folds without a RUN (default 5, as pretrain)"
    )
    raw.add_argument(
        "--split-seed",
        type=int,
        default=42,
        help="seed of the folds without a RUN (default 42 = pretrain's default --seed)",
    )
    parser.add_argument(
        "--out",
        default=None,
        help="output folder (default: RUN/evaluation for one run; required for several)",
    )
    parser.add_argument(
        "--name",
        dest="names",
        action="append",
        default=None,
        metavar="NAME",
        help="display name of each run, in order (repeat; default: the folder names)",
    )
    parser.add_argument(
        "--inputs",
        nargs="+",
        default=["slide", "rna", "both"],
        choices=["slide", "rna", "both"],
        help="probe inputs (default: slide rna both; both = concatenated)",
    )
    parser.add_argument(
        "--k-shots",
        nargs="*",
        type=int,
        default=[1, 10, 25],
        metavar="K",
        help="k-shot probes, patients per class (default 1 10 25; none: --k-shots)",
    )
    parser.add_argument(
        "--draws", type=int, default=10, help="seeded draws per k-shot probe (default 10)"
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of k-shot draws and inner CV (default 0)"
    )
    parser.add_argument(
        "--probe-c",
        type=_c_value,
        default="cv",
        help="logistic-regression C, or 'cv' = inner CV on training patients (default)",
    )
    parser.add_argument(
        "--cox-penalizer",
        type=_c_value,
        default="cv",
        help="elastic-net Cox penalty (alpha) or 'cv' = inner CV on training patients (default)",
    )
    parser.add_argument(
        "--cox-l1-ratio",
        type=_ratio_value,
        default="cv",
        help="elastic-net mixing in (0, 1] (1 = lasso, 0.05 = near ridge) or 'cv' (default)",
    )
    parser.add_argument(
        "--cox-components",
        type=int,
        default=0,
        help="PCA components before the Cox model (default 0 = none: the penalty does the work)",
    )
    parser.add_argument(
        "--hazard-weight-decay",
        type=_c_value,
        default="cv",
        help="L2 penalty of the discrete-time hazard head or 'cv' (default)",
    )
    add_device_option(parser, purpose="where to embed the patients")
    add_precision_option(parser, default="fp32", purpose="of the embeddings")
    parser.add_argument(
        "--max-tiles",
        type=int,
        default=None,
        help="embed at most this many tiles per slide (seeded subset; default all tiles)",
    )
    parser.add_argument("--no-report", action="store_true", help="write metrics only, no report.md")


def _print_summary(results: dict) -> None:
    from ..evaluation.report import format_mean_sd

    names = list(results)
    width = max(8, *(len(n) for n in names))
    print(
        f"{'task':<16} {'input':<6} {'metric':<18} " + " ".join(f"{n:>{width + 8}}" for n in names)
    )
    first = results[names[0]].metrics
    headline = {"auroc_macro", "balanced_accuracy", "c_index"}
    for task, inps in first.items():
        for inp, ms in inps.items():
            for m in ms:
                if m not in headline:
                    continue
                cells = [format_mean_sd(results[n].metrics[task][inp][m]) for n in names]
                print(
                    f"{task:<16} {inp:<6} {m:<18} " + " ".join(f"{c:>{width + 8}}" for c in cells)
                )


def run(args: argparse.Namespace) -> int:
    from .._progress import TqdmProgress
    from ..errors import ConfigError
    from ..evaluation.evaluate import EvaluationSettings, evaluate_runs, save_evaluation

    runs = [Path(r) for r in args.runs]
    standalone = [
        f"--{n}" for n in ("cohort", "expression", "features") if getattr(args, n) is not None
    ]
    if not runs:
        if not args.raw_inputs:
            raise ConfigError(
                "give at least one pretraining RUN folder, or --raw-inputs with --cohort to "
                "evaluate a cohort's raw inputs."
            )
        if args.cohort is None or (args.expression is None and args.features is None):
            raise ConfigError(
                "--raw-inputs without a RUN needs --cohort and --expression and/or --features."
            )
        if args.out is None:
            raise ConfigError("--raw-inputs without a RUN: pass --out FOLDER.")
    elif standalone:
        raise ConfigError(
            f"{', '.join(standalone)} only apply without a RUN; with runs the raw inputs are "
            "read from each run's config.yaml."
        )
    if args.out is None:
        if len(runs) > 1 or args.raw_inputs:
            raise ConfigError("several rows are compared into one report: pass --out FOLDER.")
        out = runs[0] / "evaluation"
    else:
        out = Path(args.out)
    if args.names is not None and len(args.names) != len(runs):
        raise ConfigError(
            f"--name was given {len(args.names)} times for {len(runs)} runs; give one per run."
        )
    if args.max_tiles is not None and args.max_tiles < 1:
        raise ConfigError("--max-tiles must be >= 1.")
    if args.folds < 2:
        raise ConfigError("--folds must be >= 2 (test folds are needed for an honest evaluation).")
    settings = EvaluationSettings(
        inputs=tuple(args.inputs),
        k_shots=tuple(args.k_shots),
        n_draws=args.draws,
        seed=args.seed,
        probe_C=args.probe_c,
        cox_penalizer=args.cox_penalizer,
        cox_l1_ratio=args.cox_l1_ratio,
        cox_max_components=None if args.cox_components == 0 else args.cox_components,
        hazard_weight_decay=args.hazard_weight_decay,
    )
    with TqdmProgress() as bar:
        if runs:
            results = evaluate_runs(
                runs,
                out,
                names=args.names,
                settings=settings,
                device=args.device,
                precision=args.precision,
                max_tiles=args.max_tiles,
                write_report_md=not args.no_report,
                raw_inputs=args.raw_inputs,
                progress=bar,
            )
        else:
            from ..evaluation.raw import RAW_NAME, evaluate_raw
            from ..expression import read_expression

            res = evaluate_raw(
                None,
                settings,
                cohort=args.cohort,
                expression=read_expression(args.expression, nan_policy=args.nan_policy or "error")
                if args.expression is not None
                else False,
                features_dir=args.features if args.features is not None else False,
                folds=args.folds,
                seed=args.split_seed,
                max_tiles=args.max_tiles,
                progress=bar,
            )
            results = {RAW_NAME: res}
            save_evaluation(out, results, write_report_md=not args.no_report)
    _print_summary(results)
    print(f"wrote {out / 'metrics.json'}" + ("" if args.no_report else f" and {out / 'report.md'}"))
    return 0
