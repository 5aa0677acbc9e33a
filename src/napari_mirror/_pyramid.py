"""Lazy dask pyramids over a slide: one array per level, each chunk one ``read_region`` call (no Qt).

Nothing is read when the arrays are made; napari computes only the chunks it draws, at the
pyramid level that matches the zoom, so a whole level 0 never sits in memory.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["ChunkCounter", "SlidePyramid", "slide_pyramid"]

# 1024² RGB chunks (3 MiB) keep napari's per-chunk overhead low while a screenful of the
# slide still needs only a handful of reads.
DEFAULT_CHUNK_PX = 1024
# Below this many pixels on the long side a level is pointless for display.
_MIN_LEVEL_PX = 256
# Single-level files larger than this get lazily downsampled levels so that napari can show an
# overview without building one huge texture.
_SYNTH_LEVEL_ABOVE_PX = 4096


@dataclass
class ChunkCounter:
    """Counts the chunks read per pyramid level (tests use it to prove laziness)."""

    reads: dict[int, int] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __deepcopy__(self, memo: dict) -> ChunkCounter:
        # Layer metadata may be deep-copied (layer duplication); the copy counts the same reads.
        return self

    def __getstate__(self) -> dict:
        return {"reads": dict(self.reads)}

    def __setstate__(self, state: dict) -> None:
        self.reads = dict(state["reads"])
        self._lock = threading.Lock()

    def add(self, level: int) -> None:
        with self._lock:
            self.reads[level] = self.reads.get(level, 0) + 1


@dataclass
class SlidePyramid:
    """The arrays napari gets and what they mean.

    Attributes
    ----------
    levels : list[dask.array.Array]
        ``[h_l, w_l, 3]`` uint8 per level, largest first.
    downsamples : list[float]
        Level-0 pixels per pixel of each kept level.
    source_levels : list[int]
        The slide level each array reads (synthesised levels reuse the level they coarsen).
    counter : ChunkCounter
        Chunk reads per slide level, for diagnostics.
    """

    levels: list[Any]
    downsamples: list[float]
    source_levels: list[int]
    counter: ChunkCounter

    @property
    def multiscale(self) -> bool:
        return len(self.levels) > 1


def _level_array(
    read: Callable[[tuple[int, int], int, tuple[int, int]], np.ndarray],
    level: int,
    size_wh: tuple[int, int],
    downsample: float,
    chunk_px: int,
    counter: ChunkCounter,
):
    import dask.array as da

    w, h = int(size_wh[0]), int(size_wh[1])

    def _chunks(n: int) -> tuple[int, ...]:
        full, rest = divmod(n, chunk_px)
        return (chunk_px,) * full + ((rest,) if rest else ())

    def load(block_info=None) -> np.ndarray:
        (r0, r1), (c0, c1), _ = block_info[None]["array-location"]
        # read_region takes the top-left in level-0 pixels and the size in this level's pixels.
        x0 = round(c0 * downsample)
        y0 = round(r0 * downsample)
        counter.add(level)
        tile = read((x0, y0), level, (c1 - c0, r1 - r0))
        tile = np.asarray(tile)
        if tile.ndim == 3 and tile.shape[2] == 4:
            tile = tile[..., :3]
        return np.ascontiguousarray(tile[: r1 - r0, : c1 - c0, :3], dtype=np.uint8)

    return da.map_blocks(
        load,
        chunks=(_chunks(h), _chunks(w), (3,)),
        dtype=np.uint8,
        meta=np.empty((0, 0, 0), dtype=np.uint8),
        name=f"mirror-slide-level{level}-{id(counter):x}",
    )


def slide_pyramid(slide: Any, chunk_px: int = DEFAULT_CHUNK_PX) -> SlidePyramid:
    """Wrap an open :class:`mirror_model.slide.SlideHandle` in lazy dask arrays.

    Parameters
    ----------
    slide : SlideHandle
        Needs ``level_dimensions`` (``(w, h)`` per level), ``level_downsamples`` and
        ``read_region((x0, y0) level-0 px, level, (w, h) level px) -> uint8 [h, w, 3]``. The
        handle must stay open while the arrays are used (the layer keeps it alive).
    chunk_px : int
        Chunk side in pixels of each level.

    Returns
    -------
    SlidePyramid
        Levels with strictly decreasing shapes (napari requires it); levels smaller than
        256 px are dropped except the first.
    """
    import dask.array as da

    counter = ChunkCounter()
    lock = threading.Lock()

    # Not every backend is thread-safe (tifffile pages share one file handle) and napari may
    # compute chunks from several threads; one lock per slide keeps reads correct.
    def read(loc: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        with lock:
            return slide.read_region(loc, level, size)

    dims = [tuple(int(v) for v in d) for d in slide.level_dimensions]
    downs = [float(d) for d in slide.level_downsamples]
    levels, kept_down, sources = [], [], []
    last_shape: tuple[int, int] | None = None
    for lv, ((w, h), d) in enumerate(zip(dims, downs, strict=True)):
        if last_shape is not None:
            if not (h < last_shape[0] and w < last_shape[1]):
                continue  # napari needs each level strictly smaller than the previous one
            if max(w, h) < _MIN_LEVEL_PX:
                continue
        levels.append(_level_array(read, lv, (w, h), d, chunk_px, counter))
        kept_down.append(d)
        sources.append(lv)
        last_shape = (h, w)

    # Flat (single-level) files: add lazily coarsened levels so napari can show an overview.
    while max(levels[-1].shape[:2]) > _SYNTH_LEVEL_ABOVE_PX:
        prev = levels[-1]
        h, w = prev.shape[:2]
        prev = prev[: h - h % 2, : w - w % 2]
        coarse = da.coarsen(np.mean, prev.astype(np.float32), {0: 2, 1: 2}, trim_excess=True)
        levels.append((coarse + 0.5).astype(np.uint8))  # round, do not truncate
        kept_down.append(kept_down[-1] * 2)
        sources.append(sources[-1])
    return SlidePyramid(levels=levels, downsamples=kept_down, source_levels=sources, counter=counter)
