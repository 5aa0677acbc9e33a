"""The wheel carries both packages, napari.yaml (a real file) and the demo bundle, and the
plugin is discovered through its ``napari.manifest`` entry point when installed from the wheel."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# not marked slow: the --no-isolation wheel build and install take ~3 s together (measured)


def _python(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], check=True, capture_output=True, text=True)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    _python("-m", "build", "--wheel", "--no-isolation", "--outdir", str(out), str(REPO))
    (whl,) = out.glob("napari_mirror-*.whl")
    return whl


def test_wheel_contents(wheel):
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        manifest = zf.read("napari_mirror/napari.yaml").decode()
        entry_points = next(n for n in names if n.endswith("entry_points.txt"))
        eps = zf.read(entry_points).decode()
        metadata = zf.read(next(n for n in names if n.endswith("METADATA"))).decode()
    assert manifest == (REPO / "napari.yaml").read_text()
    assert "napari-mirror = napari_mirror:napari.yaml" in eps
    assert "mirror-train = mirror_model.cli:main" in eps
    assert "Classifier: Framework :: napari" in metadata
    assert "mirror_model/data/demo.mirror" in names
    assert not any(n.startswith("tests/") for n in names)
    # Qt bindings are dev extras only, never a runtime requirement.
    runtime = [
        ln
        for ln in metadata.splitlines()
        if ln.startswith("Requires-Dist:") and "extra ==" not in ln
    ]
    assert not any(q in ln for ln in runtime for q in ("PyQt", "PySide"))


def test_plugin_discovered_from_installed_wheel(wheel, tmp_path):
    target = tmp_path / "site"
    _python("-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel))
    code = f"""
import sys
sys.path.insert(0, {str(target)!r})
from importlib.metadata import distribution
dist = distribution("napari-mirror")
assert str(dist.locate_file("")).startswith({str(target)!r}), dist.locate_file("")
import napari_mirror
assert napari_mirror.__file__.startswith({str(target)!r}), napari_mirror.__file__
from npe2 import PluginManager

pm = PluginManager()
pm.discover(include_npe1=False)
mf = pm.get_manifest("napari-mirror")
print(mf.name, len(mf.contributions.widgets or []), len(mf.contributions.readers or []))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    name, n_widgets, n_readers = out.stdout.split()
    assert name == "napari-mirror"
    assert int(n_widgets) >= 1 and int(n_readers) >= 1
