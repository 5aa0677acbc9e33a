"""Small synthetic slides and H&E-like textures for the slide / encoder / extraction tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np

# Ruifrok-Johnston stain OD vectors (normalised rows): haematoxylin, eosin
_H = np.array([0.65, 0.70, 0.29])
_E = np.array([0.07, 0.99, 0.11])
H_VEC = _H / np.linalg.norm(_H)
E_VEC = _E / np.linalg.norm(_E)


def stain_rgb(h: np.ndarray, e: np.ndarray) -> np.ndarray:
    """Float RGB in [0, 1] from haematoxylin / eosin concentration maps (Beer-Lambert)."""
    od = h[..., None] * H_VEC + e[..., None] * E_VEC
    return np.clip(10.0 ** (-od), 0.0, 1.0)


def to_uint8(rgb: np.ndarray) -> np.ndarray:
    return (np.clip(rgb, 0, 1) * 255 + 0.5).astype(np.uint8)


def nuclei_texture(rng: np.random.Generator, px: int = 64) -> np.ndarray:
    """Nuclei-dense tissue: many round dark-purple blobs on light pink (float RGB [px, px, 3])."""
    yy, xx = np.mgrid[0:px, 0:px].astype(np.float64)
    h = np.full((px, px), 0.08)
    e = np.full((px, px), 0.25) + 0.05 * rng.standard_normal((px, px))
    n = int(rng.integers(18, 26)) * px * px // 4096
    for _ in range(n):
        cy, cx = rng.uniform(0, px, 2)
        r = rng.uniform(1.6, 2.6)
        h += 0.7 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
    scale = rng.uniform(0.8, 1.2)
    return stain_rgb(np.clip(h * scale, 0, None), np.clip(e * scale, 0, None))


def stroma_texture(rng: np.random.Generator, px: int = 64) -> np.ndarray:
    """Stroma-like tissue: oriented fibres of eosin with thin elongated haematoxylin streaks."""
    yy, xx = np.mgrid[0:px, 0:px].astype(np.float64)
    th = rng.uniform(0, np.pi)
    u = xx * np.cos(th) + yy * np.sin(th)
    v = -xx * np.sin(th) + yy * np.cos(th)
    phase = rng.uniform(0, 2 * np.pi)
    e = (
        0.45
        + 0.25 * np.sin(2 * np.pi * u / 5.0 + phase + 0.3 * np.sin(v / 9.0))
        + 0.05 * rng.standard_normal((px, px))
    )
    h = np.full((px, px), 0.08)
    for _ in range(
        int(rng.integers(3, 6)) * px * px // 4096
    ):  # elongated fibroblast nuclei along the fibres
        cu, cv = rng.uniform(-px, 2 * px), rng.uniform(-px, 2 * px)
        h += 0.5 * np.exp(-((u - cu) ** 2) / (2 * 6.0**2) - ((v - cv) ** 2) / (2 * 1.0**2))
    scale = rng.uniform(0.8, 1.2)
    return stain_rgb(np.clip(h * scale, 0, None), np.clip(e * scale, 0, None))


def tissue_slide_array(
    width: int = 2048,
    height: int = 1536,
    seed: int = 0,
    rect: tuple[int, int, int, int] = (512, 256, 1536, 1280),
) -> np.ndarray:
    """White slide (uint8 RGB) with an H&E-like textured rectangle (x0, y0, x1, y1) of tissue."""
    rng = np.random.default_rng(seed)
    img = np.full((height, width, 3), 250, np.uint8)
    img[..., :] += rng.integers(0, 4, (height, width, 1), dtype=np.uint8)  # faint glass noise
    x0, y0, x1, y1 = rect
    tile = to_uint8(nuclei_texture(rng, 128))  # a 128 px texture, repeated
    reps_y = -(-(y1 - y0) // 128)
    reps_x = -(-(x1 - x0) // 128)
    big = np.tile(tile, (reps_y, reps_x, 1))[: y1 - y0, : x1 - x0]
    img[y0:y1, x0:x1] = big
    return img


def pyramid(img: np.ndarray, n_levels: int) -> list[np.ndarray]:
    levels = [img]
    for _ in range(1, n_levels):
        prev = levels[-1]
        h, w = prev.shape[0] // 2 * 2, prev.shape[1] // 2 * 2
        levels.append(
            prev[:h, :w].reshape(h // 2, 2, w // 2, 2, 3).mean((1, 3)).round().astype(np.uint8)
        )
    return levels


def write_pyramidal_tiff(
    path: Path, img: np.ndarray, mpp: float, n_levels: int = 3, compression: str | None = "zlib"
) -> list[np.ndarray]:
    """Plain pyramidal TIFF (one tiled page per level, resolution in pixels per cm) as OpenSlide reads it."""
    import tifffile

    levels = pyramid(img, n_levels)
    with tifffile.TiffWriter(path, bigtiff=False) as tw:
        for i, lv in enumerate(levels):
            res = 1e4 / (mpp * 2**i)  # pixels per cm
            tw.write(
                lv,
                tile=(128, 128),
                photometric="rgb",
                compression=compression,
                resolution=(res, res),
                resolutionunit="CENTIMETER",
                subfiletype=0 if i == 0 else 1,
            )
    return levels


def write_ome_pyramid(
    path: Path,
    img: np.ndarray,
    physical_size: float,
    unit: str = "µm",
    n_levels: int = 3,
    tile: tuple[int, int] | None = (128, 128),
    compression: str | None = "zlib",
) -> list[np.ndarray]:
    """OME-TIFF with the reduced levels as SubIFDs (which OpenSlide ignores)."""
    import tifffile

    levels = pyramid(img, n_levels)
    kw = {"tile": tile} if tile else {"rowsperstrip": 37}
    with tifffile.TiffWriter(path, ome=True, bigtiff=False) as tw:
        tw.write(
            levels[0],
            subifds=n_levels - 1,
            photometric="rgb",
            compression=compression,
            metadata={
                "axes": "YXS",
                "PhysicalSizeX": physical_size,
                "PhysicalSizeXUnit": unit,
                "PhysicalSizeY": physical_size,
                "PhysicalSizeYUnit": unit,
            },
            **kw,
        )
        for lv in levels[1:]:
            tw.write(lv, subfiletype=1, photometric="rgb", compression=compression, **kw)
    return levels


def write_plain_tiff(
    path: Path,
    img: np.ndarray,
    resolution: tuple[float, float] | None = None,
    unit: str | None = None,
) -> None:
    """A tiled single-level TIFF, optionally with resolution tags (tifffile writes none by default)."""
    import tifffile

    kw = {}
    if resolution is not None:
        kw["resolution"] = resolution
        kw["resolutionunit"] = unit
    tifffile.imwrite(path, img, tile=(128, 128), photometric="rgb", **kw)


def write_cohort_csv(path: Path, slides: dict[str, Path]) -> Path:
    lines = ["patient_id,slide_id,slide_path"]
    for i, (sid, p) in enumerate(slides.items()):
        lines.append(f"P{i:03d},{sid},{p}")
    path.write_text("\n".join(lines) + "\n")
    return path
