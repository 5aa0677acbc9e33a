"""Slide access (OpenSlide + tifffile backends), tissue detection and the tile grid."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
from _slides import (
    tissue_slide_array,
    write_ome_pyramid,
    write_plain_tiff,
    write_pyramidal_tiff,
)

from mirror_model.errors import ConfigError, SlideError
from mirror_model.slide import (
    TissueMask,
    detect_tissue,
    make_tile_grid,
    open_slide,
    otsu_threshold,
    saturation,
)
from mirror_model.slide._access import _rgba_to_rgb


@pytest.fixture(scope="module")
def slide_img() -> np.ndarray:
    rng = np.random.default_rng(1)
    return rng.integers(0, 256, (700, 900, 3), dtype=np.uint8)


# --------------------------------------------------------------------------- real scanner file


def test_cmu_metadata(cmu_small_svs: Path) -> None:
    with open_slide(cmu_small_svs) as s:
        assert s.backend == "openslide"
        assert s.vendor == "aperio"
        assert s.mpp == pytest.approx(0.499)
        assert s.mpp_source == "openslide.mpp-x"
        assert s.dimensions == (2220, 2967)
        assert s.level_dimensions == ((2220, 2967),)
        region = s.read_region((100, 200), 0, (64, 32))
        assert region.shape == (32, 64, 3) and region.dtype == np.uint8
        thumb = s.get_thumbnail(300)
        assert max(thumb.shape[:2]) == 300 and thumb.shape[2] == 3
        assert thumb.shape[1] / thumb.shape[0] == pytest.approx(2220 / 2967, rel=0.02)


def test_cmu_tile_grid_on_tissue(cmu_small_svs: Path) -> None:
    with open_slide(cmu_small_svs) as s:
        grid = make_tile_grid(s, target_mpp=0.5, tile_px=256, tissue_threshold=0.25)
        size = grid.tile_size_level0
        assert size == round(256 * 0.5 / 0.499) == 257
        assert grid.read_level == 0 and grid.read_size_px == 257
        c = grid.coords_level0
        assert c.dtype == np.int64 and c.shape[1] == 2
        assert np.all(c % size == 0)  # on the grid
        assert np.all(c >= 0)
        assert np.all(c[:, 0] + size <= 2220) and np.all(c[:, 1] + size <= 2967)
        ny, nx = grid.grid_shape
        assert (ny, nx) == (2967 // 257, 2220 // 257)
        assert 10 < len(grid) < ny * nx  # some tissue, some background
        # row-major order (y, then x)
        assert np.all(np.diff(c[:, 1] * 10**6 + c[:, 0]) > 0)
        # check against the full-resolution saturation of every grid tile
        kept = {tuple(xy) for xy in c.tolist()}
        thr = grid.tissue_mask.threshold
        frac_kept, frac_dropped = [], []
        for r in range(ny):
            for col in range(nx):
                xy = (col * size, r * size)
                f = float((saturation(s.read_region(xy, 0, (size, size))) > thr).mean())
                (frac_kept if xy in kept else frac_dropped).append(f)
        assert min(frac_kept) >= 0.25
        assert max(frac_dropped) < 0.25


# --------------------------------------------------------------------------- synthetic files


def test_pyramidal_tiff_through_openslide(tmp_path: Path, slide_img: np.ndarray) -> None:
    path = tmp_path / "pyr.tif"
    levels = write_pyramidal_tiff(path, slide_img, mpp=0.25, n_levels=3)
    with open_slide(path) as s:
        assert s.backend == "openslide" and s.vendor == "generic-tiff"
        assert s.mpp == pytest.approx(0.25, rel=1e-6)
        assert s.level_dimensions == tuple((lv.shape[1], lv.shape[0]) for lv in levels)
        assert s.level_downsamples == pytest.approx((1.0, 2.0, 4.0))
        # lossless compression: pixel-equal to the source at every level
        np.testing.assert_array_equal(s.read_region((0, 0), 0, (900, 700)), levels[0])
        np.testing.assert_array_equal(
            s.read_region((200, 100), 1, (150, 120)), levels[1][50:170, 100:250]
        )
        assert s.get_best_level_for_downsample(3.0) == 1
        assert s.get_best_level_for_downsample(4.0) == 2
        assert s.get_best_level_for_downsample(0.5) == 0


@pytest.mark.parametrize(("value", "unit", "expected"), [(0.5, "µm", 0.5), (250.0, "nm", 0.25)])
def test_ome_pyramid_pixel_equal(
    tmp_path: Path, slide_img: np.ndarray, value: float, unit: str, expected: float
) -> None:
    path = tmp_path / "slide.ome.tif"
    levels = write_ome_pyramid(path, slide_img, physical_size=value, unit=unit, n_levels=3)
    with open_slide(path) as s:
        assert s.backend == "tifffile" and s.vendor == "ome-tiff"
        assert s.mpp == pytest.approx(expected)
        assert s.mpp_source == "OME PhysicalSizeX"
        assert s.level_count == 3
        assert s.level_dimensions == tuple((lv.shape[1], lv.shape[0]) for lv in levels)
        assert s.level_downsamples == pytest.approx((1.0, 2.0, 4.0))
        # regions crossing tile borders, at every level
        np.testing.assert_array_equal(
            s.read_region((100, 90), 0, (300, 257)), levels[0][90:347, 100:400]
        )
        np.testing.assert_array_equal(
            s.read_region((2 * 60, 2 * 70), 1, (200, 130)), levels[1][70:200, 60:260]
        )
        np.testing.assert_array_equal(s.read_region((0, 0), 2, levels[2].shape[1::-1]), levels[2])
        # partly outside the slide: the outside is white
        out = s.read_region((850, 650), 0, (100, 100))
        np.testing.assert_array_equal(out[:50, :50], levels[0][650:700, 850:900])
        assert np.all(out[50:, :] == 255) and np.all(out[:, 50:] == 255)


def test_ome_stripped_untiled(tmp_path: Path, slide_img: np.ndarray) -> None:
    path = tmp_path / "strips.ome.tif"
    levels = write_ome_pyramid(path, slide_img, physical_size=0.5, n_levels=2, tile=None)
    with open_slide(path) as s:
        assert s.level_count == 2
        np.testing.assert_array_equal(
            s.read_region((33, 70), 0, (400, 111)), levels[0][70:181, 33:433]
        )
        np.testing.assert_array_equal(
            s.read_region((66, 140), 1, (100, 80)), levels[1][70:150, 33:133]
        )


def test_ome_reads_from_threads(tmp_path: Path, slide_img: np.ndarray) -> None:
    path = tmp_path / "t.ome.tif"
    levels = write_ome_pyramid(path, slide_img, physical_size=0.5, n_levels=1)
    rng = np.random.default_rng(0)
    boxes = [
        (int(x), int(y))
        for x, y in zip(rng.integers(0, 800, 40), rng.integers(0, 600, 40), strict=True)
    ]
    errors: list[str] = []
    with open_slide(path) as s:

        def work(k: int) -> None:
            for x, y in boxes[k::4]:
                got = s.read_region((x, y), 0, (100, 100))
                want = np.full((100, 100, 3), 255, np.uint8)
                part = levels[0][y : y + 100, x : x + 100]
                want[: part.shape[0], : part.shape[1]] = part
                if not np.array_equal(got, want):
                    errors.append(f"{x},{y}")

        threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert errors == []


def test_tiff_without_resolution_needs_mpp(tmp_path: Path, slide_img: np.ndarray) -> None:
    path = tmp_path / "nores.tif"
    write_plain_tiff(path, slide_img)
    with pytest.raises(SlideError, match=r"nores\.tif.*no resolution metadata.*mpp"):
        open_slide(path)
    with open_slide(path, mpp=0.5) as s:
        assert s.mpp == 0.5 and s.mpp_source == "user"
        np.testing.assert_array_equal(s.read_region((10, 20), 0, (30, 40)), slide_img[20:60, 10:40])


def test_screen_dpi_is_not_a_microscope_resolution(tmp_path: Path, slide_img: np.ndarray) -> None:
    path = tmp_path / "dpi72.tif"
    write_plain_tiff(path, slide_img, resolution=(72, 72), unit="INCH")
    with pytest.raises(SlideError, match=r"dpi72\.tif.*not a microscope resolution"):
        open_slide(path)
    assert open_slide(path, mpp=0.25).mpp == 0.25


def test_tiff_resolution_in_inch(tmp_path: Path, slide_img: np.ndarray) -> None:
    path = tmp_path / "inch.tif"
    write_plain_tiff(path, slide_img, resolution=(101600.0, 101600.0), unit="INCH")  # 0.25 µm/px
    with open_slide(path) as s:
        assert s.mpp == pytest.approx(0.25, rel=1e-6)


@pytest.mark.parametrize("kind", ["missing", "text", "truncated", "folder"])
def test_bad_slide_files(tmp_path: Path, slide_img: np.ndarray, kind: str) -> None:
    if kind == "missing":
        path = tmp_path / "nope.svs"
    elif kind == "text":
        path = tmp_path / "notes.svs"
        path.write_text("this is not a slide\n")
    elif kind == "truncated":
        good = tmp_path / "good.tif"
        write_pyramidal_tiff(good, slide_img, mpp=0.5)
        path = tmp_path / "cut.tif"
        path.write_bytes(good.read_bytes()[:3000])
    else:
        path = tmp_path / "folder"
        path.mkdir()
    with pytest.raises(SlideError, match=path.name):
        s = open_slide(path)
        s.read_region((0, 0), 0, (900, 700))  # a truncated file may open but cannot be read


@pytest.mark.parametrize("mpp", [0, -1.0, float("nan"), "abc"])
def test_bad_mpp(tmp_path: Path, slide_img: np.ndarray, mpp: object) -> None:
    path = tmp_path / "nores.tif"
    write_plain_tiff(path, slide_img)
    with pytest.raises(SlideError, match="mpp"):
        open_slide(path, mpp=mpp)  # type: ignore[arg-type]


def test_bad_region_arguments(tmp_path: Path, slide_img: np.ndarray) -> None:
    path = tmp_path / "p.tif"
    write_pyramidal_tiff(path, slide_img, mpp=0.5, n_levels=2)
    with open_slide(path) as s:
        with pytest.raises(SlideError, match="level 5 does not exist"):
            s.read_region((0, 0), 5, (10, 10))
        with pytest.raises(SlideError, match="positive"):
            s.read_region((0, 0), 0, (0, 10))


def test_rgba_composited_on_white() -> None:
    # OpenSlide returns premultiplied RGBA: transparent -> white, half-transparent red -> pink
    rgba = np.array([[[0, 0, 0, 0], [128, 0, 0, 128], [10, 20, 30, 255]]], np.uint8)
    rgb = _rgba_to_rgb(rgba)
    np.testing.assert_array_equal(rgb, [[[255, 255, 255], [255, 127, 127], [10, 20, 30]]])


# --------------------------------------------------------------------------- tissue and grid


def test_otsu_threshold_two_modes() -> None:
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.normal(0.1, 0.01, 1000), rng.normal(0.5, 0.01, 1000)])
    assert otsu_threshold(values) == pytest.approx(0.3, abs=0.04)  # middle of the gap


def test_grid_keeps_exactly_the_tissue_rectangle(tmp_path: Path) -> None:
    # tissue exactly covers grid cells x in [512, 1536), y in [256, 1280) at 256 px tiles
    img = tissue_slide_array(2048, 1536, rect=(512, 256, 1536, 1280))
    path = tmp_path / "rect.tif"
    write_pyramidal_tiff(path, img, mpp=0.5, n_levels=3)
    with open_slide(path) as s:
        grid = make_tile_grid(s, target_mpp=0.5, tile_px=256)
        expected = {(x, y) for y in range(256, 1280, 256) for x in range(512, 1536, 256)}
        assert {tuple(c) for c in grid.coords_level0.tolist()} == expected
        assert grid.tile_size_level0 == 256 and grid.read_level == 0
        np.testing.assert_allclose(grid.tissue_fraction, 1.0, atol=0.05)
        # 1 µm/px tiles come from the 2x level, 128 px of it per tile
        g2 = make_tile_grid(s, target_mpp=1.0, tile_px=128, tissue=grid.tissue_mask)
        assert g2.tile_size_level0 == 256 and g2.read_level == 1 and g2.read_size_px == 128
        assert {tuple(c) for c in g2.coords_level0.tolist()} == expected
        # threshold 0 keeps every tile of the full grid
        g0 = make_tile_grid(s, tissue_threshold=0.0, tissue=grid.tissue_mask)
        assert len(g0) == (1536 // 256) * (2048 // 256)


def test_fraction_in_boxes_closed_form() -> None:
    mask = np.zeros((10, 10), bool)
    mask[:, :5] = True  # left half is tissue
    tm = TissueMask(mask=mask, downsample=(10.0, 10.0), threshold=0.1, mask_mpp=5.0)
    boxes = np.array([[0, 0], [50, 0], [25, 0], [40, 40]])
    np.testing.assert_allclose(tm.fraction_in_boxes(boxes, 20.0), [1.0, 0.0, 1.0, 0.5], atol=1e-6)


def test_blank_slide_has_no_tissue(tmp_path: Path) -> None:
    img = np.full((1024, 1024, 3), 252, np.uint8)
    path = tmp_path / "blank.tif"
    write_pyramidal_tiff(path, img, mpp=0.5, n_levels=1)
    with open_slide(path) as s:
        with pytest.raises(SlideError, match=r"blank\.tif: no tissue found.*Check"):
            make_tile_grid(s)
        assert len(make_tile_grid(s, require_tissue=False)) == 0
        assert detect_tissue(s).tissue_fraction == 0.0


def test_slide_smaller_than_a_tile(tmp_path: Path) -> None:
    path = tmp_path / "tiny.tif"
    write_pyramidal_tiff(
        path, tissue_slide_array(200, 200, rect=(0, 0, 200, 200)), mpp=0.5, n_levels=1
    )
    with open_slide(path) as s, pytest.raises(SlideError, match="smaller than one tile"):
        make_tile_grid(s)


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"target_mpp": 0}, "target_mpp"),
        ({"tile_px": 4}, "tile_px"),
        ({"tissue_threshold": 1.5}, "tissue_threshold"),
    ],
)
def test_grid_bad_parameters(tmp_path: Path, kw: dict, match: str) -> None:
    path = tmp_path / "p.tif"
    write_pyramidal_tiff(
        path, tissue_slide_array(512, 512, rect=(0, 0, 512, 512)), mpp=0.5, n_levels=1
    )
    with open_slide(path) as s, pytest.raises(ConfigError, match=match):
        make_tile_grid(s, **kw)


def test_read_scaled_in_blocks_matches_whole_read(tmp_path: Path, slide_img: np.ndarray,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import mirror_model.slide._access as access

    path = tmp_path / "b.ome.tif"
    write_ome_pyramid(path, slide_img, physical_size=0.5, n_levels=1)
    with open_slide(path) as s:
        whole = s.read_scaled(180, 140)  # exact factor 5
        monkeypatch.setattr(access, "_MAX_SCALED_LEVEL_PIXELS", 1000)
        monkeypatch.setattr(access, "_SCALED_BLOCK_PX", 250)  # slides without a pyramid: bounded memory
        np.testing.assert_array_equal(s.read_scaled(180, 140), whole)
    want = slide_img.reshape(140, 5, 180, 5, 3).mean((1, 3))
    assert np.abs(whole.astype(float) - want).max() <= 1.0


def test_ome_planar_channels(tmp_path: Path, slide_img: np.ndarray) -> None:
    import tifffile

    planes = np.moveaxis(slide_img, -1, 0)  # CYX: one grey page per colour
    path = tmp_path / "cyx.ome.tif"
    with tifffile.TiffWriter(path, ome=True) as tw:
        tw.write(planes, subifds=1, tile=(128, 128), photometric="minisblack",
                 metadata={"axes": "CYX", "PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5})
        tw.write(planes[:, ::2, ::2], subfiletype=1, tile=(128, 128), photometric="minisblack")
    with open_slide(path) as s:
        assert s.level_count == 2
        np.testing.assert_array_equal(s.read_region((10, 20), 0, (300, 200)), slide_img[20:220, 10:310])
        np.testing.assert_array_equal(s.read_region((0, 0), 1, (450, 350)), slide_img[::2, ::2])
    five = tmp_path / "fluo.ome.tif"
    tifffile.imwrite(five, np.zeros((5, 64, 64), np.uint16), ome=True, photometric="minisblack",
                     metadata={"axes": "CYX", "PhysicalSizeX": 0.5})
    with pytest.raises(SlideError, match=r"fluo\.ome\.tif: the image has 5 separate channels"):
        open_slide(five)


def test_grayscale_slide_is_named_as_such(tmp_path):
    """A single-channel pyramidal TIFF with content: the error names the channel problem,
    not "no tissue"; a blank white RGB slide keeps the no-tissue message."""
    import tifffile

    from mirror_model.errors import SlideError
    from mirror_model.slide import make_tile_grid, open_slide

    img = (np.random.default_rng(0).random((1024, 1024)) * 120).astype(np.uint8)
    def write(path, data, photometric):
        with tifffile.TiffWriter(path) as tw:
            tw.write(data, tile=(256, 256), resolution=(2e4, 2e4), resolutionunit="CENTIMETER",
                     photometric=photometric)  # fmt: skip
        return path

    p = write(tmp_path / "gray.tif", img, "minisblack")
    with open_slide(p) as s, pytest.raises(SlideError, match="single channel \\(grayscale"):
        make_tile_grid(s, target_mpp=1.0, tile_px=64)
    white = np.full((1024, 1024, 3), 250, np.uint8)
    q = write(tmp_path / "white.tif", white, "rgb")
    with open_slide(q) as s, pytest.raises(SlideError, match="no tissue found"):
        make_tile_grid(s, target_mpp=1.0, tile_px=64)
