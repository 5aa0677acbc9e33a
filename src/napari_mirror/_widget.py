"""npe2 widget entry point: the MIRROR dock widget (Qt code lives in ``_qt``)."""

from __future__ import annotations

from ._qt._main import MirrorWidget

__all__ = ["MirrorWidget"]
