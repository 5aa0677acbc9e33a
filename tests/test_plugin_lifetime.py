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


@pytest.fixture(scope="module")
def sample_cache(tmp_path_factory):
    """The demo sample generated once for all cases (untimed by the cases)."""
    cache = tmp_path_factory.mktemp("mirror-cache")
    from napari_mirror._sample_data import demo_case

    demo_case(cache)
    return cache


@pytest.mark.parametrize(
    "case", ["close_panel", "close_viewer", "quit", "cancel_quit", "cancel_close_panel"]
)
def test_session_ends_cleanly_during_a_run(case, sample_cache):
    if not os.environ.get("DISPLAY"):
        pytest.skip("needs an X display (pytest-xvfb provides one)")
    env = dict(os.environ)
    env["NAPARI_MIRROR_CACHE"] = str(sample_cache)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), env.get("PYTHONPATH", "")])
    env["PYTHONFAULTHANDLER"] = "1"  # a crash prints the threads' stacks
    env.setdefault("OMP_NUM_THREADS", "1")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), case],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"exit status {proc.returncode}\n{out[-4000:]}"
    for bad in ("Traceback", "Fatal Python error", "has been deleted", "Segmentation fault"):
        assert bad not in out, out[-4000:]
    assert "ACTED in_flight=True" in out, out[-4000:]  # the session ended during the run
    assert "JOB finished=True cancelled=True" in out, out[-4000:]  # the worker was stopped
    assert "CLEAN EXIT" in out
