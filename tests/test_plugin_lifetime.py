"""Ending a napari session while a MIRROR run is in flight never crashes.

Each case runs ``tests/_lifetime_script.py`` in its own Python process with a real napari viewer
(on the Xvfb display pytest-xvfb started), starts a run on the demo sample, and while the worker
is encoding tiles closes the panel, closes the viewer or quits (with and without Cancel first).
Before the fix these ended in a segmentation fault (exit 139), "Fatal Python error: Aborted"
(134) or a ``RuntimeError: wrapped C/C++ object ... has been deleted`` traceback.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.gui

SCRIPT = Path(__file__).with_name("_lifetime_script.py")
REPO = Path(__file__).resolve().parents[1]


CASES = ["close_panel", "close_viewer", "quit", "cancel_quit", "cancel_close_panel"]
#: Sessions run side by side (each is mostly napari start-up and waiting): the five cases take
#: about half the wall time (CI machines have two cores).
PARALLEL = 2


@pytest.fixture(scope="module")
def sessions(tmp_path_factory):
    """Run every case's session once, a few at a time; -> {case: (exit status, output)}."""
    import time

    if not os.environ.get("DISPLAY"):
        pytest.skip("needs an X display (pytest-xvfb provides one)")
    cache = tmp_path_factory.mktemp("mirror-cache")
    from napari_mirror._sample_data import demo_case

    demo_case(cache)  # the demo sample, generated once for all sessions
    env = dict(os.environ)
    env["NAPARI_MIRROR_CACHE"] = str(cache)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), env.get("PYTHONPATH", "")])
    env["PYTHONFAULTHANDLER"] = "1"  # a crash prints the threads' stacks
    env.setdefault("OMP_NUM_THREADS", "1")
    logs = tmp_path_factory.mktemp("sessions")
    pending, running, done = list(CASES), {}, {}
    deadline = time.monotonic() + 600
    while pending or running:
        while pending and len(running) < PARALLEL:
            case = pending.pop(0)
            out = open(logs / f"{case}.log", "w+")
            proc = subprocess.Popen(
                [sys.executable, str(SCRIPT), case], env=env, cwd=REPO,
                stdout=out, stderr=subprocess.STDOUT, text=True,
            )  # fmt: skip
            running[case] = (proc, out)
        for case, (proc, out) in list(running.items()):
            if proc.poll() is not None or time.monotonic() > deadline:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
                out.seek(0)
                done[case] = (proc.returncode, out.read())
                out.close()
                del running[case]
        time.sleep(0.2)
    return done


@pytest.mark.parametrize("case", CASES)
def test_session_ends_cleanly_during_a_run(case, sessions):
    returncode, out = sessions[case]
    assert returncode == 0, f"exit status {returncode}\n{out[-4000:]}"
    for bad in ("Traceback", "Fatal Python error", "has been deleted", "Segmentation fault"):
        assert bad not in out, out[-4000:]
    assert "ACTED in_flight=True" in out, out[-4000:]  # the session ended during the run
    assert "JOB finished=True cancelled=True" in out, out[-4000:]  # the worker was stopped
    assert "CLEAN EXIT" in out
