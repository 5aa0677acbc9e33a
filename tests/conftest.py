"""Shared test configuration.

GUI tests use napari's ``make_napari_viewer`` fixture (napari's pytest plugin) under Xvfb
(pytest-xvfb starts a virtual X server, so the OpenGL canvas is real).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
CMU_SMALL_SVS = SHARED_DATA / "CMU-1-Small-Region.svs"

# Keep test runs deterministic and polite on small CI machines.
os.environ.setdefault("MIRROR_NUM_THREADS", "2")


def _torch_threads(n: int):
    """Run the rest of a fixture with ``n`` torch threads, then restore the previous count."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread_session():
    """Module- and session-scoped fixtures are set up before function-scoped ones, so without
    this a module fixture (e.g. test_resume's reference run) would train with the default thread
    count and the test body with one: CPU reductions split across threads round differently, and
    'bitwise identical' comparisons between the two fail."""
    yield from _torch_threads(1)


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tiny tensors: one thread avoids OpenMP spin-waits on 2-core CI machines (restored after
    each test, so a test that needs more threads can set them)."""
    yield from _torch_threads(1)


@pytest.fixture(scope="session")
def cmu_small_svs() -> Path:
    """The real Aperio slide from ../shared/data (skipped in a user's checkout without it)."""
    if not CMU_SMALL_SVS.exists():
        pytest.skip(
            f"real test slide not found at {CMU_SMALL_SVS} (only present beside the project's CI checkout)"
        )
    return CMU_SMALL_SVS


@pytest.fixture(scope="module")
def case(request, tmp_path_factory):
    """A small trained bundle with its inputs (``_bundle_helpers.build_case``), built once per
    test module (test_bundle, test_inference) in a folder named after the module."""
    from _bundle_helpers import build_case

    name = request.module.__name__.rpartition(".")[2].removeprefix("test_")
    return build_case(tmp_path_factory.mktemp(name))
