"""The MIRROR dock widget: inputs, Run/Cancel, results in collapsible sections, exports.

Lifetime rules (each of them once crashed napari):

* A run is a :class:`napari_mirror._run.RunJob`, a plain Python thread that touches no Qt
  object. The panel polls it from a ``QTimer`` that the panel owns, so the timer, and with it
  every call into the panel, dies with the panel.
* Closing the panel (the dock's close button), closing the viewer or quitting cancels the job;
  quitting also waits for it (``QApplication.aboutToQuit`` and the interpreter's exit hook),
  so no worker is left running inside a half-torn-down interpreter.
* Everything the result needs (napari layer objects, the panel's text, the Kaplan–Meier plot)
  is prepared on the job thread; the GUI thread only adds the layers and sets texts.
"""

from __future__ import annotations

import gc
import html
import logging
import threading
import time
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from qtpy.QtCore import QEvent, Qt, QTimer
from qtpy.QtWidgets import (
    QApplication,
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QGridLayout,
    QHBoxLayout,
    QLabel,
    QListWidget,
    QListWidgetItem,
    QMessageBox,
    QPushButton,
    QScrollArea,
    QSizePolicy,
    QSlider,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from .._layers import HEATMAP_COLORMAPS, METADATA_KEY, SCALINGS, HeatmapDisplay, TopTile
from .._panel import PreparedResult, layer_names, prepare_result
from .._run import RunJob, RunRequest, RunResult, cancel_all_runs, list_samples, suggest_sample
from ._form import NO_SLIDE, InputForm
from ._results import KMView, MetricsView, ModelCardView, PredictionView, rich_label

__all__ = ["MirrorWidget"]

log = logging.getLogger(__name__)

_ERROR_PREFIX = "MIRROR: "
_AUTO_COLORMAP = "automatic"
#: How often the panel reads the job's progress (ms).
POLL_MS = 100
#: Width of the Kaplan–Meier image (logical px): fits a 400 px dock with margins.
KM_WIDTH_PX = 330
#: Pause between the steps that show a result (ms): the canvas draws in between.
STEP_PAUSE_MS = 20
#: New glyphs drawn per step when the colour-bar label appears.
GLYPHS_PER_STEP = 4
#: The panel fits a dock this narrow (napari's docks are ~400 px wide) without hiding anything.
MIN_WIDTH_PX = 360


def _warm_up() -> None:
    """Import the inference stack off the GUI thread while the user picks inputs, so that the
    first Run pays no seconds of imports on the GUI thread."""
    try:
        import lifelines  # noqa: F401
        import matplotlib.backends.backend_agg  # noqa: F401
        import scipy.stats  # noqa: F401

        import mirror_model.inference
        import mirror_model.models  # noqa: F401
    except Exception:  # the run itself reports any real problem
        log.debug("warm-up import failed", exc_info=True)


_warmed = threading.Event()
_quit_hook = threading.Event()


def _update_image_layer(layer: Any, new: Any) -> None:
    """Give an existing map layer the data and display of ``new`` (an unattached layer)."""
    layer.scale, layer.translate = new.scale, new.translate
    layer.data = new.data
    layer.colormap = new.colormap
    layer.contrast_limits = new.contrast_limits
    layer.opacity = new.opacity
    layer.metadata = dict(new.metadata)
    layer.colorbar.visible = True


def _update_shapes_layer(layer: Any, new: Any) -> None:
    """Give an existing top-tiles layer the rectangles, ranks and look of ``new``."""
    layer.selected_data = set()
    layer.data = [(np.asarray(d), t) for d, t in zip(new.data, new.shape_type, strict=True)]
    layer.features = new.features
    if len(new.data):
        layer.edge_width = new.edge_width
        layer.edge_color = new.edge_color
        layer.face_color = new.face_color
    layer.metadata = dict(new.metadata)
    layer.refresh_text()


_gc_holds = 0


def _hold_gc() -> None:
    """Keep Python's full garbage collections short while a run is going and its result is
    shown: a full collection walks every object of napari, Qt and torch (~0.4 s on the GUI
    thread, measured), so the objects that exist now are set aside (``gc.freeze``) until
    :func:`_release_gc`. New garbage is still collected; nothing stays frozen afterwards."""
    global _gc_holds
    _gc_holds += 1
    if _gc_holds == 1:
        gc.freeze()


def _release_gc() -> None:
    global _gc_holds
    if _gc_holds == 0:
        return
    _gc_holds -= 1
    if _gc_holds == 0:
        gc.unfreeze()


_seen_glyphs: set[str] = set(" 0123456789.-")


def _glyph_chunks(text: str) -> list[str]:
    """Prefixes of ``text`` such that each adds at most :data:`GLYPHS_PER_STEP` glyphs not
    drawn before (all of them, when every glyph was drawn already: none)."""
    out, new = [], set()
    for i, ch in enumerate(text):
        if ch not in _seen_glyphs and ch not in new and not ch.isspace():
            if len(new) == GLYPHS_PER_STEP:
                out.append(text[:i])
                _seen_glyphs.update(new)
                new = set()
            new.add(ch)
    if new:
        out.append(text)
    return out


class _JobBox:
    """Holds the panel's current job for the ``destroyed`` handler: a plain object, so the
    handler keeps no reference to the (dying) panel."""

    def __init__(self) -> None:
        self.job: RunJob | None = None
        self._gc_held = False

    def cancel(self, *_: Any) -> None:
        if self.job is not None:
            self.job.cancel()
        self.release_gc()

    def hold_gc(self) -> None:
        if not self._gc_held:
            self._gc_held = True
            _hold_gc()

    def release_gc(self) -> None:
        if self._gc_held:
            self._gc_held = False
            _release_gc()


def _section(title: str, content: QWidget, expanded: bool = True) -> QWidget:
    from superqt import QCollapsible

    box = QCollapsible(title)
    box.setDuration(0)
    box.addWidget(content)
    content.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Preferred)
    if expanded:
        box.expand(animate=False)
    else:
        box.collapse(animate=False)
    return box


class MirrorWidget(QWidget):
    """Dock widget that runs a MIRROR bundle on the selected slide and/or expression row.

    Parameters
    ----------
    napari_viewer : napari.Viewer
        Injected by napari.

    Notes
    -----
    Public methods (``run``, ``cancel``, ``export_*``, ``set_*``, ``select_map``) are what the
    buttons call; scripts and tests use them directly. ``last_result`` holds the last finished
    run, ``last_error`` / ``last_error_details`` the last error.
    """

    def __init__(self, napari_viewer: Any, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.viewer = napari_viewer
        self.last_result: RunResult | None = None
        self.last_prepared: PreparedResult | None = None
        self.last_error: str | None = None
        self.last_error_details: str = ""
        self.heatmap_layer = None
        self.top_tiles_layer = None
        self._top: list[TopTile] = []
        self._map_name: str | None = None
        self._pbar = None
        self._docked = False
        self._closed = False
        self._box = _JobBox()
        self._poll = QTimer(self)
        self._poll.setInterval(POLL_MS)
        self._poll.timeout.connect(self._poll_job)
        self._step_timer = QTimer(self)  # dies with the panel, like every call it makes
        self._step_timer.setSingleShot(True)
        self._step_timer.timeout.connect(self._next_step)
        self._steps: list[Any] = []
        self._adding: list[Any] = []
        self._build_ui()
        self._connect_viewer()
        self.refresh_slide_layers()
        # The panel may die without a close event (its window is deleted): cancel then too.
        self.destroyed.connect(self._box.cancel)
        app = QApplication.instance()
        if app is not None and not _quit_hook.is_set():
            _quit_hook.set()
            app.aboutToQuit.connect(partial(cancel_all_runs, 60.0))
        if not _warmed.is_set():
            _warmed.set()
            # Not a daemon: a daemon thread killed inside `import torch` at exit can abort.
            threading.Thread(target=_warm_up, name="mirror-warm-up", daemon=False).start()

    # ------------------------------------------------------------------------------- UI
    def _build_ui(self) -> None:
        inner = QWidget()
        root = QVBoxLayout(inner)
        root.setContentsMargins(4, 4, 4, 4)

        # inputs (magicgui)
        self.form = InputForm()
        self.form.slide.changed.connect(self._on_slide_changed)
        self.form.open_slide.changed.connect(self._browse_slide)
        self.form.expression.changed.connect(self._on_expression_edited)
        inputs = QWidget()
        il = QVBoxLayout(inputs)
        il.setContentsMargins(0, 0, 0, 0)
        il.addWidget(self.form.native)
        self.reader_pref = QCheckBox("Open slide files with MIRROR without asking")
        self.reader_pref.setToolTip(
            "Sets napari's reader preference for .svs, .ndpi, .mrxs, .scn, .bif, .vms, .vmu and "
            ".svslide files (Preferences > Plugins), so dropping a slide skips 'Choose reader'."
        )
        self.reader_pref.setChecked(self._reader_preference_set())
        self.reader_pref.toggled.connect(self._on_reader_pref)
        il.addWidget(self.reader_pref)
        root.addWidget(_section("Inputs", inputs))

        # run / cancel / status
        run_box = QWidget()
        rl = QVBoxLayout(run_box)
        rl.setContentsMargins(0, 0, 0, 0)
        buttons = QHBoxLayout()
        self.run_button = QPushButton("Run")
        self.run_button.clicked.connect(self.run)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.cancel_button.clicked.connect(self.cancel)
        buttons.addWidget(self.run_button)
        buttons.addWidget(self.cancel_button)
        rl.addLayout(buttons)
        status_row = QHBoxLayout()
        self.status_label = QLabel("Ready.")
        self.status_label.setWordWrap(True)
        self.status_label.setMinimumWidth(10)
        self.status_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.details_button = QPushButton("Details…")
        self.details_button.setToolTip("The full error message")
        self.details_button.clicked.connect(self.show_error_details)
        self.details_button.hide()
        status_row.addWidget(self.status_label, 1)
        status_row.addWidget(self.details_button, 0, Qt.AlignmentFlag.AlignTop)
        rl.addLayout(status_row)
        root.addWidget(run_box)

        # model card (top of the results) and the prediction
        self.model_view = ModelCardView()
        self.prediction_view = PredictionView()
        res = QWidget()
        rv = QVBoxLayout(res)
        rv.setContentsMargins(0, 0, 0, 0)
        rv.addWidget(self.model_view)
        rv.addWidget(self.prediction_view)
        self.results_section = _section("Result", res)
        root.addWidget(self.results_section)

        # heatmap: map selector, what it means, display, top tiles
        heat = QWidget()
        hf = QFormLayout(heat)
        hf.setContentsMargins(0, 0, 0, 0)
        hf.setRowWrapPolicy(QFormLayout.RowWrapPolicy.WrapLongRows)
        self.map_combo = QComboBox()
        self.map_combo.setToolTip("Which per-tile map the heatmap, the top tiles and the exports follow.")
        self.map_combo.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
        self.map_combo.setMinimumContentsLength(12)
        self.map_combo.currentIndexChanged.connect(self._on_map_changed)
        self.map_combo.setEnabled(False)
        hf.addRow("Map", self.map_combo)
        self.map_description = rich_label("<span style='color:gray'>Run first.</span>")
        hf.addRow(self.map_description)
        self.colormap_combo = QComboBox()
        self.colormap_combo.addItems([_AUTO_COLORMAP, *HEATMAP_COLORMAPS])
        self.colormap_combo.setToolTip("automatic: inferno, or a diverging map white at 0 for signed maps")
        self.colormap_combo.currentTextChanged.connect(self._apply_display)
        self.scaling_combo = QComboBox()
        for key, words in SCALINGS.items():
            self.scaling_combo.addItem("1st–99th pct" if key == "percentile" else "min–max", key)
            self.scaling_combo.setItemData(self.scaling_combo.count() - 1, words, Qt.ItemDataRole.ToolTipRole)
        self.scaling_combo.currentIndexChanged.connect(self._apply_display)
        grid = QGridLayout()
        grid.setContentsMargins(0, 0, 0, 0)
        grid.addWidget(self.colormap_combo, 0, 0)
        grid.addWidget(self.scaling_combo, 0, 1)
        hf.addRow("Colours", grid)
        self.opacity_slider = QSlider(Qt.Orientation.Horizontal)
        self.opacity_slider.setRange(0, 100)
        self.opacity_slider.setValue(55)
        self.opacity_slider.valueChanged.connect(self._apply_display)
        self.smoothing_spin = QDoubleSpinBox()
        self.smoothing_spin.setRange(0.0, 10.0)
        self.smoothing_spin.setSingleStep(0.5)
        self.smoothing_spin.setSuffix(" tiles")
        self.smoothing_spin.setToolTip("Gaussian smoothing (σ in tiles); 0 = raw tile values.")
        self.smoothing_spin.valueChanged.connect(self._apply_display)
        row = QGridLayout()
        row.setContentsMargins(0, 0, 0, 0)
        row.addWidget(self.opacity_slider, 0, 0)
        row.addWidget(QLabel("σ"), 0, 1)
        row.addWidget(self.smoothing_spin, 0, 2)
        hf.addRow("Opacity", row)
        self.topk_spin = QSpinBox()
        self.topk_spin.setRange(0, 100)
        self.topk_spin.setValue(10)
        self.topk_spin.valueChanged.connect(self._apply_top_k)
        hf.addRow("Top tiles", self.topk_spin)
        self.top_list = QListWidget()
        self.top_list.setMaximumHeight(150)
        self.top_list.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.top_list.setToolTip("Highest tiles of the selected map; click one to go there.")
        self.top_list.itemClicked.connect(self._on_top_clicked)
        self.top_list.currentRowChanged.connect(lambda r: self.go_to_tile(r) if r >= 0 else None)
        hf.addRow(self.top_list)
        self.heatmap_section = _section("Heatmap", heat)
        root.addWidget(self.heatmap_section)

        self.km_view = KMView()
        self.km_section = _section("Survival: reference cohort", self.km_view)
        root.addWidget(self.km_section)
        self.metrics_view = MetricsView()
        self.metrics_section = _section("Validation", self.metrics_view)
        root.addWidget(self.metrics_section)

        exports = QWidget()
        elay = QGridLayout(exports)
        elay.setContentsMargins(0, 0, 0, 0)
        self.export_buttons: dict[str, QPushButton] = {}
        for i, (key, label) in enumerate(
            (("geojson", "GeoJSON"), ("csv", "CSV"), ("png", "PNG"), ("json", "Report"))
        ):
            b = QPushButton(label)
            b.clicked.connect(lambda _=False, k=key: self._export_dialog(k))
            b.setEnabled(False)
            elay.addWidget(b, 0, i)
            self.export_buttons[key] = b
        root.addWidget(_section("Export", exports))
        root.addStretch(1)

        self.scroll = QScrollArea()
        self.scroll.setWidgetResizable(True)
        # Everything wraps to the dock's width; a horizontal scroll bar would hide content.
        self.scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.scroll.setWidget(inner)
        outer = QVBoxLayout(self)
        outer.setContentsMargins(0, 0, 0, 0)
        outer.addWidget(self.scroll)
        self._inner = inner
        self.setMinimumWidth(MIN_WIDTH_PX)

    @staticmethod
    def _reader_preference_set() -> bool:
        from .._reader import PLUGIN_NAME, slide_reader_preference

        try:
            return all(v == PLUGIN_NAME for v in slide_reader_preference().values())
        except Exception:  # settings unavailable: leave the box unticked
            log.debug("reading napari's reader preference failed", exc_info=True)
            return False

    def _on_reader_pref(self, checked: bool) -> None:
        from .._reader import set_slide_reader_preference

        changed = set_slide_reader_preference(bool(checked))
        if checked:
            taken = not self._reader_preference_set()
            self.status_label.setText(
                "Slide files now open with MIRROR."
                + (" Some endings are assigned to another reader in Preferences > Plugins." if taken else "")
            )
        elif changed:
            self.status_label.setText("napari will ask which reader to use for slide files again.")

    # -------------------------------------------------------------------------- lifetime
    def event(self, ev: QEvent) -> bool:
        # napari closes a dock by removing the widget from it (setParent(None)); a widget that
        # was docked and has no parent any more is a closed panel: stop its run now.
        if ev.type() == QEvent.Type.ParentChange:
            if self.parent() is not None:
                self._docked = True
            elif self._docked:
                self.close_panel()
        return super().event(ev)

    def close_panel(self) -> None:
        """What closing the panel does: cancel the run, stop polling, let go of the viewer.

        The result layers stay in the viewer. Idempotent.
        """
        if self._closed:
            return
        self._closed = True
        self._box.cancel()  # also ends the garbage-collection hold
        self._poll.stop()
        self._steps = []
        self._step_timer.stop()
        self._close_progress()
        self._disconnect_viewer()

    def _close_progress(self) -> None:
        pbar, self._pbar = self._pbar, None
        if pbar is not None:
            try:
                pbar.close()
            except Exception:  # the viewer's activity dock may be gone already
                log.debug("closing the progress bar failed", exc_info=True)

    # ------------------------------------------------------------------------- viewer links
    def _connect_viewer(self) -> None:
        ev = self.viewer.layers.events
        for name in ("inserted", "removed", "reordered"):
            getattr(ev, name).connect(self._on_layers_changed)

    def _disconnect_viewer(self) -> None:
        ev = self.viewer.layers.events
        for name in ("inserted", "removed", "reordered"):
            try:
                getattr(ev, name).disconnect(self._on_layers_changed)
            except Exception:  # viewer already gone
                pass

    def _on_layers_changed(self, event: Any = None) -> None:
        try:
            self.refresh_slide_layers()
            if getattr(event, "type", "") == "removed":
                if self.heatmap_layer is not None and self.heatmap_layer not in self.viewer.layers:
                    self.heatmap_layer = None
                    self._update_colorbar_label()
                if self.top_tiles_layer is not None and self.top_tiles_layer not in self.viewer.layers:
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
        current = self.form.slide.value
        names = [layer.name for layer in self.slide_layers()]
        self.form.set_choices(self.form.slide, [*names, NO_SLIDE], keep=current if current in names else None)
        if names:
            # Slides are in µm: a scale bar makes sizes readable at a glance.
            self.viewer.scale_bar.visible = True
        if current not in names:
            self._on_slide_changed()
        if not names and self._foreign_slide_layers():
            self.status_label.setText(
                "A slide was opened by another reader (no physical scale). Open it with "
                "'Open slide…' in this panel (set µm/px first if the file has no resolution "
                "metadata) so it can be analysed."
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
        name = self.form.slide.value
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
        if name not in self.form.slide.choices:
            raise ValueError(f"{name!r} is not a slide layer of this viewer")
        self.form.slide.value = name

    def _on_slide_changed(self, *_: Any) -> None:
        layer = self.selected_slide_layer()
        if layer is None:
            return
        meta = layer.metadata[METADATA_KEY]
        # Sample data carries its expression table: fill it in when the user has not chosen one.
        if meta.get("expression_path") and not self.form.path_text(self.form.expression):
            self.set_expression_file(meta["expression_path"], sample_id=meta.get("sample_id"))
        elif self.form.sample.choices:
            self._auto_pick_sample()

    # --------------------------------------------------------------------------- inputs
    def set_bundle_file(self, path: str | Path | None) -> None:
        self.form.set_path(self.form.bundle, path)

    def set_features_file(self, path: str | Path | None) -> None:
        self.form.set_path(self.form.features, path)

    def set_device(self, device: str) -> None:
        if device not in self.form.device.choices:
            raise ValueError(f"device must be auto, cpu or cuda; got {device!r}")
        self.form.device.value = device

    def set_mpp(self, mpp: float | None) -> None:
        """µm per level-0 pixel for 'Open slide…' (None or 0 = from the file)."""
        self.form.mpp.value = float(mpp or 0.0)

    def _on_expression_edited(self, *_: Any) -> None:
        text = self.form.path_text(self.form.expression)
        if text == getattr(self, "_expression_loaded", None):
            return
        if not text or Path(text).is_file():
            self.set_expression_file(text or None)

    def set_expression_file(self, path: str | Path | None, sample_id: str | None = None) -> bool:
        """Use ``path`` as expression table, list its samples and pick the patient's row.

        The row is ``sample_id`` when given, else the one matching the slide's file name.
        Returns False (and notifies) when the table cannot be read.
        """
        text = "" if path is None else str(path).strip()
        self._expression_loaded = text
        with self.form.expression.changed.blocked():
            self.form.set_path(self.form.expression, text)
        self.form.set_choices(self.form.sample, [])
        if not text:
            return True
        try:
            samples = list_samples(text)
        except Exception as exc:
            self._notify_error(exc)
            return False
        self.form.set_choices(self.form.sample, samples, keep=sample_id)
        if sample_id is None or sample_id not in samples:
            self._auto_pick_sample()
        return True

    def _auto_pick_sample(self) -> None:
        layer = self.selected_slide_layer()
        samples = list(self.form.sample.choices)
        if layer is None or not samples:
            return
        meta = layer.metadata[METADATA_KEY]
        wanted = meta.get("sample_id")
        if wanted in samples:
            self.form.sample.value = wanted
            return
        hit = suggest_sample(samples, meta.get("slide_path") or layer.name)
        if hit is not None:
            self.form.sample.value = hit
            self.status_label.setText(f"Patient row {hit!r} matched to the slide name.")

    def set_sample(self, sample_id: str) -> None:
        if sample_id not in self.form.sample.choices:
            raise ValueError(f"{sample_id!r} is not a row of the expression file")
        self.form.sample.value = sample_id

    def current_request(self) -> RunRequest:
        """The inputs as a :class:`RunRequest` (read on the GUI thread)."""
        layer = self.selected_slide_layer()
        meta = layer.metadata[METADATA_KEY] if layer is not None else {}
        expr = self.form.path_text(self.form.expression) or None
        return RunRequest(
            bundle_path=self.form.path_text(self.form.bundle) or None,
            slide_path=meta.get("slide_path"),
            features_path=self.form.path_text(self.form.features) or None,
            expression_path=expr,
            sample_id=(self.form.sample.value or None) if expr else None,
            device=str(self.form.device.value),
            nan_policy=str(self.form.nan_policy.value),
            # a resolution the user gave when opening the slide must reach the tiling too
            mpp=float(meta["mpp"]) if meta.get("mpp_source") == "user" else None,
        )

    def display(self) -> HeatmapDisplay:
        cmap = self.colormap_combo.currentText()
        return HeatmapDisplay(
            colormap=None if cmap == _AUTO_COLORMAP else cmap,
            opacity=self.opacity_slider.value() / 100.0,
            scaling=self.scaling_combo.currentData() or "percentile",
            smoothing_sigma_tiles=float(self.smoothing_spin.value()),
        )

    # ------------------------------------------------------------------------------ run
    @property
    def is_running(self) -> bool:
        """A run is going, or its result is still being shown."""
        return self._box.job is not None or bool(self._steps)

    @property
    def job(self) -> RunJob | None:
        """The running job (None when idle)."""
        return self._box.job

    def run(self) -> None:
        """Start a run on a worker thread; the viewer stays responsive."""
        if self.is_running or self._closed:
            return
        try:
            request = self.current_request().validate()
        except Exception as exc:
            self._notify_error(exc)
            return
        from napari.utils import progress

        prepare = self._preparer(request.slide_path)
        self._clear_error()
        self._pbar = progress(total=0, desc="MIRROR")
        self._box.job = RunJob(request, prepare=prepare).start()
        self._box.hold_gc()
        self.run_button.setEnabled(False)
        self.cancel_button.setEnabled(True)
        self.status_label.setText("Running…")
        self._poll.start()

    def _preparer(self, slide_path: str | None) -> Any:
        """:func:`prepare_result` with the panel's current display settings (read now, on the
        GUI thread; the job thread calls it with the result)."""
        layer = self._slide_layer_for(slide_path)
        return partial(
            prepare_result,
            display=self.display(),
            map_name=self._map_name,
            k=self.topk_spin.value(),
            slide_name=layer.name if layer is not None else "MIRROR",
            km_width_px=KM_WIDTH_PX,
        )

    def cancel(self) -> None:
        """Ask the running job to stop at its next check; nothing is added to the viewer."""
        job = self._box.job
        if job is None:
            return
        job.cancel()
        self.cancel_button.setEnabled(False)
        self.status_label.setText("Cancelling…")

    def wait(self, timeout_s: float = 300.0) -> bool:
        """Process events until the running job is shown (scripts and tests). True when idle."""
        app = QApplication.instance()
        deadline = time.monotonic() + timeout_s
        while self.is_running and time.monotonic() < deadline:
            app.processEvents()
            time.sleep(0.01)
        app.processEvents()
        return not self.is_running

    def _poll_job(self) -> None:
        try:
            self._poll_job_unguarded()
        except RuntimeError as exc:
            if "has been deleted" not in str(exc):
                raise
            # The viewer is being torn down under this slot (quitting): stop the run; its
            # outcome has nowhere to go.
            self._box.cancel()

    def _poll_job_unguarded(self) -> None:
        job = self._box.job
        if job is None:
            self._poll.stop()
            return
        p = job.progress()
        if self._pbar is not None:
            try:
                if self._pbar.total != p.total:
                    self._pbar.total = p.total
                self._pbar.set_description(f"MIRROR: {p.stage}")
                self._pbar.n = min(p.done, p.total) if p.total else p.done
                self._pbar.refresh()
            except Exception:  # a progress bar glitch must never break a run
                log.debug("progress update failed", exc_info=True)
        if not job.cancel_requested:
            count = f" {p.done}/{p.total}" if p.total else ""
            self.status_label.setText(f"{p.stage}…{count} ({p.seconds:.0f} s)")
        if job.finished:
            self._finish(job)

    def _finish(self, job: RunJob) -> None:
        self._poll.stop()
        self._box.job = None
        self._close_progress()
        self.run_button.setEnabled(True)
        self.cancel_button.setEnabled(False)
        outcome = job.outcome()
        from mirror_model.errors import Cancelled

        if outcome is None:  # pragma: no cover - finished implies an outcome
            return
        if outcome.error is not None or outcome.cancelled:
            self._box.release_gc()
        if outcome.cancelled or isinstance(outcome.error, Cancelled):
            from napari.utils.notifications import show_info

            self.status_label.setText(
                f"Cancelled after {outcome.seconds:.1f} s; the viewer was left unchanged."
            )
            show_info(_ERROR_PREFIX + "run cancelled; nothing was changed.")
            return
        if outcome.error is not None:
            self._notify_error(outcome.error, outcome.traceback)
            return
        try:
            self.show_result(outcome.result, outcome.prepared, staged=True)
        except Exception as exc:
            self._box.release_gc()
            log.debug("showing the MIRROR result failed", exc_info=True)
            import traceback

            self._notify_error(exc, traceback.format_exc())

    # --------------------------------------------------------------------------- results
    def show_result(
        self, result: RunResult, prepared: PreparedResult | None = None, *, staged: bool = False
    ) -> None:
        """Add the map and top-tile layers and fill the panel.

        ``prepared`` comes from the job thread; without it (scripts) it is computed here. With
        ``staged`` (what a run does) the work is cut into steps, one per turn of the event loop,
        each well under 0.25 s of GUI time (adding a layer, showing its colour bar, drawing the
        label's new glyphs, filling the panel), so the viewer never freezes while a result
        appears; :attr:`is_running` stays True until the last step.
        """
        if prepared is None:
            prepared = self._preparer(result.request.slide_path)(result)
        steps = self._result_steps(result, prepared)
        if not staged:
            for step in steps:
                step()
            return
        self._steps = steps
        self._step_timer.start(0)

    def _next_step(self) -> None:
        if not self._steps:
            return
        step = self._steps.pop(0)
        try:
            step()
        except RuntimeError as exc:
            if "has been deleted" in str(exc):  # the viewer is being closed under us
                self._steps = []
                self._box.release_gc()
                return
            self._abort_steps(exc)
            return
        except Exception as exc:
            self._abort_steps(exc)
            return
        if self._steps:
            # a short pause lets the canvas draw what the step added before the next one
            self._step_timer.start(STEP_PAUSE_MS)

    def _abort_steps(self, exc: BaseException) -> None:
        import traceback

        self._steps = []
        self._box.release_gc()
        for lyr in self._adding:  # all or nothing: no half result stays behind
            if lyr in self.viewer.layers:
                self.viewer.layers.remove(lyr)
        self._adding = []
        self.run_button.setEnabled(True)
        log.debug("showing the MIRROR result failed", exc_info=(type(exc), exc, exc.__traceback__))
        self._notify_error(exc, "".join(traceback.format_exception(exc)))

    def _result_steps(self, result: RunResult, prepared: PreparedResult) -> list[Any]:
        pred = result.prediction
        slide_path = result.request.slide_path
        layer = self._slide_layer_for(slide_path)
        heat_name, tops_name = layer_names(layer.name if layer is not None else "MIRROR")
        # The earlier result layers of the same slide are updated in place: removing a layer
        # costs napari a full garbage collection (~0.5 s) and adding one builds its controls.
        old = [lyr for lyr in self.result_layers() if lyr.metadata[METADATA_KEY].get("slide_path") == slide_path]
        old_heat = next((x for x in old if x.metadata[METADATA_KEY]["kind"] == "heatmap"), None)
        old_tops = next((x for x in old if x.metadata[METADATA_KEY]["kind"] == "top_tiles"), None)
        heat, tops = prepared.heatmap, prepared.top_tiles_layer
        self._adding = []
        self.run_button.setEnabled(False)
        steps: list[Any] = []

        def add(lyr: Any) -> None:
            self.viewer.layers.append(lyr)
            self._adding.append(lyr)

        def show_colorbar() -> None:
            heat.colorbar.visible = True

        if heat is not None and old_heat is not None:
            steps.append(partial(_update_image_layer, old_heat, heat))
            heat = old_heat
        elif heat is not None:
            # the colour bar stays hidden while the layer is added: two short steps
            heat.colorbar.visible = False
            steps += [partial(add, heat), show_colorbar]
        if tops is not None and old_tops is not None:
            steps.append(partial(_update_shapes_layer, old_tops, tops))
            tops = old_tops
        elif tops is not None:
            # added hidden, then drawn, then its rank numbers (a text visual): three short steps
            tops.visible = tops.text.visible = False
            steps += [
                partial(add, tops),
                partial(setattr, tops, "visible", True),
                partial(setattr, tops.text, "visible", True),
            ]
        stale = [x for x in old if x is not heat and x is not tops]

        def settle() -> None:
            for lyr in stale:
                if lyr in self.viewer.layers:
                    self.viewer.layers.remove(lyr)
            if heat is not None:  # napari suffixed the names while both generations existed
                heat.name = heat_name
                heat.events.visible.disconnect(self._update_colorbar_label)
                heat.events.visible.connect(self._update_colorbar_label)
            if tops is not None:
                tops.name = tops_name
            self._adding = []
            self.heatmap_layer, self.top_tiles_layer = heat, tops
            self._top = list(prepared.tops)
            self._map_name = prepared.map_name
            if layer is not None and heat is not None:
                self.viewer.layers.selection.active = heat
            self.viewer.scale_bar.visible = True
            self.last_result = result
            self.last_prepared = prepared

        def fill_panel() -> None:
            s = prepared.summary
            self.model_view.show_card(s)
            self.prediction_view.show_summary(s)
            self.km_view.show_summary(s)
            self.metrics_view.show_summary(s)
            self._fill_map_combo(pred, prepared.map_name)
            self._fill_top_list()
            has_tiles = heat is not None
            self.heatmap_section.setEnabled(has_tiles)
            if has_tiles:
                self.heatmap_section.expand(animate=False)
            else:  # nothing to show there for an expression-only run
                self.heatmap_section.collapse(animate=False)
            for key, b in self.export_buttons.items():
                b.setEnabled(key in ("png", "json") or has_tiles)
            self.status_label.setText(f"{s.inputs}. Done in {result.seconds:.1f} s.")
            self.run_button.setEnabled(True)
            self._box.release_gc()

        steps.append(settle)
        if prepared.heatmap is not None:
            label = prepared.heatmap.metadata[METADATA_KEY]["colorbar_label"]
            steps += [partial(self._warm_glyphs, chunk) for chunk in _glyph_chunks(label)]
            steps.append(self._update_colorbar_label)
        steps.append(fill_panel)
        return steps

    def _warm_glyphs(self, text: str) -> None:
        """Draw ``text`` once in the (still hidden) label overlay: the canvas renders each new
        glyph of a label once (~8 ms each under software OpenGL); a few at a time keeps every
        step short."""
        overlay = self.viewer.text_overlay
        overlay.text = text
        if not overlay.visible:
            overlay.opacity, overlay.visible = 0.0, True
        _seen_glyphs.update(text)

    @property
    def results(self) -> Any:
        """Displayed strings of the last result (``shown``) and the text of the result view."""
        from types import SimpleNamespace

        s = self.last_prepared.summary if self.last_prepared is not None else None
        return SimpleNamespace(
            shown=dict(s.shown) if s is not None else {},
            summary_text=self.prediction_view.text.text,
            model_text=self.model_view.text.text,
            banner_text=self.model_view.banner.text,
        )

    def _fill_map_combo(self, pred: Any, selected: str | None) -> None:
        maps = getattr(pred, "maps", None) or {}
        self.map_combo.blockSignals(True)
        self.map_combo.clear()
        for name, m in maps.items():
            self.map_combo.addItem(m.label, name)
            self.map_combo.setItemData(self.map_combo.count() - 1, m.description, Qt.ItemDataRole.ToolTipRole)
        if selected is not None:
            self.map_combo.setCurrentIndex(max(0, self.map_combo.findData(selected)))
        self.map_combo.blockSignals(False)
        self.map_combo.setEnabled(bool(maps))
        self._update_map_description()

    def _update_map_description(self) -> None:
        pred = self.last_result.prediction if self.last_result is not None else None
        maps = getattr(pred, "maps", None) or {}
        m = maps.get(self._map_name) if self._map_name else None
        if m is None:
            self.map_description.setText(
                "<span style='color:gray'>No per-tile map (no slide input).</span>" if pred is not None
                else "<span style='color:gray'>Run first.</span>"
            )
            return
        self.map_description.setText(
            f"{html.escape(m.description)}<br><span style='color:gray'>units: {html.escape(m.units)}"
            f"; method: {html.escape(m.method)}</span>"
        )

    def map_names(self) -> list[str]:
        """Names of the maps in the selector, in order."""
        return [self.map_combo.itemData(i) for i in range(self.map_combo.count())]

    def select_map(self, name: str) -> None:
        """Show map ``name`` (a key of ``Prediction.maps``): heatmap, top tiles and exports follow."""
        idx = self.map_combo.findData(name)
        if idx < 0:
            raise ValueError(f"no map {name!r}; the result has {', '.join(self.map_names())}")
        self.map_combo.setCurrentIndex(idx)
        self._on_map_changed()

    @property
    def selected_map_name(self) -> str | None:
        return self._map_name

    def _on_map_changed(self, *_: Any) -> None:
        name = self.map_combo.currentData()
        if name is None or self.last_result is None or name == self._map_name:
            return
        self._map_name = name
        self._apply_display()
        self._apply_top_k()
        self._update_map_description()

    def _apply_display(self, *_: Any) -> None:
        layer = self.heatmap_layer
        if layer is None or self.last_result is None or layer not in self.viewer.layers:
            return
        from .._layers import heatmap_layer_data

        data, kw, _ = heatmap_layer_data(
            self.last_result.prediction,
            map_name=self._map_name,
            display=self.display(),
            name=layer.name,
            source={"slide_path": self.last_result.request.slide_path},
            note=layer.metadata[METADATA_KEY].get("legend_note"),
        )
        layer.data = data
        layer.colormap = kw["colormap"]
        layer.contrast_limits = kw["contrast_limits"]
        layer.opacity = kw["opacity"]
        layer.metadata = {**layer.metadata, **kw["metadata"]}
        self._update_colorbar_label()

    def _update_colorbar_label(self, *_: Any) -> None:
        """The colour bar says what the map is: its label, units and colour range, written in a
        text overlay next to napari's colour bar (which has no title of its own)."""
        overlay = self.viewer.text_overlay
        layer = self.heatmap_layer
        if layer is None or layer not in self.viewer.layers or not layer.visible:
            if getattr(self, "_owns_text_overlay", False):
                overlay.visible = False
            return
        overlay.text = layer.metadata[METADATA_KEY]["colorbar_label"]
        overlay.position = "top_left"  # under the colour bar (napari stacks a corner's overlays)
        overlay.font_size = 9
        overlay.opacity = 1.0
        overlay.visible = True
        self._owns_text_overlay = True

    def _apply_top_k(self, *_: Any) -> None:
        pred = self.last_result.prediction if self.last_result is not None else None
        if pred is None or not getattr(pred, "maps", None):
            return
        from .._layers import make_layer, top_tiles, top_tiles_layer_data

        k = self.topk_spin.value()
        mpp = float(pred.slide_mpp)
        self._top = top_tiles(pred, k, map_name=self._map_name, mpp=mpp)
        name = layer_names(self._slide_name())[1]
        new = make_layer(
            top_tiles_layer_data(
                pred, k, map_name=self._map_name, mpp=mpp, name=name,
                source={"slide_path": self.last_result.request.slide_path}, tops=self._top,
            )
        )
        layer = self.top_tiles_layer
        if layer is not None and layer in self.viewer.layers:
            _update_shapes_layer(layer, new)  # in place: no layer removal (a full GC in napari)
        else:
            self.top_tiles_layer = new
            self.viewer.layers.append(new)
        self._fill_top_list()

    def _slide_name(self) -> str:
        layer = self._slide_layer_for(self.last_result.request.slide_path) if self.last_result else None
        return layer.name if layer is not None else "MIRROR"

    def _fill_top_list(self) -> None:
        self.top_list.clear()
        pred = self.last_result.prediction if self.last_result is not None else None
        units = ""
        if pred is not None and self._map_name and getattr(pred, "maps", None):
            units = pred.maps[self._map_name].units
        for t in self._top:
            item = QListWidgetItem(t.label())
            item.setToolTip(f"value {t.value:.4g} ({units}); tile {t.index}")
            self.top_list.addItem(item)

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

    def _export_context(self) -> dict[str, Any]:
        card = self.last_prepared.summary.card if self.last_prepared is not None else None
        return {"model": card.to_dict() if card is not None else None, "selected_map": self._map_name}

    def export_geojson(self, path: str | Path, object_type: str = "tile") -> Path:
        """QuPath GeoJSON of the last result: one square per tile (level-0 pixels), every map's
        value and percentile, the model card and the displayed map in the collection's
        properties."""
        from .._export import write_geojson

        return write_geojson(path, self._require_result().prediction, object_type=object_type, **self._export_context())

    def export_csv(self, path: str | Path) -> Path:
        """Per-tile CSV (``Prediction.tiles_table``) under a ``#`` comment header naming the
        model and the displayed map."""
        from .._export import write_tile_csv

        return write_tile_csv(path, self._require_result().prediction, **self._export_context())

    def export_png(self, path: str | Path) -> Path:
        """Snapshot of the canvas as shown, with the colour bar, its label and the scale bar."""
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
        d = self.display()
        inputs["display"] = {
            "map": self._map_name,
            "colormap": self.heatmap_layer.colormap.name if self.heatmap_layer is not None else None,
            "scaling": d.scaling,
            "smoothing_sigma_tiles": d.smoothing_sigma_tiles,
            "top_k": self.topk_spin.value(),
        }
        inputs["seconds"] = res.seconds
        return write_report(
            path, res.prediction, inputs=inputs, bundle=res.bundle, top_k=self.topk_spin.value(),
            **self._export_context(),
        )

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
    def open_slide_file(self, path: str) -> Any | None:
        """Open ``path`` as a slide layer at the panel's µm/px (or the file's own), select it.

        Returns the new layer, or None after showing why the file could not be opened.
        """
        from mirror_model.errors import MirrorError, SlideResolutionError

        from .._layers import slide_layer_data

        mpp = float(self.form.mpp.value) or None
        try:
            data, kwargs, _ = slide_layer_data(path, mpp=mpp)
        except MirrorError as exc:
            hint = (
                " Set µm/px in this panel and open the slide again."
                if isinstance(exc, SlideResolutionError)
                else ""
            )
            self.status_label.setText(f"{exc}{hint}")
            return None
        layer = self.viewer.add_image(data, **kwargs)
        self.refresh_slide_layers()
        self.form.slide.value = layer.name
        source = "given in this panel" if mpp is not None else "from the file"
        self.status_label.setText(f"Opened {layer.name} at {float(kwargs['scale'][0]):g} µm/px ({source}).")
        return layer

    def _browse_slide(self, *_: Any) -> None:
        from .._reader import SLIDE_SUFFIXES

        pattern = " ".join(f"*{suffix}" for suffix in SLIDE_SUFFIXES)
        path, _ = QFileDialog.getOpenFileName(self, "Slide", "", f"Slides ({pattern});;All files (*)")
        if path:
            self.open_slide_file(path)

    # ----------------------------------------------------------------------------- errors
    def _clear_error(self) -> None:
        self.last_error = None
        self.last_error_details = ""
        self.details_button.hide()

    def _notify_error(self, exc: BaseException, details: str = "") -> None:
        """Show a user-facing message (never a traceback) in the status line and as a
        notification; the full text (and, for unexpected errors, the traceback) stays behind
        the Details button."""
        from napari.utils.notifications import show_error

        from mirror_model.errors import MirrorError

        if isinstance(exc, MirrorError):
            msg = str(exc)
            full = msg
        else:
            # Unexpected failure: say what happened in one line; the traceback is in Details.
            msg = f"unexpected {type(exc).__name__}: {exc}"
            full = msg + ("\n\n" + details if details else "")
            log.warning("MIRROR failed", exc_info=(type(exc), exc, exc.__traceback__))
        self.last_error = msg
        self.last_error_details = full
        try:
            first = msg.splitlines()[0] if msg else msg
            short = first if len(first) <= 300 else first[:297] + "…"
            self.status_label.setText(f"Error: {short}")
            self.details_button.show()
        except RuntimeError:
            pass
        show_error(_ERROR_PREFIX + msg)

    def show_error_details(self) -> QMessageBox | None:
        """A dialog with the whole error message (what the status line and toast shorten)."""
        if not self.last_error:
            return None
        box = QMessageBox(self)
        box.setIcon(QMessageBox.Icon.Warning)
        box.setWindowTitle("MIRROR error")
        box.setText(self.last_error)
        box.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        if self.last_error_details and self.last_error_details != self.last_error:
            box.setDetailedText(self.last_error_details)
        box.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose)
        box.show()
        self.error_dialog = box
        return box
