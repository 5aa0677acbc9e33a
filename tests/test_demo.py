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
    _check_heatmap_numbers(out, m)
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
    """The demo's heatmap figures, recomputed independently: for each held-out slide, the
    fold model's attention (model.encode_slide) against tile labels taken straight from the
    mask PNG (tile = an exact block of mask pixels here), scored with scikit-learn."""
    import torch
    from PIL import Image
    from sklearn.metrics import roc_auc_score

    from mirror_model.cohort import read_cohort
    from mirror_model.features import read_features
    from mirror_model.train.run import load_fold_model

    hm = json.loads((out / "evaluation" / "heatmap.json").read_text())
    coh = read_cohort(out / "cohort.csv").table.set_index("slide_id")
    ds = json.loads((out / "generative_model.json").read_text())["slides"]["mask_downsample"]
    scored = []
    for rec in hm["slides"]:
        ff = read_features(out / "features" / f"{rec['slide_id']}.h5")
        model = load_fold_model(out / "run", rec["fold"]).model
        with torch.no_grad():
            att = model.encode_slide(torch.from_numpy(ff.features)).attention[0].double().numpy()
        mask = np.asarray(Image.open(out / coh.loc[rec["slide_id"], "mask_path"])) > 0
        size = ff.patch_size_level0 // ds  # tile edge in mask pixels (integral for the demo)
        assert size * ds == ff.patch_size_level0
        frac = np.array([
            mask[y // ds : y // ds + size, x // ds : x // ds + size].sum() / size**2
            for x, y in ff.coords_level0
        ])  # fmt: skip
        lab = frac >= 0.5
        assert rec["n_tumour_tiles"] == int(lab.sum()) and rec["n_tiles"] == att.size
        if 0 < lab.sum() < lab.size:
            assert rec["auroc"] == pytest.approx(roc_auc_score(lab, att), abs=1e-9)
            scored.append(rec)
        else:
            assert rec["auroc"] is None
    aucs = np.array([r["auroc"] for r in scored])
    h = m["heatmap"]
    assert h["n_slides"] == len(scored) > 0
    assert h["tumour_auroc"] == pytest.approx(aucs.mean(), abs=1e-12)
    assert h["fraction_above_chance"] == pytest.approx(np.mean(aucs > 0.5))
    for k, v in h["per_fold"].items():
        fold_aucs = [r["auroc"] for r in scored if r["fold"] == int(k)]
        assert v == (pytest.approx(np.mean(fold_aucs)) if fold_aucs else None)
    # the headline repeats evaluate's numbers for the best input
    for key, task, metric in (("auroc_macro", "subtype_linear", "auroc_macro"),
                              ("c_index", "survival_cox", "c_index")):  # fmt: skip
        head = m["headline"][key]
        assert head["mean"] == m[task][head["input"]][metric]["mean"]
