"""``mirror-train``: the command line of mirror_model.

Each subcommand lives in ``mirror_model._cli.<module>`` with two functions,
``configure(parser)`` and ``run(args) -> int``; only the chosen one is imported,
so ``mirror-train synth`` does not pay for importing torch models it does not use.
User errors (:class:`~mirror_model.errors.MirrorError`) print one clear message and
exit with status 2 — never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# name -> (module under mirror_model._cli, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "synth": ("synth", "generate a synthetic cohort (slides, masks, expression, survival)"),
    "extract": ("extract", "tile slides and write per-slide feature files (<slide_id>.h5)"),
    "select-genes": ("select_genes", "select genes by RFECV on training patients only"),
    "pretrain": ("pretrain", "pretrain MIRROR (or a preset) with patient-level folds"),
    "evaluate": ("evaluate", "evaluate frozen encoders: subtyping, survival, report"),
    "export": ("export", "export a trained run as a model bundle (.mirror)"),
    "predict": ("predict", "run a model bundle on one slide and/or expression profile"),
    "heatmaps": ("heatmaps", "score a run's per-tile maps on held-out slides vs region masks"),
    "demo": ("demo", "end-to-end demo: synth -> extract -> pretrain -> evaluate -> export"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mirror-train",
        description="MIRROR: multi-modal pretraining over whole-slide images and transcriptomics.",
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"mirror-train {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        if command == name:
            importlib.import_module(f"mirror_model._cli.{module}").configure(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    if command is not None and command not in COMMANDS:
        command = None
    parser = build_parser(command)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 1
    from .errors import MirrorError

    module = importlib.import_module(f"mirror_model._cli.{COMMANDS[args.command][0]}")
    try:
        return int(module.run(args) or 0)
    except MirrorError as exc:
        print(f"mirror-train {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            f"mirror-train {args.command}: interrupted; completed work was kept.", file=sys.stderr
        )
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
