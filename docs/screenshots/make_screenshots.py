"""Make the README's screenshots of the MIRROR panel with a real napari viewer.

    xvfb-run -a -s "-screen 0 1920x1200x24" python docs/screenshots/make_screenshots.py

Writes into ``docs/screenshots/`` (or ``--out``):

* ``sample_case.png`` / ``sample_case_panel.png`` — the demo patient (File > Open Sample >
  MIRROR demo slide + expression), slide + expression, with the embedded demo bundle;
* ``real_slide.png`` / ``real_slide_panel.png`` — the real H&E slide
  ``../shared/data/CMU-1-Small-Region.svs`` (skipped when it is absent), slide only.

The window shots show the whole napari window (canvas with the map, its colour bar and label,
the scale bar, the top tiles, the dock at 400 px); the panel shots show the whole panel
unscrolled. Re-run after rebuilding the demo bundle: nothing here depends on its numbers.
``--map NAME`` picks the map to show (default: the predicted subtype's evidence map when the
bundle makes one, else the first map).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
REAL_SLIDE = REPO.parent / "shared" / "data" / "CMU-1-Small-Region.svs"
WINDOW = (1600, 1000)
DOCK_WIDTH = 400
SHOT_WIDTH = 1280  # window shots are scaled down to this width (keeps the files small)


def _save_png(rgba, path: Path, width: int) -> None:
    from PIL import Image

    img = Image.fromarray(rgba).convert("RGB")
    if img.width > width:
        img = img.resize((width, round(img.height * width / img.width)), Image.Resampling.LANCZOS)
    img.save(path, optimize=True)


def _settle(app, seconds: float = 0.6) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        app.processEvents()
        time.sleep(0.01)


def _save_trimmed(pixmap, path: Path) -> None:
    """Save a grabbed widget without the empty rows below its content."""
    import numpy as np

    img = pixmap.toImage()
    w, h = img.width(), img.height()
    ptr = img.constBits()
    ptr.setsize(img.sizeInBytes())
    arr = np.frombuffer(ptr, np.uint8).reshape(h, img.bytesPerLine())[:, : 4 * w].reshape(h, w, 4)
    background = arr[-1, w // 2]
    rows = np.nonzero((arr != background).any(axis=(1, 2)))[0]
    bottom = min(h, int(rows.max()) + 12) if rows.size else h
    img.copy(0, 0, w, bottom).save(str(path))


def _pick_map(widget, wanted: str | None) -> None:
    names = widget.map_names()
    pred = widget.last_result.prediction
    if wanted is None and pred.predicted_subtype and f"subtype:{pred.predicted_subtype}" in names:
        wanted = f"subtype:{pred.predicted_subtype}"
    if wanted in names:
        widget.select_map(wanted)


def shoot(name: str, out: Path, open_layers, wanted_map: str | None) -> None:
    import napari
    from qtpy.QtCore import Qt
    from qtpy.QtWidgets import QApplication

    viewer = napari.Viewer(show=True)
    app = QApplication.instance()
    win = viewer.window._qt_window
    win.resize(*WINDOW)
    try:
        open_layers(viewer)
        dock, widget = viewer.window.add_plugin_dock_widget("napari-mirror", "MIRROR")
        win.resizeDocks([dock], [DOCK_WIDTH], Qt.Orientation.Horizontal)
        widget.set_device("cpu")
        widget.run()
        if not widget.wait(600) or widget.last_error:
            raise SystemExit(f"{name}: the run failed: {widget.last_error_details or widget.last_error}")
        _pick_map(widget, wanted_map)
        viewer.reset_view()
        _settle(app, 1.0)
        _save_png(viewer.screenshot(canvas_only=False, flash=False), out / f"{name}.png", SHOT_WIDTH)
        # the whole panel, unscrolled: float the dock and make it as tall as its content
        height = widget._inner.sizeHint().height() + 40
        dock.setFloating(True)
        dock.resize(DOCK_WIDTH, height)
        _settle(app, 0.8)
        _save_trimmed(dock.grab(), out / f"{name}_panel.png")
        print(f"wrote {out / (name + '.png')} and {out / (name + '_panel.png')}")
    finally:
        viewer.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=HERE, help="folder for the PNGs (default: %(default)s)")
    ap.add_argument("--map", default=None, help="map to show (a key of Prediction.maps)")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(REPO / "src"))

    shoot("sample_case", args.out, lambda v: v.open_sample("napari-mirror", "demo_slide"), args.map)
    if REAL_SLIDE.exists():
        shoot("real_slide", args.out, lambda v: v.open(str(REAL_SLIDE), plugin="napari-mirror"), args.map)
    else:
        print(f"skipped the real slide: {REAL_SLIDE} not found")
    return 0


if __name__ == "__main__":
    sys.exit(main())
