"""Sample, patient and slide names: one set of rules (mirror_model.ids) used everywhere."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from mirror_model.ids import (
    SLIDE_SUFFIXES,
    has_slide_suffix,
    is_tcga_barcode,
    match_sample,
    patient_key,
    slide_stem,
    tcga_sample_type,
)

REPO = Path(__file__).resolve().parents[1]


def test_tcga_barcode_parts():
    b = "TCGA-AB-1234-01A-11R-A123-07"
    assert is_tcga_barcode(b) and is_tcga_barcode("tcga-ab-1234")
    assert not is_tcga_barcode("P-001") and not is_tcga_barcode("TCGA-AB-12")
    assert patient_key(b) == "TCGA-AB-1234"
    assert tcga_sample_type(b) == 1
    assert tcga_sample_type("TCGA-AB-1234-11A") == 11  # solid tissue normal
    assert tcga_sample_type("TCGA-AB-1234") is None and tcga_sample_type("P-001-01A") is None


@pytest.mark.parametrize(
    ("name", "stem"),
    [("a/B2.ome.tiff", "B2"), ("B2.OME.TIF", "B2"), ("x.svs", "x"), ("x.y.ndpi", "x.y"),
     ("TCGA-AB-1234-01Z-00-DX1.h5", "TCGA-AB-1234-01Z-00-DX1"), ("noext", "noext"),
     ("odd.xyz", "odd"), (".svs", ".svs")],
)  # fmt: skip
def test_slide_stem_removes_whole_slide_extensions(name, stem):
    assert slide_stem(name) == stem


def test_slide_suffixes_match_the_napari_manifest():
    manifest = yaml.safe_load((REPO / "napari.yaml").read_text())
    patterns = manifest["contributions"]["readers"][0]["filename_patterns"]
    assert patterns == [f"*{s}" for s in SLIDE_SUFFIXES]
    assert has_slide_suffix("X.SVS") and has_slide_suffix("a.ome.tiff")
    assert not has_slide_suffix("a.h5") and not has_slide_suffix("a.png")


def test_match_sample_prefers_the_slides_own_sample_then_tumour():
    ids = ["TCGA-AB-1234-11A", "TCGA-AB-1234-01A", "TCGA-CD-0001-01A"]
    # the slide barcode's sample type (01) picks the sample, not the first listed
    assert match_sample(ids, "TCGA-AB-1234-01Z-00-DX1.svs") == "TCGA-AB-1234-01A"
    assert match_sample(ids, "TCGA-AB-1234-11A-00-DX1.svs") == "TCGA-AB-1234-11A"
    assert match_sample(ids[:2] + ["x"], "TCGA-AB-1234.svs") == "TCGA-AB-1234-01A"
    assert match_sample(["P007", "P0071"], "P007_HE.svs") == "P007"
    assert match_sample(["P007_HE_x", "Q"], "P007_HE.tif") == "P007_HE_x"
    assert match_sample(["A", "B"], None) is None and match_sample(["only"], None) == "only"
