"""Pure logic of the napari-mirror plugin (no viewer): tile geometry, heatmap layer data,
top tiles, exports and sample matching."""

from __future__ import annotations

import csv
import json
from types import SimpleNamespace

import numpy as np
import pytest

from napari_mirror._export import (
    geojson_feature_collection,
    write_geojson,
    write_report,
    write_tile_csv,
)
from napari_mirror._geometry import (
    percentile_limits,
    percentile_ranks,
    rasterize,
    smooth_nan,
    tile_centres_world_um,
    tile_lattice,
)
from napari_mirror._layers import (
    HeatmapDisplay,
    heatmap_layer_data,
    top_tiles,
    top_tiles_layer_data,
)
from napari_mirror._run import RunRequest, modality_kind, modality_sentence, suggest_sample


def fake_prediction(seed: int = 0, size: int = 512, mpp: float = 0.25) -> SimpleNamespace:
    """Tiles on a 512-px lattice starting at (1000, 2000), with holes (no tissue)."""
    rng = np.random.default_rng(seed)
    cells = [(c, r) for r in range(5) for c in range(7) if (r, c) not in {(0, 0), (2, 3), (4, 6)}]
    coords = np.array([[1000 + c * size, 2000 + r * size] for c, r in cells], dtype=np.int64)
    att = rng.random(len(coords))
    att /= att.sum()
    return SimpleNamespace(
        modalities=("slide",),
        coords_level0=coords,
        tile_size_level0=size,
        attention=att,
        slide_mpp=mpp,
        bundle_sha256="ab" * 32,
        risk_score=0.3,
        to_dict=lambda **kw: {"modalities": ["slide"], "attention": att, "coords_level0": coords},
    )


def test_lattice_places_tiles_on_cells():
    pred = fake_prediction()
    lat = tile_lattice(pred.coords_level0, pred.tile_size_level0)
    assert lat.exact and lat.stride_level0 == 512 and lat.origin_level0 == (1000, 2000)
    assert lat.shape == (5, 7)
    np.testing.assert_array_equal(lat.cols, (pred.coords_level0[:, 0] - 1000) // 512)
    np.testing.assert_array_equal(lat.rows, (pred.coords_level0[:, 1] - 2000) // 512)
    grid = rasterize(pred.attention, lat)
    assert np.isnan(grid[0, 0]) and np.isnan(grid[2, 3]) and np.isnan(grid[4, 6])
    assert np.isfinite(grid).sum() == len(pred.attention)
    np.testing.assert_allclose(grid[lat.rows, lat.cols], pred.attention, rtol=1e-6)


def test_lattice_overlapping_and_jittered_grids():
    # 50 % overlap: stride is half a tile.
    coords = np.array([[0, 0], [128, 0], [256, 0], [0, 128]])
    lat = tile_lattice(coords, 256)
    assert lat.exact and lat.stride_level0 == 128 and lat.shape == (2, 3)
    # Jittered coordinates are rounded to tile cells and flagged.
    lat = tile_lattice(np.array([[0, 0], [257, 3], [511, 1]]), 256)
    assert not lat.exact and lat.stride_level0 == 256
    np.testing.assert_array_equal(lat.cols, [0, 1, 2])


def test_heatmap_cells_cover_exactly_their_tiles_in_world_coordinates():
    """Each heatmap cell spans, in world µm, exactly the level-0 pixels of its tile on the slide."""
    from napari.layers import Image

    pred = fake_prediction()
    mpp = pred.slide_mpp
    data, kwargs, kind = heatmap_layer_data(pred)
    assert kind == "image" and data.shape == (5, 7)
    kwargs = {k: v for k, v in kwargs.items() if k != "metadata"}
    heat = Image(data, **kwargs)
    slide = Image(np.zeros((5000, 6000), np.uint8), scale=(mpp, mpp))
    np.testing.assert_allclose(heat.scale, [512 * mpp] * 2)
    np.testing.assert_allclose(heat.translate, [(2000 + 255.5) * mpp, (1000 + 255.5) * mpp])
    for x, y in pred.coords_level0[[0, 5, -1]]:
        r, c = (y - 2000) // 512, (x - 1000) // 512
        # Outer edges of the cell and of the tile's first/last pixels (napari pixels are centred).
        cell_lo = heat.data_to_world((r - 0.5, c - 0.5))
        cell_hi = heat.data_to_world((r + 0.5, c + 0.5))
        tile_lo = slide.data_to_world((y - 0.5, x - 0.5))
        tile_hi = slide.data_to_world((y + 512 - 0.5, x + 512 - 0.5))
        np.testing.assert_allclose(cell_lo, tile_lo, atol=1e-9)
        np.testing.assert_allclose(cell_hi, tile_hi, atol=1e-9)
    lo, hi = kwargs["contrast_limits"]
    np.testing.assert_allclose([lo, hi], np.percentile(pred.attention, [1, 99]))
    assert kwargs["units"] == ("µm", "µm")


def test_percentile_helpers_closed_forms():
    v = np.arange(1.0, 101.0)
    assert percentile_limits(v, 0, 100) == (1.0, 100.0)
    np.testing.assert_allclose(percentile_limits(v, 1, 99), [1.99, 99.01])
    assert (
        percentile_limits(np.array([3.0, 3.0, np.nan]))[0]
        < 3.0
        < percentile_limits(np.array([3.0, 3.0]))[1]
    )
    np.testing.assert_allclose(
        percentile_ranks(np.array([10.0, 30.0, 20.0, np.nan])), [0, 100, 50, np.nan]
    )
    np.testing.assert_allclose(percentile_ranks(np.array([1.0, 1.0, 3.0])), [25.0, 25.0, 100.0])
    np.testing.assert_allclose(percentile_ranks(np.array([7.0])), [100.0])
    assert HeatmapDisplay(scaling="minmax").contrast_limits(v) == (1.0, 100.0)


def test_smoothing_keeps_holes_and_constants():
    g = np.full((6, 6), 2.0, np.float32)
    g[2, 2] = np.nan
    s = smooth_nan(g, 1.5)
    assert np.isnan(s[2, 2]) and np.isfinite(s).sum() == 35
    np.testing.assert_allclose(s[np.isfinite(s)], 2.0, rtol=1e-6)
    spike = np.zeros((9, 9), np.float32)
    spike[4, 4] = 1.0
    sm = smooth_nan(spike, 1.0)
    assert sm[4, 4] < 1.0 and sm[4, 5] > 0 and sm.sum() == pytest.approx(1.0, rel=0.05)
    np.testing.assert_array_equal(smooth_nan(spike, 0), spike)


def test_top_tiles_order_positions_and_shapes():
    pred = fake_prediction()
    tops = top_tiles(pred, 3)
    order = np.argsort(-pred.attention)[:3]
    assert [t.index for t in tops] == list(order) and [t.rank for t in tops] == [1, 2, 3]
    x, y = pred.coords_level0[order[0]]
    assert (tops[0].x_level0, tops[0].y_level0) == (x, y)
    np.testing.assert_allclose(tops[0].centre_world_um, [(y + 255.5) * 0.25, (x + 255.5) * 0.25])
    assert tops[0].percentile == 100.0
    rects, kwargs, kind = top_tiles_layer_data(pred, 3)
    assert kind == "shapes" and len(rects) == 3
    np.testing.assert_allclose(rects[0].min(0), [(y - 0.5) * 0.25, (x - 0.5) * 0.25])
    np.testing.assert_allclose(rects[0].max(0), [(y + 511.5) * 0.25, (x + 511.5) * 0.25])
    np.testing.assert_array_equal(kwargs["features"]["rank"], [1, 2, 3])
    np.testing.assert_allclose(tile_centres_world_um(np.array([[0, 0]]), 1, 2.0), [[0.0, 0.0]])


def test_geojson_csv_report_round_trip(tmp_path):
    pred = fake_prediction()
    path = write_geojson(tmp_path / "tiles.geojson", pred)
    fc = json.loads(path.read_text())
    assert fc["type"] == "FeatureCollection" and len(fc["features"]) == len(pred.attention)
    for feat, (x, y), a in zip(fc["features"], pred.coords_level0, pred.attention, strict=True):
        assert feat["geometry"]["type"] == "Polygon"
        ring = feat["geometry"]["coordinates"][0]
        assert ring == [[x, y], [x + 512, y], [x + 512, y + 512], [x, y + 512], [x, y]]
        assert feat["properties"]["objectType"] == "tile"
        assert feat["properties"]["measurements"]["MIRROR attention"] == pytest.approx(a)
    pct = [f["properties"]["measurements"]["MIRROR attention percentile"] for f in fc["features"]]
    assert max(pct) == 100.0 and np.argmax(pct) == np.argmax(pred.attention)
    assert (
        geojson_feature_collection(pred, object_type="detection")["features"][0]["properties"][
            "objectType"
        ]
        == "detection"
    )
    with pytest.raises(ValueError, match="object_type"):
        geojson_feature_collection(pred, object_type="cell-ish")
    # identical ids on re-export
    assert json.loads(write_geojson(tmp_path / "again.geojson", pred).read_text()) == fc

    rows = list(csv.DictReader(write_tile_csv(tmp_path / "tiles.csv", pred).open()))
    assert len(rows) == len(pred.attention)
    best = int(np.argmax(pred.attention))
    assert rows[best]["rank"] == "1"
    assert float(rows[0]["centre_x_um"]) == pytest.approx((pred.coords_level0[0, 0] + 256) * 0.25)

    rep = json.loads(
        write_report(tmp_path / "r.json", pred, inputs={"slide_path": "s.svs"}).read_text()
    )
    assert rep["bundle"]["sha256"] == "ab" * 32 and rep["inputs"]["slide_path"] == "s.svs"
    assert len(rep["outputs"]["attention"]) == len(pred.attention)

    rna_only = SimpleNamespace(attention=None, coords_level0=None, tile_size_level0=None)
    with pytest.raises(ValueError, match="expression-only"):
        geojson_feature_collection(rna_only)


def test_sample_matching_and_requests():
    ids = ["TCGA-AB-1234-01A", "TCGA-CD-5678-01A", "P7", "P17"]
    assert suggest_sample(ids, "/x/TCGA-AB-1234-01Z-00-DX1.svs") == "TCGA-AB-1234-01A"
    assert suggest_sample(ids, "P17.tif") == "P17"
    assert suggest_sample(ids, "slide_P17_scan.svs") == "P17"
    assert suggest_sample(ids, "slide_of_nobody.svs") is None
    assert suggest_sample(["case1", "case1b"], "x.ome.tiff") is None
    assert modality_kind(("slide", "rna")) == "both" and modality_kind(("rna",)) == "rna"
    assert "Slide only" in modality_sentence(("slide",))
    from mirror_model.errors import ConfigError

    with pytest.raises(ConfigError, match="Nothing to run on"):
        RunRequest().validate()
    with pytest.raises(ConfigError, match="sample id"):
        RunRequest(expression_path="e.csv").validate()
    assert RunRequest(slide_path="s.svs").validate().device == "auto"


def test_plugin_modules_import_light():
    """napari imports the reader at start-up and whenever a file is dropped: no Qt, torch or
    matplotlib until the widget opens or a run starts."""
    import json
    import subprocess
    import sys

    code = (
        "import sys, json\n"
        "import napari_mirror, napari_mirror._reader, napari_mirror._layers, napari_mirror._export\n"
        "import napari_mirror._geometry, napari_mirror._sample_data, napari_mirror._run, napari_mirror._pyramid\n"
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    mods = set(json.loads(out.strip().splitlines()[-1]))
    assert not mods & {"torch", "qtpy", "PyQt6", "PySide6", "matplotlib", "vispy", "napari"}, mods
    import napari_mirror

    assert {"MirrorWidget", "napari_get_reader", "heatmap_layer_data"} <= set(napari_mirror.__all__)
    assert napari_mirror.heatmap_layer_data is heatmap_layer_data


class _FlatSlide:
    """A single-level 'slide' whose pixel (x, y) has R = x % 251, G = y % 241, B = 7."""

    def __init__(self, w: int, h: int) -> None:
        self.level_dimensions = ((w, h),)
        self.level_downsamples = (1.0,)
        self.calls: list[tuple] = []

    def read_region(self, loc, level, size):
        self.calls.append((loc, level, size))
        (x0, y0), (w, h) = loc, size
        yy, xx = np.mgrid[y0 : y0 + h, x0 : x0 + w]
        return np.stack([xx % 251, yy % 241, np.full_like(xx, 7)], axis=-1).astype(np.uint8)


def test_flat_slides_get_lazy_overview_levels():
    from napari_mirror._pyramid import slide_pyramid

    slide = _FlatSlide(9000, 5000)
    pyr = slide_pyramid(slide, chunk_px=1024)
    assert [a.shape[:2] for a in pyr.levels] == [(5000, 9000), (2500, 4500), (1250, 2250)]
    assert pyr.downsamples == [1.0, 2.0, 4.0] and pyr.multiscale
    assert slide.calls == []  # building the pyramid reads nothing
    block = np.asarray(pyr.levels[1][100:102, 300:302])
    # 2x2 mean of level-0 pixels x 600..601 (R 98, 99), y 200..201 (G 200, 201)
    np.testing.assert_array_equal(block[0, 0], [99, 201, 7])  # means 98.5 and 200.5, rounded half up
    assert {c[1] for c in slide.calls} == {0}
    np.testing.assert_array_equal(np.asarray(pyr.levels[0][4990:5000, 8990:9000])[-1, -1], [8999 % 251, 4999 % 241, 7])
