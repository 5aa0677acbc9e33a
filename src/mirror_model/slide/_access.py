"""Whole-slide image access: one :class:`SlideHandle` over OpenSlide and tifffile.

Backends
--------
* **OpenSlide** for every vendor format it reads (.svs, .ndpi, .mrxs, .scn, .vms, .bif,
  Philips TIFF, plain tiled pyramidal TIFF with one page per level, ...).
* **tifffile** for OME-TIFF pyramids (levels stored as SubIFDs, which OpenSlide ignores) and
  for TIFF layouts OpenSlide refuses (e.g. stripped, untiled TIFF). Regions are read tile by
  tile (or strip by strip) straight from the TIFF segment offsets, so a region read decodes
  only the segments it touches and never loads a whole level into memory.

Resolution (µm per pixel at level 0, ``mpp``) always comes from the file's own metadata:
``openslide.mpp-x`` (vendor metadata), OME ``PhysicalSizeX`` with its unit, or the TIFF
``XResolution`` tag with ``ResolutionUnit`` (cm or inch). A file without usable resolution
metadata raises :class:`~mirror_model.errors.SlideError` unless the caller passes ``mpp=``;
we never assume a resolution silently.

Thread safety: OpenSlide handles are thread-safe (the C library locks internally); the
tifffile backend serialises file reads with a lock and decodes outside it, so a
:class:`SlideHandle` can be read from background reader threads.
"""

from __future__ import annotations

import math
import os
import re
import threading
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import SlideError, SlideResolutionError

__all__ = ["SlideHandle", "open_slide"]

# A brightfield slide has 0.05-20 µm/px. Values far outside are screen/print dpi (72 dpi ->
# 353 µm/px) written by image editors, i.e. not a microscope resolution: refuse them.
_MPP_PLAUSIBLE = (0.01, 50.0)

# Largest level (in pixels) the tifffile backend will decode in one piece when the page
# is neither tiled nor stripped in a way we can read segment-wise.
_MAX_WHOLE_PAGE_PIXELS = 200_000_000

# read_scaled reads a level in one piece up to this size, block by block above it.
_MAX_SCALED_LEVEL_PIXELS = 64_000_000
_SCALED_BLOCK_PX = 4096

_UNIT_TO_UM = {
    "pm": 1e-6,
    "å": 1e-4,
    "Å": 1e-4,
    "nm": 1e-3,
    "µm": 1.0,
    "μm": 1.0,  # greek mu
    "um": 1.0,
    "micron": 1.0,
    "mm": 1e3,
    "cm": 1e4,
    "dm": 1e5,
    "m": 1e6,
}


def _check_mpp(value: float, source: str, path: Path) -> float:
    if not (math.isfinite(value) and _MPP_PLAUSIBLE[0] <= value <= _MPP_PLAUSIBLE[1]):
        raise SlideError(
            f"{path}: the resolution in its metadata ({source}) gives {value:.4g} µm per pixel, "
            f"which is not a microscope resolution (expected {_MPP_PLAUSIBLE[0]}-{_MPP_PLAUSIBLE[1]}). "
            "Pass the true level-0 resolution explicitly (mpp=..., or --mpp on the command line)."
        )
    return float(value)


def _no_mpp_error(path: Path, detail: str) -> SlideResolutionError:
    return SlideResolutionError(
        f"{path}: the file has no resolution metadata ({detail}), so its µm per pixel is unknown. "
        "Pass it explicitly (mpp=0.25 for a 40x scan, 0.5 for 20x; --mpp on the command line)."
    )


class SlideHandle:
    """An open whole-slide image.

    Attributes
    ----------
    path : Path
        The slide file.
    mpp : float
        µm per pixel at level 0 (x; slides with anisotropic pixels use the x value).
    dimensions : tuple[int, int]
        (width, height) of level 0 in pixels.
    level_dimensions : tuple[tuple[int, int], ...]
        (width, height) of every pyramid level, level 0 first.
    level_downsamples : tuple[float, ...]
        Level-0 pixels per level pixel for every level (1.0 for level 0).
    backend : str
        ``"openslide"`` or ``"tifffile"``.
    vendor : str
        The format as detected (e.g. ``"aperio"``, ``"generic-tiff"``, ``"ome-tiff"``).
    mpp_source : str
        Where ``mpp`` came from (``"openslide.mpp-x"``, ``"OME PhysicalSizeX"``,
        ``"TIFF XResolution"`` or ``"user"``).
    """

    path: Path
    mpp: float
    dimensions: tuple[int, int]
    level_dimensions: tuple[tuple[int, int], ...]
    level_downsamples: tuple[float, ...]
    backend: str
    vendor: str
    mpp_source: str
    properties: Mapping[str, str]

    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

    def read_region(
        self, location: tuple[int, int], level: int, size: tuple[int, int]
    ) -> np.ndarray:
        """Read a region as uint8 RGB ``[h, w, 3]``.

        Parameters
        ----------
        location : (x, y)
            Top-left corner in **level-0** pixels.
        level : int
            Pyramid level to read from.
        size : (w, h)
            Size in pixels **of that level**.

        Areas outside the slide, and transparent pixels, come back white.
        """
        level = int(level)
        if not 0 <= level < self.level_count:
            raise SlideError(
                f"{self.path}: level {level} does not exist (the slide has {self.level_count} levels)."
            )
        w, h = int(size[0]), int(size[1])
        if w <= 0 or h <= 0:
            raise SlideError(f"{self.path}: region size must be positive, got {size}.")
        return self._read_region(int(location[0]), int(location[1]), level, w, h)

    def get_best_level_for_downsample(self, downsample: float) -> int:
        """The level with the largest downsample ≤ ``downsample`` (0.5 % tolerance)."""
        best = 0
        for i, d in enumerate(self.level_downsamples):
            if d <= downsample * 1.005:
                best = i if d >= self.level_downsamples[best] else best
        return best

    def get_thumbnail(self, max_px: int = 1024) -> np.ndarray:
        """A uint8 RGB thumbnail whose longer side is at most ``max_px`` pixels.

        The aspect ratio is kept; the image is read from the smallest level that is still
        at least as detailed as the thumbnail and area-averaged down.
        """
        w0, h0 = self.dimensions
        scale = max(w0, h0) / float(max_px)
        tw, th = max(1, round(w0 / max(scale, 1.0))), max(1, round(h0 / max(scale, 1.0)))
        return self.read_scaled(tw, th)

    def read_scaled(self, width: int, height: int) -> np.ndarray:
        """The whole slide resampled to ``(width, height)`` pixels (uint8 RGB ``[height, width, 3]``).

        Reads the most detailed-enough level; a level larger than ~64 MP (a slide without a
        pyramid) is read and reduced block by block so memory stays bounded.
        """
        from PIL import Image

        width, height = max(1, int(width)), max(1, int(height))
        w0, h0 = self.dimensions
        level = self.get_best_level_for_downsample(min(w0 / width, h0 / height))
        lw, lh = self.level_dimensions[level]
        if lw * lh <= _MAX_SCALED_LEVEL_PIXELS:
            img = self.read_region((0, 0), level, (lw, lh))
            if (lw, lh) != (width, height):
                img = np.asarray(Image.fromarray(img).resize((width, height), Image.Resampling.BOX))
            return img
        out = np.empty((height, width, 3), np.uint8)
        sx, sy = width / lw, height / lh  # output px per level px
        ds = self.level_downsamples[level]
        # blocks aligned to output pixels so the seams do not shift
        step_out = max(1, int(_SCALED_BLOCK_PX * min(sx, sy)))
        for oy in range(0, height, step_out):
            for ox in range(0, width, step_out):
                ow, oh = min(step_out, width - ox), min(step_out, height - oy)
                lx0, ly0 = int(ox / sx), int(oy / sy)
                lx1, ly1 = (
                    min(lw, max(lx0 + 1, round((ox + ow) / sx))),
                    min(lh, max(ly0 + 1, round((oy + oh) / sy))),
                )
                block = self.read_region(
                    (int(lx0 * ds), int(ly0 * ds)), level, (lx1 - lx0, ly1 - ly0)
                )
                out[oy : oy + oh, ox : ox + ow] = np.asarray(
                    Image.fromarray(block).resize((ow, oh), Image.Resampling.BOX)
                )
        return out

    def close(self) -> None:  # pragma: no cover - overridden
        pass

    def __enter__(self) -> SlideHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"<SlideHandle {self.path.name!r} {self.vendor} {self.dimensions[0]}x{self.dimensions[1]} px, "
            f"{self.mpp:.4g} µm/px, {self.level_count} levels>"
        )

    def _read_region(
        self, x: int, y: int, level: int, w: int, h: int
    ) -> np.ndarray:  # pragma: no cover
        raise NotImplementedError


# --------------------------------------------------------------------------- OpenSlide


class _OpenSlideHandle(SlideHandle):
    backend = "openslide"

    def __init__(self, path: Path, osr: Any, mpp: float | None) -> None:
        self.path = path
        self._osr = osr
        self.properties = dict(osr.properties)
        self.vendor = self.properties.get("openslide.vendor", "unknown")
        self.dimensions = tuple(int(v) for v in osr.dimensions)  # type: ignore[assignment]
        self.level_dimensions = tuple((int(a), int(b)) for a, b in osr.level_dimensions)
        self.level_downsamples = tuple(float(d) for d in osr.level_downsamples)
        if mpp is not None:
            self.mpp, self.mpp_source = float(mpp), "user"
        else:
            self.mpp, self.mpp_source = self._mpp_from_properties()

    def _mpp_from_properties(self) -> tuple[float, str]:
        props = self.properties
        if "openslide.mpp-x" in props:
            try:
                return _check_mpp(
                    float(props["openslide.mpp-x"]), "openslide.mpp-x", self.path
                ), "openslide.mpp-x"
            except ValueError:
                pass
        unit = props.get("tiff.ResolutionUnit", "").lower()
        xres = props.get("tiff.XResolution")
        if xres is not None and unit in ("centimeter", "inch"):
            per_unit_um = 1e4 if unit == "centimeter" else 25400.0
            value = per_unit_um / float(xres)
            return _check_mpp(
                value, f"TIFF XResolution {xres} per {unit}", self.path
            ), "TIFF XResolution"
        raise _no_mpp_error(
            self.path, f"format {self.vendor}, no openslide.mpp-x and no TIFF resolution unit"
        )

    def _read_region(self, x: int, y: int, level: int, w: int, h: int) -> np.ndarray:
        try:
            img = self._osr.read_region((x, y), level, (w, h))
        except Exception as exc:  # openslide.OpenSlideError on corrupt tiles
            raise SlideError(
                f"{self.path}: reading region at ({x}, {y}) level {level} failed: {exc}"
            ) from exc
        if img.getextrema()[3][0] == 255:  # fully opaque (the usual case): a cheap C conversion
            return np.array(img.convert("RGB"))
        return _rgba_to_rgb(np.asarray(img))

    def read_scaled(self, width: int, height: int) -> np.ndarray:
        w0, h0 = self.dimensions
        level = self.get_best_level_for_downsample(min(w0 / max(width, 1), h0 / max(height, 1)))
        lw, lh = self.level_dimensions[level]
        if lw * lh > _MAX_SCALED_LEVEL_PIXELS:  # no small level: bounded-memory block reads
            return super().read_scaled(width, height)
        # OpenSlide's own thumbnail code picks the level and resamples with PIL.
        try:
            img = self._osr.get_thumbnail((width, height)).convert("RGBA")
        except Exception as exc:
            raise SlideError(f"{self.path}: reading a thumbnail failed: {exc}") from exc
        arr = _rgba_to_rgb(np.asarray(img))
        if arr.shape[:2] != (height, width):
            from PIL import Image

            arr = np.asarray(
                Image.fromarray(arr).resize((width, height), Image.Resampling.BILINEAR)
            )
        return arr

    def close(self) -> None:
        self._osr.close()


def _rgba_to_rgb(rgba: np.ndarray) -> np.ndarray:
    """Composite RGBA (OpenSlide returns premultiplied ARGB as RGBA) on white."""
    if rgba.ndim == 3 and rgba.shape[2] == 4:
        alpha = rgba[..., 3]
        rgb = rgba[..., :3]
        if alpha.min() == 255:
            return np.ascontiguousarray(rgb)
        # OpenSlide's RGBA is premultiplied: out = rgb + (255 - alpha) (white background).
        out = rgb.astype(np.uint16) + (255 - alpha.astype(np.uint16))[..., None]
        return np.minimum(out, 255).astype(np.uint8)
    return np.ascontiguousarray(rgba[..., :3])


# --------------------------------------------------------------------------- tifffile


class _TiffLevel:
    """Region reads from one TIFF page (tiled or stripped) without loading the whole page."""

    def __init__(self, page: Any, owner: _TiffSlideHandle) -> None:
        self.page = page
        self.owner = owner
        self.height = int(page.imagelength)
        self.width = int(page.imagewidth)
        self.samples = int(page.samplesperpixel)
        self.separate = int(page.planarconfig) == 2 and self.samples > 1
        if page.is_tiled:
            self.seg_h, self.seg_w = int(page.tilelength), int(page.tilewidth)
        else:
            self.seg_h, self.seg_w = int(page.rowsperstrip or self.height), self.width
            self.seg_h = min(self.seg_h, self.height)
        self.ny = -(-self.height // self.seg_h)
        self.nx = -(-self.width // self.seg_w)
        self.n_planes = self.samples if self.separate else 1
        self.segmentwise = (
            len(page.dataoffsets) == self.n_planes * self.ny * self.nx and int(page.imagedepth) == 1
        )
        self._whole: np.ndarray | None = None

    def read(self, x: int, y: int, w: int, h: int) -> np.ndarray:
        """Level pixels [y:y+h, x:x+w] as uint8 RGB; outside the image -> white."""
        out = np.full((h, w, 3), 255, dtype=np.uint8)
        x0, y0 = max(x, 0), max(y, 0)
        x1, y1 = min(x + w, self.width), min(y + h, self.height)
        if x1 <= x0 or y1 <= y0:
            return out
        if not self.segmentwise:
            whole = self._read_whole()
            out[y0 - y : y1 - y, x0 - x : x1 - x] = whole[y0:y1, x0:x1]
            return out
        ty0, ty1 = y0 // self.seg_h, (y1 - 1) // self.seg_h
        tx0, tx1 = x0 // self.seg_w, (x1 - 1) // self.seg_w
        for ty in range(ty0, ty1 + 1):
            for tx in range(tx0, tx1 + 1):
                planes = [
                    self._segment(p * self.ny * self.nx + ty * self.nx + tx)
                    for p in range(self.n_planes)
                ]
                seg = planes[0] if len(planes) == 1 else np.concatenate(planes, axis=-1)
                seg = self._to_rgb(seg)
                sy, sx = ty * self.seg_h, tx * self.seg_w
                # intersection of the segment with the requested window, in level pixels
                iy0, iy1 = max(sy, y0), min(sy + seg.shape[0], y1)
                ix0, ix1 = max(sx, x0), min(sx + seg.shape[1], x1)
                if iy1 > iy0 and ix1 > ix0:
                    out[iy0 - y : iy1 - y, ix0 - x : ix1 - x] = seg[
                        iy0 - sy : iy1 - sy, ix0 - sx : ix1 - sx
                    ]
        return out

    def _segment(self, index: int) -> np.ndarray:
        page = self.page
        offset, count = int(page.dataoffsets[index]), int(page.databytecounts[index])
        if count == 0:  # sparse TIFF: missing tile = background
            return np.full(
                (self.seg_h, self.seg_w, 1 if self.separate else self.samples), 255, np.uint8
            )
        with self.owner._lock:
            fh = self.owner._tif.filehandle
            fh.seek(offset)
            data = fh.read(count)
        try:
            seg, _, shape = page.decode(data, index, jpegtables=page.jpegtables)
        except Exception as exc:
            raise SlideError(
                f"{self.owner.path}: decoding TIFF segment {index} failed ({exc}); the file may be corrupt."
            ) from exc
        if seg is None:
            raise SlideError(
                f"{self.owner.path}: TIFF segment {index} could not be decoded; the file may be corrupt."
            )
        seg = np.asarray(seg)
        # decode returns (depth, length, width, samples); strips may come back short
        seg = seg.reshape(seg.shape[-3], seg.shape[-2], seg.shape[-1]) if seg.ndim == 4 else seg
        if seg.ndim == 2:
            seg = seg[..., None]
        return seg

    def _to_rgb(self, arr: np.ndarray) -> np.ndarray:
        if arr.dtype != np.uint8:
            if arr.dtype == np.uint16:
                arr = (arr.astype(np.uint32) // 257).astype(np.uint8)
            elif arr.dtype == bool:
                arr = arr.astype(np.uint8) * 255
            elif np.issubdtype(arr.dtype, np.floating):
                arr = (np.clip(arr, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
            else:
                raise SlideError(
                    f"{self.owner.path}: pixel type {arr.dtype} is not a brightfield RGB image "
                    "(expected uint8 or uint16 RGB)."
                )
        c = arr.shape[-1]
        if c == 1:
            return np.repeat(arr, 3, axis=-1)
        if c == 2:  # grey + alpha
            return _rgba_to_rgb_straight(
                np.concatenate([np.repeat(arr[..., :1], 3, -1), arr[..., 1:]], -1)
            )
        if c == 4:
            return _rgba_to_rgb_straight(arr)
        return arr[..., :3]

    def _read_whole(self) -> np.ndarray:
        if self._whole is None:
            n = self.width * self.height
            if n > _MAX_WHOLE_PAGE_PIXELS:
                raise SlideError(
                    f"{self.owner.path}: a {self.width}x{self.height} level is stored in a layout that cannot be "
                    "read region by region; convert the slide to a tiled pyramidal TIFF (e.g. with vips tiffsave --tile --pyramid)."
                )
            with self.owner._lock:
                arr = self.page.asarray()
            if self.separate and arr.ndim == 3 and arr.shape[0] == self.samples:
                arr = np.moveaxis(arr, 0, -1)
            if arr.ndim == 2:
                arr = arr[..., None]
            self._whole = self._to_rgb(arr)
        return self._whole


class _PlanarLevel:
    """A level stored as one grey page per colour channel (OME ``CYX``)."""

    def __init__(self, planes: list[_TiffLevel]) -> None:
        self.planes = planes
        self.width, self.height = planes[0].width, planes[0].height
        self.page = planes[0].page

    def read(self, x: int, y: int, w: int, h: int) -> np.ndarray:
        # each plane comes back as grey replicated to RGB; take one channel of each
        return np.stack([p.read(x, y, w, h)[..., 0] for p in self.planes], axis=-1)


def _rgba_to_rgb_straight(rgba: np.ndarray) -> np.ndarray:
    """Composite straight (non-premultiplied) RGBA on white."""
    alpha = rgba[..., 3:4].astype(np.float32) / 255.0
    rgb = rgba[..., :3].astype(np.float32) * alpha + 255.0 * (1.0 - alpha)
    return (rgb + 0.5).astype(np.uint8)


class _TiffSlideHandle(SlideHandle):
    backend = "tifffile"

    def __init__(self, path: Path, tif: Any, mpp: float | None) -> None:
        self.path = path
        self._tif = tif
        self._lock = threading.Lock()
        series = self._pick_series(tif)
        planar_rgb = self._is_planar_rgb(series)
        self._levels: list[_TiffLevel | _PlanarLevel] = []
        for level in series.levels:
            pages = [p for p in level.pages if p is not None] or [level.keyframe]
            # TiffFrame (tifffile's light page) lacks tags we use: load the full page
            pages = [p.aspage() if hasattr(p, "aspage") else p for p in pages]
            lvl: _TiffLevel | _PlanarLevel
            if planar_rgb:  # OME "CYX": one grey page per colour channel
                lvl = _PlanarLevel([_TiffLevel(p, self) for p in pages[:3]])
            else:
                lvl = _TiffLevel(pages[0], self)
            if self._levels and (
                lvl.width > self._levels[-1].width or lvl.height > self._levels[-1].height
            ):
                continue  # not a reduced resolution of the previous level
            self._levels.append(lvl)
        if not self._levels:
            raise SlideError(f"{path}: the TIFF holds no image pages.")
        self.dimensions = (self._levels[0].width, self._levels[0].height)
        self.level_dimensions = tuple((lv.width, lv.height) for lv in self._levels)
        w0, h0 = self.dimensions
        self.level_downsamples = tuple(
            float((w0 / lv.width + h0 / lv.height) / 2.0) for lv in self._levels
        )
        self.vendor = "ome-tiff" if tif.is_ome else "tiff"
        self.properties = {"tifffile.series_axes": series.axes}
        if mpp is not None:
            self.mpp, self.mpp_source = float(mpp), "user"
        else:
            self.mpp, self.mpp_source = self._mpp_from_metadata()

    def _is_planar_rgb(self, series: Any) -> bool:
        axes = str(series.axes)
        if "C" not in axes or "S" in axes:
            return False
        n_channels = int(series.shape[axes.index("C")])
        if n_channels == 1:
            return False
        if n_channels != 3:
            raise SlideError(
                f"{self.path}: the image has {n_channels} separate channels ({axes}); only brightfield RGB "
                "slides (3 colour channels) can be analysed."
            )
        return True

    @staticmethod
    def _pick_series(tif: Any) -> Any:
        # The main image is the series with the largest level 0 (labels/macros are smaller).
        best = None
        for s in tif.series:
            shape = s.levels[0].shape
            if len(shape) < 2:
                continue
            size = int(np.prod(shape))
            if best is None or size > best[0]:
                best = (size, s)
        if best is None:
            raise SlideError(f"{tif.filehandle.path}: the TIFF holds no 2-D image series.")
        return best[1]

    def _mpp_from_metadata(self) -> tuple[float, str]:
        tif = self._tif
        if tif.is_ome and tif.ome_metadata:
            value = _ome_physical_size_x_um(tif.ome_metadata)
            if value is not None:
                return _check_mpp(value, "OME PhysicalSizeX", self.path), "OME PhysicalSizeX"
        page = self._levels[0].page
        tags = page.tags
        unit_tag = tags.get("ResolutionUnit")
        xres_tag = tags.get("XResolution")
        if unit_tag is not None and xres_tag is not None:
            unit = int(unit_tag.value)
            num, den = xres_tag.value if isinstance(xres_tag.value, tuple) else (xres_tag.value, 1)
            if unit in (2, 3) and num:
                per_unit_um = 25400.0 if unit == 2 else 1e4
                value = per_unit_um * den / num
                return _check_mpp(value, "TIFF XResolution", self.path), "TIFF XResolution"
        raise _no_mpp_error(self.path, "no OME PhysicalSizeX and no TIFF resolution unit")

    def _read_region(self, x: int, y: int, level: int, w: int, h: int) -> np.ndarray:
        ds = self.level_downsamples[level]
        lx, ly = int(math.floor(x / ds)), int(math.floor(y / ds))
        return self._levels[level].read(lx, ly, w, h)

    def close(self) -> None:
        self._tif.close()


def _ome_physical_size_x_um(xml: str) -> float | None:
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return None
    for el in root.iter():
        if el.tag.rsplit("}", 1)[-1] == "Pixels" and "PhysicalSizeX" in el.attrib:
            value = float(el.attrib["PhysicalSizeX"])
            unit = el.attrib.get("PhysicalSizeXUnit", "µm")
            factor = _UNIT_TO_UM.get(unit.strip())
            if factor is None:
                return None
            return value * factor
    return None


# --------------------------------------------------------------------------- open_slide


def _is_tiff(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            head = fh.read(4)
    except OSError:
        return False
    return head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


def _is_ome(path: Path) -> bool:
    if re.search(r"\.ome\.tiff?$", path.name, re.IGNORECASE):
        return True
    try:
        import tifffile

        with tifffile.TiffFile(path) as tif:
            return bool(tif.is_ome)
    except Exception:
        return False


def _open_tifffile(path: Path, mpp: float | None) -> SlideHandle:
    import tifffile

    try:
        tif = tifffile.TiffFile(path)
    except Exception as exc:
        raise SlideError(f"{path}: not a readable TIFF ({exc}).") from exc
    try:
        return _TiffSlideHandle(path, tif, mpp)
    except BaseException:
        tif.close()
        raise


def open_slide(path: str | os.PathLike[str], mpp: float | None = None) -> SlideHandle:
    """Open a whole-slide image.

    Parameters
    ----------
    path : path-like
        Any format OpenSlide reads, or an OME-TIFF / plain TIFF.
    mpp : float, optional
        Level-0 µm per pixel, overriding the file's metadata. Needed only for files without
        resolution metadata.

    Returns
    -------
    SlideHandle

    Raises
    ------
    SlideError
        The file is missing, unreadable, corrupt, or has no resolution metadata (and no
        ``mpp`` was given).
    """
    p = Path(path).expanduser()
    if mpp is not None:
        try:
            mpp = float(mpp)
        except (TypeError, ValueError):
            raise SlideError(f"{p}: mpp must be a number of µm per pixel, got {mpp!r}.") from None
        if not (math.isfinite(mpp) and mpp > 0):
            raise SlideError(f"{p}: mpp must be a positive number of µm per pixel, got {mpp!r}.")
    if not p.exists():
        raise SlideError(f"{p}: slide file not found.")
    if p.is_dir() and p.suffix.lower() != ".mrxs":
        raise SlideError(f"{p}: is a folder, not a slide file.")
    p = p.resolve()
    tiff = _is_tiff(p)
    if tiff and _is_ome(p):
        return _open_tifffile(p, mpp)
    import openslide

    try:
        fmt = openslide.OpenSlide.detect_format(str(p))
    except Exception:
        fmt = None
    if fmt is not None:
        try:
            osr = openslide.OpenSlide(str(p))
        except Exception as exc:
            if tiff:
                return _open_tifffile(p, mpp)
            raise SlideError(
                f"{p}: OpenSlide cannot read this {fmt} file ({exc}); it may be corrupt or truncated."
            ) from exc
        try:
            return _OpenSlideHandle(p, osr, mpp)
        except BaseException:
            osr.close()
            raise
    if tiff:
        return _open_tifffile(p, mpp)
    raise SlideError(
        f"{p}: not a slide format this tool reads (OpenSlide formats such as .svs/.ndpi/.mrxs/.scn/.tif, "
        "or OME-TIFF). Is the file complete and is it really a whole-slide image?"
    )
