"""``mirror-train predict``: run a model bundle on one slide and/or expression profile.

Prints the subtype probabilities, the risk score with its percentile and group against the
bundle's reference cohort, and the top tiles of every per-tile map; writes the full JSON report
(``--out``), the per-tile table of all maps (``--tiles-csv``) and the tiles with every map as
QuPath measurements (``--geojson``). Uses
:func:`mirror_model.inference.predict`, the same API as the napari plugin.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from ._options import add_nan_policy_option, add_quiet_option, add_slide_options, progress_bar


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--bundle",
        default=None,
        help="model bundle (.mirror file or folder; default: the shipped demo bundle)",
    )
    parser.add_argument(
        "--slide", default=None, help="whole-slide image (svs, ndpi, mrxs, tiff, ome.tiff, ...)"
    )
    parser.add_argument(
        "--features",
        default=None,
        help="precomputed feature file (.h5) of the slide, instead of extracting",
    )
    parser.add_argument("--expression", default=None, help="expression table (CSV/TSV/parquet)")
    parser.add_argument(
        "--sample-id",
        default=None,
        help="row of the expression table (default: the only row, or the one matching the slide name)",
    )
    add_nan_policy_option(parser)
    add_slide_options(parser)
    parser.add_argument(
        "--encoder-weights",
        default=None,
        help="weights file of the bundle's patch encoder when it needs one (e.g. UNI)",
    )
    parser.add_argument("--out", default=None, help="write the JSON report here")
    parser.add_argument(
        "--tiles-csv",
        default=None,
        help="write the per-tile table here: coordinates and every map (value, rank, percentile)",
    )
    parser.add_argument(
        "--geojson",
        default=None,
        help="write the tiles as QuPath GeoJSON here, every map as a measurement",
    )
    parser.add_argument(
        "--include-tiles",
        action="store_true",
        help="also put every tile's coordinates and map values into the JSON report",
    )
    add_quiet_option(parser)


def _summary(pred: Any) -> str:
    lines = [f"inputs: {' + '.join(pred.modalities)} (heads: {pred.input_kind})"]
    if pred.sample_id:
        lines.append(f"expression sample: {pred.sample_id} ({pred.sample_match})")
    if pred.subtype_probabilities:
        probs = ", ".join(f"{c} {p:.3f}" for c, p in pred.subtype_probabilities.items())
        lines.append(f"subtype: {pred.predicted_subtype}  ({probs})")
    if pred.risk_score is not None:
        pct = "n/a" if pred.risk_percentile is None else f"{pred.risk_percentile:.0f}th percentile"
        lines.append(
            f"risk score: {pred.risk_score:.3f} (higher = worse prognosis), {pct} of the "
            f"reference cohort, group {pred.risk_group or 'n/a'} (cut-off {pred.risk_cutoff:.3f})"
            if pred.risk_cutoff is not None
            else f"risk score: {pred.risk_score:.3f}, {pct}"
        )
    if pred.maps:
        lines.append(
            f"tiles: {pred.n_tiles} of {pred.tile_size_level0} level-0 px "
            f"({pred.tile_px} px at {pred.target_mpp:g} µm/px, encoder {pred.patch_encoder})"
        )
        for name, m in pred.maps.items():
            tops = ", ".join(
                f"#{i} ({pred.coords_level0[i, 0]}, {pred.coords_level0[i, 1]}) {m.values[i]:.3g}"
                for i in pred.top_tiles(3, name)
            )
            lines.append(f"  map {name!r} ({m.label}): top tiles {tops}")
    lines.append(
        f"time: {pred.timings_s.get('total', 0):.2f} s on {pred.device} ({pred.precision})"
    )
    lines += [f"note: {w}" for w in pred.warnings]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from .._io import atomic_write_text
    from ..bundle import load_bundle
    from ..inference import predict

    bundle = load_bundle(args.bundle)
    with progress_bar(args) as bar:
        pred = predict(
            bundle,
            slide_path=args.slide,
            features_path=args.features,
            expression_path=args.expression,
            sample_id=args.sample_id,
            device=args.device,
            precision=args.precision,
            mpp=args.mpp,
            progress=bar,
            patch_encoder_weights=args.encoder_weights,
            batch_size=args.batch_size,
            nan_policy=args.nan_policy,
        )
    print(_summary(pred))
    if args.out:
        doc = pred.to_dict(include_tiles=args.include_tiles)
        atomic_write_text(args.out, json.dumps(doc, indent=2) + "\n")
        print(f"wrote {args.out}", file=sys.stderr)
    for path, write in ((args.tiles_csv, pred.write_tiles_csv), (args.geojson, pred.write_geojson)):
        if not path:
            continue
        if not pred.maps:
            print(f"no slide input: no tiles to write to {path}", file=sys.stderr)
        else:
            write(path)
            print(f"wrote {path}", file=sys.stderr)
    return 0
