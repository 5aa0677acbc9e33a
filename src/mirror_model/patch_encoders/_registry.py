"""The patch-encoder registry (like timm's ``register_model`` / ``create_model``).

Each encoder file registers its factory with :func:`register_patch_encoder`; a factory is
called as ``factory(name, options)`` with the caller's :class:`EncoderOptions` and returns a
:class:`~._spec.PatchEncoder`. A *prefix* entry (``"timm:"``, ``"torchscript:"``) receives
the text after the prefix as ``name``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["EncoderOptions", "find_factory", "list_patch_encoders", "register_patch_encoder"]


@dataclass(frozen=True)
class EncoderOptions:
    """What :func:`~mirror_model.patch_encoders.create_patch_encoder` passes every factory.

    Attributes
    ----------
    weights : path-like, optional
        Local weights file (ViT / timm); encoders without weights reject one.
    allow_random : bool
        Accept a ViT without weights (random init; benchmarks only).
    input_px : int, optional
        Encoder input size in pixels (default: the encoder's own).
    mean, std : sequence of 3 floats, optional
        Input normalisation (default: the encoder's own, usually ImageNet's).
    """

    weights: str | os.PathLike[str] | None = None
    allow_random: bool = False
    input_px: int | None = None
    mean: Sequence[float] | None = None
    std: Sequence[float] | None = None


Factory = Callable[[str, EncoderOptions], Any]

_EXACT: dict[str, Factory] = {}
_PREFIX: dict[str, Factory] = {}
# names shown to users, in registration order (no aliases); name families after the names
_LISTED: list[str] = []
_LISTED_PREFIX: list[str] = []


def register_patch_encoder(
    name: str, *aliases: str, prefix: bool = False, listed_as: str | None = None
) -> Callable[[Factory], Factory]:
    """Decorator registering ``factory`` under ``name`` (and ``aliases``, case-insensitive).

    ``prefix=True`` registers a name family such as ``"timm:"``; ``listed_as`` is how
    :func:`list_patch_encoders` shows it (e.g. ``"timm:<model_name>"``).
    """

    def deco(factory: Factory) -> Factory:
        table = _PREFIX if prefix else _EXACT
        for key in (name, *aliases):
            if key.lower() in table:
                raise ValueError(f"patch encoder {key!r} is registered twice")
            table[key.lower()] = factory
        (_LISTED_PREFIX if prefix else _LISTED).append(listed_as or name)
        return factory

    return deco


def find_factory(name: str) -> tuple[Factory, str] | None:
    """``(factory, name to pass it)`` for a registered name or prefix form; None if unknown."""
    key = name.lower()
    if key in _EXACT:
        return _EXACT[key], key
    for pre, factory in _PREFIX.items():
        if key.startswith(pre):
            return factory, name[len(pre) :]
    return None


def list_patch_encoders() -> list[str]:
    """Names accepted by ``create_patch_encoder`` (prefix forms end with ``<...>``)."""
    return [*_LISTED, *_LISTED_PREFIX]
