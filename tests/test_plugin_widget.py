"""The MIRROR widget in a real napari viewer (Xvfb): full runs on the demo sample, the heatmap's
alignment with the slide, the map selector, the panel's numbers and model card, colour bar and
scale bar, exports, errors (with their details), cancellation and the 400-px layout."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from _plugin_helpers import (
    NotificationRecorder,
    camera_of,
    make_random_bundle,
    wait_for_run,
    write_blank_tiff,
    write_pyramidal_tiff,
)

from napari_mirror._layers import METADATA_KEY
from napari_mirror._panel import format_percentile, format_probability
from napari_mirror._qt._form import NO_SLIDE
from napari_mirror._run import RunRequest, clear_bundle_cache, run_prediction

pytestmark = pytest.mark.gui


# ----------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("mirror-cache")


@pytest.fixture(autouse=True)
def _sample_cache(cache_dir, monkeypatch):
    monkeypatch.setenv("NAPARI_MIRROR_CACHE", str(cache_dir))
    yield
    clear_bundle_cache()


@pytest.fixture(scope="module")
def demo_case(cache_dir):
    from napari_mirror._sample_data import demo_case

    return demo_case(cache_dir)


@dataclass(frozen=True)
class BundleUnderTest:
    path: Path | None  # None: the embedded demo bundle (the widget's default)
    has_rna: bool


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, demo_case):
    """The embedded demo bundle when it has been built; until then a small random-weight
    bundle made with the package's save API (slide heads, plus RNA heads when the gene module
    is there)."""
    from mirror_model.bundle import default_bundle_path, load_bundle

    path = default_bundle_path()
    if path.exists():
        return BundleUnderTest(None, load_bundle(path).has_rna_encoder)
    genes = None
    try:
        import mirror_model.genes  # noqa: F401
        from mirror_model.expression import read_expression

        genes = read_expression(demo_case.expression_path).genes
    except ImportError:
        pass
    made = make_random_bundle(tmp_path_factory.mktemp("bundle") / "random.mirror", genes)
    return BundleUnderTest(made, load_bundle(made).has_rna_encoder)


@pytest.fixture(scope="module")
def demo_features(tmp_path_factory, bundle, demo_case):
    """Precomputed features (.h5) of the demo slide for the bundle under test: runs that use
    them skip tile encoding, and they exercise the widget's feature-file input."""
    from mirror_model.bundle import default_bundle_path, load_bundle
    from mirror_model.extract import extract_slide

    b = load_bundle(bundle.path or default_bundle_path())
    out = tmp_path_factory.mktemp("features") / "demo.h5"
    extract_slide(
        demo_case.slide_path,
        b.patch_encoder_name,
        out,
        target_mpp=b.target_mpp,
        tile_px=b.tile_px,
        tissue_threshold=float(b.document["tiling"].get("tissue_threshold", 0.25)),
        device="cpu",
        num_workers=1,
    )
    return out


def _viewer_with_sample(make_napari_viewer, bundle=None, show=False):
    viewer = make_napari_viewer(show=show)
    layers = viewer.open_sample("napari-mirror", "demo_slide")
    from napari_mirror._widget import MirrorWidget

    widget = MirrorWidget(viewer)
    viewer.window.add_dock_widget(widget, name="MIRROR")
    widget.set_device("cpu")
    if bundle is not None:
        widget.set_bundle_file(bundle.path)
        if not bundle.has_rna:
            widget.set_expression_file(None)  # a slide-only bundle cannot take the expression row
    return viewer, widget, layers[0]


# ----------------------------------------------------------------------------------- manifest
def test_manifest_found_through_entry_point():
    from npe2 import PluginManager

    pm = PluginManager()
    pm.discover(include_npe1=False)
    mf = pm.get_manifest("napari-mirror")
    assert mf.display_name == "MIRROR"
    (reader,) = mf.contributions.readers
    assert {"*.svs", "*.ndpi", "*.tif", "*.tiff", "*.mrxs", "*.scn", "*.bif", "*.ome.tif"} <= set(
        reader.filename_patterns
    )
    assert [s.key for s in mf.contributions.sample_data] == ["demo_slide"]
    assert [w.display_name for w in mf.contributions.widgets] == ["MIRROR"]
    mf.validate_imports()  # every python_name in napari.yaml imports


def test_widget_opens_from_plugin_menu(make_napari_viewer):
    viewer = make_napari_viewer()
    dock, widget = viewer.window.add_plugin_dock_widget("napari-mirror", "MIRROR")
    assert type(widget).__name__ == "MirrorWidget"
    assert widget.form.slide.value == NO_SLIDE


# ----------------------------------------------------------------------------------- sample data
def test_sample_data_carries_expression_and_fills_the_widget(make_napari_viewer, demo_case):
    viewer, widget, layer = _viewer_with_sample(make_napari_viewer)
    meta = layer.metadata[METADATA_KEY]
    assert meta["kind"] == "slide" and meta["sample_id"] == demo_case.sample_id
    assert meta["expression_path"] == str(demo_case.expression_path.resolve())
    assert widget.form.slide.value == layer.name
    assert widget.form.path_text(widget.form.expression) == meta["expression_path"]
    assert widget.form.sample.value == demo_case.sample_id
    req = widget.current_request()
    assert req.slide_path == meta["slide_path"] and req.sample_id == demo_case.sample_id


# ----------------------------------------------------------------------------------- full run
@pytest.mark.slow
def test_full_run_heatmap_panel_exports_and_screenshot(
    make_napari_viewer, qtbot, bundle, demo_case, tmp_path
):
    import time

    from mirror_model.inference import predict

    viewer, widget, slide = _viewer_with_sample(make_napari_viewer, bundle, show=True)
    widget.topk_spin.setValue(5)

    t0 = time.perf_counter()
    with NotificationRecorder() as rec:
        widget.run()
        assert widget.is_running
        wait_for_run(qtbot, widget)
    seconds = time.perf_counter() - t0
    print(f"\n[napari-mirror] Run -> heatmap on the demo sample (CPU): {seconds:.2f} s")
    assert rec.errors() == [], rec.errors()
    assert widget.last_error is None
    res = widget.last_result
    pred = res.prediction
    assert set(pred.modalities) == ({"slide", "rna"} if bundle.has_rna else {"slide"})

    # The API's own prediction for the same inputs is what the widget shows.
    ref = predict(
        res.bundle,
        slide_path=demo_case.slide_path,
        expression_path=demo_case.expression_path if bundle.has_rna else None,
        sample_id=demo_case.sample_id if bundle.has_rna else None,
        device="cpu",
    )
    np.testing.assert_allclose(pred.attention, ref.attention, rtol=1e-4, atol=1e-7)
    np.testing.assert_array_equal(pred.coords_level0, ref.coords_level0)
    assert pred.risk_score == pytest.approx(ref.risk_score, rel=1e-4, abs=1e-6)
    shown = widget.results.shown
    from napari_mirror._panel import format_number

    assert shown["risk_score"] == format_number(ref.risk_score, 4)
    assert shown["risk_percentile"] == format_percentile(ref.risk_percentile)
    assert shown["risk_group"] == str(ref.risk_group)
    assert shown["predicted_subtype"] == str(ref.predicted_subtype)
    for name, p in ref.subtype_probabilities.items():
        assert shown[f"p[{name}]"] == format_probability(p)
    assert (
        "Slide + expression" if bundle.has_rna else "Slide only"
    ) in widget.results.summary_text()
    assert shown["km_groups"]  # the reference cohort's curves were drawn
    assert widget.status_label.text().endswith(f"Done in {res.seconds:.1f} s.")
    # the model says where it comes from, at the top of the results
    prov = res.bundle.provenance
    assert prov.name in widget.results.model_text() and prov.intended_use in widget.results.model_text()
    if prov.synthetic:  # the embedded demo bundle
        assert widget.model_view.banner.isVisible()
        assert "Not for patient material" in widget.results.banner_text()
        assert "Not for patient material" not in widget.results.summary_text()  # said once
    # napari's colour bar on the map layer, its label beside it, a scale bar in µm
    heat = widget.heatmap_layer
    assert heat.colorbar.visible and viewer.scale_bar.visible
    label = viewer.text_overlay.text
    assert viewer.text_overlay.visible and label == heat.metadata["mirror"]["colorbar_label"]
    assert pred.maps[widget.selected_map_name].label in label and "percentile" in label
    if prov.synthetic:  # every screenshot / PNG export of a demo model's map says so
        assert label.startswith("DEMO MODEL (synthetic data): not for patient material\n")

    # Heatmap layer: one cell per tile, aligned with the slide's level-0 pixels (µm).
    heat = widget.heatmap_layer
    assert heat is not None and heat in viewer.layers
    mpp = slide.scale[0]
    coords, size = np.asarray(pred.coords_level0), int(pred.tile_size_level0)
    x0, y0 = coords.min(0)
    assert heat.data.shape == (
        (coords[:, 1].max() - y0) // size + 1,
        (coords[:, 0].max() - x0) // size + 1,
    )
    np.testing.assert_allclose(heat.scale, [size * mpp] * 2)
    np.testing.assert_allclose(
        heat.translate, [(y0 + (size - 1) / 2) * mpp, (x0 + (size - 1) / 2) * mpp]
    )
    rows, cols = (coords[:, 1] - y0) // size, (coords[:, 0] - x0) // size
    np.testing.assert_allclose(heat.data[rows, cols], pred.attention, rtol=1e-5)
    assert np.isnan(heat.data).sum() == heat.data.size - len(
        coords
    )  # no tissue -> NaN (transparent)
    lo, hi = heat.contrast_limits
    np.testing.assert_allclose([lo, hi], np.percentile(pred.attention, [1, 99]), rtol=1e-5)
    for x, y in coords[:3]:
        r, c = (y - y0) // size, (x - x0) // size
        np.testing.assert_allclose(
            heat.data_to_world((r - 0.5, c - 0.5)), slide.data_to_world((y - 0.5, x - 0.5))
        )
    tops = widget.top_tiles_layer
    assert tops is not None and len(tops.data) == 5 and widget.top_list.count() == 5

    # Clicking a listed tile centres the view on it.
    widget.top_list.setCurrentRow(0)
    first = widget._top[0]
    np.testing.assert_allclose(camera_of(viewer).center[-2:], first.centre_world_um)

    # Screenshot: the overlay changes the pixels over tissue tiles and nowhere else (compared
    # with the same view, same layout, heatmap hidden).
    viewer.reset_view()
    tops.visible = False
    heat.visible = False
    heat.colorbar.visible = False  # the legend (colour bar + label) would cover some cells
    qtbot.wait(200)
    before = viewer.screenshot(canvas_only=True, flash=False)
    heat.visible = True
    viewer.text_overlay.visible = False
    qtbot.wait(200)
    after = viewer.screenshot(canvas_only=True, flash=False)
    heat.colorbar.visible = True
    assert after.shape == before.shape
    h, w = after.shape[:2]
    cam = camera_of(viewer)
    zoom = cam.zoom * (h / viewer.canvas.size[0])  # screenshot px per µm

    def to_px(world_yx):
        return (
            int(round((world_yx[0] - cam.center[-2]) * zoom + h / 2)),
            int(round((world_yx[1] - cam.center[-1]) * zoom + w / 2)),
        )

    changed, unchanged = [], []
    for r in range(heat.data.shape[0]):
        for c in range(heat.data.shape[1]):
            py, px = to_px(heat.data_to_world((r, c)))
            if not (0 <= py < h and 0 <= px < w):
                continue
            diff = np.abs(after[py, px, :3].astype(int) - before[py, px, :3].astype(int)).max()
            (changed if np.isfinite(heat.data[r, c]) else unchanged).append(diff)
    assert len(changed) >= 0.9 * len(coords)
    assert np.mean(np.array(changed) > 8) > 0.95, changed
    assert unchanged, "the demo slide should have tile-grid cells without tissue"
    assert np.mean(np.array(unchanged) <= 2) > 0.95, unchanged

    # Exports.
    fc = json.loads(widget.export_geojson(tmp_path / "tiles.geojson").read_text())
    assert len(fc["features"]) == len(coords)
    ring = fc["features"][0]["geometry"]["coordinates"][0]
    x, y = coords[0]
    assert ring == [[x, y], [x + size, y], [x + size, y + size], [x, y + size], [x, y]]
    assert fc["features"][0]["properties"]["measurements"]["attention"] == pytest.approx(
        pred.attention[0]
    )
    assert fc["properties"]["model"]["name"] == prov.name
    assert fc["properties"]["selected_map"] == widget.selected_map_name
    lines = widget.export_csv(tmp_path / "tiles.csv").read_text().splitlines()
    comments = [x for x in lines if x.startswith("#")]
    assert len(lines) == len(coords) + 1 + len(comments)
    assert f"# intended use: {prov.intended_use}" in comments
    png = widget.export_png(tmp_path / "view.png")
    import matplotlib.image as mpimg

    assert mpimg.imread(png).shape[:2] == (h, w)
    rep = json.loads(widget.export_report(tmp_path / "report.json").read_text())
    assert rep["bundle"]["sha256"] == pred.bundle_sha256 == res.bundle.sha256
    assert rep["inputs"]["sample_id"] == (demo_case.sample_id if bundle.has_rna else None)
    assert rep["outputs"]["survival"]["risk_score"] == pytest.approx(pred.risk_score)
    assert rep["model"]["training_data"] == prov.training_data
    if prov.synthetic:
        assert rep["warnings"][0] == prov.warning

    # Display controls act on the heatmap layer.
    widget.colormap_combo.setCurrentText("viridis")
    widget.opacity_slider.setValue(30)
    widget.smoothing_spin.setValue(1.0)
    assert heat.colormap.name == "viridis" and heat.opacity == pytest.approx(0.3)
    assert np.isnan(heat.data).sum() == heat.data.size - len(coords)


def test_slide_only_run_from_feature_file(
    make_napari_viewer, qtbot, bundle, demo_case, demo_features
):
    """Slide-only, with precomputed features instead of re-extraction: the panel says so and the
    heatmap covers the feature file's tiles."""
    from mirror_model.features import read_features

    viewer, widget, slide = _viewer_with_sample(make_napari_viewer, bundle)
    widget.set_expression_file(None)
    widget.set_features_file(demo_features)
    widget.run()
    wait_for_run(qtbot, widget)
    assert widget.last_error is None
    pred = widget.last_result.prediction
    assert tuple(pred.modalities) == ("slide",)
    assert "Slide only" in widget.results.summary_text()
    ff = read_features(demo_features)
    np.testing.assert_array_equal(pred.coords_level0, ff.coords_level0)
    heat = widget.heatmap_layer
    assert heat is not None and np.isfinite(heat.data).sum() == len(ff.coords_level0)
    assert widget.export_buttons["geojson"].isEnabled()

    # Running again replaces this slide's result layers (same names, no duplicates).
    names = [layer.name for layer in viewer.layers]
    assert names == [slide.name, f"{slide.name} heatmap", f"{slide.name} top tiles"]
    widget.run()
    wait_for_run(qtbot, widget)
    assert [layer.name for layer in viewer.layers] == names
    # updated in place (removing a napari layer costs a full garbage collection)
    assert widget.heatmap_layer is heat and widget.last_result.prediction is not pred

    # The number of marked tiles follows the spin box; the list matches the layer.
    widget.topk_spin.setValue(3)
    assert len(widget.top_tiles_layer.data) == 3 and widget.top_list.count() == 3
    assert [layer.name for layer in viewer.layers] == names
    best = int(np.argmax(pred.attention))
    assert widget.top_list.item(0).text() == (
        f"#1   100th percentile   (x {pred.coords_level0[best, 0]}, y {pred.coords_level0[best, 1]})"
    )


def test_slide_without_resolution_opens_at_the_panels_mpp_and_runs(
    make_napari_viewer, qtbot, bundle, demo_case, tmp_path
):
    """A TIFF with no resolution tags is refused with a message that says what to set; with
    'µm per pixel' set, it opens at that scale and the run tiles it at that resolution (same
    tiles as the original slide, which carries 0.5 µm/px in its metadata)."""
    import tifffile

    from mirror_model.slide import open_slide
    from napari_mirror._widget import MirrorWidget

    with open_slide(demo_case.slide_path) as ref:
        assert ref.mpp == pytest.approx(0.5)
        level0 = ref.read_region((0, 0), 0, ref.dimensions)
    bare = tmp_path / "no_resolution.tif"
    with tifffile.TiffWriter(bare) as tw:  # pyramidal, tiled, but no resolution tags at all
        img = level0
        for i in range(3):
            tw.write(img, tile=(256, 256), photometric="rgb", compression="zlib",
                     subfiletype=1 if i else 0)
            img = img[::4, ::4]
    from mirror_model.errors import SlideResolutionError

    with pytest.raises(SlideResolutionError, match="µm per pixel is unknown"):
        open_slide(bare)

    viewer = make_napari_viewer()
    widget = MirrorWidget(viewer)
    viewer.window.add_dock_widget(widget, name="MIRROR")
    widget.set_device("cpu")
    widget.set_bundle_file(bundle.path)
    widget.set_expression_file(None)
    assert widget.open_slide_file(str(bare)) is None
    assert len(viewer.layers) == 0
    assert "µm per pixel is unknown" in widget.status_label.text()
    assert "Set µm/px in this panel" in widget.status_label.text()

    widget.set_mpp(0.5)
    layer = widget.open_slide_file(str(bare))
    assert layer is not None and widget.selected_slide_layer() is layer
    assert tuple(layer.scale) == pytest.approx((0.5, 0.5))
    assert layer.metadata["mirror"]["mpp_source"] == "user"
    assert "0.5 µm/px (given in this panel)" in widget.status_label.text()
    widget.run()
    wait_for_run(qtbot, widget)
    assert widget.last_error is None
    pred = widget.last_result.prediction
    assert pred.slide_mpp == pytest.approx(0.5)
    original = run_prediction(
        RunRequest(bundle_path=bundle.path, slide_path=str(demo_case.slide_path), device="cpu")
    ).prediction
    np.testing.assert_array_equal(pred.coords_level0, original.coords_level0)
    assert widget.heatmap_layer is not None


def test_rna_only_run_says_so_and_draws_no_heatmap(make_napari_viewer, qtbot, bundle, demo_case):
    if not bundle.has_rna:
        pytest.skip("the bundle under test has no RNA heads")
    viewer, widget, slide = _viewer_with_sample(make_napari_viewer, bundle)
    n_layers = len(viewer.layers)
    widget.form.slide.value = NO_SLIDE
    widget.set_expression_file(demo_case.expression_path, sample_id=demo_case.sample_id)
    widget.run()
    wait_for_run(qtbot, widget)
    assert widget.last_error is None
    assert tuple(widget.last_result.prediction.modalities) == ("rna",)
    assert "Expression only" in widget.results.summary_text()
    assert widget.heatmap_layer is None and len(viewer.layers) == n_layers
    assert not widget.export_buttons["geojson"].isEnabled()
    assert not widget.heatmap_section.isEnabled() and widget.map_names() == []
    assert widget.results.shown["risk_group"] in ("low", "high")
    assert "no heatmap" in widget.status_label.text() and not widget.heatmap_section.isExpanded()
    assert "Heatmap vs tumour" not in widget.results.shown["headlines"]


# ----------------------------------------------------------------------------------- errors
def _run_expecting_error(widget, qtbot) -> list[str]:
    with NotificationRecorder() as rec:
        widget.run()
        if widget.is_running:
            wait_for_run(qtbot, widget)
    return rec.errors()


def test_error_unloadable_bundle(make_napari_viewer, qtbot, demo_case, tmp_path):
    viewer, widget, _ = _viewer_with_sample(make_napari_viewer)
    bad = tmp_path / "broken.mirror"
    bad.write_bytes(b"\x00" * 64)
    widget.set_bundle_file(bad)
    n = len(viewer.layers)
    errors = _run_expecting_error(widget, qtbot)
    assert len(errors) == 1 and "broken.mirror" in errors[0] and errors[0].startswith("MIRROR: ")
    assert "Traceback" not in errors[0]
    assert len(viewer.layers) == n and widget.last_result is None


def test_error_expression_not_matching_bundle_genes(
    make_napari_viewer, qtbot, bundle, demo_case, tmp_path
):
    if not bundle.has_rna:
        pytest.skip("the bundle under test has no RNA heads")
    viewer, widget, _ = _viewer_with_sample(make_napari_viewer, bundle)
    expr = tmp_path / "other_genes.csv"
    genes = [f"NOTAGENE{i}" for i in range(30)]
    rows = ["sample_id," + ",".join(genes), "PATIENT-1," + ",".join(["1.0"] * 30)]
    expr.write_text("\n".join(rows) + "\n")
    assert widget.set_expression_file(expr, sample_id="PATIENT-1")
    n = len(viewer.layers)
    errors = _run_expecting_error(widget, qtbot)
    assert len(errors) == 1 and "gene" in errors[0].lower() and "other_genes.csv" in errors[0]
    assert len(viewer.layers) == n


def test_error_unreadable_slide_and_no_tissue(make_napari_viewer, qtbot, bundle, tmp_path):
    viewer = make_napari_viewer()
    from napari_mirror._widget import MirrorWidget

    blank = tmp_path / "blank_glass.tif"
    write_blank_tiff(blank)
    good = tmp_path / "to_be_corrupted.tif"
    write_pyramidal_tiff(good, width=1024, height=768, n_levels=2)
    (blank_layer,) = viewer.open(str(blank), plugin="napari-mirror")
    (bad_layer,) = viewer.open(str(good), plugin="napari-mirror")
    widget = MirrorWidget(viewer)
    viewer.window.add_dock_widget(widget)
    widget.set_device("cpu")
    widget.set_bundle_file(bundle.path)

    widget.set_slide_layer(blank_layer)
    n = len(viewer.layers)
    errors = _run_expecting_error(widget, qtbot)
    assert len(errors) == 1 and "tissue" in errors[0].lower() and "blank_glass" in errors[0]
    assert len(viewer.layers) == n

    # The file changes on disk after it was opened: the run must say so, not crash.
    good.write_bytes(b"this is no longer a TIFF")
    widget.set_slide_layer(bad_layer)
    errors = _run_expecting_error(widget, qtbot)
    assert len(errors) == 1 and "to_be_corrupted.tif" in errors[0]
    assert len(viewer.layers) == n


def test_error_nothing_to_run_on_and_bad_expression_file(make_napari_viewer, qtbot, tmp_path):
    viewer = make_napari_viewer()
    from napari_mirror._widget import MirrorWidget

    widget = MirrorWidget(viewer)
    errors = _run_expecting_error(widget, qtbot)
    assert len(errors) == 1 and "Nothing to run on" in errors[0]
    bad = tmp_path / "garbage.csv"
    bad.write_bytes(b"\x00\x01\x02")
    with NotificationRecorder() as rec:
        assert widget.set_expression_file(bad) is False
    assert len(rec.errors()) == 1 and "garbage.csv" in rec.errors()[0]


# ----------------------------------------------------------------------------------- cancel
def test_cancel_leaves_viewer_unchanged(make_napari_viewer, qtbot, bundle, demo_case):
    viewer, widget, _ = _viewer_with_sample(make_napari_viewer, bundle)
    names = [layer.name for layer in viewer.layers]
    with NotificationRecorder() as rec:
        widget.run()
        widget.cancel()
        wait_for_run(qtbot, widget)
    assert [layer.name for layer in viewer.layers] == names
    assert widget.last_result is None and widget.heatmap_layer is None
    assert rec.errors() == [] and any("cancelled" in m for m in rec.infos())
    assert "Cancelled" in widget.status_label.text()
    assert widget.run_button.isEnabled() and not widget.cancel_button.isEnabled()


def test_cancel_mid_run_keeps_previous_result(
    make_napari_viewer, qtbot, bundle, demo_case, demo_features
):
    """Cancel while predict is encoding tiles (from its first progress report): the earlier
    result and its layers stay exactly as they were."""
    viewer, widget, _ = _viewer_with_sample(make_napari_viewer, bundle)
    widget.set_expression_file(None)
    widget.set_features_file(demo_features)
    widget.run()
    wait_for_run(qtbot, widget)
    first = widget.last_result
    heat = widget.heatmap_layer
    assert first is not None and heat is not None
    names = [layer.name for layer in viewer.layers]
    data = heat.data.copy()

    widget.set_features_file(None)  # now a real extraction, cancelled while it encodes tiles
    with NotificationRecorder() as rec:
        widget.run()
        # progress reaches the panel while it runs
        qtbot.waitUntil(lambda: "encoding" in widget.status_label.text(), timeout=60_000)
        assert widget.job is not None and not widget.job.finished
        widget.cancel()
        wait_for_run(qtbot, widget)
    assert any("cancelled" in m for m in rec.infos()) and rec.errors() == []
    assert widget.last_result is first and widget.heatmap_layer is heat
    assert [layer.name for layer in viewer.layers] == names
    np.testing.assert_array_equal(heat.data, data)


# ----------------------------------------------------------------------------------- maps
def _with_signed_map(result):
    """The same result with one more map: a signed one (centred attention), so the selector has
    an unsigned and a signed map whatever maps the bundle's predictions carry."""
    import dataclasses

    from mirror_model import TileMap

    pred = result.prediction
    att = pred.maps["attention"].values
    extra = TileMap("subtype:test", att - np.median(att), "Evidence for test", "Positive = for test.",
                    True, "test", "logit")  # fmt: skip
    pred = dataclasses.replace(pred, maps={**pred.maps, "subtype:test": extra},
                               warnings=[*pred.warnings, "a warning from the prediction"])  # fmt: skip
    return dataclasses.replace(result, prediction=pred)


def test_map_selector_drives_heatmap_top_tiles_and_exports(
    make_napari_viewer, qtbot, bundle, demo_case, demo_features, tmp_path
):
    viewer, widget, slide = _viewer_with_sample(make_napari_viewer, bundle)
    widget.set_expression_file(None)
    widget.set_features_file(demo_features)
    widget.topk_spin.setValue(4)
    widget.run()
    wait_for_run(qtbot, widget)
    assert widget.last_error is None
    result = _with_signed_map(widget.last_result)
    widget.show_result(result)  # what the run shows, computed here on the GUI thread
    pred = result.prediction
    assert widget.map_names() == list(pred.maps)
    assert "a warning from the prediction" in widget.results.summary_text()
    heat = widget.heatmap_layer
    coords, size = np.asarray(pred.coords_level0), int(pred.tile_size_level0)
    x0, y0 = coords.min(0)
    rows, cols = (coords[:, 1] - y0) // size, (coords[:, 0] - x0) // size
    for name in widget.map_names():
        widget.select_map(name)
        m = pred.maps[name]
        assert widget.selected_map_name == name and widget.heatmap_layer is heat
        np.testing.assert_allclose(heat.data[rows, cols], m.values, rtol=1e-5, atol=1e-12)
        lo, hi = heat.contrast_limits
        if m.signed:  # diverging colours centred on 0
            assert lo == pytest.approx(-hi) and heat.colormap.name == "RdBu_r"
        else:
            assert heat.colormap.name == "inferno"
        assert __import__("html").escape(m.description[:40]) in widget.map_description.text()
        assert m.label in viewer.text_overlay.text
        best = int(np.argmax(m.values))
        assert widget._top[0].index == best and widget.top_list.count() == 4
        assert widget.top_list.item(0).text().startswith("#1   100th percentile")
        np.testing.assert_array_equal(
            widget.top_tiles_layer.features["rank"], [1, 2, 3, 4]
        )
        assert widget.top_tiles_layer.metadata["mirror"]["map_name"] == name
        rep = json.loads(widget.export_report(tmp_path / f"{name}.json").read_text().replace("NaN", "null"))
        assert rep["selected_map"] == name == rep["inputs"]["display"]["map"]
    # hiding the map layer hides its colour-bar label too
    heat.visible = False
    assert not viewer.text_overlay.visible
    heat.visible = True
    assert viewer.text_overlay.visible


# ----------------------------------------------------------------------------------- layout
def test_panel_fits_a_400px_dock_and_sections_collapse(make_napari_viewer, qtbot, bundle, demo_features):
    from qtpy.QtCore import Qt
    from qtpy.QtWidgets import QWidget
    from superqt import QCollapsible

    viewer, widget, _ = _viewer_with_sample(make_napari_viewer, bundle, show=True)
    widget.set_expression_file(None)
    widget.set_features_file(demo_features)
    widget.run()
    wait_for_run(qtbot, widget)
    dock = widget.parent()
    while dock is not None and not hasattr(dock, "setFloating"):
        dock = dock.parent()
    viewer.window._qt_window.resizeDocks([dock], [400], Qt.Orientation.Horizontal)
    qtbot.wait(100)
    assert dock.width() <= 410
    view = widget.scroll.viewport()
    assert widget._inner.minimumSizeHint().width() <= view.width()
    assert widget._inner.width() <= view.width()
    clipped = []
    for child in widget._inner.findChildren(QWidget):
        if child.isVisible() and child.width() > 0:
            right = child.mapTo(view, child.rect().topRight()).x()
            if right > view.width() + 1:
                clipped.append((type(child).__name__, right))
    assert clipped == [], f"wider than the {view.width()} px viewport: {clipped[:5]}"
    sections = widget._inner.findChildren(QCollapsible)
    titles = [s.text() for s in sections]
    assert titles == ["Inputs", "Result", "Heatmap", "Survival: reference cohort", "Validation", "Export"]
    km = sections[3]
    assert km.isExpanded()  # the plot is there (layouts settle on a later turn under load)
    qtbot.waitUntil(lambda: km.content().height() > 200, timeout=10_000)
    km.collapse(animate=False)
    assert not km.isExpanded()
    qtbot.waitUntil(lambda: km.content().height() == 0, timeout=10_000)
    km.expand(animate=False)
    # the validation section: a few headline figures, the full table behind a button
    assert widget.results.shown["headlines"].count("|") <= 4
    dlg = widget.metrics_view.show_table()
    table = dlg.findChild(__import__("qtpy.QtWidgets", fromlist=["QTableWidget"]).QTableWidget)
    assert table.rowCount() == int(widget.results.shown["n_metrics"]) > 5
    dlg.close()


# ----------------------------------------------------------------------------------- errors
def test_error_details_are_reachable(make_napari_viewer, qtbot, demo_case, tmp_path):
    viewer, widget, _ = _viewer_with_sample(make_napari_viewer)
    bad = tmp_path / "broken.mirror"
    bad.write_bytes(b"\x00" * 64)
    widget.set_bundle_file(bad)
    errors = _run_expecting_error(widget, qtbot)
    assert widget.status_label.text() == f"Error: {widget.last_error.splitlines()[0]}"
    assert not widget.details_button.isHidden()
    box = widget.show_error_details()
    assert box.text() == widget.last_error and "broken.mirror" in box.text()
    assert errors == ["MIRROR: " + widget.last_error]
    box.close()
    # the next run clears it
    widget.set_bundle_file(None)
    widget.set_features_file(None)
    widget.cancel()
    widget.run()
    assert widget.details_button.isHidden()
    widget.cancel()
    wait_for_run(qtbot, widget)


def test_missing_expression_values_policy_from_the_panel(
    make_napari_viewer, qtbot, bundle, demo_case, demo_features, tmp_path
):
    """A table with missing values lists its rows, stops the run with a message naming them
    under the default policy, and runs with another policy, saying so in the panel."""
    if not bundle.has_rna:
        pytest.skip("the bundle under test has no RNA heads")
    import pandas as pd

    t = pd.read_csv(demo_case.expression_path)
    row = t.index[t.iloc[:, 0].astype(str) == demo_case.sample_id][0]
    t.iloc[row, 3] = np.nan
    holes = tmp_path / "with_holes.csv"
    t.to_csv(holes, index=False)
    viewer, widget, _ = _viewer_with_sample(make_napari_viewer, bundle)
    widget.set_features_file(demo_features)
    assert widget.set_expression_file(holes, sample_id=demo_case.sample_id)
    errors = _run_expecting_error(widget, qtbot)
    assert len(errors) == 1 and "missing value" in errors[0] and "with_holes.csv" in errors[0]
    widget.form.nan_policy.value = "zero"
    widget.run()
    wait_for_run(qtbot, widget)
    assert widget.last_error is None and widget.last_result.request.nan_policy == "zero"
    warned = " ".join(widget.last_result.prediction.warnings)
    assert "missing" in warned and "missing" in widget.results.summary_text()
