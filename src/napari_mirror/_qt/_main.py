"""The MIRROR dock widget: inputs, Run/Cancel in a worker thread, results, exports."""

from __future__ import annotations

import logging
import threading
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from qtpy.QtCore import QObject, Qt, Signal
from qtpy.QtWidgets import (
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QListWidget,
    QListWidgetItem,
    QPushButton,
    QScrollArea,
    QSlider,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from .._layers import HEATMAP_COLORMAPS, METADATA_KEY, HeatmapDisplay, TopTile
from .._run import (
    RunRequest,
    RunResult,
    list_samples,
    modality_sentence,
    run_prediction,
    suggest_sample,
)
from ._results import ResultsPanel

__all__ = ["MirrorWidget"]

log = logging.getLogger(__name__)

_NO_SLIDE = "(no slide: expression only)"
_ERROR_PREFIX = "MIRROR: "


class _Bridge(QObject):
    """Carries progress from the worker thread to the GUI thread (queued connection)."""

    progressed = Signal(int, int, str)


@dataclass
class _Outcome:
    """What the worker returns: a result, or the error that stopped it (never raised across
    threads, so napari shows our message rather than a traceback)."""

    result: RunResult | None = None
    error: BaseException | None = None
    traceback: str = ""


def _job(request: RunRequest, progress: Any, should_stop: Any) -> _Outcome:
    try:
        return _Outcome(result=run_prediction(request, progress=progress, should_stop=should_stop))
    except Exception as exc:
        return _Outcome(error=exc, traceback=traceback.format_exc())


def _warm_up() -> None:
    """Import the inference stack (torch, models) off the GUI thread while the user picks
    inputs, so the first Run does not pay seconds of imports."""
    try:
        import mirror_model.inference
        import mirror_model.models  # noqa: F401
    except Exception:  # the run itself reports any real problem
        log.debug("warm-up import failed", exc_info=True)


_warmed = threading.Event()


def _browse_row(edit: QLineEdit, button: QPushButton) -> QWidget:
    w = QWidget()
    lay = QHBoxLayout(w)
    lay.setContentsMargins(0, 0, 0, 0)
    lay.addWidget(edit, 1)
    lay.addWidget(button)
    return w


class MirrorWidget(QWidget):
    """Dock widget that runs a MIRROR bundle on the selected slide and/or expression row.

    Parameters
    ----------
    napari_viewer : napari.Viewer
        Injected by napari.

    Notes
    -----
    Public methods (``run``, ``cancel``, ``export_*``, ``set_*``) are what the buttons call;
    scripts and tests use them directly. ``last_result`` holds the last finished run.
    """

    def __init__(self, napari_viewer: Any, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.viewer = napari_viewer
        self.last_result: RunResult | None = None
        self.last_error: str | None = None
        self.heatmap_layer = None
        self.top_tiles_layer = None
        self._top: list[TopTile] = []
        self._worker = None
        self._pbar = None
        self._cancel = threading.Event()
        self._bridge = _Bridge()
        self._bridge.progressed.connect(self._on_progress)
        self._build_ui()
        self._connect_viewer()
        self.refresh_slide_layers()
        if not _warmed.is_set():
            _warmed.set()
            threading.Thread(target=_warm_up, name="mirror-warm-up", daemon=True).start()
        # Closing the dock stops a run at its next check rather than leaving it running.
        self.destroyed.connect(lambda *_: self._cancel.set())

    # ------------------------------------------------------------------------------- UI
    def _build_ui(self) -> None:
        inner = QWidget()
        root = QVBoxLayout(inner)

        inputs = QGroupBox("Inputs")
        form = QFormLayout(inputs)
        self.slide_combo = QComboBox()
        self.slide_combo.setToolTip("Slide layer to analyse (opened with the MIRROR reader).")
        self.slide_combo.currentIndexChanged.connect(self._on_slide_changed)
        form.addRow("Slide layer", self.slide_combo)

        # Files without resolution metadata cannot be opened silently at a guessed scale: the
        # user states the level-0 µm per pixel here and opens the slide through the panel.
        self.mpp_spin = QDoubleSpinBox()
        self.mpp_spin.setRange(0.0, 100.0)
        self.mpp_spin.setDecimals(4)
        self.mpp_spin.setSingleStep(0.05)
        self.mpp_spin.setSuffix(" µm/px")
        self.mpp_spin.setSpecialValueText("from the file")
        self.mpp_spin.setValue(0.0)
        self.mpp_spin.setToolTip(
            "Level-0 resolution used when opening a slide with 'Open slide…'. Keep 'from the "
            "file' unless the file has no resolution metadata (0.25 for a 40x scan, 0.5 for 20x)."
        )
        btn = QPushButton("Open slide…")
        btn.setToolTip("Open a slide file as a layer, at the resolution on the left.")
        btn.clicked.connect(self._browse_slide)
        form.addRow("µm per pixel", _browse_row(self.mpp_spin, btn))

        self.features_edit = QLineEdit()
        self.features_edit.setPlaceholderText("optional: precomputed features (.h5)")
        self.features_edit.setToolTip(
            "Patch features from `mirror-train extract` (or CLAM/TRIDENT) used instead of re-extracting."
        )
        btn = QPushButton("…")
        btn.clicked.connect(self._browse_features)
        form.addRow("Features", _browse_row(self.features_edit, btn))

        self.bundle_edit = QLineEdit()
        self.bundle_edit.setPlaceholderText("embedded demo bundle")
        self.bundle_edit.setToolTip("A .mirror model bundle; empty = the embedded demo bundle.")
        btn = QPushButton("…")
        btn.clicked.connect(self._browse_bundle)
        form.addRow("Model bundle", _browse_row(self.bundle_edit, btn))

        self.expression_edit = QLineEdit()
        self.expression_edit.setPlaceholderText("optional: expression table (.csv/.tsv/.parquet)")
        self.expression_edit.editingFinished.connect(lambda: self.set_expression_file(self.expression_edit.text()))
        btn = QPushButton("…")
        btn.clicked.connect(self._browse_expression)
        form.addRow("Expression", _browse_row(self.expression_edit, btn))
        self.sample_combo = QComboBox()
        self.sample_combo.setToolTip("The patient's row of the expression table.")
        form.addRow("Patient row", self.sample_combo)

        self.device_combo = QComboBox()
        self.device_combo.addItems(["auto", "cpu", "cuda"])
        form.addRow("Device", self.device_combo)
        root.addWidget(inputs)

        buttons = QHBoxLayout()
        self.run_button = QPushButton("Run")
        self.run_button.clicked.connect(self.run)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.cancel_button.clicked.connect(self.cancel)
        buttons.addWidget(self.run_button)
        buttons.addWidget(self.cancel_button)
        root.addLayout(buttons)
        self.status_label = QLabel("Ready.")
        self.status_label.setWordWrap(True)
        root.addWidget(self.status_label)

        display = QGroupBox("Heatmap display")
        dform = QFormLayout(display)
        self.colormap_combo = QComboBox()
        self.colormap_combo.addItems(list(HEATMAP_COLORMAPS))
        self.colormap_combo.currentTextChanged.connect(self._apply_display)
        dform.addRow("Colormap", self.colormap_combo)
        self.opacity_slider = QSlider(Qt.Orientation.Horizontal)
        self.opacity_slider.setRange(0, 100)
        self.opacity_slider.setValue(55)
        self.opacity_slider.valueChanged.connect(self._apply_display)
        dform.addRow("Opacity", self.opacity_slider)
        self.scaling_combo = QComboBox()
        self.scaling_combo.addItem("1st–99th percentile", "percentile")
        self.scaling_combo.addItem("min–max", "minmax")
        self.scaling_combo.currentIndexChanged.connect(self._apply_display)
        dform.addRow("Contrast", self.scaling_combo)
        self.smoothing_spin = QDoubleSpinBox()
        self.smoothing_spin.setRange(0.0, 10.0)
        self.smoothing_spin.setSingleStep(0.5)
        self.smoothing_spin.setSuffix(" tiles")
        self.smoothing_spin.setToolTip("Gaussian smoothing (σ in tiles); 0 = raw tile values.")
        self.smoothing_spin.valueChanged.connect(self._apply_display)
        dform.addRow("Smoothing", self.smoothing_spin)
        self.topk_spin = QSpinBox()
        self.topk_spin.setRange(0, 100)
        self.topk_spin.setValue(10)
        self.topk_spin.valueChanged.connect(self._apply_top_k)
        dform.addRow("Top tiles", self.topk_spin)
        root.addWidget(display)

        results = QGroupBox("Result")
        rlay = QVBoxLayout(results)
        self.results = ResultsPanel()
        rlay.addWidget(self.results)
        rlay.addWidget(QLabel("Most attended tiles (click to go there):"))
        self.top_list = QListWidget()
        self.top_list.setMaximumHeight(160)
        self.top_list.itemClicked.connect(self._on_top_clicked)
        self.top_list.currentRowChanged.connect(lambda row: self.go_to_tile(row) if row >= 0 else None)
        rlay.addWidget(self.top_list)
        root.addWidget(results)

        exports = QGroupBox("Export")
        elay = QHBoxLayout(exports)
        self.export_buttons: dict[str, QPushButton] = {}
        for key, label in (("geojson", "GeoJSON"), ("csv", "CSV"), ("png", "PNG"), ("json", "Report")):
            b = QPushButton(label)
            b.clicked.connect(lambda _=False, k=key: self._export_dialog(k))
            b.setEnabled(False)
            elay.addWidget(b)
            self.export_buttons[key] = b
        root.addWidget(exports)
        root.addStretch(1)

        scroll = QScrollArea()
        scroll.setWidgetResizable(True)
        scroll.setWidget(inner)
        outer = QVBoxLayout(self)
        outer.setContentsMargins(0, 0, 0, 0)
        outer.addWidget(scroll)
        self.setMinimumWidth(340)

    # ------------------------------------------------------------------------- viewer links
    def _connect_viewer(self) -> None:
        ev = self.viewer.layers.events
        for name in ("inserted", "removed", "reordered"):
            getattr(ev, name).connect(self._on_layers_changed)
        self.destroyed.connect(lambda *_: self._disconnect_viewer(ev))

    def _disconnect_viewer(self, ev: Any) -> None:
        for name in ("inserted", "removed", "reordered"):
            try:
                getattr(ev, name).disconnect(self._on_layers_changed)
            except Exception:  # viewer already gone
                pass

    def _on_layers_changed(self, event: Any = None) -> None:
        try:
            self.refresh_slide_layers()
            removed = getattr(event, "type", "") == "removed"
            if removed and self.heatmap_layer is not None and self.heatmap_layer not in self.viewer.layers:
                self.heatmap_layer = None
            if removed and self.top_tiles_layer is not None and self.top_tiles_layer not in self.viewer.layers:
                self.top_tiles_layer = None
        except RuntimeError:  # the Qt side of this widget was deleted
            pass

    def slide_layers(self) -> list[Any]:
        """Image layers that are slides (made by the MIRROR reader or sample data)."""
        out = []
        for layer in self.viewer.layers:
            meta = getattr(layer, "metadata", {}) or {}
            if isinstance(meta.get(METADATA_KEY), dict) and meta[METADATA_KEY].get("kind") == "slide":
                out.append(layer)
        return out

    def refresh_slide_layers(self) -> None:
        current = self.slide_combo.currentText()
        names = [layer.name for layer in self.slide_layers()]
        self.slide_combo.blockSignals(True)
        self.slide_combo.clear()
        self.slide_combo.addItems([*names, _NO_SLIDE])
        if current in names:
            self.slide_combo.setCurrentText(current)
        else:
            self.slide_combo.setCurrentIndex(0)
        self.slide_combo.blockSignals(False)
        if current not in names:
            self._on_slide_changed()
        if not names and self._foreign_slide_layers():
            self.status_label.setText(
                "A slide was opened by another reader (no physical scale). Open it with "
                "'Open slide…' in this panel (set 'µm per pixel' first if the file has no "
                "resolution metadata) so it can be analysed."
            )

    def _foreign_slide_layers(self) -> list[Any]:
        from .._reader import SLIDE_SUFFIXES

        out = []
        for layer in self.viewer.layers:
            path = getattr(getattr(layer, "source", None), "path", None)
            meta = (getattr(layer, "metadata", {}) or {}).get(METADATA_KEY)
            if path and meta is None and str(path).lower().endswith(SLIDE_SUFFIXES):
                out.append(layer)
        return out

    def result_layers(self) -> list[Any]:
        """Heatmap and top-tile layers made by this plugin."""
        out = []
        for layer in self.viewer.layers:
            meta = (getattr(layer, "metadata", {}) or {}).get(METADATA_KEY)
            if isinstance(meta, dict) and meta.get("kind") in ("heatmap", "top_tiles"):
                out.append(layer)
        return out

    def selected_slide_layer(self) -> Any | None:
        name = self.slide_combo.currentText()
        for layer in self.slide_layers():
            if layer.name == name:
                return layer
        return None

    def _slide_layer_for(self, slide_path: str | None) -> Any | None:
        if slide_path is None:
            return None
        for layer in self.slide_layers():
            if layer.metadata[METADATA_KEY].get("slide_path") == slide_path:
                return layer
        return None

    def set_slide_layer(self, layer_or_name: Any) -> None:
        name = layer_or_name if isinstance(layer_or_name, str) else layer_or_name.name
        self.refresh_slide_layers()
        idx = self.slide_combo.findText(name)
        if idx < 0:
            raise ValueError(f"{name!r} is not a slide layer of this viewer")
        self.slide_combo.setCurrentIndex(idx)
        self._on_slide_changed()

    def _on_slide_changed(self, *_: Any) -> None:
        layer = self.selected_slide_layer()
        if layer is None:
            return
        meta = layer.metadata[METADATA_KEY]
        # Sample data carries its expression table: fill it in when the user has not chosen one.
        if meta.get("expression_path") and not self.expression_edit.text().strip():
            self.set_expression_file(meta["expression_path"], sample_id=meta.get("sample_id"))
        elif self.sample_combo.count():
            self._auto_pick_sample()

    # --------------------------------------------------------------------------- inputs
    def set_bundle_file(self, path: str | Path | None) -> None:
        self.bundle_edit.setText("" if path is None else str(path))

    def set_features_file(self, path: str | Path | None) -> None:
        self.features_edit.setText("" if path is None else str(path))

    def set_device(self, device: str) -> None:
        idx = self.device_combo.findText(device)
        if idx < 0:
            raise ValueError(f"device must be auto, cpu or cuda; got {device!r}")
        self.device_combo.setCurrentIndex(idx)

    def set_expression_file(self, path: str | Path | None, sample_id: str | None = None) -> bool:
        """Use ``path`` as expression table, list its samples and pick the patient's row.

        The row is ``sample_id`` when given, else the one matching the slide's file name.
        Returns False (and notifies) when the table cannot be read.
        """
        text = "" if path is None else str(path).strip()
        self.expression_edit.setText(text)
        self.sample_combo.clear()
        if not text:
            return True
        try:
            samples = list_samples(text)
        except Exception as exc:
            self._notify_error(exc)
            return False
        self.sample_combo.addItems(samples)
        if sample_id is not None and sample_id in samples:
            self.sample_combo.setCurrentText(sample_id)
        else:
            self._auto_pick_sample()
        return True

    def _auto_pick_sample(self) -> None:
        layer = self.selected_slide_layer()
        samples = [self.sample_combo.itemText(i) for i in range(self.sample_combo.count())]
        if layer is None or not samples:
            return
        meta = layer.metadata[METADATA_KEY]
        wanted = meta.get("sample_id")
        if wanted in samples:
            self.sample_combo.setCurrentText(wanted)
            return
        hit = suggest_sample(samples, meta.get("slide_path") or layer.name)
        if hit is not None:
            self.sample_combo.setCurrentText(hit)
            self.status_label.setText(f"Patient row {hit!r} matched to the slide name.")

    def set_sample(self, sample_id: str) -> None:
        idx = self.sample_combo.findText(sample_id)
        if idx < 0:
            raise ValueError(f"{sample_id!r} is not a row of the expression file")
        self.sample_combo.setCurrentIndex(idx)

    def current_request(self) -> RunRequest:
        """The inputs as a :class:`RunRequest` (read on the GUI thread)."""
        layer = self.selected_slide_layer()
        meta = layer.metadata[METADATA_KEY] if layer is not None else {}
        expr = self.expression_edit.text().strip() or None
        return RunRequest(
            bundle_path=self.bundle_edit.text().strip() or None,
            slide_path=meta.get("slide_path"),
            features_path=self.features_edit.text().strip() or None,
            expression_path=expr,
            sample_id=(self.sample_combo.currentText() or None) if expr else None,
            device=self.device_combo.currentText(),
            # a resolution the user gave when opening the slide must reach the tiling too
            mpp=float(meta["mpp"]) if meta.get("mpp_source") == "user" else None,
        )

    def display(self) -> HeatmapDisplay:
        return HeatmapDisplay(
            colormap=self.colormap_combo.currentText(),
            opacity=self.opacity_slider.value() / 100.0,
            scaling=self.scaling_combo.currentData() or "percentile",
            smoothing_sigma_tiles=float(self.smoothing_spin.value()),
        )

    # ------------------------------------------------------------------------------ run
    @property
    def is_running(self) -> bool:
        return self._worker is not None

    def run(self) -> None:
        """Start a run in a worker thread; the viewer stays responsive."""
        if self._worker is not None:
            return
        try:
            request = self.current_request().validate()
        except Exception as exc:
            self._notify_error(exc)
            return
        from napari.qt.threading import create_worker
        from napari.utils import progress

        self._cancel = threading.Event()
        self.last_error = None
        self._pbar = progress(total=0, desc="MIRROR")
        self._worker = create_worker(
            _job,
            request,
            progress=self._bridge.progressed.emit,
            should_stop=self._cancel.is_set,
            _ignore_errors=True,
        )
        self._worker.returned.connect(self._on_returned)
        self._worker.finished.connect(self._on_finished)
        self.run_button.setEnabled(False)
        self.cancel_button.setEnabled(True)
        self.status_label.setText("Running…")
        self._worker.start()

    def cancel(self) -> None:
        """Ask the running job to stop at its next check; nothing is added to the viewer."""
        if self._worker is None:
            return
        self._cancel.set()
        self.cancel_button.setEnabled(False)
        self.status_label.setText("Cancelling…")

    def _on_progress(self, done: int, total: int, stage: str) -> None:
        if self._pbar is None or self._worker is None:
            return  # a late update from a run that has already finished
        try:
            if self._pbar.total != total:
                self._pbar.total = total
            self._pbar.set_description(f"MIRROR: {stage}")
            self._pbar.n = min(done, total) if total else done
            self._pbar.refresh()
        except Exception:  # a progress bar glitch must never break a run
            log.debug("progress update failed", exc_info=True)
        self.status_label.setText(f"{stage}… {done}/{total}" if total else f"{stage}…")

    def _on_finished(self) -> None:
        self._worker = None
        if self._pbar is not None:
            self._pbar.close()
            self._pbar = None
        try:
            self.run_button.setEnabled(True)
            self.cancel_button.setEnabled(False)
        except RuntimeError:  # widget deleted while running
            pass

    def _on_returned(self, outcome: _Outcome) -> None:
        try:
            self._handle_outcome(outcome)
        except RuntimeError:  # the widget was closed while the run was going
            log.debug("MIRROR widget gone before its run returned", exc_info=True)

    def _handle_outcome(self, outcome: _Outcome) -> None:
        from mirror_model.errors import Cancelled

        if outcome.error is not None or self._cancel.is_set():
            if outcome.error is None or isinstance(outcome.error, Cancelled):
                from napari.utils.notifications import show_info

                self.status_label.setText("Cancelled; the viewer was left unchanged.")
                show_info(_ERROR_PREFIX + "run cancelled; nothing was changed.")
                return
            if outcome.traceback:
                log.debug("MIRROR run failed:\n%s", outcome.traceback)
            self._notify_error(outcome.error)
            return
        try:
            self.show_result(outcome.result)
        except Exception as exc:
            log.debug("showing the MIRROR result failed", exc_info=True)
            self._notify_error(exc)

    # --------------------------------------------------------------------------- results
    def show_result(self, result: RunResult) -> None:
        """Add the heatmap and top-tile layers and fill the panel (all or nothing)."""
        from .._layers import heatmap_layer_data, top_tiles, top_tiles_layer_data

        pred = result.prediction
        # The slide the run was started on (the user may have picked another one meanwhile).
        layer = self._slide_layer_for(result.request.slide_path)
        slide_name = layer.name if layer is not None else "MIRROR"
        has_tiles = getattr(pred, "attention", None) is not None and len(np.asarray(pred.coords_level0)) > 0
        new_layers: list[Any] = []
        # A new result replaces the earlier result layers of the same slide (other slides keep theirs).
        slide_path = result.request.slide_path
        old = [lyr for lyr in self.result_layers() if lyr.metadata[METADATA_KEY].get("slide_path") == slide_path]
        source = {"slide_path": result.request.slide_path}
        heat = tops_layer = None
        tops: list[TopTile] = []
        try:
            if has_tiles:
                mpp = float(pred.slide_mpp)
                data, kw, _ = heatmap_layer_data(
                    pred,
                    mpp=mpp,
                    display=self.display(),
                    name=f"{slide_name} attention",
                    source=source,
                )
                heat = self.viewer.add_image(data, **kw)
                new_layers.append(heat)
                k = self.topk_spin.value()
                if k > 0:
                    data, kw, _ = top_tiles_layer_data(
                        pred, k, mpp=mpp, name=f"{slide_name} top tiles", source=source
                    )
                    tops_layer = self.viewer.add_shapes(data, **kw)
                    new_layers.append(tops_layer)
                tops = top_tiles(pred, k, mpp=mpp)
        except Exception:
            # All or nothing: a failure while adding layers leaves no half result behind.
            for lyr in new_layers:
                if lyr in self.viewer.layers:
                    self.viewer.layers.remove(lyr)
            raise
        for lyr in old:
            if lyr in self.viewer.layers:
                self.viewer.layers.remove(lyr)
        # napari suffixes duplicate names while both generations exist; restore the plain names.
        if heat is not None:
            heat.name = f"{slide_name} attention"
        if tops_layer is not None:
            tops_layer.name = f"{slide_name} top tiles"
        self.heatmap_layer, self.top_tiles_layer, self._top = heat, tops_layer, tops
        if layer is not None:
            # Keep the slide selected so the layer controls stay on it.
            self.viewer.layers.selection.active = layer if heat is None else heat
        self.last_result = result
        self.results.show_result(pred, result.bundle, result.seconds)
        self.top_list.clear()
        for t in tops:
            item = QListWidgetItem(t.label())
            item.setData(Qt.ItemDataRole.UserRole, t.rank - 1)
            self.top_list.addItem(item)
        for key, b in self.export_buttons.items():
            b.setEnabled(key in ("png", "json") or has_tiles)
        self.status_label.setText(
            f"Done in {result.seconds:.1f} s — {modality_sentence(pred.modalities)}."
            + ("" if has_tiles else " No heatmap (no slide input).")
        )

    def _apply_display(self, *_: Any) -> None:
        layer = self.heatmap_layer
        if layer is None or self.last_result is None or layer not in self.viewer.layers:
            return
        from .._layers import heatmap_grid

        disp = self.display()
        grid, _lattice = heatmap_grid(self.last_result.prediction, disp)
        layer.data = grid
        layer.contrast_limits = disp.contrast_limits(grid)
        layer.colormap = disp.colormap
        layer.opacity = disp.opacity

    def _apply_top_k(self, *_: Any) -> None:
        if self.last_result is None or getattr(self.last_result.prediction, "attention", None) is None:
            return
        from .._layers import top_tiles, top_tiles_layer_data

        pred = self.last_result.prediction
        k = self.topk_spin.value()
        if self.top_tiles_layer is not None and self.top_tiles_layer in self.viewer.layers:
            name = self.top_tiles_layer.name
            self.viewer.layers.remove(self.top_tiles_layer)
        else:
            layer = self._slide_layer_for(self.last_result.request.slide_path)
            name = f"{layer.name if layer is not None else 'MIRROR'} top tiles"
        self.top_tiles_layer = None
        if k > 0:
            data, kw, _ = top_tiles_layer_data(
                pred, k, mpp=float(pred.slide_mpp), name=name,
                source={"slide_path": self.last_result.request.slide_path},
            )
            self.top_tiles_layer = self.viewer.add_shapes(data, **kw)
        self._top = top_tiles(pred, k, mpp=float(pred.slide_mpp))
        self.top_list.clear()
        for t in self._top:
            self.top_list.addItem(QListWidgetItem(t.label()))

    def _on_top_clicked(self, item: QListWidgetItem) -> None:
        self.go_to_tile(self.top_list.row(item))

    def go_to_tile(self, index: int) -> None:
        """Centre the view on the ``index``-th listed tile and zoom so it fills ~1/4 of the view."""
        if not (0 <= index < len(self._top)) or self.last_result is None:
            return
        t = self._top[index]
        scene = getattr(self.viewer, "scene", None)
        # napari >= 0.9 keeps the camera on viewer.scene (viewer.camera is deprecated there).
        camera = scene.camera if scene is not None else self.viewer.camera
        camera.center = t.centre_world_um
        tile_um = t.tile_size_level0 * float(self.last_result.prediction.slide_mpp)
        canvas = getattr(self.viewer, "canvas", None)
        size = getattr(canvas, "size", None) or getattr(self.viewer, "_canvas_size", (600, 600))
        canvas_px = float(min(size))
        if canvas_px > 0 and tile_um > 0:
            camera.zoom = canvas_px / (4.0 * tile_um)

    # ---------------------------------------------------------------------------- exports
    def _require_result(self) -> RunResult:
        from mirror_model.errors import MirrorError

        if self.last_result is None:
            raise MirrorError("Nothing to export yet: run MIRROR first.")
        return self.last_result

    def export_geojson(self, path: str | Path, object_type: str = "tile") -> Path:
        """QuPath GeoJSON of the last result (one square per tile, level-0 pixels)."""
        from .._export import write_geojson

        return write_geojson(path, self._require_result().prediction, object_type=object_type)

    def export_csv(self, path: str | Path) -> Path:
        from .._export import write_tile_csv

        return write_tile_csv(path, self._require_result().prediction)

    def export_png(self, path: str | Path) -> Path:
        """Snapshot of the canvas (what the viewer shows now)."""
        from .._export import write_png

        img = self.viewer.screenshot(canvas_only=True, flash=False)
        return write_png(path, img)

    def export_report(self, path: str | Path) -> Path:
        from .._export import write_report

        res = self._require_result()
        inputs = res.request.to_dict()
        if inputs.get("bundle_path") is None:
            from mirror_model.bundle import default_bundle_path

            inputs["bundle_path"] = str(default_bundle_path())
            inputs["bundle"] = "embedded demo bundle"
        inputs["display"] = {
            "colormap": self.display().colormap,
            "scaling": self.display().scaling,
            "smoothing_sigma_tiles": self.display().smoothing_sigma_tiles,
        }
        inputs["seconds"] = res.seconds
        return write_report(path, res.prediction, inputs=inputs, bundle=res.bundle)

    def _export_dialog(self, kind: str) -> None:
        filters = {
            "geojson": ("GeoJSON (*.geojson *.json)", ".geojson", self.export_geojson),
            "csv": ("CSV (*.csv)", ".csv", self.export_csv),
            "png": ("PNG image (*.png)", ".png", self.export_png),
            "json": ("JSON report (*.json)", ".json", self.export_report),
        }
        flt, suffix, fn = filters[kind]
        layer = self.selected_slide_layer()
        stem = layer.name if layer is not None else "mirror"
        path, _ = QFileDialog.getSaveFileName(self, f"Export {kind}", f"{stem}_mirror{suffix}", flt)
        if not path:
            return
        try:
            out = fn(path)
        except Exception as exc:
            self._notify_error(exc)
            return
        from napari.utils.notifications import show_info

        show_info(f"{_ERROR_PREFIX}saved {out}")

    # ---------------------------------------------------------------------------- browse
    def _browse_bundle(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Model bundle", "", "MIRROR bundle (*.mirror);;All files (*)")
        if path:
            self.set_bundle_file(path)

    def open_slide_file(self, path: str) -> Any | None:
        """Open ``path`` as a slide layer at the panel's µm/px (or the file's own), select it.

        Returns the new layer, or None after showing why the file could not be opened.
        """
        from mirror_model.errors import MirrorError, SlideResolutionError

        from .._layers import slide_layer_data

        mpp = float(self.mpp_spin.value()) or None
        try:
            data, kwargs, _ = slide_layer_data(path, mpp=mpp)
        except MirrorError as exc:
            hint = (
                " Set 'µm per pixel' in this panel and open the slide again."
                if isinstance(exc, SlideResolutionError)
                else ""
            )
            self.status_label.setText(f"{exc}{hint}")
            return None
        layer = self.viewer.add_image(data, **kwargs)
        self.refresh_slide_layers()
        self.slide_combo.setCurrentText(layer.name)
        source = "given in this panel" if mpp is not None else "from the file"
        self.status_label.setText(f"Opened {layer.name} at {float(kwargs['scale'][0]):g} µm/px ({source}).")
        return layer

    def _browse_slide(self) -> None:
        from .._reader import SLIDE_SUFFIXES

        pattern = " ".join(f"*{suffix}" for suffix in SLIDE_SUFFIXES)
        path, _ = QFileDialog.getOpenFileName(self, "Slide", "", f"Slides ({pattern});;All files (*)")
        if path:
            self.open_slide_file(path)

    def _browse_features(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Patch features", "", "Features (*.h5 *.hdf5);;All files (*)")
        if path:
            self.set_features_file(path)

    def _browse_expression(self) -> None:
        path, _ = QFileDialog.getOpenFileName(
            self, "Expression table", "", "Tables (*.csv *.tsv *.txt *.parquet *.gz);;All files (*)"
        )
        if path:
            self.set_expression_file(path)

    # ----------------------------------------------------------------------------- errors
    def _notify_error(self, exc: BaseException) -> None:
        """Show a user-facing message (never a traceback) and keep it in ``last_error``."""
        from napari.utils.notifications import show_error

        from mirror_model.errors import MirrorError

        if isinstance(exc, MirrorError):
            msg = str(exc)
        else:
            # Unexpected failure: say what happened in one line; details go to the log.
            msg = f"unexpected {type(exc).__name__}: {exc}"
            log.warning("MIRROR failed", exc_info=(type(exc), exc, exc.__traceback__))
        self.last_error = msg
        try:
            self.status_label.setText(f"Error: {msg}")
        except RuntimeError:
            pass
        show_error(_ERROR_PREFIX + msg)
