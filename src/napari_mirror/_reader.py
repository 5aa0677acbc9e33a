"""npe2 reader: whole-slide images as lazy multiscale RGB layers in µm."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from mirror_model.ids import SLIDE_SUFFIXES, has_slide_suffix

__all__ = ["SLIDE_SUFFIXES", "can_read", "napari_get_reader", "read_slides"]

log = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]


def can_read(path: PathLike) -> bool:
    """True when ``path`` has a slide suffix and :func:`mirror_model.slide.open_slide` opens it
    with a known resolution (so a plain microscopy TIFF without one goes to napari's own reader)."""
    if not has_slide_suffix(path) or not os.path.isfile(path):
        return False
    try:
        from mirror_model.errors import MirrorError
        from mirror_model.slide import open_slide
    except ImportError:  # pragma: no cover - broken install
        return False
    try:
        with open_slide(path) as slide:
            return float(slide.mpp) > 0 and len(slide.level_dimensions) > 0
    except MirrorError as exc:
        log.debug("napari-mirror does not claim %s: %s", path, exc)
        return False
    except Exception as exc:  # any other failure means "not ours", never a crash in napari
        log.debug("napari-mirror does not claim %s: %r", path, exc)
        return False


def napari_get_reader(path: PathLike | Sequence[PathLike]) -> Callable[..., list[Any]] | None:
    """Return :func:`read_slides` when every path is a slide this plugin can open, else None."""
    paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    if not paths or not all(can_read(p) for p in paths):
        return None
    return read_slides


def read_slides(path: PathLike | Sequence[PathLike]) -> list[Any]:
    """Layer data (one lazy multiscale RGB image per slide), scaled in µm from the file's mpp."""
    from ._layers import slide_layer_data

    paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    return [slide_layer_data(Path(p)) for p in paths]
