"""The napari-mirror reader: lazy multiscale slides in µm, claiming only what it can open."""

from __future__ import annotations

import numpy as np
import pytest
from _plugin_helpers import camera_of, write_pyramidal_tiff

from napari_mirror._layers import METADATA_KEY
from napari_mirror._reader import napari_get_reader


@pytest.fixture(scope="module")
def pyramid_tiff(tmp_path_factory):
    path = tmp_path_factory.mktemp("slides") / "pyramid.tif"
    img = write_pyramidal_tiff(path, width=4096, height=3072, mpp=0.5, n_levels=4)
    return path, img


def test_reader_claims_only_openable_slides(tmp_path, pyramid_tiff):
    assert napari_get_reader(str(pyramid_tiff[0])) is not None
    (tmp_path / "notes.txt").write_text("hello")
    assert napari_get_reader(str(tmp_path / "notes.txt")) is None
    assert napari_get_reader(str(tmp_path / "missing.ndpi")) is None
    # A plain TIFF without resolution metadata is left to napari's own reader.
    import tifffile

    tifffile.imwrite(tmp_path / "plain.tif", np.zeros((64, 64, 3), np.uint8))
    assert napari_get_reader(str(tmp_path / "plain.tif")) is None
    # A list is claimed only when every file is a slide.
    assert napari_get_reader([str(pyramid_tiff[0]), str(tmp_path / "notes.txt")]) is None


def test_pyramid_layer_data_is_lazy_and_exact(pyramid_tiff):
    import dask.array as da

    path, img = pyramid_tiff
    (data, kwargs, layer_type) = napari_get_reader(str(path))(str(path))[0]
    assert layer_type == "image"
    assert kwargs["multiscale"] is True and kwargs["rgb"] is True
    assert kwargs["scale"] == (0.5, 0.5) and kwargs["units"] == ("µm", "µm")
    assert [a.shape for a in data] == [
        (3072, 4096, 3),
        (1536, 2048, 3),
        (768, 1024, 3),
        (384, 512, 3),
    ]
    assert all(isinstance(a, da.Array) and a.dtype == np.uint8 for a in data)
    counter = kwargs["metadata"]["_mirror_chunk_counter"]
    assert counter.reads == {}  # nothing read to build the layer
    # A region straddling chunk borders equals the file's pixels.
    np.testing.assert_array_equal(
        np.asarray(data[0][1000:1100, 1000:1100]), img[1000:1100, 1000:1100]
    )
    assert counter.reads == {0: 4}  # exactly the four 1024² chunks under the region
    meta = kwargs["metadata"][METADATA_KEY]
    assert meta["kind"] == "slide" and meta["mpp"] == 0.5
    assert meta["dimensions_level0"] == [4096, 3072]
    assert meta["level_downsamples"] == [1.0, 2.0, 4.0, 8.0]


def test_a_broken_slide_gets_the_plugins_own_message(tmp_path):
    """Slide-only formats are always claimed, so a file that cannot be opened is explained by
    this plugin (file name, reason) instead of napari's generic refusal and a traceback."""
    from _plugin_helpers import NotificationRecorder

    broken = tmp_path / "broken.svs"
    broken.write_bytes(b"not a slide at all")
    reader = napari_get_reader(str(broken))
    assert reader is not None
    with NotificationRecorder() as rec:
        assert reader(str(broken)) == [(None,)]  # napari's "claimed, nothing to add"
    (msg,) = rec.errors()
    assert msg.startswith("MIRROR could not open broken.svs: ") and "Traceback" not in msg


@pytest.mark.gui
def test_slides_open_without_choose_reader_once_preferred(make_napari_viewer, cmu_small_svs, tmp_path):
    """napari asks "Choose reader" when several readers match and no preference is set (its
    built-in reader matches *.svs too). The panel's checkbox sets the preference once; then a
    dropped slide opens with this plugin, and a broken one gets this plugin's message."""
    from _plugin_helpers import NotificationRecorder
    from napari.errors import MultipleReaderError
    from napari.settings import get_settings

    from napari_mirror._reader import set_slide_reader_preference, slide_reader_preference

    settings = get_settings().plugins
    saved = dict(settings.extension2reader)
    try:
        settings.extension2reader = {}
        viewer = make_napari_viewer()
        # File > Open and drag-and-drop call viewer.open(..., plugin=None) (QtViewer._qt_open);
        # this error is what makes napari show "Choose reader"
        with pytest.raises(MultipleReaderError):
            viewer.open(str(cmu_small_svs), plugin=None)
        from napari_mirror._widget import MirrorWidget

        widget = MirrorWidget(viewer)
        assert not widget.reader_pref.isChecked()
        widget.reader_pref.setChecked(True)  # the panel's one click
        assert set(slide_reader_preference().values()) == {"napari-mirror"}
        assert settings.extension2reader["*.svs"] == "napari-mirror"
        (layer,) = viewer.open(str(cmu_small_svs), plugin=None)  # the preference decides
        assert layer.metadata[METADATA_KEY]["kind"] == "slide"
        broken = tmp_path / "broken.ndpi"
        broken.write_bytes(b"\x00" * 100)
        with NotificationRecorder() as rec:
            assert viewer.open(str(broken), plugin=None) == []  # no generic error, no dialog
        assert len(rec.errors()) == 1 and "broken.ndpi" in rec.errors()[0]
        # a pattern the user gave to another reader is left alone; unticking removes ours
        settings.extension2reader = {**settings.extension2reader, "*.scn": "napari"}
        widget.reader_pref.setChecked(False)
        assert settings.extension2reader == {"*.scn": "napari"}
        assert set_slide_reader_preference(True) == [
            p for p in slide_reader_preference() if p != "*.scn"
        ]
    finally:
        settings.extension2reader = saved


@pytest.mark.gui
def test_viewer_open_pyramid_reads_no_level0_chunk(make_napari_viewer, qtbot, pyramid_tiff):
    path, _ = pyramid_tiff
    viewer = make_napari_viewer(show=True)  # a real canvas draws the levels it needs
    layers = viewer.open(str(path), plugin="napari-mirror")
    (layer,) = layers
    assert layer.multiscale and layer.rgb
    np.testing.assert_allclose(layer.scale, [0.5, 0.5])
    assert [str(u) for u in layer.units] == ["micrometer", "micrometer"]
    counter = layer.metadata["_mirror_chunk_counter"]
    qtbot.waitUntil(lambda: sum(counter.reads.values()) > 0, timeout=10_000)
    qtbot.wait(200)
    # Showing the whole slide draws from coarse levels only: level 0 is never read.
    assert counter.reads.get(0, 0) == 0, counter.reads
    assert set(counter.reads) <= {1, 2, 3}
    # Zooming into a small region reads level-0 chunks under that region only, not the level.
    camera_of(viewer).center = (100.0, 100.0)  # µm, i.e. level-0 pixels (200, 200)
    camera_of(viewer).zoom = 8.0
    qtbot.waitUntil(lambda: counter.reads.get(0, 0) > 0, timeout=10_000)
    qtbot.wait(200)
    assert counter.reads[0] < 12  # level 0 has 12 chunks of 1024²
    assert layer.metadata[METADATA_KEY]["slide_path"] == str(path.resolve())


@pytest.mark.gui
def test_viewer_open_real_svs(make_napari_viewer, cmu_small_svs):
    import dask.array as da

    viewer = make_napari_viewer()
    (layer,) = viewer.open(str(cmu_small_svs), plugin="napari-mirror")
    assert layer.rgb
    np.testing.assert_allclose(layer.scale, [0.499, 0.499])
    meta = layer.metadata[METADATA_KEY]
    assert meta["mpp"] == pytest.approx(0.499)
    assert meta["dimensions_level0"] == [2220, 2967]
    assert meta["vendor"] == "aperio"
    data = layer.data if not layer.multiscale else layer.data[0]
    assert isinstance(data, da.Array) and data.shape == (2967, 2220, 3)
    # napari's world extent runs from the centre of the first pixel to that of the last one.
    extent = layer.extent.world
    np.testing.assert_allclose(
        extent[1] - extent[0], (np.array([2967, 2220]) - 1) * 0.499, rtol=1e-9
    )
