"""The model package must stay free of Qt and napari (design: plugin is a thin GUI over it)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

FORBIDDEN = ("napari", "qtpy", "PyQt5", "PyQt6", "PySide2", "PySide6", "magicgui", "vispy")


def _imported_after(code: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", code + "\nimport sys, json; print(json.dumps(sorted(sys.modules)))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return {m.split(".")[0] for m in json.loads(out.strip().splitlines()[-1])}


def test_import_mirror_model_pulls_no_gui():
    mods = _imported_after("import mirror_model")
    assert not (mods & set(FORBIDDEN)), mods & set(FORBIDDEN)


@pytest.mark.parametrize(
    "module",
    [
        "mirror_model.models",
        "mirror_model.losses",
        "mirror_model.slide",
        "mirror_model.patch_encoders",
        "mirror_model.features",
        "mirror_model.extract",
        "mirror_model.expression",
        "mirror_model.genes",
        "mirror_model.synth",
        "mirror_model.train",
        "mirror_model.evaluation",
        "mirror_model.bundle",
        "mirror_model.inference",
        "mirror_model.cli",
    ],
)
def test_submodules_pull_no_gui(module):
    mods = _imported_after(f"import {module}")
    assert not (mods & set(FORBIDDEN)), f"{module} imports {mods & set(FORBIDDEN)}"


def test_cli_help_lists_every_command():
    out = subprocess.run(
        [sys.executable, "-m", "mirror_model.cli", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for cmd in (
        "synth",
        "extract",
        "select-genes",
        "pretrain",
        "evaluate",
        "export",
        "predict",
        "demo",
    ):
        assert cmd in out


def test_inference_path_imports_no_training_or_fitting_code(cmu_small_svs):
    """Loading a bundle and predicting needs neither training nor head-fitting code (nor the
    fitting libraries): the inference path stays light and cannot drift with training."""
    code = f"""
from pathlib import Path
from mirror_model.bundle import load_bundle
from mirror_model.inference import predict
b = load_bundle()
pred = predict(b, slide_path=Path({str(cmu_small_svs)!r}), expression_values=dict.fromkeys(b.genes, 1.0),
               device="cpu", precision="fp32")
assert pred.modalities == ("slide", "rna") and pred.risk_score is not None
"""
    out = subprocess.run(
        [sys.executable, "-c", code + "\nimport sys, json; print(json.dumps(sorted(sys.modules)))"],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    mods = set(json.loads(out.stdout.strip().splitlines()[-1]))
    forbidden = {
        m
        for m in mods
        if m.startswith(("mirror_model.train", "mirror_model.demo", "mirror_model.synth"))
        or m
        in (
            "mirror_model.evaluation.evaluate",
            "mirror_model.evaluation.export",
            "mirror_model.evaluation.heads",
            "mirror_model.evaluation.report",
            "lifelines",
            "sklearn",
        )
    }
    assert not forbidden, sorted(forbidden)
    assert "mirror_model.bundle" in mods and "mirror_model.inference" in mods
