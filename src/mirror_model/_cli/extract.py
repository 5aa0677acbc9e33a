"""``mirror-train extract``: tile the cohort's slides and write ``<slide_id>.h5`` feature files.

Resumable (slides with a valid file are skipped) and shardable: under ``torchrun
--nproc-per-node N mirror-train extract ...`` each rank takes every N-th slide.
"""

from __future__ import annotations

import argparse
import sys

from ._options import add_quiet_option, add_slide_options, progress_bar


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--cohort", required=True, help="cohort table (CSV: patient_id, slide_id, slide_path, ...)"
    )
    parser.add_argument("--out", required=True, help="output folder for <slide_id>.h5 files")
    parser.add_argument(
        "--encoder",
        default="stain-texture",
        help="patch encoder: stain-texture (default, no weights), uni, phikon, virchow, virchow2, uni2-h, "
        "vit_<size>_patch<p>_<px>, timm:<name>, torchscript:<file>",
    )
    parser.add_argument(
        "--weights",
        default=None,
        help="local weights file for ViT/timm encoders (.safetensors preferred)",
    )
    parser.add_argument(
        "--input-px", type=int, default=None, help="encoder input size (TorchScript encoders)"
    )
    for stat in ("mean", "std"):
        parser.add_argument(
            f"--{stat}",
            type=float,
            nargs=3,
            default=None,
            metavar=("R", "G", "B"),
            help=f"normalisation {stat} (TorchScript encoders; default ImageNet)",
        )
    parser.add_argument(
        "--target-mpp",
        type=float,
        default=0.5,
        help="µm per pixel of the tiles (default 0.5 ≈ 20x)",
    )
    parser.add_argument(
        "--tile-px", type=int, default=256, help="tile side in pixels at --target-mpp (default 256)"
    )
    parser.add_argument(
        "--tissue-threshold",
        type=float,
        default=0.25,
        help="minimum tissue fraction of a kept tile (default 0.25)",
    )
    parser.add_argument(
        "--num-workers",
        type=int,
        default=None,
        help="tile reader threads (default: CPUs - 1, max 4)",
    )
    add_slide_options(parser)
    parser.add_argument(
        "--overwrite", action="store_true", help="re-extract slides whose file exists"
    )
    parser.add_argument(
        "--stop-on-error",
        action="store_true",
        help="stop at the first failing slide (default: report failures at the end)",
    )
    parser.add_argument(
        "--allow-random-weights",
        action="store_true",
        help="allow a ViT without --weights (random features; benchmarking only)",
    )
    add_quiet_option(parser)


def run(args: argparse.Namespace) -> int:
    from ..errors import MirrorError
    from ..extract import extract_cohort

    # None / False are create_patch_encoder's own defaults
    encoder_kwargs = {
        "input_px": args.input_px,
        "mean": None if args.mean is None else tuple(args.mean),
        "std": None if args.std is None else tuple(args.std),
        "allow_random": args.allow_random_weights,
    }
    with progress_bar(args, unit="tile") as bar:
        result = extract_cohort(
            args.cohort,
            args.out,
            args.encoder,
            weights=args.weights,
            target_mpp=args.target_mpp,
            tile_px=args.tile_px,
            batch_size=args.batch_size,
            device=args.device,
            precision=args.precision,
            mpp=args.mpp,
            num_workers=args.num_workers,
            tissue_threshold=args.tissue_threshold,
            overwrite=args.overwrite,
            on_error="raise" if args.stop_on_error else "continue",
            encoder_kwargs=encoder_kwargs,
            progress=bar,
        )
    shard = f" (rank {result.rank}/{result.world_size})" if result.world_size > 1 else ""
    print(
        f"extract{shard}: {result.n_extracted} extracted, {result.n_skipped} already done, "
        f"{result.n_failed} failed -> {result.out_dir} [encoder {result.encoder}]"
    )
    if result.n_failed:
        for r in result.failed:
            print(f"  failed {r.slide_id}: {r.error}", file=sys.stderr)
        raise MirrorError(
            f"{result.n_failed} slide(s) failed; fix them and rerun (finished slides are kept)."
        )
    return 0
