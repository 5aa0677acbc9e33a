"""Pure logic of the napari-mirror plugin (no viewer): tile geometry, map layer data, top
tiles, number formats, exports, sample matching and run jobs."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mirror_model import Prediction, TileMap
from napari_mirror._export import (
    csv_header,
    geojson_feature_collection,
    write_geojson,
    write_report,
    write_tile_csv,
)
from napari_mirror._geometry import (
    rasterize,
    smooth_nan,
    tile_centres_world_um,
    tile_lattice,
)
from napari_mirror._layers import (
    HeatmapDisplay,
    colorbar_label,
    heatmap_layer_data,
    top_tiles,
    top_tiles_layer_data,
)
from napari_mirror._panel import (
    format_percentile,
    format_probability,
    metric_headlines,
)
from napari_mirror._run import RunRequest, input_sentence, suggest_sample


def fake_prediction(seed: int = 0, size: int = 512, mpp: float = 0.25) -> Prediction:
    """A real :class:`Prediction` with known maps: tiles on a 512-px lattice starting at
    (1000, 2000), with holes (no tissue); an attention map (unsigned, sums to 1) and a signed
    evidence map."""
    rng = np.random.default_rng(seed)
    cells = [(c, r) for r in range(5) for c in range(7) if (r, c) not in {(0, 0), (2, 3), (4, 6)}]
    coords = np.array([[1000 + c * size, 2000 + r * size] for c, r in cells], dtype=np.int64)
    att = rng.random(len(coords))
    att /= att.sum()
    ev = rng.normal(size=len(coords))
    maps = {
        "attention": TileMap("attention", att, "Attention", "Share of attention.", False, "test", "weight"),
        "subtype:solid": TileMap(
            "subtype:solid", ev, "Evidence for solid", "Positive = for solid.", True, "test", "logit"
        ),
    }
    return Prediction(
        modalities=("slide",),
        input_kind="slide",
        coords_level0=coords,
        tile_size_level0=size,
        attention=att,
        maps=maps,
        slide_mpp=mpp,
        bundle_sha256="ab" * 32,
        bundle_name="test.mirror",
        risk_score=0.3,
        warnings=["the slide's scale differs from the training slides"],
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
    assert kwargs["units"] == ("µm", "µm") and kwargs["colormap"] == "inferno"


def test_signed_maps_are_centred_on_zero_with_a_diverging_colormap():
    pred = fake_prediction()
    ev = pred.maps["subtype:solid"].values
    grid, kwargs, _ = heatmap_layer_data(pred, map_name="subtype:solid")
    lat = tile_lattice(pred.coords_level0, 512)
    np.testing.assert_allclose(grid[lat.rows, lat.cols], ev, rtol=1e-6)
    a = np.percentile(np.abs(ev), 99)
    np.testing.assert_allclose(kwargs["contrast_limits"], [-a, a])
    assert kwargs["colormap"] == "RdBu_r"
    meta = kwargs["metadata"]["mirror"]
    assert meta["map_name"] == "subtype:solid" and meta["signed"] is True
    assert "Evidence for solid" in meta["colorbar_label"] and "white = 0" in meta["colorbar_label"]
    assert f"99th percentile of |value| on this slide, ±{a:.3g}" in meta["colorbar_label"]
    assert "logit" in meta["colorbar_label"]
    # min-max: the largest |value| on either side, still symmetric
    _, kw2, _ = heatmap_layer_data(pred, map_name="subtype:solid", display=HeatmapDisplay(scaling="minmax"))
    m = np.abs(ev).max()
    np.testing.assert_allclose(kw2["contrast_limits"], [-m, m])
    # an explicit colormap wins; an unknown map name says which maps exist
    _, kw3, _ = heatmap_layer_data(pred, map_name="attention", display=HeatmapDisplay(colormap="viridis"))
    assert kw3["colormap"] == "viridis"
    with pytest.raises(ValueError, match="attention, subtype:solid"):
        heatmap_layer_data(pred, map_name="risk")
    label = colorbar_label(pred.maps["attention"], HeatmapDisplay(), (0.01, 0.05))
    assert "1st–99th percentile" in label and "0.01 to 0.05" in label and "weight" in label
    noted = colorbar_label(pred.maps["attention"], HeatmapDisplay(), (0.01, 0.05), note="DEMO")
    assert noted == "DEMO\n" + label


def test_number_formats_closed_forms():
    assert format_probability(0.9996) == "> 99.9 %" and format_probability(1.0) == "> 99.9 %"
    assert format_probability(0.0004) == "< 0.1 %" and format_probability(0.0) == "< 0.1 %"
    assert format_probability(0.4567) == "45.7 %" and format_probability(0.9994) == "99.9 %"
    assert format_probability(float("nan")) == "n/a"
    assert [format_percentile(p) for p in (62.4, 1.0, 2, 3, 11, 12, 13, 21, 50, 100)] == [
        "62nd", "1st", "2nd", "3rd", "11th", "12th", "13th", "21st", "50th", "100th"
    ]
    # near the ends one decimal, never rounded up to a higher percentile
    assert format_percentile(99.96) == "99.9th" and format_percentile(0.46) == "0.4th"
    v = TileMap("v", np.arange(1.0, 101.0), "v", "v", False, "m", "u")
    assert HeatmapDisplay(scaling="minmax").contrast_limits(v) == (1.0, 100.0)
    np.testing.assert_allclose(HeatmapDisplay().contrast_limits(v), [1.99, 99.01])
    with pytest.raises(ValueError, match="scaling"):
        HeatmapDisplay(scaling="log")


def test_metric_headlines_pick_the_inputs_of_the_prediction():
    metrics = {
        "subtype_linear": {
            "slide": {"auroc_macro": {"mean": 0.91, "sd": 0.02, "per_fold": [0.9] * 5}},
            "both": {"auroc_macro": {"mean": 0.99, "sd": 0.01, "per_fold": [1] * 5}},
        },
        "survival_cox": {"both": {"c_index": {"mean": 0.66, "sd": 0.16}}},
        "heatmap": {"tumour_auroc": 0.79, "tumour_auroc_sd": 0.17},
    }
    heads = metric_headlines(metrics, "slide")
    assert [(h.label, h.value) for h in heads] == [
        ("Subtype macro AUROC (slide only)", "0.910 ± 0.020"),
        # no slide-only C-index in the bundle: the nearest kind it has, and the label says so
        ("Survival C-index (slide + expression)", "0.660 ± 0.160"),
        ("Heatmap vs tumour mask AUROC", "0.790 ± 0.170"),
    ]
    assert "5 held-out folds" in heads[0].detail
    assert "Heatmap" not in " ".join(h.label for h in metric_headlines(metrics, "rna"))
    assert metric_headlines({}, "slide") == []


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
    ev = pred.maps["subtype:solid"].values
    signed = top_tiles(pred, 4, map_name="subtype:solid")
    assert [t.index for t in signed] == list(np.argsort(-ev)[:4])
    assert [t.value for t in signed] == sorted(ev, reverse=True)[:4]
    assert signed[0].label().startswith("#1   100th percentile   (x ")
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
    assert kwargs["metadata"]["mirror"]["map_name"] == "attention"
    np.testing.assert_allclose(tile_centres_world_um(np.array([[0, 0]]), 1, 2.0), [[0.0, 0.0]])


def test_geojson_csv_report_carry_the_model_card_and_the_map(tmp_path):
    import pandas as pd

    pred = fake_prediction()
    card = {
        "name": "demo.mirror",
        "created": "2026-11-29",
        "training_data": "synthetic cohort",
        "intended_use": "demonstration only",
        "synthetic": True,
        "warning": "Demonstration model trained on synthetic data. Not for patient material.",
    }
    fc = json.loads(write_geojson(tmp_path / "t.geojson", pred, model=card, selected_map="subtype:solid").read_text())
    assert fc == {**pred.to_geojson(), "features": fc["features"], "properties": fc["properties"]}
    assert fc["properties"]["model"]["intended_use"] == "demonstration only"
    assert fc["properties"]["selected_map"] == "subtype:solid"
    assert fc["properties"]["warnings"][0].startswith("Demonstration model")
    assert fc["properties"]["warnings"][1] == pred.warnings[0]
    for feat, ref in zip(fc["features"], pred.to_geojson()["features"], strict=True):
        assert feat["geometry"] == ref["geometry"]
        assert feat["properties"]["measurements"] == ref["properties"]["measurements"]
        assert feat["properties"]["model"] == "demo.mirror"
        assert feat["properties"]["not_for_patient_material"] is True
    assert geojson_feature_collection(pred, object_type="detection")["features"][0]["properties"]["objectType"] == "detection"

    path = write_tile_csv(tmp_path / "t.csv", pred, model=card, selected_map="subtype:solid")
    lines = path.read_text().splitlines()
    header = csv_header(card, "subtype:solid", pred)
    assert lines[: len(header)] == header
    assert "# intended use: demonstration only" in header
    assert any(h.startswith("# WARNING: Demonstration model") for h in header)
    table = pd.read_csv(path, comment="#")
    ref = pred.tiles_table()
    assert list(table.columns) == list(ref)
    np.testing.assert_allclose(table["subtype:solid"], ref["subtype:solid"], rtol=1e-6)
    np.testing.assert_array_equal(table["attention_rank"], ref["attention_rank"])

    rep = json.loads(
        write_report(tmp_path / "r.json", pred, inputs={"slide_path": "s.svs"}, model=card, selected_map="subtype:solid").read_text()
    )
    assert rep["model"]["training_data"] == "synthetic cohort"
    assert rep["warnings"][0].startswith("Demonstration model") and pred.warnings[0] in rep["warnings"]
    assert rep["selected_map"] == "subtype:solid" and rep["inputs"]["slide_path"] == "s.svs"
    assert rep["bundle"]["sha256"] == "ab" * 32
    assert set(rep["outputs"]["slide"]["maps"]) == {"attention", "subtype:solid"}

    rna_only = Prediction(modalities=("rna",), input_kind="rna")
    with pytest.raises(ValueError, match="expression-only"):
        geojson_feature_collection(rna_only)
    with pytest.raises(ValueError, match="expression-only"):
        write_tile_csv(tmp_path / "x.csv", rna_only)
    assert not (tmp_path / "x.csv").exists()


def test_sample_matching_and_requests():
    ids = ["TCGA-AB-1234-01A", "TCGA-CD-5678-01A", "P7", "P17"]
    assert suggest_sample(ids, "/x/TCGA-AB-1234-01Z-00-DX1.svs") == "TCGA-AB-1234-01A"
    assert suggest_sample(ids, "P17.tif") == "P17"
    assert suggest_sample(ids, "slide_P17_scan.svs") == "P17"
    assert suggest_sample(ids, "slide_of_nobody.svs") is None
    assert suggest_sample(["case1", "case1b"], "x.ome.tiff") is None
    assert "Slide only" in input_sentence("slide") and "Expression only" in input_sentence("rna")
    from mirror_model.errors import ConfigError

    with pytest.raises(ConfigError, match="Nothing to run on"):
        RunRequest().validate()
    with pytest.raises(ConfigError, match="sample id"):
        RunRequest(expression_path="e.csv").validate()
    assert RunRequest(slide_path="s.svs").validate().device == "auto"


def test_run_request_fields_are_predict_keywords():
    """run_prediction passes every field but the bundle to predict() under its own name."""
    import inspect

    from mirror_model.inference import predict

    kw = RunRequest(slide_path="s.svs", mpp=0.25, nan_policy="median").predict_kwargs()
    assert "bundle_path" not in kw and set(kw) <= set(inspect.signature(predict).parameters)
    assert (kw["slide_path"], kw["mpp"], kw["nan_policy"], kw["device"]) == ("s.svs", 0.25, "median", "auto")


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


# ------------------------------------------------------------------------------ run jobs
def test_run_job_reports_errors_and_cancellation_without_raising(tmp_path):
    from mirror_model.errors import BundleError, Cancelled, ConfigError
    from napari_mirror._run import RunJob, cancel_all_runs, running_jobs

    job = RunJob(RunRequest()).start()  # nothing to run on
    assert job.join(30) and job.finished
    out = job.outcome()
    assert isinstance(out.error, ConfigError) and not out.cancelled and out.result is None

    missing = RunRequest(bundle_path=str(tmp_path / "nope.mirror"), slide_path="s.svs")
    out = RunJob(missing).start()
    assert out.join(30) and isinstance(out.outcome().error, BundleError)
    assert "nope.mirror" in str(out.outcome().error)

    job = RunJob(RunRequest(slide_path="s.svs"))
    job.cancel()  # cancelled before it starts: stops at its first check, never predicts
    job.start()
    assert job.join(60)
    out = job.outcome()
    assert out.cancelled and isinstance(out.error, Cancelled) and out.result is None
    assert job.progress().stage == "loading model bundle"
    assert running_jobs() == [] and cancel_all_runs(1.0)


def test_run_job_prepares_off_the_calling_thread(tmp_path):
    """The ``prepare`` step runs on the job's thread, and its failure is the job's outcome."""
    import threading

    from napari_mirror import _run

    seen = []

    def fake_run(request, progress=None, should_stop=None):
        progress(1, 2, "working")
        return _run.RunResult(request=request, prediction="p", bundle="b", seconds=0.0)

    def prepare(result, should_stop):
        seen.append((threading.current_thread().name, result.prediction, should_stop()))
        return "prepared"

    orig = _run.run_prediction
    _run.run_prediction = fake_run
    try:
        job = _run.RunJob(RunRequest(slide_path="s.svs"), prepare=prepare).start()
        assert job.join(10)
        out = job.outcome()
        assert out.prepared == "prepared" and out.result.prediction == "p" and out.error is None
        assert seen == [("mirror-run", "p", False)]
        bad = _run.RunJob(RunRequest(slide_path="s.svs"), prepare=lambda r, s: 1 / 0).start()
        assert bad.join(10) and isinstance(bad.outcome().error, ZeroDivisionError)
        assert "ZeroDivisionError" in bad.outcome().traceback
    finally:
        _run.run_prediction = orig
