"""Input kinds of the heads: which embeddings a subtype or survival head reads.

One place for the fact, used by evaluation, export, bundles and inference:

- ``"slide"`` — the slide embedding alone;
- ``"rna"`` — the expression embedding alone;
- ``"both"`` — the two concatenated, slide first (``[slide | rna]``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["INPUT_KINDS", "INPUT_KIND_WORDS", "input_kind", "input_matrix"]

#: Every input kind, in the order reports list them.
INPUT_KINDS: tuple[str, ...] = ("slide", "rna", "both")
#: Each kind in words, for messages and the panel.
INPUT_KIND_WORDS: dict[str, str] = {
    "slide": "slide only",
    "rna": "expression only",
    "both": "slide + expression",
}


def input_kind(modalities: Sequence[str]) -> str:
    """The input kind for the modalities present: ``("slide", "rna")`` → ``"both"``."""
    mods = set(modalities)
    if mods == {"slide", "rna"}:
        return "both"
    if len(mods) == 1 and next(iter(mods)) in ("slide", "rna"):
        return next(iter(mods))
    raise ValueError(f"modalities must be 'slide' and/or 'rna'; got {list(modalities)}")


def input_matrix(slide: np.ndarray | None, rna: np.ndarray | None, kind: str) -> np.ndarray | None:
    """The head input of ``kind`` from per-patient embeddings ([P, D] each, or None).

    None when a modality the kind needs is missing. ``"both"`` is ``[slide | rna]``.
    """
    if kind == "slide":
        return slide
    if kind == "rna":
        return rna
    if kind != "both":
        raise ValueError(f"unknown input kind {kind!r}; use one of {INPUT_KINDS}")
    if slide is None or rna is None:
        return None
    return np.concatenate([slide, rna], axis=1)
