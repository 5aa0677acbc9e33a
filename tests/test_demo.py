"""The end-to-end demo: tumour-fraction and AUROC helpers, the sample case, a tiny full run."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from mirror_model.demo import (
    STAGES,
    DemoSettings,
    make_sample_case,
    run_demo,
    tile_tumour_fraction,
)
from mirror_model.errors import ConfigError
from mirror_model.evaluation.metrics import binary_auroc


def test_tile_tumour_fraction_closed_form():
    mask = np.zeros((4, 4), bool)
    mask[:, :2] = True  # left half is tumour; 1 mask px = 16 x 16 level-0 px
    coords = np.array([[0, 0], [16, 0], [8, 0], [24, 0], [32, 32], [40, 16]])
    size = [32, 32, 16, 16, 32, 16]
    got = [tile_tumour_fraction(mask, c[None], s, 16)[0] for c, s in zip(coords, size, strict=True)]
    # x ranges in mask px: [0,2) all tumour; [1,3) half; [.5,1.5) all; [1.5,2.5) half;
    # [2,4) none; [2.5,3.5) none
    np.testing.assert_allclose(got, [1.0, 0.5, 1.0, 0.5, 0.0, 0.0], atol=1e-12)
    # a tile sticking out of the slide counts the missing part as not tumour
    assert tile_tumour_fraction(mask, np.array([[-16, 0]]), 32, 16)[0] == pytest.approx(0.5)


def test_binary_auroc_known_answers():
    y = np.array([0, 0, 1, 1])
    assert binary_auroc(y, np.array([0.1, 0.2, 0.3, 0.4])) == 1.0
    assert binary_auroc(y, np.array([0.4, 0.3, 0.2, 0.1])) == 0.0
    assert binary_auroc(y, np.array([0.5, 0.5, 0.5, 0.5])) == 0.5
    assert binary_auroc(y, np.array([0.1, 0.3, 0.2, 0.4])) == 0.75
    assert math.isnan(binary_auroc(np.array([1, 1]), np.array([0.1, 0.2])))


def test_make_sample_case(tmp_path):
    case = make_sample_case(tmp_path / "c", DemoSettings.tiny())
    for p in (case.slide_path, case.expression_path, case.mask_path):
        assert p.is_file()
    lines = case.expression_path.read_text().strip().splitlines()
    assert len(lines) == 2 and lines[1].startswith(case.sample_id + ",")
    assert len(lines[0].split(",")) == 1 + DemoSettings.tiny().n_genes
    truth = json.loads((tmp_path / "c" / "case.json").read_text())
    assert truth["sample_id"] == case.sample_id and truth["subtype"] == case.subtype
    mtime = case.slide_path.stat().st_mtime_ns
    again = make_sample_case(tmp_path / "c", DemoSettings.tiny())  # reused, not rebuilt
    assert again == case and case.slide_path.stat().st_mtime_ns == mtime
    assert not [p for p in (tmp_path / "c").iterdir() if p.name.startswith(".")]


def test_demo_refuses_foreign_or_different_folder(tmp_path):
    (tmp_path / "x.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not empty"):
        run_demo(tmp_path, DemoSettings.tiny())
    assert (tmp_path / "x.txt").read_text() == "mine"


@pytest.mark.slow
def test_tiny_demo_end_to_end_and_resume(tmp_path):
    from mirror_model.bundle import load_bundle

    out = tmp_path / "demo"
    res = run_demo(out, DemoSettings.tiny(), bundle_out=tmp_path / "copy.mirror", device="cpu",
                   workers=1)
    m = json.loads((out / "metrics.json").read_text())
    # stable keys
    assert {"subtype_linear", "survival_cox", "headline", "heatmap", "demo"} <= set(m)
    for key in ("tumour_auroc", "n_slides", "per_fold", "attention_mass_on_tumour"):
        assert key in m["heatmap"]
    assert m["heatmap"]["n_slides"] + m["heatmap"]["n_slides_skipped"] == 10
    t = m["heatmap"]["tumour_auroc"]
    assert t is None or 0.0 <= t <= 1.0
    # the heatmap is the first TransMIL layer's row; the last layer's is scored beside it
    assert (m["heatmap"]["heatmap_layer"], m["heatmap"]["other_layer"]) == ("first", "last")
    per_slide = json.loads((out / "evaluation" / "heatmap.json").read_text())["slides"]
    assert all(r["other_layer"] == "last" for r in per_slide)
    other = [r["auroc_other_layer"] for r in per_slide if r["auroc_other_layer"] is not None]
    if other:
        assert m["heatmap"]["tumour_auroc_other_layer"] == pytest.approx(sum(other) / len(other))
    assert set(m["headline"]) == {"auroc_macro", "c_index"}
    assert m["subtype_linear"]["both"]["auroc_macro"]["mean"] is not None
    assert set(m["demo"]["stage_seconds"]) == set(STAGES)
    md = (out / "report.md").read_text()
    assert "Does it learn?" in md and "heatmap" in md
    if other:
        assert "TransMIL **first** layer" in md
    assert (out / "evaluation" / "figures" / "heatmap_vs_tumour.png").is_file()
    b = load_bundle(out / "demo.mirror")
    assert b.input_kinds == ("slide", "rna", "both")
    assert b.metrics["heatmap"]["n_slides"] == m["heatmap"]["n_slides"]
    # a shipped bundle names its metrics file, not the folder it was built in
    assert b.metrics["source"] == "metrics.json"
    assert (tmp_path / "copy.mirror").read_bytes() == (out / "demo.mirror").read_bytes()
    assert res.headline["tumour_auroc"] == m["heatmap"]["tumour_auroc"]
    # resumable: a second run skips every finished stage
    again = run_demo(out, DemoSettings.tiny(), device="cpu", workers=1)
    assert again.skipped == [s for s in STAGES if s != "report"]
    with pytest.raises(ConfigError, match="other settings"):
        run_demo(out, DemoSettings.full())
