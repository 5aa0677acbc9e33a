"""npe2 reader: whole-slide images as lazy multiscale RGB layers in µm.

Which reader opens a file is napari's decision: every reader whose ``filename_patterns`` match
is a candidate (napari's built-in reader matches ``*.svs``, ``*.ndpi``, ``*.tif``, … too), and
with more than one candidate napari asks "Choose reader" unless the user's setting
``plugins.extension2reader`` names one for that pattern. A plugin cannot declare a priority
(npe2 reader contributions have no such field; napari
``components/viewer_model.py::_open_or_raise_error`` and ``_qt/dialogs/qt_reader_dialog.py``).
So the panel offers to set that preference once for the slide-only formats
(:func:`set_slide_reader_preference`), and the README says how to do it in napari's
Preferences.

Slide-only formats (``.svs``, ``.ndpi``, ``.mrxs``, …) are always claimed: when such a file
cannot be opened, the user gets this plugin's own message (which names the file and what to
do) as a notification instead of napari's generic "refused the file" and a traceback. Generic
TIFFs are claimed only when they open as a slide with a resolution, so ordinary microscopy
TIFFs stay with napari's reader.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from mirror_model.ids import SLIDE_SUFFIXES, has_slide_suffix

__all__ = [
    "PLUGIN_NAME",
    "SLIDE_ONLY_SUFFIXES",
    "SLIDE_SUFFIXES",
    "can_read",
    "napari_get_reader",
    "read_slides",
    "slide_reader_preference",
    "set_slide_reader_preference",
]

log = logging.getLogger(__name__)

#: The npe2 plugin name (napari.yaml ``name``).
PLUGIN_NAME = "napari-mirror"
#: Endings only whole-slide images use (not TIFF): claimed always, so errors are ours to explain.
SLIDE_ONLY_SUFFIXES = tuple(s for s in SLIDE_SUFFIXES if not s.endswith((".tif", ".tiff")))

PathLike = str | os.PathLike[str]


def can_read(path: PathLike) -> bool:
    """True when ``path`` has a slide suffix and :func:`mirror_model.slide.open_slide` opens it
    with a known resolution (so a plain microscopy TIFF without one goes to napari's own reader)."""
    if not has_slide_suffix(path) or not os.path.isfile(path):
        return False
    try:
        from mirror_model.slide import open_slide
    except ImportError:  # pragma: no cover - broken install
        return False
    try:
        with open_slide(path) as slide:
            return float(slide.mpp) > 0 and len(slide.level_dimensions) > 0
    except Exception as exc:  # any failure means "not ours", never a crash in napari
        log.debug("napari-mirror does not open %s: %r", path, exc)
        return False


def _claims(path: PathLike) -> bool:
    if os.fspath(path).lower().endswith(SLIDE_ONLY_SUFFIXES):
        return os.path.isfile(path)
    return can_read(path)


def napari_get_reader(path: PathLike | Sequence[PathLike]) -> Callable[..., list[Any]] | None:
    """Return :func:`read_slides` when every path is ours: a slide-only format, or a TIFF that
    opens as a slide with a resolution. Else None (napari's other readers get the file)."""
    paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    if not paths or not all(_claims(p) for p in paths):
        return None
    return read_slides


def read_slides(path: PathLike | Sequence[PathLike]) -> list[Any]:
    """Layer data (one lazy multiscale RGB image per slide), scaled in µm from the file's mpp.

    A file that cannot be opened is reported as a napari notification with the reason and what
    to do (e.g. set µm per pixel in the MIRROR panel); the others still open. When none opens,
    the file is claimed with napari's "nothing to add" value so napari adds no generic error.
    """
    from mirror_model.errors import MirrorError, SlideResolutionError

    from ._layers import slide_layer_data

    paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    out = []
    for p in paths:
        try:
            out.append(slide_layer_data(Path(p)))
        except MirrorError as exc:
            hint = (
                " Open it from the MIRROR panel (Plugins > MIRROR) after setting its µm/px."
                if isinstance(exc, SlideResolutionError)
                else ""
            )
            _notify_error(f"MIRROR could not open {Path(p).name}: {exc}{hint}")
        except Exception as exc:  # a reader must never hand napari a traceback
            log.debug("reading %s failed", p, exc_info=True)
            _notify_error(f"MIRROR could not open {Path(p).name}: unexpected {type(exc).__name__}: {exc}")
    return out or [(None,)]


def _notify_error(message: str) -> None:
    try:
        from napari.utils.notifications import show_error
    except ImportError:  # pragma: no cover - napari is a dependency
        log.error(message)
        return
    show_error(message)


# ------------------------------------------------------------------------- preference
def _patterns() -> list[str]:
    return [f"*{s}" for s in SLIDE_ONLY_SUFFIXES]


def slide_reader_preference() -> dict[str, str | None]:
    """napari's reader preference (``plugins.extension2reader``) for each slide-only pattern."""
    from napari.settings import get_settings

    prefs = dict(get_settings().plugins.extension2reader)
    return {pat: prefs.get(pat) for pat in _patterns()}


def set_slide_reader_preference(enabled: bool = True) -> list[str]:
    """Make napari open the slide-only formats with this plugin without asking (``enabled``),
    or remove that choice again; patterns the user gave to another reader are left alone.

    The same setting as ticking "remember this choice" in napari's "Choose reader" dialog
    (Preferences > Plugins lists it). Returns the patterns that changed.
    """
    from napari.settings import get_settings

    settings = get_settings().plugins
    prefs = dict(settings.extension2reader)
    changed = []
    for pat in _patterns():
        if enabled and prefs.get(pat) is None:
            prefs[pat] = PLUGIN_NAME
            changed.append(pat)
        elif not enabled and prefs.get(pat) == PLUGIN_NAME:
            del prefs[pat]
            changed.append(pat)
    if changed:
        settings.extension2reader = prefs
    return changed
