"""Cohort table reading and validation (mirror_model.cohort)."""

from __future__ import annotations

import os

import numpy as np
import pytest

from mirror_model.cohort import read_cohort
from mirror_model.errors import CohortError, MirrorError

HEADER = "patient_id,slide_id,slide_path,subtype,time,event\n"


def write(tmp_path, text, name="cohort.csv"):
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


def test_valid_table_paths_patients_and_types(tmp_path):
    (tmp_path / "slides").mkdir()
    p = write(
        tmp_path,
        HEADER
        + "P1,S1,slides/s1.tif,A,10.5,1\n"
        + "P1,S2,slides/s2.tif,A,10.5,1\n"
        + "\n"  # blank lines are ignored
        + "P2,S3,/abs/s3.tif,B,3,0\n"
        + "P3,S4,s4.tif,,,\n",
    )
    c = read_cohort(p)
    t = c.table
    assert c.path == p
    assert t["slide_id"].tolist() == ["S1", "S2", "S3", "S4"]
    assert t["slide_path"].tolist() == [
        os.path.join(str(tmp_path.resolve()), "slides", "s1.tif"),
        os.path.join(str(tmp_path.resolve()), "slides", "s2.tif"),
        "/abs/s3.tif",
        os.path.join(str(tmp_path.resolve()), "s4.tif"),
    ]
    assert t["line"].tolist() == [2, 3, 5, 6]  # spreadsheet line numbers (header = 1)
    assert t["time"].iloc[0] == 10.5 and np.isnan(t["time"].iloc[3])
    assert c.patient_ids == ["P1", "P2", "P3"]
    assert c.subtypes == ["A", "B"]
    assert c.has_subtype and c.has_survival
    pat = c.patients()
    assert pat["patient_id"].tolist() == ["P1", "P2", "P3"]
    assert pat["n_slides"].tolist() == [2, 1, 1]
    assert pat["slide_ids"].tolist() == [["S1", "S2"], ["S3"], ["S4"]]
    assert pat["subtype"].tolist() == ["A", "B", None]
    assert pat["time"].tolist()[:2] == [10.5, 3.0]
    assert c.slides_for("P1") == ["S1", "S2"]
    assert any("no subtype" in w for w in c.warnings)


def test_complete_survival_gives_integer_events_and_extra_columns_kept(tmp_path):
    p = write(
        tmp_path,
        "Patient_ID ; Slide_ID ; slide_path ; time ; event ; site\n"
        "P1;S1;a.tif;1;1;lung\nP2;S2;b.tif;2;0;breast\n",
    )
    c = read_cohort(p)
    assert c.table["event"].dtype == np.int64
    assert c.table["event"].tolist() == [1, 0]
    assert c.table["site"].tolist() == ["lung", "breast"]
    assert not c.has_subtype


def test_tab_separated_with_bom(tmp_path):
    p = tmp_path / "c.tsv"
    p.write_bytes("\ufeffpatient_id\tslide_id\tslide_path\nP1\tS1\tx.svs\n".encode())
    assert read_cohort(p).table["patient_id"].tolist() == ["P1"]


@pytest.mark.parametrize(
    "body, expected",
    [
        ("P1,S1,a.tif,A,-3,1\n", ["line 2", "time -3 is negative"]),
        ("P1,S1,a.tif,A,abc,1\n", ["line 2", "'abc' is not a number"]),
        ("P1,S1,a.tif,A,5,2\n", ["line 2", "event '2' must be 1"]),
        ("P1,S1,a.tif,A,5,\n", ["line 2", "time without event"]),
        ("P1,S1,a.tif,A,,1\n", ["line 2", "event without time"]),
        ("P1,S1,a.tif,A,inf,1\n", ["line 2", "not finite"]),
        ("P1,S1,a.tif,A,1,1\n,S2,b.tif,A,1,1\n", ["line 3", "empty patient_id"]),
        ("P1,,a.tif,A,1,1\n", ["line 2", "empty slide_id"]),
        ("P1,S1,,A,1,1\n", ["line 2", "empty slide_path"]),
        ("P1,S1,a.tif,A,1\n", ["line 2", "5 fields but the header has 6"]),
    ],
)
def test_bad_rows_name_file_and_line(tmp_path, body, expected):
    p = write(tmp_path, HEADER + body)
    with pytest.raises(CohortError) as ei:
        read_cohort(p)
    msg = str(ei.value)
    assert str(p) in msg
    for part in expected:
        assert part in msg


def test_several_problems_reported_together(tmp_path):
    p = write(tmp_path, HEADER + "P1,S1,a.tif,A,-1,1\nP2,S2,b.tif,A,x,1\nP3,S3,c.tif,A,1,7\n")
    msg = str(pytest.raises(CohortError, read_cohort, p).value)
    assert "line 2" in msg and "line 3" in msg and "line 4" in msg


def test_missing_columns_are_listed(tmp_path):
    p = write(tmp_path, "patient,slide_id,path\nP1,S1,a.tif\n")
    msg = str(pytest.raises(CohortError, read_cohort, p).value)
    assert str(p) in msg
    assert "patient_id" in msg and "slide_path" in msg
    assert "'patient'" in msg  # shows what was found


def test_time_column_without_event_column(tmp_path):
    p = write(tmp_path, "patient_id,slide_id,slide_path,time\nP1,S1,a.tif,3\n")
    msg = str(pytest.raises(CohortError, read_cohort, p).value)
    assert "'time' column but no 'event' column" in msg


def test_duplicate_slide_id_names_both_lines(tmp_path):
    p = write(tmp_path, HEADER + "P1,S1,a.tif,A,1,1\nP2,S2,b.tif,A,1,1\nP3,S1,c.tif,B,1,0\n")
    msg = str(pytest.raises(CohortError, read_cohort, p).value)
    assert "duplicate slide_id 'S1' on lines 2, 4" in msg


def test_patient_slides_must_agree(tmp_path):
    p = write(tmp_path, HEADER + "P1,S1,a.tif,A,1,1\nP1,S2,b.tif,B,1,1\n")
    msg = str(pytest.raises(CohortError, read_cohort, p).value)
    assert "patient 'P1'" in msg and "subtype" in msg and "lines 2, 3" in msg


def test_empty_header_only_and_missing_file(tmp_path):
    with pytest.raises(CohortError, match="does not exist"):
        read_cohort(tmp_path / "nope.csv")
    with pytest.raises(CohortError, match="is empty"):
        read_cohort(write(tmp_path, "  \n"))
    with pytest.raises(CohortError, match="no slide rows"):
        read_cohort(write(tmp_path, HEADER))
    with pytest.raises(CohortError, match="is a folder"):
        read_cohort(tmp_path)


def test_check_files_lists_every_missing_slide(tmp_path):
    (tmp_path / "ok.tif").write_bytes(b"x")
    p = write(
        tmp_path, HEADER + "P1,S1,ok.tif,A,1,1\nP2,S2,gone1.tif,A,1,1\nP3,S3,gone2.tif,B,1,0\n"
    )
    assert len(read_cohort(p)) == 3  # not checked by default
    msg = str(pytest.raises(CohortError, read_cohort, p, check_files=True).value)
    assert "2 of 3 slide files do not exist" in msg
    assert "line 3" in msg and "gone1.tif" in msg and "line 4" in msg and "gone2.tif" in msg
    assert "ok.tif" not in msg
    assert isinstance(
        pytest.raises(MirrorError, read_cohort, p, check_files=True).value, CohortError
    )


def test_unknown_patient_in_slides_for(tmp_path):
    c = read_cohort(write(tmp_path, HEADER + "P1,S1,a.tif,A,1,1\n"))
    with pytest.raises(CohortError, match="no patient 'P9'"):
        c.slides_for("P9")


# ---------------------------------------------------------------------------- slide columns


def test_expression_only_cohort(tmp_path):
    p = tmp_path / "c.csv"
    p.write_text("patient_id,subtype,time,event\nP1,a,10,1\nP2,b,5,0\nP3,,7,1\n")
    coh = read_cohort(p)
    assert not coh.has_slides and coh.slide_ids == [] and coh.missing_files() == []
    pat = coh.patients()
    assert pat["patient_id"].tolist() == ["P1", "P2", "P3"]
    assert pat["slide_ids"].tolist() == [[], [], []] and pat["n_slides"].tolist() == [0, 0, 0]
    assert coh.slides_for("P2") == []
    read_cohort(p, check_files=True)  # nothing to check
    p.write_text("patient_id,time,event\nP1,10,1\nP2,5,0\nP1,10,1\n")
    msg = str(pytest.raises(CohortError, read_cohort, p).value)
    assert "expression-only" in msg and "'P1' on lines 2, 4" in msg


def test_slide_id_defaults_to_the_file_name(tmp_path):
    p = tmp_path / "c.csv"
    p.write_text("patient_id,slide_path\nP1,slides/S1.ome.tiff\nP2,slides/S2.svs\n")
    coh = read_cohort(p)
    assert coh.has_slides and coh.slide_ids == ["S1", "S2"]


def test_one_slide_file_on_many_rows_is_refused(tmp_path):
    p = tmp_path / "c.csv"
    rows = "".join(f"P{i},S{i},slides/same.svs\n" for i in range(5))
    p.write_text("patient_id,slide_id,slide_path\n" + rows)
    msg = str(pytest.raises(CohortError, read_cohort, p).value)
    assert "same slide file is listed on several rows" in msg and "same.svs on 5 rows" in msg
    assert "lines 2, 3, 4, 5, 6" in msg


def test_url_slide_path_is_refused(tmp_path):
    p = tmp_path / "c.csv"
    p.write_text("patient_id,slide_id,slide_path\nP1,S1,http://example.org/s1.svs\n")
    msg = str(pytest.raises(CohortError, read_cohort, p).value)
    assert "line 2" in msg and "is a URL" in msg and "local files" in msg
