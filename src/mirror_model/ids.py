"""Sample, patient and slide names: the matching rules, in one place.

TCGA barcodes
    ``TCGA-AB-1234-01A-11R-A123-07``: the first 12 characters name the patient
    (``TCGA-AB-1234``), characters 14–15 the sample type (01–09 tumour, 10–19 normal,
    20–29 control). Barcodes are compared upper-cased on the patient part, so an expression
    row of a sample matches its patient in a cohort table and its slide.
Slide names
    The file name without its slide extension, double extensions included
    (``B2.ome.tiff`` → ``B2``; feature files ``B2.h5`` → ``B2``).
Matching a slide to an expression row
    :func:`match_sample` (used by ``predict`` and the plugin).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "SLIDE_SUFFIXES",
    "files_by_slide",
    "has_slide_suffix",
    "is_tcga_barcode",
    "match_sample",
    "patient_key",
    "slide_stem",
    "tcga_sample_type",
]

#: Whole-slide file name endings the tools open (napari.yaml's reader patterns list the same,
#: in this order; OpenSlide formats plus OME-TIFF).
SLIDE_SUFFIXES: tuple[str, ...] = (
    ".svs",
    ".ndpi",
    ".tif",
    ".tiff",
    ".mrxs",
    ".scn",
    ".bif",
    ".vms",
    ".vmu",
    ".svslide",
    ".ome.tif",
    ".ome.tiff",
)
# Also stripped from a name before matching: feature files and plain images of a slide.
_OTHER_SUFFIXES = (".h5", ".pt", ".pth", ".png", ".jpg", ".jpeg")
# longest first, so ".ome.tif" is removed whole and not as ".tif"
_STEM_SUFFIXES = tuple(sorted(SLIDE_SUFFIXES + _OTHER_SUFFIXES, key=len, reverse=True))

_TCGA_RE = re.compile(r"^TCGA-[A-Z0-9]{2}-[A-Z0-9]{4}", re.IGNORECASE)
_SEPARATORS = "_-. "


def is_tcga_barcode(sample_id: str) -> bool:
    """True when the ID starts like a TCGA barcode (``TCGA-XX-XXXX``, any case)."""
    return bool(_TCGA_RE.match(str(sample_id)))


def patient_key(sample_id: str) -> str:
    """The key a sample ID is matched on: first 12 characters (upper case) of a TCGA barcode,
    the stripped ID otherwise."""
    s = str(sample_id).strip()
    return s[:12].upper() if _TCGA_RE.match(s) else s


def tcga_sample_type(sample_id: str) -> int | None:
    """Two-digit TCGA sample type (01 primary tumour … 10–19 normal), None when absent."""
    s = str(sample_id).strip()
    if _TCGA_RE.match(s) and len(s) >= 15 and s[12] == "-" and s[13:15].isdigit():
        return int(s[13:15])
    return None


def has_slide_suffix(path: str | os.PathLike[str]) -> bool:
    """True when the file name ends with one of :data:`SLIDE_SUFFIXES` (any case)."""
    return os.fspath(path).lower().endswith(SLIDE_SUFFIXES)


def slide_stem(path: str | os.PathLike[str]) -> str:
    """File name of a slide without its (possibly double) extension (``a.ome.tif`` → ``a``)."""
    name = Path(path).name
    low = name.lower()
    for suf in _STEM_SUFFIXES:
        if low.endswith(suf) and len(name) > len(suf):
            return name[: -len(suf)]
    return Path(name).stem


def match_sample(table: Any, slide_path: str | os.PathLike[str] | None) -> str | None:
    """The expression row (sample ID) that belongs to a slide, or None when unclear.

    Rules, in order: a table with one row → that row; a sample ID equal to the slide's file
    name (without extension) → it; TCGA barcodes → the samples sharing the slide's first 12
    characters (patient), preferring the slide's own sample type, then a tumour sample
    (type 01–09) when several; otherwise the longest sample ID that is a prefix of the file
    name followed by a separator (``P007`` for ``P007_HE.svs``) or that contains the file name
    followed by one. Ambiguous or no match → None (the caller asks the user).

    Parameters
    ----------
    table : ExpressionTable or a sequence of sample IDs.
    slide_path : the slide (or its feature file); None → only the one-row rule applies.
    """
    ids = [str(s) for s in (table.sample_ids if hasattr(table, "sample_ids") else table)]
    if len(ids) == 1:
        return ids[0]
    if not ids or slide_path is None:
        return None
    stem = slide_stem(slide_path)
    if stem in ids:
        return stem
    low = {s.lower(): s for s in ids}
    if stem.lower() in low and sum(s.lower() == stem.lower() for s in ids) == 1:
        return low[stem.lower()]
    if is_tcga_barcode(stem):
        return _match_tcga(stem, ids)
    return _match_prefix(stem, ids)


def _match_tcga(stem: str, ids: Sequence[str]) -> str | None:
    key = stem[:12].upper()
    cands = [s for s in ids if s[:12].upper() == key]
    if len(cands) > 1:
        # the slide's own sample type, when its barcode has one, decides first
        own = [s for s in cands if len(stem) >= 15 and s[:15].upper() == stem[:15].upper()]
        tumour = [s for s in cands if (t := tcga_sample_type(s)) is not None and t < 10]
        cands = own if len(own) == 1 else tumour
    return cands[0] if len(cands) == 1 else None


def _match_prefix(stem: str, ids: Sequence[str]) -> str | None:
    pref = [
        s for s in ids if len(s) < len(stem) and stem.startswith(s) and stem[len(s)] in _SEPARATORS
    ]
    if pref:
        best = max(len(s) for s in pref)
        top = [s for s in pref if len(s) == best]
        return top[0] if len(top) == 1 else None
    cont = [
        s for s in ids if len(stem) < len(s) and s.startswith(stem) and s[len(stem)] in _SEPARATORS
    ]
    return cont[0] if len(cont) == 1 else None


def files_by_slide(
    folder: str | os.PathLike[str], slide_ids: Sequence[str], suffixes: Sequence[str]
) -> tuple[dict[str, Path], list[str]]:
    """``folder/<slide_id><suffix>`` for each slide (the first suffix that exists), and the
    slide IDs that have none, in input order (feature files, region masks)."""
    d = Path(folder)
    found: dict[str, Path] = {}
    missing: list[str] = []
    for sid in slide_ids:
        for suf in suffixes:
            p = d / f"{sid}{suf}"
            if p.is_file():
                found[sid] = p
                break
        else:
            missing.append(sid)
    return found, missing
