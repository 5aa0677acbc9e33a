"""``mirror-train synth``: write a synthetic cohort (slides, masks, expression, survival)."""

from __future__ import annotations

import argparse
import os

from ..synth import DEFAULT_SUBTYPES


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder")
    parser.add_argument(
        "--patients", type=int, default=40, metavar="N", help="number of patients (default 40)"
    )
    parser.add_argument("--seed", type=int, default=0, metavar="S", help="random seed (default 0)")
    parser.add_argument(
        "--slide-px",
        type=int,
        default=None,
        metavar="PX",
        help="slide side in level-0 pixels, multiple of 256 (default 4096 = 2 mm at 0.5 µm/px; "
        "1024 with --tiny)",
    )
    parser.add_argument(
        "--genes",
        type=int,
        default=None,
        metavar="G",
        help="number of expression genes (default 500; 60 with --tiny)",
    )
    parser.add_argument(
        "--subtypes",
        default=",".join(DEFAULT_SUBTYPES),
        metavar="A,B[,C]",
        help="2 or 3 subtype names; morphologies glandular, solid, discohesive in "
        "that order (default %(default)s)",
    )
    parser.add_argument("--slides-per-patient", type=int, default=1, metavar="K")
    parser.add_argument("--mpp", type=float, default=0.5, help="level-0 µm per pixel (default 0.5)")
    parser.add_argument(
        "--mask-downsample",
        type=int,
        default=16,
        metavar="D",
        help="level-0 pixels per tumour-mask pixel (default 16)",
    )
    parser.add_argument(
        "--tiny",
        action="store_true",
        help="test-size cohort: 1024-px slides and 60 genes unless given otherwise",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        metavar="W",
        help="processes rendering slides (default: CPU count, at most 8)",
    )
    parser.add_argument(
        "--tables-only",
        action="store_true",
        help="write cohort.csv, expression.csv and the truth tables only (no slides)",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="write into a folder that already holds a cohort"
    )


def run(args: argparse.Namespace) -> int:
    from .._progress import TqdmProgress
    from ..synth import synthesize_cohort

    slide_px = args.slide_px or (1024 if args.tiny else 4096)
    n_genes = args.genes or (60 if args.tiny else 500)
    workers = args.workers or max(1, min(8, os.cpu_count() or 1))
    subtypes = tuple(s.strip() for s in args.subtypes.split(",") if s.strip())
    with TqdmProgress(unit="slide") as bar:
        summary = synthesize_cohort(
            args.out,
            n_patients=args.patients,
            seed=args.seed,
            slide_px=slide_px,
            n_genes=n_genes,
            subtypes=subtypes,
            slides_per_patient=args.slides_per_patient,
            mpp=args.mpp,
            mask_downsample=args.mask_downsample,
            workers=workers,
            write_slides=not args.tables_only,
            overwrite=args.overwrite,
            progress=bar,
        )
    n_events = int(summary.event.sum())
    print(
        f"wrote {summary.n_patients} patients / {summary.n_slides} slides "
        f"({slide_px} px at {args.mpp} µm/px, levels "
        f"{', '.join(f'{w}x{h}' for w, h in summary.level_dimensions)}) and "
        f"{summary.config.n_genes} genes to {summary.out_dir} in {summary.seconds:.1f} s"
    )
    print(f"  cohort:     {summary.cohort_csv}  ({n_events} events)")
    print(f"  expression: {summary.expression_csv}")
    print(f"  curated:    {summary.curated_genes}")
    print(f"  truth:      {summary.truth_csv}  (latent risk, tumour fraction, grade)")
    return 0
