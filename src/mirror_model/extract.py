"""Patch-feature extraction: slide -> tissue tiles -> patch encoder -> ``<slide_id>.h5``.

Reading overlaps encoding: a small pool of reader threads (OpenSlide and PIL release the GIL)
reads and resizes batches of tiles into a bounded queue while the main thread encodes the
previous batch (bf16 autocast where it helps, see :func:`mirror_model._device.resolve_precision`).
Files are written atomically, so a crash or a cancel never leaves a partial ``.h5``;
:func:`extract_cohort` skips slides whose file already exists and is valid (resumable), and
shards slides over ranks (slide *i* goes to rank ``i % world_size``; torchrun's ``RANK`` /
``WORLD_SIZE`` are used by default).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from ._device import autocast, resolve_device, resolve_precision
from ._progress import ProgressFn, StopFn, check_cancel, report
from .errors import CohortError, ConfigError, FeatureFileError, MirrorError
from .features import FeatureFile, check_encoder, read_features, write_features
from .ids import slide_stem
from .patch_encoders import PatchEncoder, create_patch_encoder
from .slide import SlideHandle, TileGrid, make_tile_grid, open_slide

__all__ = [
    "CohortExtraction",
    "SlideExtraction",
    "extract_cohort",
    "extract_features_in_memory",
    "extract_slide",
]


@dataclass
class SlideExtraction:
    """Outcome for one slide.

    Attributes
    ----------
    slide_id, slide_path, out_path
    status : str
        ``"extracted"``, ``"skipped"`` (a valid file from the same encoder existed) or ``"failed"``.
    n_tiles : int
        Tiles in the feature file (0 when failed).
    seconds : float
        Wall time spent on this slide.
    error : str or None
        The error message when failed.
    """

    slide_id: str
    slide_path: Path
    out_path: Path
    status: Literal["extracted", "skipped", "failed"]
    n_tiles: int = 0
    seconds: float = 0.0
    error: str | None = None

    @property
    def tiles_per_second(self) -> float:
        return self.n_tiles / self.seconds if self.seconds > 0 else 0.0


@dataclass
class CohortExtraction:
    """Outcome of :func:`extract_cohort` on this rank."""

    out_dir: Path
    encoder: str
    rank: int
    world_size: int
    results: list[SlideExtraction] = field(default_factory=list)

    def _count(self, status: str) -> int:
        return sum(r.status == status for r in self.results)

    @property
    def n_extracted(self) -> int:
        return self._count("extracted")

    @property
    def n_skipped(self) -> int:
        return self._count("skipped")

    @property
    def n_failed(self) -> int:
        return self._count("failed")

    @property
    def n_slides(self) -> int:
        """Slides this rank handled."""
        return len(self.results)

    @property
    def n_done(self) -> int:
        """Slides whose feature file exists after the run (extracted now or before)."""
        return self.n_extracted + self.n_skipped

    @property
    def n_tiles(self) -> int:
        """Tiles in this rank's feature files (extracted and skipped slides)."""
        return sum(r.n_tiles for r in self.results)

    @property
    def seconds(self) -> float:
        """Wall time over this rank's slides."""
        return float(sum(r.seconds for r in self.results))

    @property
    def failed(self) -> list[SlideExtraction]:
        return [r for r in self.results if r.status == "failed"]


# --------------------------------------------------------------------------- helpers


def _default_workers() -> int:
    return max(1, min(4, (os.cpu_count() or 2) - 1))


def _get_encoder(
    encoder: str | PatchEncoder,
    weights: Any,
    device: torch.device,
    encoder_kwargs: dict[str, Any] | None,
) -> PatchEncoder:
    if isinstance(encoder, torch.nn.Module):
        if not hasattr(encoder, "spec"):
            raise ConfigError(
                "a patch encoder module must have a .spec (PatchEncoderSpec); use create_patch_encoder()."
            )
        return encoder.to(device).eval()  # type: ignore[return-value]
    return create_patch_encoder(encoder, weights=weights, device=device, **(encoder_kwargs or {}))


_CACHE_LEVEL0_PIXELS = 64_000_000  # 192 MB of RGB


class _InMemoryLevel0(SlideHandle):
    """A single-level slide decoded once into memory (same pixels as the file, read faster)."""

    def __init__(self, base: SlideHandle) -> None:
        self.base = base
        for name in (
            "path",
            "mpp",
            "dimensions",
            "level_dimensions",
            "level_downsamples",
            "backend",
            "vendor",
            "mpp_source",
            "properties",
        ):
            setattr(self, name, getattr(base, name))
        w, h = base.dimensions
        self._img = np.empty((h, w, 3), np.uint8)
        band = 512

        def read_band(y: int) -> None:
            self._img[y : y + band] = base.read_region((0, y), 0, (w, min(band, h - y)))

        # decode bands in parallel (OpenSlide and tifffile's codecs release the GIL)
        with ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1)) as pool:
            list(pool.map(read_band, range(0, h, band)))

    def _read_region(self, x: int, y: int, level: int, w: int, h: int) -> np.ndarray:
        if level != 0:
            return self.base.read_region((x, y), level, (w, h))
        height, width = self._img.shape[:2]
        if x >= 0 and y >= 0 and x + w <= width and y + h <= height:
            return self._img[y : y + h, x : x + w].copy()
        out = np.full((h, w, 3), 255, np.uint8)
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, width), min(y + h, height)
        if x1 > x0 and y1 > y0:
            out[y0 - y : y1 - y, x0 - x : x1 - x] = self._img[y0:y1, x0:x1]
        return out

    def close(self) -> None:
        self._img = np.empty((0, 0, 3), np.uint8)


class _TileBatchReader:
    """Reads tiles of a grid and resizes them to the encoder input (runs in worker threads)."""

    def __init__(self, slide: SlideHandle, grid: TileGrid, input_px: int) -> None:
        self.slide = slide
        self.grid = grid
        self.input_px = int(input_px)
        # Read from the most detailed-enough level for the *encoder input* resolution: an
        # encoder that works at 64 px reads from a 4x level when the slide has one.
        needed = grid.tile_size_level0 / float(self.input_px)
        self.level = int(slide.get_best_level_for_downsample(needed))
        self.read_px = max(
            1, round(grid.tile_size_level0 / float(slide.level_downsamples[self.level]))
        )

    def read(self, coords: np.ndarray) -> np.ndarray:
        from PIL import Image

        out = np.empty((len(coords), self.input_px, self.input_px, 3), np.uint8)
        size = (self.read_px, self.read_px)
        for i, (x, y) in enumerate(coords):
            tile = self.slide.read_region((int(x), int(y)), self.level, size)
            if self.read_px != self.input_px:
                img = Image.fromarray(tile)
                if self.read_px % self.input_px == 0:  # exact box average, the cheapest
                    img = img.reduce(self.read_px // self.input_px)
                else:  # antialiased bilinear, after an integer pre-reduction
                    img = img.resize(
                        (self.input_px, self.input_px), Image.Resampling.BILINEAR, reducing_gap=2.0
                    )
                tile = np.asarray(img)
            out[i] = tile
        return out


def _resolve_rank(rank: int | None, world_size: int | None) -> tuple[int, int]:
    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if rank is None:
        rank = int(os.environ.get("RANK", "0"))
    if world_size < 1 or not 0 <= rank < world_size:
        raise ConfigError(
            f"rank must be in [0, world_size); got rank={rank}, world_size={world_size}."
        )
    return rank, world_size


def _device_for_rank(device: str | torch.device, world_size: int) -> torch.device:
    dev = resolve_device(device)
    if dev.type == "cuda" and dev.index is None and world_size > 1 and "LOCAL_RANK" in os.environ:
        dev = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return dev


# --------------------------------------------------------------------------- one slide


def extract_features_in_memory(
    slide: str | os.PathLike[str] | SlideHandle,
    encoder: str | PatchEncoder = "stain-texture",
    *,
    weights: str | os.PathLike[str] | None = None,
    target_mpp: float = 0.5,
    tile_px: int = 256,
    batch_size: int = 64,
    device: str | torch.device = "auto",
    precision: str = "auto",
    mpp: float | None = None,
    num_workers: int | None = None,
    tissue_threshold: float = 0.25,
    grid: TileGrid | None = None,
    encoder_kwargs: dict[str, Any] | None = None,
    progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
) -> FeatureFile:
    """Tile one slide and encode its tissue tiles, without writing anything.

    Parameters
    ----------
    slide : path or SlideHandle
        The slide (a path is opened and closed here).
    encoder : str or PatchEncoder
        Registry name (see :func:`mirror_model.patch_encoders.create_patch_encoder`) or a module.
    weights : path, optional
        Weights file for a named ViT/timm encoder.
    target_mpp, tile_px : float, int
        Tiles are ``tile_px`` pixels at ``target_mpp`` µm/px (then resized to the encoder input).
    batch_size : int
        Tiles per encoder call.
    device, precision : str
        ``"auto"|"cpu"|"cuda"``; ``"auto"|"fp32"|"bf16"``.
    mpp : float, optional
        Level-0 µm/px for slides without resolution metadata.
    num_workers : int, optional
        Reader threads (default: CPU count - 1, at most 4).
    tissue_threshold : float
        Minimum tissue fraction of a kept tile.
    grid : TileGrid, optional
        A precomputed grid (e.g. the one a viewer shows).
    progress, should_stop
        See :mod:`mirror_model._progress`; cancelling raises :class:`~mirror_model.errors.Cancelled`.

    Returns
    -------
    FeatureFile
        With ``coords_level0``, ``patch_size_level0``, ``target_mpp``, ``encoder`` and attrs
        ``encoder_spec``, ``slide_path``, ``slide_width``/``slide_height``, ``slide_mpp``, ``tile_px``.
    """
    if int(batch_size) < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}.")
    batch_size = int(batch_size)
    num_workers = _default_workers() if num_workers is None else int(num_workers)
    if num_workers < 1:
        raise ConfigError(f"num_workers must be >= 1, got {num_workers}.")
    dev = resolve_device(device)
    prec = resolve_precision(precision, dev)
    enc = _get_encoder(encoder, weights, dev, encoder_kwargs)
    spec = enc.spec

    own = not isinstance(slide, SlideHandle)
    handle = open_slide(slide, mpp=mpp) if own else slide  # type: ignore[arg-type]
    try:
        check_cancel(should_stop, "feature extraction")
        source: SlideHandle = handle
        if grid is None:
            # A small slide without a pyramid would be decoded twice (tissue overview, then
            # tiles): decode it once and serve both from memory.
            w0, h0 = handle.dimensions
            if handle.level_count == 1 and w0 * h0 <= _CACHE_LEVEL0_PIXELS:
                source = _InMemoryLevel0(handle)
            grid = make_tile_grid(
                source, target_mpp=target_mpp, tile_px=tile_px, tissue_threshold=tissue_threshold
            )
        with _cpu_threads_for(enc, dev, num_workers):
            feats = _encode_grid(
                source, grid, enc, dev, prec, batch_size, num_workers, progress, should_stop
            )
    finally:
        if own:
            handle.close()
    attrs: dict[str, Any] = {
        "encoder_spec": spec.to_dict(),
        "slide_path": str(handle.path),
        "slide_width": int(handle.dimensions[0]),
        "slide_height": int(handle.dimensions[1]),
        "slide_mpp": float(handle.mpp),
        "slide_mpp_source": handle.mpp_source,
        "tile_px": int(grid.tile_px),
        "tissue_threshold": float(grid.tissue_threshold),
    }
    return FeatureFile(
        features=feats,
        coords_level0=grid.coords_level0.copy(),
        patch_size_level0=int(grid.tile_size_level0),
        target_mpp=float(grid.target_mpp),
        encoder=spec.name,
        attrs=attrs,
    ).validate(handle.path)


@contextlib.contextmanager
def _cpu_threads_for(enc: PatchEncoder, dev: torch.device, num_workers: int) -> Iterator[None]:
    """Leave the reader threads a core when the encoder is light.

    The stain-texture encoder runs many small ops: with every core busy reading, torch's
    OpenMP threads spin against the readers and run several times slower than one thread.
    Heavy encoders (ViTs) are compute bound and keep all of torch's threads.
    """
    if dev.type != "cpu" or enc.spec.kind != "stain-texture":
        yield
        return
    before = torch.get_num_threads()
    want = max(1, min(before, (os.cpu_count() or 1) - num_workers))
    torch.set_num_threads(want)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _encode_grid(
    slide: SlideHandle,
    grid: TileGrid,
    enc: PatchEncoder,
    dev: torch.device,
    prec: str,
    batch_size: int,
    num_workers: int,
    progress: ProgressFn | None,
    should_stop: StopFn | None,
) -> np.ndarray:
    reader = _TileBatchReader(slide, grid, enc.spec.input_px)
    coords = grid.coords_level0
    n = len(coords)
    stage = f"encoding {Path(str(slide.path)).name}"
    starts = list(range(0, n, batch_size))
    out = np.empty((n, enc.spec.dim), np.float32)
    prefetch = num_workers + 1
    pool = ThreadPoolExecutor(max_workers=num_workers, thread_name_prefix="mirror-tile-reader")
    pending: deque[tuple[int, Future[np.ndarray]]] = deque()
    it = iter(starts)
    try:
        for s in it:
            pending.append((s, pool.submit(reader.read, coords[s : s + batch_size])))
            if len(pending) >= prefetch:
                break
        report(progress, 0, n, stage)
        done = 0
        while pending:
            check_cancel(should_stop, "feature extraction")
            s, fut = pending.popleft()
            tiles = fut.result()
            nxt = next(it, None)
            if nxt is not None:
                pending.append((nxt, pool.submit(reader.read, coords[nxt : nxt + batch_size])))
            x = (
                torch.from_numpy(tiles)
                .to(dev, non_blocking=True)
                .permute(0, 3, 1, 2)
                .float()
                .div_(255.0)
            )
            with torch.inference_mode(), autocast(dev, prec):
                y = enc(x)
            if y.ndim != 2 or y.shape[0] != len(tiles) or y.shape[1] != enc.spec.dim:
                raise ConfigError(
                    f"patch encoder {enc.spec.name!r} returned shape {tuple(y.shape)}; expected "
                    f"[{len(tiles)}, {enc.spec.dim}]."
                )
            out[s : s + len(tiles)] = y.float().cpu().numpy()
            done += len(tiles)
            report(progress, done, n, stage)
    finally:
        for _, fut in pending:
            fut.cancel()
        pool.shutdown(wait=True, cancel_futures=True)
    if not np.isfinite(out).all():
        raise MirrorError(
            f"{slide.path}: the patch encoder {enc.spec.name!r} produced NaN/inf features "
            f"(precision {prec}); try --precision fp32."
        )
    return out


def extract_slide(
    slide_path: str | os.PathLike[str],
    encoder: str | PatchEncoder,
    out_path: str | os.PathLike[str],
    target_mpp: float = 0.5,
    tile_px: int = 256,
    *,
    slide_id: str | None = None,
    overwrite: bool = False,
    weights: str | os.PathLike[str] | None = None,
    batch_size: int = 64,
    device: str | torch.device = "auto",
    precision: str = "auto",
    mpp: float | None = None,
    num_workers: int | None = None,
    tissue_threshold: float = 0.25,
    encoder_kwargs: dict[str, Any] | None = None,
    progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
) -> SlideExtraction:
    """Extract one slide's features to ``out_path`` (HDF5, written atomically).

    A valid existing file from the same encoder (and target resolution) is kept and the slide
    is skipped, unless ``overwrite``. An existing *valid* file from another encoder is an error
    (so features are never silently replaced); a damaged one is re-extracted.

    Returns
    -------
    SlideExtraction
    """
    t0 = time.perf_counter()
    dev = resolve_device(device)
    enc = _get_encoder(encoder, weights, dev, encoder_kwargs)
    out = Path(out_path)
    sid = slide_id or slide_stem(slide_path)
    if out.exists() and not overwrite:
        existing = _existing_valid(out)
        if existing is not None:
            check_encoder(existing, enc.spec, target_mpp=target_mpp)
            if existing.attrs.get("tile_px") not in (None, int(tile_px)):
                raise FeatureFileError(
                    f"{out}: exists with {existing.attrs.get('tile_px')} px tiles, not {tile_px}; "
                    "choose another output folder or pass overwrite (--overwrite)."
                )
            return SlideExtraction(
                sid, Path(slide_path), out, "skipped", existing.n_tiles, time.perf_counter() - t0
            )
    ff = extract_features_in_memory(
        slide_path,
        enc,
        target_mpp=target_mpp,
        tile_px=tile_px,
        batch_size=batch_size,
        device=dev,
        precision=precision,
        mpp=mpp,
        num_workers=num_workers,
        tissue_threshold=tissue_threshold,
        progress=progress,
        should_stop=should_stop,
    )
    ff.attrs["slide_id"] = sid
    write_features(out, ff)
    return SlideExtraction(
        sid, Path(slide_path), out, "extracted", ff.n_tiles, time.perf_counter() - t0
    )


def _existing_valid(path: Path) -> FeatureFile | None:
    try:
        return read_features(path)
    except FeatureFileError:
        return None


# --------------------------------------------------------------------------- cohort


def _cohort_rows(cohort: Any) -> list[dict[str, Any]]:
    import pandas as pd

    if isinstance(cohort, (str, os.PathLike)):
        from .cohort import read_cohort

        table = read_cohort(cohort).table
    elif isinstance(cohort, pd.DataFrame):
        table = cohort
    elif hasattr(cohort, "table"):
        table = cohort.table
    else:
        raise ConfigError(
            f"cohort must be a CSV path, a Cohort or a DataFrame; got {type(cohort).__name__}."
        )
    missing = [c for c in ("slide_id", "slide_path") if c not in table.columns]
    if missing:
        raise CohortError(
            f"cohort table lacks column(s) {', '.join(missing)}: there are no slides to extract "
            "(an expression-only cohort needs no features; pretrain it without --features)."
            if "slide_path" in missing
            else f"cohort table lacks column(s) {', '.join(missing)} (needs slide_id and slide_path)."
        )
    rows = table.to_dict("records")
    seen: set[str] = set()
    for r in rows:
        sid = str(r["slide_id"])
        if sid in seen:
            raise CohortError(
                f"slide_id {sid!r} appears twice in the cohort; feature files are named by slide_id."
            )
        seen.add(sid)
    return rows


def extract_cohort(
    cohort: Any,
    out_dir: str | os.PathLike[str],
    encoder: str | PatchEncoder = "stain-texture",
    *,
    weights: str | os.PathLike[str] | None = None,
    target_mpp: float = 0.5,
    tile_px: int = 256,
    batch_size: int = 64,
    device: str | torch.device = "auto",
    precision: str = "auto",
    mpp: float | None = None,
    num_workers: int | None = None,
    tissue_threshold: float = 0.25,
    rank: int | None = None,
    world_size: int | None = None,
    overwrite: bool = False,
    on_error: Literal["raise", "continue"] = "raise",
    encoder_kwargs: dict[str, Any] | None = None,
    progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
    slide_ids: Sequence[str] | None = None,
) -> CohortExtraction:
    """Extract ``<out_dir>/<slide_id>.h5`` for every slide of a cohort (this rank's share).

    Parameters
    ----------
    cohort : path, Cohort or DataFrame
        A cohort CSV (read with :func:`mirror_model.cohort.read_cohort`) or its table
        (columns ``slide_id``, ``slide_path``; an optional ``mpp`` column overrides per slide).
    out_dir : path
        Output folder (created).
    encoder, weights, target_mpp, tile_px, batch_size, device, precision, num_workers, tissue_threshold
        As in :func:`extract_features_in_memory`.
    mpp : float, optional
        Level-0 µm/px for slides without resolution metadata (all slides).
    rank, world_size : int, optional
        Shard: slide *i* (cohort order) is done by rank ``i % world_size``. Default: torchrun's
        ``RANK`` / ``WORLD_SIZE`` environment, else 0 / 1.
    overwrite : bool
        Re-extract slides whose file exists.
    on_error : {"raise", "continue"}
        Stop at the first failing slide, or record the failure and go on.
    slide_ids : sequence of str, optional
        Only these slides.
    progress, should_stop
        Progress per slide (stage names the slide); cancelling raises ``Cancelled`` and leaves
        only complete files.

    Returns
    -------
    CohortExtraction
    """
    if on_error not in ("raise", "continue"):
        raise ConfigError(f"on_error must be 'raise' or 'continue', got {on_error!r}.")
    rank, world_size = _resolve_rank(rank, world_size)
    rows = _cohort_rows(cohort)
    if slide_ids is not None:
        wanted = {str(s) for s in slide_ids}
        unknown = wanted - {str(r["slide_id"]) for r in rows}
        if unknown:
            raise CohortError(f"slide id(s) not in the cohort: {', '.join(sorted(unknown))}.")
        rows = [r for r in rows if str(r["slide_id"]) in wanted]
    mine = [r for i, r in enumerate(rows) if i % world_size == rank]
    out_root = Path(out_dir)
    out_root.mkdir(parents=True, exist_ok=True)
    dev = _device_for_rank(device, world_size)
    enc = _get_encoder(encoder, weights, dev, encoder_kwargs)
    result = CohortExtraction(
        out_dir=out_root, encoder=enc.spec.name, rank=rank, world_size=world_size
    )
    for i, row in enumerate(mine):
        check_cancel(should_stop, "feature extraction")
        sid = str(row["slide_id"])
        spath = Path(str(row["slide_path"]))
        out = out_root / f"{sid}.h5"
        slide_mpp = mpp
        row_mpp = row.get("mpp")
        if row_mpp is not None and not (isinstance(row_mpp, float) and np.isnan(row_mpp)):
            slide_mpp = float(row_mpp)

        def slide_progress(done: int, total: int, stage: str, _i: int = i, _sid: str = sid) -> None:
            report(progress, done, total, f"slide {_i + 1}/{len(mine)} {_sid}")

        try:
            res = extract_slide(
                spath,
                enc,
                out,
                target_mpp=target_mpp,
                tile_px=tile_px,
                slide_id=sid,
                overwrite=overwrite,
                batch_size=batch_size,
                device=dev,
                precision=precision,
                mpp=slide_mpp,
                num_workers=num_workers,
                tissue_threshold=tissue_threshold,
                progress=slide_progress,
                should_stop=should_stop,
            )
        except MirrorError as exc:
            from .errors import Cancelled

            if isinstance(exc, Cancelled) or on_error == "raise":
                raise
            res = SlideExtraction(sid, spath, out, "failed", error=str(exc))
        result.results.append(res)
    return result
