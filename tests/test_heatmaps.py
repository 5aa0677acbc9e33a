"""``mirror-train heatmaps``: masks, the deletion test, the JSON schema, map orientation."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mirror_model.errors import ConfigError
from mirror_model.evaluation.heatmaps import (
    deletion_effects,
    find_masks,
    insertion_gain,
    mask_downsample,
    mass_ratio,
    n_removed,
    read_region_mask,
    tile_region_fraction,
)


def test_tile_region_fraction_closed_form():
    mask = np.zeros((4, 4), bool)
    mask[:, :2] = True  # left half is the region; 1 mask px = 16 x 16 level-0 px
    coords = np.array([[0, 0], [16, 0], [8, 0], [24, 0], [32, 32], [40, 16]])
    size = [32, 32, 16, 16, 32, 16]
    got = [tile_region_fraction(mask, c[None], s, 16)[0] for c, s in zip(coords, size, strict=True)]
    np.testing.assert_allclose(got, [1.0, 0.5, 1.0, 0.5, 0.0, 0.0], atol=1e-12)
    # a tile sticking out of the slide counts the missing part as outside the region
    assert tile_region_fraction(mask, np.array([[-16, 0]]), 32, 16)[0] == pytest.approx(0.5)
    # a non-integer downsample (mask 3 px for 40 level-0 px)
    m3 = np.array([[1, 0, 0]], bool)
    assert tile_region_fraction(m3, np.array([[0, 0]]), 40 / 3, 40 / 3)[0] == pytest.approx(1.0)


def test_mass_ratio_known_answers():
    y = np.array([0, 0, 1, 1], bool)
    # all mass on the region, which is half of the tiles: twice its share
    assert mass_ratio(np.array([0.0, 0.0, 1.0, 3.0]), y) == pytest.approx(2.0)
    assert mass_ratio(np.ones(4), y) == pytest.approx(1.0)


def test_masks_found_read_and_matched_to_the_slide(tmp_path):
    import tifffile
    from PIL import Image

    Image.fromarray(np.array([[0, 255], [0, 7]], np.uint8)).save(tmp_path / "s1.png")
    rgb = np.zeros((3, 4, 3), np.uint8)
    rgb[1, 2, 1] = 1  # any non-zero channel counts
    tifffile.imwrite(tmp_path / "s2.tif", rgb)
    found = find_masks(tmp_path, ["s1", "s2"])
    assert found["s1"].suffix == ".png" and found["s2"].suffix == ".tif"
    np.testing.assert_array_equal(read_region_mask(found["s1"]), [[False, True], [False, True]])
    assert read_region_mask(found["s2"]).sum() == 1
    # a missing mask names the slide, the file expected, and the others missing
    with pytest.raises(ConfigError) as e:
        find_masks(tmp_path, ["s1", "s3", "s4"])
    msg = str(e.value)
    assert "no mask for slide s3" in msg and str(tmp_path / "s3.png") in msg
    assert "1 more (s4)" in msg and "2 of the 3" in msg and "--skip-missing" in msg
    # a misnamed one (other case, a suffix) is pointed out with the name it needs
    Image.fromarray(np.zeros((2, 2), np.uint8)).save(tmp_path / "s3_mask.png")
    (tmp_path / "s4.PNG").write_bytes((tmp_path / "s1.png").read_bytes())
    with pytest.raises(ConfigError, match=r"Found s3_mask\.png: rename it to s3\.png"):
        find_masks(tmp_path, ["s3"])
    with pytest.raises(ConfigError, match=r"Found s4\.PNG: rename it to s4\.png"):
        find_masks(tmp_path, ["s4"])
    # downsample from the size ratio; sides rounded up by one pixel are fine
    assert mask_downsample((128, 128), (2048, 2048)) == pytest.approx(16.0)
    assert mask_downsample((63, 101), (6400, 4000)) == pytest.approx(63.43, abs=0.1)
    with pytest.raises(ConfigError, match="aspect ratios differ"):
        mask_downsample((128, 64), (2048, 2048), where="mask m.png")


def test_deletion_metric_on_a_constructed_case():
    """An additive output (sum of the kept tiles' values): removing the top 10 % by the true
    values changes it by the sum of those values; random removal by 10 % of the total."""
    rng = np.random.default_rng(0)
    n = 200
    v = rng.exponential(size=n)

    def output(keep):
        return float(v[keep].sum())

    k = n_removed(n, 0.1)
    assert k == 20 and n_removed(5, 0.1) == 1
    draws = [rng.choice(n, k, replace=False) for _ in range(200)]
    top, rand = deletion_effects(output, n, np.argsort(-v), draws, fraction=0.1)
    assert top == pytest.approx(np.sort(v)[-k:].sum())
    assert rand == pytest.approx(np.mean([v[d].sum() for d in draws]))
    assert rand == pytest.approx(0.1 * v.sum(), rel=0.1)
    assert top / rand > 3  # a faithful map
    # the reversed map removes the least important tiles: the output barely moves
    low, _ = deletion_effects(output, n, np.argsort(v), draws, fraction=0.1)
    assert 0 < low < 0.1 * rand
    # insertion: a slide of the top tiles only against slides of the random draws only
    gain = insertion_gain(output, n, np.argsort(-v), draws, fraction=0.1)
    assert gain == pytest.approx(np.sort(v)[-k:].sum() - np.mean([v[d].sum() for d in draws]))
    assert gain > 0 > insertion_gain(output, n, np.argsort(v), draws, fraction=0.1)


# ------------------------------------------------------------------------------------------
# the command on a tiny trained run
# ------------------------------------------------------------------------------------------
def _tiny_run(root, seed):
    from mirror_model.demo import DemoSettings
    from mirror_model.extract import extract_cohort
    from mirror_model.synth import synthesize_cohort
    from mirror_model.train import TrainConfig, pretrain

    s = DemoSettings.tiny()
    cohort = root / "cohort"
    if not (cohort / "cohort.csv").is_file():
        synthesize_cohort(cohort, **s.synth_kwargs())
        ex = s.extract_kwargs()
        extract_cohort(cohort / "cohort.csv", root / "features", ex.pop("encoder"), num_workers=1,
                       **ex)
    kw = s.train_kwargs() | {"seed": seed}
    run = root / f"run_{seed}"
    pretrain(cohort / "cohort.csv", cohort / "expression.csv", root / "features", run,
             preset="mirror", config=TrainConfig(**kw), model_overrides=s.model_overrides())
    return cohort, run


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("heatmaps")
    cohort, run = _tiny_run(root, seed=42)
    return root, cohort, run


@pytest.mark.slow
def test_cli_heatmaps_writes_the_documented_schema(tiny, capsys):
    from mirror_model.cli import main

    root, cohort, run = tiny
    out = root / "hm"
    rc = main(["heatmaps", "--run", str(run), "--cohort", str(cohort / "cohort.csv"), "--masks",
               str(cohort / "masks"), "--out", str(out), "--draws", "3", "--quiet"])
    assert rc == 0
    assert "subtype map of the true class" in capsys.readouterr().out
    doc = json.loads((out / "heatmaps.json").read_text())
    assert set(doc) == {"schema", "maps", "settings", "descriptions"}
    assert list(doc["maps"]) == ["subtype:true", "subtype:predicted", "risk", "attention",
                                 "feature_norm", "random"]
    folds = doc["settings"]["folds"]
    assert folds == [0, 1] and doc["settings"]["n_slides"] == 10
    for name, metrics in doc["maps"].items():
        assert {"auroc", "auroc_abs", "mass_ratio", "abs_mass_ratio", "deletion_ratio",
                "deletion_lowers", "insertion_gain"} <= set(metrics), name
        if name not in ("subtype:true", "subtype:predicted", "risk"):
            assert "deletion_ratio_risk" in metrics
        for m, s in metrics.items():
            assert set(s) == {"mean", "sd", "min_fold", "per_fold"}, (name, m)
            assert set(s["per_fold"]) == {str(k) for k in folds}
            vals = [v for v in s["per_fold"].values() if v is not None]
            assert s["mean"] == pytest.approx(np.mean(vals)) and s["min_fold"] == min(vals)
            if m.startswith("auroc") or m == "deletion_lowers":
                assert all(0.0 <= v <= 1.0 for v in vals)
            elif m != "insertion_gain":  # signed
                assert all(v >= 0.0 for v in vals)
    slides = json.loads((out / "heatmap_slides.json").read_text())
    assert len(slides) == 10 and {r["fold"] for r in slides} == {0, 1}
    assert all(r["mask_downsample"] == pytest.approx(16.0) for r in slides)
    md = (out / "report.md").read_text()
    assert "| map | AUROC vs region" in md and "figures/heatmap_examples.png" in md
    assert (out / "figures" / "heatmap_examples.png").stat().st_size > 10_000
    assert (out / "bundles" / "fold_1.mirror").is_file()


@pytest.mark.slow
def test_cli_heatmaps_clear_errors_for_missing_and_foreign_masks(tiny, tmp_path, capsys):
    import shutil

    from PIL import Image

    from mirror_model.cli import main

    root, cohort, run = tiny
    masks = tmp_path / "masks"
    shutil.copytree(cohort / "masks", masks)
    gone = sorted(masks.iterdir())[0]
    gone.unlink()
    args = ["heatmaps", "--run", str(run), "--cohort", str(cohort / "cohort.csv"), "--masks",
            str(masks), "--out", str(tmp_path / "o"), "--draws", "1", "--examples", "0", "--quiet"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert gone.stem in err and "--skip-missing" in err
    assert main([*args, "--skip-missing"]) == 0
    capsys.readouterr()
    assert json.loads((tmp_path / "o" / "heatmaps.json").read_text())["settings"]["n_slides"] == 9
    # a mask of another shape than the slide: named, with both sizes
    other = sorted(masks.iterdir())[0]
    Image.fromarray(np.zeros((48, 20), np.uint8)).save(other)
    assert main([*args, "--skip-missing"]) == 2
    err = capsys.readouterr().err
    assert other.name in err and "aspect ratios differ" in err


@pytest.mark.slow
def test_cli_heatmaps_auroc_on_masks_with_a_known_answer(tiny, tmp_path, capsys):
    """Masks drawn from the features themselves: the region is the tiles whose feature norm is
    above the slide's median, drawn at 4 level-0 px per mask px (not the cohort's 16). The
    feature-norm baseline must then score AUROC 1 on every slide and fold, the region must be
    half of the tiles, the downsample 4 must be read from the size ratio; a second map method
    is scored beside the first under ``<map>@<method>``."""
    from PIL import Image

    from mirror_model.cli import main
    from mirror_model.features import read_features
    from mirror_model.slide import open_slide

    root, cohort, run = tiny
    masks = tmp_path / "masks"
    masks.mkdir()
    import pandas as pd

    table = pd.read_csv(cohort / "cohort.csv")
    for _, row in table.iterrows():
        ff = read_features(root / "features" / f"{row.slide_id}.h5")
        with open_slide(cohort / row.slide_path) as sl:
            w0, h0 = sl.dimensions
        norm = np.linalg.norm(ff.features.astype(np.float64), axis=1)
        m = np.zeros((int(np.ceil(h0 / 4)), int(np.ceil(w0 / 4))), np.uint8)
        t = ff.patch_size_level0 // 4
        for (x, y), hi in zip(ff.coords_level0 // 4, norm > np.median(norm), strict=True):
            if hi:
                m[y : y + t, x : x + t] = 200
        Image.fromarray(m).save(masks / f"{row.slide_id}.png")
    out = tmp_path / "hm"
    rc = main(["heatmaps", "--run", str(run), "--cohort", str(cohort / "cohort.csv"), "--masks",
               str(masks), "--out", str(out), "--draws", "2", "--examples", "0", "--quiet",
               "--methods", "tile-alone,gradient"])
    assert rc == 0
    capsys.readouterr()
    doc = json.loads((out / "heatmaps.json").read_text())
    assert doc["settings"]["methods"] == ["tile-alone", "gradient"]
    fn = doc["maps"]["feature_norm"]
    assert fn["auroc"]["mean"] == pytest.approx(1.0) and fn["auroc"]["min_fold"] == pytest.approx(1.0)
    assert abs(doc["maps"]["random"]["auroc"]["mean"] - 0.5) < 0.15
    assert {"subtype:true@gradient", "risk@gradient"} <= set(doc["maps"])
    slides = json.loads((out / "heatmap_slides.json").read_text())
    for r in slides:
        assert r["mask_downsample"] == pytest.approx(4.0)
        assert r["region_share"] == pytest.approx(0.5, abs=1.0 / r["n_tiles"])
        assert r["maps"]["feature_norm"]["auroc"] == pytest.approx(1.0)


@pytest.mark.slow
def test_cli_heatmaps_with_expression_names_a_patient_without_a_sample(tiny, tmp_path, capsys):
    """With --expression the maps explain the slide + expression heads; each slide's sample is
    found by the expression table's own rules (as in training), and a patient with no sample is
    named instead of being matched to a look-alike ID."""
    import pandas as pd

    from mirror_model.cli import main

    root, cohort, run = tiny
    table = pd.read_csv(cohort / "expression.csv")
    args = ["heatmaps", "--run", str(run), "--cohort", str(cohort / "cohort.csv"), "--masks",
            str(cohort / "masks"), "--draws", "1", "--examples", "0", "--quiet"]
    assert main([*args, "--expression", str(cohort / "expression.csv"),
                 "--out", str(tmp_path / "ok")]) == 0
    slides = json.loads((tmp_path / "ok" / "heatmap_slides.json").read_text())
    assert {r["input_kind"] for r in slides} == {"both"}
    assert all(r["sample_id"][:12] == r["patient_id"] for r in slides)
    gone = slides[0]["patient_id"]
    table[~table["sample_id"].str.startswith(gone)].to_csv(tmp_path / "expr.csv", index=False)
    capsys.readouterr()
    assert main([*args, "--expression", str(tmp_path / "expr.csv"),
                 "--out", str(tmp_path / "bad")]) == 2
    assert gone in capsys.readouterr().err
