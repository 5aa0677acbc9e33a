"""``mirror-train demo``: synthetic cohort → features → pretraining → evaluation → bundle.

Resumable: run it again on the same ``--out`` folder and finished stages are skipped.
``--install`` also copies the bundle to the package's embedded ``data/demo.mirror``
(what the plugin loads by default); ``--bundle-out FILE`` copies it anywhere.
"""

from __future__ import annotations

import argparse
import sys

from ._options import add_device_option, add_quiet_option, progress_bar


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="demo folder (created; re-run to resume)")
    parser.add_argument(
        "--size",
        choices=["full", "tiny"],
        default="full",
        help="full (default, a few minutes on a CPU) or tiny (seconds; numbers not meaningful)",
    )
    parser.add_argument(
        "--install",
        action="store_true",
        help="also write the bundle to the package's data/demo.mirror (rebuilds the shipped bundle)",
    )
    parser.add_argument("--bundle-out", default=None, help="also copy the bundle to this file")
    add_device_option(parser)
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="processes/threads for slide rendering and tile reading (default: CPUs, max 4)",
    )
    add_quiet_option(parser, "no progress bars")


def run(args: argparse.Namespace) -> int:
    from ..bundle import default_bundle_path
    from ..demo import DemoSettings, run_demo
    from ..errors import ConfigError

    if args.install and args.bundle_out:
        raise ConfigError("give either --install or --bundle-out, not both.")
    target = default_bundle_path() if args.install else args.bundle_out
    settings = DemoSettings.tiny() if args.size == "tiny" else DemoSettings.full()

    def log(msg: str) -> None:
        print(f"[demo] {msg}", file=sys.stderr, flush=True)

    with progress_bar(args) as bar:
        res = run_demo(
            args.out,
            settings,
            bundle_out=target,
            device=args.device,
            workers=args.workers,
            progress=bar,
            log=log,
        )
    h = res.headline

    def f(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.3f}"

    total = sum(res.metrics.get("demo", {}).get("stage_seconds", {}).values() or [0])
    print(
        f"held-out subtype macro AUROC {f(h['auroc_macro'])}, survival C-index "
        f"{f(h['c_index'])}, heatmap-vs-tumour AUROC {f(h['tumour_auroc'])}"
    )
    print(
        f"wrote {res.metrics_path}, {res.report_path}, {res.bundle_path} "
        f"(stages took {total:.0f} s in all)"
    )
    if res.installed_to:
        print(f"installed the bundle as {res.installed_to}")
    return 0
