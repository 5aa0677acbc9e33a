"""``mirror-train heatmaps``: how far a run's per-tile maps can be trusted.

Scores every map (subtype, risk, attention) and two baselines (feature norm, random) on the
run's held-out slides against region masks (AUROC, mass on the region) and without masks by
the deletion test; writes ``DIR/heatmaps.json``, ``DIR/heatmap_slides.json`` and
``DIR/report.md`` with example slides. See :mod:`mirror_model.evaluation.heatmaps`.

Each fold's bundle is exported to ``DIR/bundles/fold_<k>.mirror`` and reused when the command
runs again on the same run (or when it was exported there beforehand with
``mirror-train export --run RUN --fold k --out DIR/bundles/fold_<k>.mirror``).
"""

from __future__ import annotations

import argparse
import sys


def configure(parser: argparse.ArgumentParser) -> None:
    from ._options import add_device_option, add_quiet_option

    parser.add_argument("--run", required=True, help="a `mirror-train pretrain` output folder")
    parser.add_argument("--cohort", required=True, help="the cohort table (CSV) of the run")
    parser.add_argument(
        "--masks",
        required=True,
        help="folder with one mask per slide, <slide_id>.png or .tif (non-zero = region), at "
        "any downsample of level 0",
    )
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument(
        "--features", default=None, help="feature folder (default: the one the run used)"
    )
    parser.add_argument(
        "--expression",
        default=None,
        help="expression table: the maps then explain the slide + expression heads "
        "(default: slide-only heads)",
    )
    parser.add_argument(
        "--threshold",
        type=float,
        default=0.5,
        help="a tile is in the region when at least this fraction of it is (default 0.5)",
    )
    parser.add_argument(
        "--fraction", type=float, default=0.1, help="deletion test: fraction of tiles removed"
    )
    parser.add_argument(
        "--draws", type=int, default=10, help="deletion test: random draws per slide (default 10)"
    )
    parser.add_argument(
        "--skip-missing",
        action="store_true",
        help="score only the slides that have a mask (default: a missing mask is an error)",
    )
    parser.add_argument("--examples", type=int, default=3, help="example slides in the report")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random baseline/draws")
    parser.add_argument(
        "--methods",
        default=None,
        help="comma-separated map methods to compare (tile-alone, gradient); the first gives "
        "the plain map names, the others <map>@<method> (default: the method predict uses)",
    )
    add_device_option(parser, default="cpu")
    add_quiet_option(parser)


def run(args: argparse.Namespace) -> int:
    from ..evaluation.heatmaps import (
        evaluate_heatmaps,
        summary_table,
        write_heatmap_report,
        write_heatmap_results,
    )
    from ._options import progress_bar

    with progress_bar(args) as bar:
        result = evaluate_heatmaps(
            args.run,
            args.cohort,
            args.masks,
            args.out,
            features_dir=args.features,
            expression=args.expression,
            threshold=args.threshold,
            fraction=args.fraction,
            draws=args.draws,
            skip_missing=args.skip_missing,
            seed=args.seed,
            methods=[m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None,
            device=args.device,
            progress=bar,
        )
    path = write_heatmap_results(args.out, result)
    report = write_heatmap_report(args.out, result, n_examples=args.examples, device=args.device)
    print(f"{result.settings['n_slides']} held-out slides, folds {result.settings['folds']}")
    print(summary_table(result))
    print(f"wrote {path} and {report}", file=sys.stderr)
    return 0
