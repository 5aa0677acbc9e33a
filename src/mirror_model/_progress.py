"""Progress and cancellation protocol shared by the CLI (tqdm) and the plugin (napari).

Long-running functions take ``progress: ProgressFn | None`` and ``should_stop: StopFn | None``.
They call ``progress(done, total, stage)`` as work advances and :func:`check_cancel` between
units of work, which raises :class:`~mirror_model.errors.Cancelled`.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from .errors import Cancelled

__all__ = ["ProgressFn", "StopFn", "TqdmProgress", "check_cancel", "report"]

ProgressFn = Callable[[int, int, str], None]
StopFn = Callable[[], bool]


def check_cancel(should_stop: StopFn | None, what: str = "work") -> None:
    """Raise :class:`Cancelled` if ``should_stop()`` says so."""
    if should_stop is not None and should_stop():
        raise Cancelled(f"{what} was cancelled.")


def report(progress: ProgressFn | None, done: int, total: int, stage: str) -> None:
    if progress is not None:
        progress(done, total, stage)


class TqdmProgress:
    """A :data:`ProgressFn` drawing one tqdm bar per stage (on stderr)."""

    def __init__(self, disable: bool | None = None, **tqdm_kwargs: Any) -> None:
        self._bar = None
        self._stage: str | None = None
        self._disable = (not sys.stderr.isatty()) if disable is None else disable
        self._kw = tqdm_kwargs

    def __call__(self, done: int, total: int, stage: str) -> None:
        from tqdm.auto import tqdm

        if stage != self._stage or self._bar is None:
            self.close()
            self._bar = tqdm(total=total, desc=stage, disable=self._disable, **self._kw)
            self._stage = stage
        if self._bar.total != total:
            self._bar.total = total
        self._bar.n = done
        self._bar.refresh()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> TqdmProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
