"""The end-to-end demo: the AUROC helper, the sample case, a tiny full run."""

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
)
from mirror_model.errors import ConfigError
from mirror_model.evaluation.metrics import binary_auroc


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
    for key in ("map", "tumour_auroc", "n_slides", "per_fold", "maps", "tumour_tile_fraction"):
        assert key in m["heatmap"]
    assert m["heatmap"]["n_slides"] == 10 and m["heatmap"]["map"] == "subtype:true"
    assert set(m["heatmap"]["maps"]) >= {"subtype:true", "risk", "attention", "feature_norm"}
    _check_heatmap_numbers(out, m)
    assert set(m["headline"]) == {"auroc_macro", "c_index"}
    assert m["subtype_linear"]["both"]["auroc_macro"]["mean"] is not None
    assert set(m["demo"]["stage_seconds"]) == set(STAGES)
    md = (out / "report.md").read_text()
    assert "Does it learn?" in md and "Per-tile maps of held-out slides" in md
    assert "baseline: feature L2 norm" in md
    hm_dir = out / "evaluation" / "heatmaps"
    assert (hm_dir / "report.md").is_file() and (hm_dir / "figures" / "heatmap_examples.png").is_file()
    b = load_bundle(out / "demo.mirror")
    assert b.input_kinds == ("slide", "rna", "both")
    assert b.metrics["heatmap"]["n_slides"] == m["heatmap"]["n_slides"]
    # a shipped bundle names its metrics file, not the folder it was built in, and records no
    # other path of this machine either; it says it is a synthetic-data model
    assert b.metrics["source"] == "metrics.json"
    from _bundle_helpers import absolute_paths

    from mirror_model.bundle import SYNTHETIC_INTENDED_USE

    assert absolute_paths(b.document) == []
    assert b.document["training"]["run"] == b.document["source"]["run"] == "run"
    assert b.provenance.synthetic and b.provenance.intended_use == SYNTHETIC_INTENDED_USE
    assert b.provenance.survival_time_unit == "months"
    assert (tmp_path / "copy.mirror").read_bytes() == (out / "demo.mirror").read_bytes()
    assert res.headline["tumour_auroc"] == m["heatmap"]["tumour_auroc"]
    # resumable: a second run skips every finished stage
    again = run_demo(out, DemoSettings.tiny(), device="cpu", workers=1)
    assert again.skipped == [s for s in STAGES if s != "report"]
    with pytest.raises(ConfigError, match="other settings"):
        run_demo(out, DemoSettings.full())


def _check_heatmap_numbers(out, m):
    """The demo's headline heatmap figure, recomputed independently: for each held-out slide,
    ``predict`` with its fold's bundle, the map of its true subtype against tile labels taken
    straight from the mask PNG (tile = an exact block of mask pixels here), scored with
    scikit-learn; fold means, then their mean."""
    from PIL import Image
    from sklearn.metrics import roc_auc_score

    from mirror_model.bundle import load_bundle
    from mirror_model.cohort import read_cohort
    from mirror_model.inference import predict

    hm_dir = out / "evaluation" / "heatmaps"
    slides = json.loads((hm_dir / "heatmap_slides.json").read_text())
    coh = read_cohort(out / "cohort.csv").table.set_index("slide_id")
    ds = json.loads((out / "generative_model.json").read_text())["slides"]["mask_downsample"]
    per_fold: dict[int, list[float]] = {}
    for rec in slides:
        sid = rec["slide_id"]
        bundle = load_bundle(hm_dir / "bundles" / f"fold_{rec['fold']}.mirror")
        pred = predict(bundle, features_path=out / "features" / f"{sid}.h5", device="cpu",
                       precision="fp32")
        values = pred.maps[f"subtype:{coh.loc[sid, 'subtype']}"].values
        mask = np.asarray(Image.open(out / coh.loc[sid, "mask_path"])) > 0
        size = pred.tile_size_level0 // ds  # tile edge in mask pixels (integral for the demo)
        assert size * ds == pred.tile_size_level0
        frac = np.array([
            mask[y // ds : y // ds + size, x // ds : x // ds + size].sum() / size**2
            for x, y in pred.coords_level0
        ])  # fmt: skip
        lab = frac >= 0.5
        got = rec["maps"]["subtype:true"]["auroc"]
        if 0 < lab.sum() < lab.size:
            assert got == pytest.approx(roc_auc_score(lab, values), abs=1e-9)
            per_fold.setdefault(rec["fold"], []).append(got)
        else:
            assert got is None or math.isnan(got)
    h = m["heatmap"]
    means = {k: np.mean(v) for k, v in per_fold.items()}
    assert h["tumour_auroc"] == pytest.approx(np.mean(list(means.values())), abs=1e-12)
    for k, v in h["per_fold"].items():
        assert v == pytest.approx(means[int(k)])
    # the headline repeats evaluate's numbers for the best input
    for key, task, metric in (("auroc_macro", "subtype_linear", "auroc_macro"),
                              ("c_index", "survival_cox", "c_index")):  # fmt: skip
        head = m["headline"][key]
        assert head["mean"] == m[task][head["input"]][metric]["mean"]
