"""Run in a subprocess by tests/test_plugin_lifetime.py: a real napari viewer, the MIRROR panel
on the demo sample, a run, and then one way of ending the session while the run is in flight.

    python tests/_lifetime_script.py CASE

CASE: ``close_panel`` (the dock's close button, then File > Exit), ``close_viewer``
(``viewer.close()``, then the application quits), ``quit`` (File > Exit), ``cancel_quit``
(Cancel, then File > Exit at once), ``cancel_close_panel`` (Cancel, then the dock's close
button, then File > Exit).

The worker thread is slowed at each progress report (the place where it crashed before), so
the session always ends with the run in flight. Prints ``ACTED in_flight=…``,
``JOB cancelled=…`` and finally ``CLEAN EXIT``; the test checks those lines, the exit status and
that no traceback was printed.
"""

from __future__ import annotations

import gc
import sys
import time
import weakref

CASE = sys.argv[1]
T0 = time.monotonic()


def main() -> int:
    import napari
    from qtpy.QtCore import QTimer
    from qtpy.QtWidgets import QApplication

    from napari_mirror import _run

    slow_report = _run.RunJob._report

    def report(self, done, total, stage):  # the worker thread, inside predict's progress call
        slow_report(self, done, total, stage)
        time.sleep(0.05)

    _run.RunJob._report = report

    viewer = napari.Viewer(show=True)
    viewer.open_sample("napari-mirror", "demo_slide")
    dock, widget = viewer.window.add_plugin_dock_widget("napari-mirror", "MIRROR")
    widget.set_device("cpu")
    state: dict = {"job": None, "acted": False, "t0": time.monotonic()}
    # Hold no strong reference to the panel, as napari itself does not once it is closed: the
    # panel is garbage-collected while its run is still going, which is what crashed before.
    widget_ref, dock_ref = weakref.ref(widget), weakref.ref(dock)
    del widget, dock

    def quit_app() -> None:  # what File > Exit (Ctrl+Q) does
        viewer.window._qt_window.close(quit_app=True, confirm_need=False)

    def after_job_ended(then) -> None:
        job = state["job"]
        if job.finished:
            then()
        elif time.monotonic() - state["t0"] > 120:
            print("TIMEOUT waiting for the job to end", flush=True)
            QApplication.quit()
        else:
            QTimer.singleShot(50, lambda: after_job_ended(then))

    def act() -> None:
        job = state["job"]
        print(
            f"ACTED in_flight={not job.finished} stage={job.progress().stage!r} "
            f"after {time.monotonic() - T0:.1f} s",
            flush=True,
        )
        widget, dock = widget_ref(), dock_ref()
        if CASE == "close_panel":
            dock.title.close_button.click()
            del widget, dock
            gc.collect()
            after_job_ended(quit_app)
        elif CASE == "close_viewer":
            viewer.close()
            after_job_ended(QApplication.quit)
        elif CASE == "quit":
            quit_app()
        elif CASE == "cancel_quit":
            widget.cancel()
            quit_app()
        elif CASE == "cancel_close_panel":
            widget.cancel()
            dock.title.close_button.click()
            del widget, dock
            gc.collect()
            after_job_ended(quit_app)
        else:
            raise SystemExit(f"unknown case {CASE!r}")

    def watch() -> None:
        job = widget_ref().job if not state["acted"] else state["job"]
        if job is None:
            QTimer.singleShot(20, watch)
            return
        state["job"] = job
        # Act once the worker is inside predict (past loading the bundle), in flight.
        if job.progress().stage.startswith(("encoding", "slide encoder", "extracting")):
            state["acted"] = True
            act()
        elif job.finished:
            print("ACTED in_flight=False (the run ended before the action)", flush=True)
            quit_app()
        else:
            QTimer.singleShot(20, watch)

    def start() -> None:
        widget_ref().run()
        watch()

    QTimer.singleShot(200, start)
    napari.run()
    job = state["job"]
    if job is not None:
        job.join(60)
        out = job.outcome()
        print(f"JOB finished={job.finished} cancelled={bool(out and out.cancelled)}", flush=True)
    print(f"CLEAN EXIT after {time.monotonic() - T0:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
