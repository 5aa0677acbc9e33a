"""Synthetic cohort generator (mirror_model.synth): files, determinism, signal where promised."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mirror_model import synth
from mirror_model.cohort import read_cohort
from mirror_model.errors import ConfigError
from mirror_model.expression import read_expression


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """6 patients (2 per subtype), 1024-px slides, 60 genes."""
    out = tmp_path_factory.mktemp("synth") / "tiny"
    return synth.synthesize_tiny_cohort(out, n_patients=6, seed=0)


def read_png(path):
    import imagecodecs

    return imagecodecs.png_decode(path.read_bytes())


def stains(rgb):
    """Colour deconvolution with the generator's stain vectors: (haematoxylin, eosin) OD."""
    od = -np.log(np.maximum(rgb.astype(np.float64), 1.0) / 255.0) - synth._BG_OD
    m = np.stack([synth._H_VEC, synth._E_VEC, np.cross(synth._H_VEC, synth._E_VEC)])
    c = od @ np.linalg.inv(m)
    return c[..., 0], c[..., 1]


def test_files_and_tables(tiny):
    out = tiny.out_dir
    for name in (
        "cohort.csv",
        "expression.csv",
        "truth.csv",
        "curated_genes.txt",
        "generative_model.json",
        "README.md",
    ):
        assert (out / name).is_file(), name
    cohort = read_cohort(tiny.cohort_csv, check_files=True)
    assert list(cohort.table.columns[:6]) == [
        "patient_id",
        "slide_id",
        "slide_path",
        "subtype",
        "time",
        "event",
    ]
    assert cohort.patient_ids == tiny.patient_ids
    assert sorted(cohort.subtypes) == sorted(synth.DEFAULT_SUBTYPES)
    assert cohort.table["subtype"].value_counts().tolist() == [2, 2, 2]  # balanced
    expr = read_expression(tiny.expression_csv)
    assert expr.orientation == "samples x genes" and expr.values.shape == (6, 60)
    np.testing.assert_array_equal(expr.rows_for(tiny.patient_ids), np.arange(6))  # TCGA 12-char
    assert np.all(expr.values == np.round(expr.values)) and expr.values.min() >= 0
    model = json.loads(tiny.model_json.read_text())
    assert model["slides"]["mpp"] == 0.5 and model["config"]["seed"] == 0
    roles = model["gene_roles"]
    assert sorted(g for v in roles.values() for g in v) == sorted(expr.genes)
    assert tiny.level_dimensions == [(1024, 1024), (256, 256)]


def test_slides_open_in_openslide_with_mpp_and_pyramid(tiny):
    import openslide

    with openslide.OpenSlide(str(tiny.slide_paths[0])) as s:
        assert float(s.properties["openslide.mpp-x"]) == pytest.approx(0.5)
        assert float(s.properties["openslide.mpp-y"]) == pytest.approx(0.5)
        assert s.level_dimensions == ((1024, 1024), (256, 256))
        assert s.level_downsamples == pytest.approx((1.0, 4.0))
        region = np.asarray(s.read_region((0, 0), 0, (64, 64)).convert("RGB"))
        assert region.min() > 200  # the corner is white glass
    import tifffile

    with tifffile.TiffFile(tiny.slide_paths[0]) as tf:
        assert [p.compression for p in tf.pages] == [tifffile.COMPRESSION.JPEG] * 2
        assert tf.pages[0].is_tiled and tf.pages[0].tilewidth == 256


def test_mask_is_aligned_with_tumour_texture(tiny):
    import openslide

    for path, mask_path, sub in zip(tiny.slide_paths, tiny.mask_paths, tiny.subtype, strict=True):
        mask = read_png(mask_path) > 0
        assert mask.shape == (1024 // 16, 1024 // 16)
        with openslide.OpenSlide(str(path)) as s:
            rgb = np.asarray(s.read_region((0, 0), 0, s.dimensions).convert("RGB"))
        h, e = stains(rgb)
        tumour = np.kron(mask, np.ones((16, 16), bool))
        tissue = (h + e) > 0.15
        stroma = tissue & ~tumour
        assert tumour.sum() > 1000 and stroma.sum() > 1000
        # tumour carries much more haematoxylin (nuclei) than the surrounding stroma
        assert h[tumour].mean() > 1.5 * h[stroma].mean(), sub
        assert e[tumour].mean() < e[stroma].mean(), sub


def test_subtype_morphology_differs(tiny):
    import openslide

    stats: dict[str, list[tuple[float, float]]] = {}
    for path, mask_path, sub in zip(tiny.slide_paths, tiny.mask_paths, tiny.subtype, strict=True):
        tumour = np.kron(read_png(mask_path) > 0, np.ones((16, 16), bool))
        with openslide.OpenSlide(str(path)) as s:
            rgb = np.asarray(s.read_region((0, 0), 0, s.dimensions).convert("RGB"))
        h, _ = stains(rgb)
        white = rgb.min(axis=-1) > 225
        stats.setdefault(sub, []).append((white[tumour].mean(), h[tumour].mean()))
    lumen = {k: np.mean([a for a, _ in v]) for k, v in stats.items()}
    hem = {k: np.mean([b for _, b in v]) for k, v in stats.items()}
    assert lumen["glandular"] > 3 * max(lumen["solid"], lumen["discohesive"])  # gland lumina
    assert hem["solid"] > 1.3 * hem["discohesive"]  # sheets of large nuclei vs single files


def test_render_matches_written_mask_and_is_deterministic():
    job = synth._SlideJob(0, "x", "solid", 0.4, 0.5, 1.0, (1, 2, 3, 4), 512, 0.5)
    a, b = synth.render_slide(job), synth.render_slide(job)
    np.testing.assert_array_equal(a.rgb, b.rgb)
    assert a.rgb.shape == (512, 512, 3) and a.rgb.dtype == np.uint8
    assert a.tumour_mask(16).shape == (32, 32)
    np.testing.assert_array_equal(a.tumour_mask(1)[::2, ::2], a.tumour_half)
    assert 0.1 < a.tumour_half.mean() < 0.6
    other = synth.render_slide(
        synth._SlideJob(0, "x", "solid", 0.4, 0.5, 1.0, (9, 9, 9, 9), 512, 0.5)
    )
    assert not np.array_equal(a.rgb, other.rgb)


def test_risk_changes_lymphocytes_inside_the_tumour_only():
    """The generative model puts the risk-dependent lymphocytes (TILs) in the tumour region:
    with everything else equal, a higher ``til_factor`` darkens the tumour with more small dark
    nuclei and leaves every pixel away from the tumour unchanged (the stroma carries only
    per-slide nuisance, independent of the patient)."""
    from scipy import ndimage as ndi

    def job(til):
        return synth._SlideJob(0, "x", "glandular", 0.4, 0.5, til, (3, 1, 4, 1), 1024, 0.5)

    few, many = synth.render_slide(job(0.2)), synth.render_slide(job(5.0))
    np.testing.assert_array_equal(few.tumour_half, many.tumour_half)
    tumour = np.repeat(np.repeat(few.tumour_half, 2, 0), 2, 1)
    near = ndi.binary_dilation(tumour, iterations=12)  # nuclei reach a few px past the border
    assert (~near).sum() > 0.3 * near.size
    np.testing.assert_array_equal(few.rgb[~near], many.rgb[~near])
    dark = lambda im: (im.mean(axis=-1) < 110)  # noqa: E731  (haematoxylin-dense pixels)
    assert dark(many.rgb)[tumour].mean() > dark(few.rgb)[tumour].mean() + 0.01


def test_same_seed_same_bytes_any_worker_count(tmp_path):
    a = synth.synthesize_cohort(
        tmp_path / "a", n_patients=2, seed=5, slide_px=512, n_genes=30, subtypes=("lum", "sol")
    )
    b = synth.synthesize_cohort(
        tmp_path / "b",
        n_patients=2,
        seed=5,
        slide_px=512,
        n_genes=30,
        subtypes=("lum", "sol"),
        workers=2,
    )
    c = synth.synthesize_cohort(
        tmp_path / "c", n_patients=2, seed=6, slide_px=512, n_genes=30, subtypes=("lum", "sol")
    )
    for rel in (
        "cohort.csv",
        "expression.csv",
        "truth.csv",
        "generative_model.json",
        f"slides/{a.slide_ids[0]}.tiff",
        f"masks/{a.slide_ids[1]}.png",
    ):
        assert (a.out_dir / rel).read_bytes() == (b.out_dir / rel).read_bytes(), rel
    assert (a.out_dir / "expression.csv").read_bytes() != (
        c.out_dir / "expression.csv"
    ).read_bytes()
    assert a.slide_paths[0].read_bytes() != c.slide_paths[0].read_bytes()


@pytest.fixture(scope="module")
def big_tables(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "tables"
    return synth.synthesize_cohort(out, n_patients=300, seed=1, n_genes=120, write_slides=False)


def test_expression_separates_subtypes(big_tables):
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score

    from mirror_model.genes import ExpressionNormalizer

    expr = read_expression(big_tables.expression_csv)
    norm = ExpressionNormalizer().fit(expr.values)
    assert norm.log1p_  # counts-like: the log1p rule fires
    X = norm.transform(expr.values)
    acc = cross_val_score(LogisticRegression(max_iter=2000), X, big_tables.subtype, cv=5).mean()
    assert acc > 0.9  # chance = 1/3
    # the marker genes of a subtype are higher in that subtype
    for k, s in enumerate(synth.DEFAULT_SUBTYPES):
        cols = expr.gene_indices(big_tables.gene_roles[f"marker:{s}"])
        mine = np.array(big_tables.subtype) == s
        assert X[mine][:, cols].mean() > X[~mine][:, cols].mean() + 1.0, k


def test_survival_follows_latent_risk(big_tables):
    from lifelines.utils import concordance_index

    r = big_tables.latent_risk
    c = concordance_index(big_tables.time_months, -r, big_tables.event)
    assert c > 0.68  # higher risk -> shorter time
    assert 0.3 < big_tables.event.mean() < 0.9
    # risk genes carry the survival signal
    expr = read_expression(big_tables.expression_csv)
    up = np.log1p(expr.values[:, expr.gene_indices(big_tables.gene_roles["risk_up"])]).mean(1)
    assert np.corrcoef(up, r)[0, 1] > 0.5


def test_invalid_settings(tmp_path):
    with pytest.raises(ConfigError, match="2 or 3"):
        synth.synthesize_cohort(tmp_path / "x", n_patients=4, subtypes=("a",), write_slides=False)
    with pytest.raises(ConfigError, match="multiple of 256"):
        synth.synthesize_cohort(tmp_path / "x", n_patients=4, slide_px=1000, write_slides=False)
    with pytest.raises(ConfigError, match="unknown synthetic-cohort parameter"):
        synth.synthesize_cohort(tmp_path / "x", n_patients=4, write_slides=False, beta=2)
    synth.synthesize_cohort(tmp_path / "x", n_patients=4, n_genes=30, write_slides=False)
    with pytest.raises(ConfigError, match="already exists"):
        synth.synthesize_cohort(tmp_path / "x", n_patients=4, n_genes=30, write_slides=False)
    synth.synthesize_cohort(
        tmp_path / "x", n_patients=4, n_genes=30, write_slides=False, overwrite=True
    )


def test_cli(tmp_path, capsys):
    from mirror_model.cli import main

    rc = main(
        [
            "synth",
            "--out",
            str(tmp_path / "c"),
            "--patients",
            "2",
            "--tiny",
            "--slide-px",
            "512",
            "--workers",
            "1",
            "--subtypes",
            "x,y",
        ]
    )
    assert rc == 0
    assert "wrote 2 patients / 2 slides (512 px" in capsys.readouterr().out
    assert read_cohort(tmp_path / "c" / "cohort.csv", check_files=True).subtypes == ["x", "y"]
    assert main(["synth", "--out", str(tmp_path / "c"), "--patients", "2", "--tiny"]) == 2


def test_several_slides_per_patient_tables_only(tmp_path):
    s = synth.synthesize_cohort(
        tmp_path / "m", n_patients=4, n_genes=30, slides_per_patient=2, write_slides=False
    )
    c = read_cohort(s.cohort_csv)
    assert len(c) == 8 and s.n_slides == 8
    pat = c.patients()
    assert pat["n_slides"].tolist() == [2, 2, 2, 2]
    np.testing.assert_allclose(pat["time"], s.time_months)
    assert not (tmp_path / "m" / "slides").exists()


def test_cancel_leaves_no_cohort_table(tmp_path):
    from mirror_model.errors import Cancelled

    calls = []

    def stop():
        calls.append(1)
        return len(calls) > 1  # let the first slide through, then cancel

    with pytest.raises(Cancelled):
        synth.synthesize_cohort(
            tmp_path / "c", n_patients=3, slide_px=512, n_genes=30, should_stop=stop
        )
    assert not (tmp_path / "c" / "cohort.csv").exists()  # a rerun needs no --overwrite
    assert len(list((tmp_path / "c" / "slides").glob("*.tiff"))) == 1
