"""Options shared by several ``mirror-train`` commands, each defined once.

Defaults, and why they differ between commands:

==========  ==========================  =================================================
command     ``--device``                ``--precision``
==========  ==========================  =================================================
extract     auto                        auto (bf16 where the hardware is fast at it)
predict     auto                        auto
pretrain    the config's (auto)         the config's (auto)
evaluate    auto                        fp32: held-out numbers in full precision
export      cpu: embeddings, and so     (always fp32)
            the bundle's heads, are the
            same on every machine
demo        auto                        (DemoSettings.precision, fp32)
==========  ==========================  =================================================

``auto`` device = CUDA when present, else CPU. Precision is never fp16 (see ``_device``).
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "PRECISIONS",
    "add_device_option",
    "add_nan_policy_option",
    "add_precision_option",
    "add_quiet_option",
    "add_slide_options",
    "progress_bar",
]

#: Accepted ``--precision`` values (``auto`` resolves to bf16 or fp32 per device).
PRECISIONS: tuple[str, ...] = ("auto", "fp32", "bf16")


def _add(parser: Any, flag: str, default: str | None, help_text: str, **kw: Any) -> None:
    shown = "the training config's, auto" if default is None else default
    parser.add_argument(flag, default=default, help=f"{help_text} (default {shown})", **kw)


def add_device_option(parser: Any, default: str | None = "auto", purpose: str = "") -> None:
    """``--device`` (``auto``, ``cpu``, ``cuda``, ``cuda:N``); ``default=None`` = the config's."""
    what = f"{purpose}: " if purpose else ""
    _add(parser, "--device", default, f"{what}auto, cpu, cuda, cuda:N")


def add_precision_option(parser: Any, default: str | None = "auto", purpose: str = "") -> None:
    """``--precision`` (:data:`PRECISIONS`); ``default=None`` = the training config's."""
    what = f"{purpose}; " if purpose else ""
    rule = "auto = bf16 where the hardware is fast at it, else fp32"
    _add(parser, "--precision", default, what + rule, choices=list(PRECISIONS))


def add_nan_policy_option(parser: Any, default: str | None = "error") -> None:
    """``--nan-policy`` for every command that reads an expression table
    (:data:`mirror_model.expression.NAN_POLICIES`); ``default=None`` = the run's own."""
    from ..expression import NAN_POLICIES

    parser.add_argument(
        "--nan-policy",
        default=default,
        choices=list(NAN_POLICIES),
        help="missing expression values: error (name them), median (each gene's median over "
        "the training patients; stored with the model for prediction), drop-genes, or zero "
        "(an extreme value on a log scale) (default "
        + ("the run's own, else error" if default is None else default)
        + ")",
    )


def add_slide_options(parser: Any) -> None:
    """Reading slides and running the patch encoder over their tiles (``extract``,
    ``predict``): ``--mpp``, ``--batch-size``, ``--device``, ``--precision``."""
    parser.add_argument(
        "--mpp",
        type=float,
        default=None,
        help="level-0 µm/px for slides without resolution metadata",
    )
    parser.add_argument(
        "--batch-size", type=int, default=64, help="tiles per encoder call (default 64)"
    )
    add_device_option(parser)
    add_precision_option(parser)


def add_quiet_option(parser: Any, help_text: str = "no progress bar") -> None:
    """``--quiet``; the command then draws its bar with :func:`progress_bar`."""
    parser.add_argument("--quiet", action="store_true", help=help_text)


def progress_bar(args: Any, **tqdm_kwargs: Any) -> Any:
    """The command's :class:`~mirror_model._progress.TqdmProgress`: none with ``--quiet``,
    else drawn when stderr is a terminal."""
    from .._progress import TqdmProgress

    return TqdmProgress(disable=True if args.quiet else None, **tqdm_kwargs)
