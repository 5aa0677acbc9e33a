"""The inference API: slide-only, RNA-only and both; inputs checked; cancellation; the CLI."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
from _bundle_helpers import TARGET_MPP, TILE_PX

from mirror_model.errors import (
    Cancelled,
    ConfigError,
    ExpressionError,
    FeatureFileError,
)
from mirror_model.inference import match_sample, predict, slide_stem


def _check_probabilities(pred, classes):
    assert list(pred.subtype_probabilities) == classes
    assert sum(pred.subtype_probabilities.values()) == pytest.approx(1.0, abs=1e-9)
    assert all(0.0 <= p <= 1.0 for p in pred.subtype_probabilities.values())
    assert pred.predicted_subtype == max(pred.subtype_probabilities,
                                         key=pred.subtype_probabilities.get)


def _check_risk(pred, bundle, kind):
    assert np.isfinite(pred.risk_score)
    from scipy.stats import percentileofscore

    ref = np.asarray(bundle.reference(kind)["risk"], dtype=float)
    # scipy's "mean" kind: ties count half (an implementation independent of ours)
    assert pred.risk_percentile == pytest.approx(percentileofscore(ref, pred.risk_score, "mean"))
    cut = bundle.risk_cutoff(kind)
    assert pred.risk_cutoff == cut
    assert pred.risk_group == ("high" if pred.risk_score > cut else "low")
    assert pred.reference_km == bundle.reference_km_for(kind)


def test_slide_only(case):
    from mirror_model.slide import make_tile_grid, open_slide

    pred = predict(case.bundle, slide_path=case.slide_path, device="cpu", precision="fp32")
    assert pred.modalities == ("slide",) and pred.input_kind == "slide"
    assert pred.rna_embedding is None and pred.sample_id is None
    with open_slide(case.slide_path) as s:
        grid = make_tile_grid(s, target_mpp=TARGET_MPP, tile_px=TILE_PX, tissue_threshold=0.25)
        dims = s.dimensions
    np.testing.assert_array_equal(pred.coords_level0, grid.coords_level0)
    assert pred.tile_size_level0 == grid.tile_size_level0 == 128  # 64 px at 1 µm/px on 0.5 µm/px
    assert pred.attention.shape == (grid.n_tiles,)
    assert np.all(pred.attention >= 0) and pred.attention.sum() == pytest.approx(1.0, abs=1e-12)
    assert pred.slide_mpp == pytest.approx(0.5) and pred.slide_dimensions == tuple(dims)
    _check_probabilities(pred, case.classes)
    _check_risk(pred, case.bundle, "slide")
    assert {"patch_features", "slide_encoder", "heads", "total"} <= set(pred.timings_s)
    top = pred.top_tiles(3)
    assert np.all(np.diff(pred.attention[top]) <= 0)
    # the report says what the map is: this bundle's config reads the first TransMIL layer
    assert case.bundle.config.heatmap_layer == "first"
    assert "first TransMIL layer" in pred.to_dict()["slide"]["attention_source"]
    # per-tile maps by name; the attention map is the attention, aligned with the coordinates
    att = pred.maps["attention"]
    assert att.name == "attention" and att.signed is False and att.label and att.description
    np.testing.assert_array_equal(att.values, pred.attention)
    assert att.values.dtype == np.float64 and not att.values.flags.writeable
    assert att.method == pred.attention_source


def test_rna_only(case):
    pred = predict(case.bundle, expression_path=case.expression_path, sample_id=case.sample_id,
                   device="cpu", precision="fp32")
    assert pred.modalities == ("rna",) and pred.input_kind == "rna"
    assert pred.attention is None and pred.coords_level0 is None and pred.n_tiles == 0
    assert pred.maps == {}
    assert pred.sample_id == case.sample_id and pred.sample_match == "given"
    _check_probabilities(pred, case.classes)
    _check_risk(pred, case.bundle, "rna")
    d = pred.to_dict()
    assert d["slide"] is None and d["modalities"] == ["rna"]
    json.dumps(d)


def test_a_null_survival_head_is_said_and_a_fitted_one_is_not(case):
    """A Cox head whose inner CV kept no feature gives every patient the same risk: the
    prediction must say so instead of showing a risk group as if it meant something."""
    import copy

    from mirror_model.inference import NULL_SURVIVAL_HEAD_WARNING

    head = case.bundle.head("rna", "survival")
    fitted = copy.copy(head)
    fitted.coef_ = np.where(np.arange(head.coef_.size) == 0, 0.5, 0.0)
    fitted.n_nonzero_ = 1
    null = copy.copy(head)
    null.coef_ = np.zeros_like(head.coef_)
    null.n_nonzero_ = 0
    said = NULL_SURVIVAL_HEAD_WARNING.format(kind="expression only")
    bundle = copy.copy(case.bundle)
    preds = {}
    for name, h in (("fitted", fitted), ("null", null)):
        bundle._cache = {**case.bundle._cache, "head:rna:survival": h}
        preds[name] = predict(bundle, expression_path=case.expression_path,
                              sample_id=case.sample_id, device="cpu", precision="fp32")
    assert said not in preds["fitted"].warnings
    assert said in preds["null"].warnings and preds["null"].risk_score == 0.0
    assert "null model" in said and "flat" in said


def test_both_matches_sample_to_slide_and_features_equal_slide(case):
    pred = predict(case.bundle, slide_path=case.slide_path, expression_path=case.expression_path,
                   device="cpu", precision="fp32")
    assert pred.modalities == ("slide", "rna") and pred.input_kind == "both"
    # two samples in the table: the row is matched to the slide's TCGA barcode
    assert pred.sample_id == case.sample_id and pred.sample_match == "matched slide name"
    _check_probabilities(pred, case.classes)
    _check_risk(pred, case.bundle, "both")
    via_h5 = predict(case.bundle, features_path=case.features_path,
                     expression_path=case.expression_path, device="cpu", precision="fp32")
    np.testing.assert_array_equal(via_h5.coords_level0, pred.coords_level0)
    np.testing.assert_allclose(via_h5.attention, pred.attention, atol=1e-6)
    assert via_h5.risk_score == pytest.approx(pred.risk_score, abs=1e-6)
    # the same RNA embedding as RNA-only prediction
    rna = predict(case.bundle, expression_path=case.expression_path, sample_id=case.sample_id,
                  device="cpu", precision="fp32")
    np.testing.assert_allclose(rna.rna_embedding, pred.rna_embedding, atol=1e-6)


def test_expression_values_alternatives(case):
    from mirror_model.expression import read_expression

    table = read_expression(case.expression_path)
    ref = predict(case.bundle, expression_values=table, sample_id=case.sample_id, device="cpu",
                  precision="fp32")
    row = table.values[table.rows_for([case.sample_id])[0]]
    as_map = dict(zip(table.genes[::-1], row[::-1].tolist(), strict=True))  # order must not matter
    by_map = predict(case.bundle, expression_values=as_map, device="cpu", precision="fp32")
    np.testing.assert_allclose(by_map.rna_embedding, ref.rna_embedding, atol=1e-6)
    import pandas as pd

    series = pd.Series(row, index=table.genes, name=case.sample_id)
    by_series = predict(case.bundle, expression_values=series, device="cpu", precision="fp32")
    np.testing.assert_allclose(by_series.rna_embedding, ref.rna_embedding, atol=1e-6)
    assert by_series.sample_id == case.sample_id
    vec = table.align_genes(case.genes)[table.rows_for([case.sample_id])[0]]
    by_vec = predict(case.bundle, expression_values=vec, device="cpu", precision="fp32")
    np.testing.assert_allclose(by_vec.rna_embedding, ref.rna_embedding, atol=1e-6)
    with pytest.raises(ExpressionError, match="bundle's 40 genes"):
        predict(case.bundle, expression_values=vec[:-1], device="cpu")


def test_missing_genes_are_listed(case, tmp_path):
    import pandas as pd

    df = pd.read_csv(case.expression_path)
    dropped = case.genes[3:6]
    bad = tmp_path / "fewer_genes.csv"
    df.drop(columns=dropped).to_csv(bad, index=False)
    with pytest.raises(ExpressionError) as ei:
        predict(case.bundle, expression_path=bad, sample_id=case.sample_id, device="cpu")
    msg = str(ei.value)
    assert str(bad) in msg and "lacks 3 of the model's 40 genes" in msg
    for g in dropped:
        assert g in msg


def test_unknown_sample_and_ambiguous_row(case):
    with pytest.raises(ExpressionError, match="NOPE-1"):
        predict(case.bundle, expression_path=case.expression_path, sample_id="NOPE-1",
                device="cpu")
    # two rows, nothing to match them to: the user must choose
    with pytest.raises(ExpressionError, match="sample_id"):
        predict(case.bundle, expression_path=case.expression_path, device="cpu")


def test_feature_file_from_another_encoder(case, tmp_path):
    other = tmp_path / "other.h5"
    with h5py.File(case.features_path, "r") as src, h5py.File(other, "w") as dst:
        for k in src:
            src.copy(k, dst)
        for k, v in src.attrs.items():
            dst.attrs[k] = v
        dst.attrs["encoder"] = "uni"
        dst["features"].attrs["encoder"] = "uni"
        dst.attrs.pop("encoder_spec", None)
        dst["features"].attrs.pop("encoder_spec", None)
    with pytest.raises(FeatureFileError) as ei:
        predict(case.bundle, features_path=other, device="cpu")
    assert "'uni'" in str(ei.value) and "stain-texture" in str(ei.value)


def test_feature_file_of_another_slide(case, tmp_path):
    from mirror_model.features import read_features, write_features

    ff = read_features(case.features_path)
    ff.coords_level0 = ff.coords_level0 + 5000
    moved = write_features(tmp_path / "moved.h5", ff)
    with pytest.raises(FeatureFileError, match="belongs to another slide"):
        predict(case.bundle, slide_path=case.slide_path, features_path=moved, device="cpu")


def test_no_input_is_a_clear_error(case):
    with pytest.raises(ConfigError, match="nothing to predict from"):
        predict(case.bundle, device="cpu")


def test_cancellation_raises_and_leaves_nothing(case):
    calls = []
    folder = case.slide_path.parent
    before = sorted(p.name for p in folder.iterdir())

    with pytest.raises(Cancelled):
        predict(case.bundle, slide_path=case.slide_path, device="cpu",
                progress=lambda d, t, s: calls.append(s), should_stop=lambda: len(calls) > 0)
    assert calls  # it had started
    assert sorted(p.name for p in folder.iterdir()) == before  # no cache, no temp file
    # a stop requested before anything ran
    with pytest.raises(Cancelled):
        predict(case.bundle, expression_path=case.expression_path, sample_id=case.sample_id,
                device="cpu", should_stop=lambda: True)


def test_cli_predict_writes_report_and_tiles(case, tmp_path, capsys):
    from mirror_model.cli import main

    out, tiles, geo = tmp_path / "report.json", tmp_path / "tiles.csv", tmp_path / "tiles.geojson"
    rc = main(["predict", "--bundle", str(case.path), "--features", str(case.features_path),
               "--expression", str(case.expression_path), "--out", str(out), "--tiles-csv",
               str(tiles), "--geojson", str(geo), "--quiet", "--device", "cpu",
               "--precision", "fp32"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "subtype:" in text and "risk score:" in text and "slide + rna" in text
    rep = json.loads(out.read_text())
    assert rep["modalities"] == ["slide", "rna"]
    assert rep["model"]["bundle_sha256"] == __import__("hashlib").sha256(
        case.path.read_bytes()).hexdigest()
    assert sum(rep["subtype"]["probabilities"].values()) == pytest.approx(1.0)
    import pandas as pd

    table = pd.read_csv(tiles)
    maps = list(rep["slide"]["maps"])
    assert maps[0] == "attention"
    assert list(table.columns) == [
        "tile_index", "x_level0", "y_level0", "tile_size_level0", "centre_x_um", "centre_y_um",
        *[c for m in maps for c in (m, f"{m}_rank", f"{m}_percentile")]]
    assert len(table) == rep["slide"]["n_tiles"]
    assert table["attention"].sum() == pytest.approx(1.0, abs=1e-5)
    size = rep["slide"]["tile_size_level0"]
    np.testing.assert_allclose(table["centre_x_um"], (table["x_level0"] + size / 2) * 0.5)
    for m in maps:  # rank 1 = highest value; percentile 100 = highest
        top = table.loc[table[f"{m}_rank"] == 1]
        if table[m].nunique() == 1:  # a flat map (e.g. a null Cox head): every tile ties at 50
            assert (table[f"{m}_percentile"] == 50.0).all()
            continue
        assert top[m].iloc[0] == table[m].max() and top[f"{m}_percentile"].iloc[0] == 100.0
        assert sorted(table[f"{m}_rank"]) == list(range(1, len(table) + 1))
    fc = json.loads(geo.read_text())
    assert len(fc["features"]) == len(table)
    f0 = fc["features"][0]
    x, y = table.loc[0, ["x_level0", "y_level0"]]
    assert f0["geometry"]["coordinates"][0][:3] == [[x, y], [x + size, y], [x + size, y + size]]
    assert f0["properties"]["measurements"]["attention"] == pytest.approx(table.loc[0, "attention"])
    # a user error exits with status 2 and one clear line
    assert main(["predict", "--bundle", str(case.path), "--quiet"]) == 2
    assert "nothing to predict from" in capsys.readouterr().err


def test_match_sample_rules():
    assert match_sample(["only"], "whatever.svs") == "only"
    assert match_sample(["A1", "B2"], "/x/B2.ome.tiff") == "B2"
    assert slide_stem("/x/B2.ome.tiff") == "B2"
    ids = ["TCGA-AB-0001-01A", "TCGA-AB-0001-11A", "TCGA-AB-0002-01A"]
    assert match_sample(ids, "TCGA-AB-0001-01Z-00-DX1.svs") == "TCGA-AB-0001-01A"  # tumour sample
    assert match_sample(ids, "TCGA-AB-0001-11A-00-DX1.svs") == "TCGA-AB-0001-11A"  # its own type
    assert match_sample(ids, "TCGA-AB-0003-01Z-00-DX1.svs") is None
    assert match_sample(["P7", "P77"], "P77_HE.svs") == "P77"  # longest prefix at a separator
    assert match_sample(["P7", "P8"], "P78.svs") is None  # no separator after the prefix
    assert match_sample(["P7", "P8"], None) is None


@pytest.mark.parametrize(
    ("offsets", "percentile"),
    [
        # reference risks relative to the patient's own score r: below, tied, above
        ([-1.0, -1.0, 0.0, 0.0, 1.0], 60.0),  # (2 below + 2 ties / 2) / 5
        ([1.0, 2.0, 3.0], 0.0),
        ([-3.0, -2.0, -1.0, -0.5], 100.0),
        ([0.0], 50.0),
        ([-1.0, 0.0, 1.0, 2.0], 37.5),  # (1 + 0.5) / 4
    ],
)
def test_risk_percentile_against_a_hand_made_reference(case, offsets, percentile):
    import copy

    from mirror_model.bundle import Bundle

    first = predict(case.bundle, expression_path=case.expression_path, sample_id=case.sample_id,
                    device="cpu", precision="fp32")  # fmt: skip
    doc = copy.deepcopy(case.bundle.document)
    doc["reference_cohort"]["rna"]["risk"] = np.array(offsets) + first.risk_score
    edited = Bundle(document=doc, model_state=case.bundle.model_state)
    pred = predict(edited, expression_path=case.expression_path, sample_id=case.sample_id,
                   device="cpu", precision="fp32")  # fmt: skip
    assert pred.input_kind == "rna" and pred.risk_score == first.risk_score
    assert pred.risk_percentile == percentile
