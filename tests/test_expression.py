"""Expression tables: reading, orientation, validation, patient and gene matching."""

from __future__ import annotations

import gzip
import sys

import numpy as np
import pytest

from mirror_model.errors import ExpressionError
from mirror_model.expression import ExpressionTable, patient_key, read_expression


def write(tmp_path, text, name="expr.csv"):
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


SG = (
    "sample_id,TP53,EGFR,ENSG00000141510.5\n"
    "TCGA-AB-1234-01A-11R-A123-07,1,2,3\n"
    "TCGA-AB-1235-01A-11R-A123-07,4,5,6.5\n"
)


def test_samples_by_genes_detected(tmp_path):
    t = read_expression(write(tmp_path, SG))
    assert t.orientation == "samples x genes"
    assert t.genes == ["TP53", "EGFR", "ENSG00000141510.5"]
    assert t.sample_ids[0].startswith("TCGA-AB-1234")
    np.testing.assert_array_equal(t.values, np.array([[1, 2, 3], [4, 5, 6.5]], np.float32))
    assert t.values.dtype == np.float32
    d = t.describe()
    assert "2 samples x 3 genes" in d and "read as samples x genes" in d and str(t.path) in d


def test_genes_by_samples_with_annotation_column(tmp_path):
    p = write(
        tmp_path,
        "Hugo_Symbol\tEntrez_Gene_Id\tTCGA-AB-1234-01A\tTCGA-AB-1235-01A\n"
        "TP53\t7157\t1\t2\nEGFR\t1956\t3\t4\nKRAS\t3845\t5\t6\n",
        "e.tsv",
    )
    t = read_expression(p)
    assert t.orientation == "genes x samples"
    assert t.genes == ["TP53", "EGFR", "KRAS"]
    assert t.sample_ids == ["TCGA-AB-1234-01A", "TCGA-AB-1235-01A"]
    np.testing.assert_array_equal(t.values, [[1, 3, 5], [2, 4, 6]])
    assert "Entrez_Gene_Id" in t.describe()  # says it skipped it


def test_ensembl_rows_generic_sample_columns(tmp_path):
    p = write(tmp_path, "gene_id,S_01,S_02\nENSG00000000003.14,1,2\nENSG00000000005.6,3,4\n")
    t = read_expression(p)
    assert t.orientation == "genes x samples"
    assert t.sample_ids == ["S_01", "S_02"]


@pytest.mark.parametrize(
    "n_rows, n_cols, expected", [(2, 5, "samples x genes"), (5, 2, "genes x samples")]
)
def test_shape_fallback_when_labels_are_inconclusive(tmp_path, n_rows, n_cols, expected):
    header = "id," + ",".join(f"c{chr(97 + j)}x" for j in range(n_cols))
    rows = [f"r{chr(97 + i)}x," + ",".join("1" for _ in range(n_cols)) for i in range(n_rows)]
    t = read_expression(write(tmp_path, "\n".join([header, *rows]) + "\n"))
    assert t.orientation == expected
    assert "inconclusive" in t.orientation_reason


def test_forced_orientation_and_id_column(tmp_path):
    p = write(tmp_path, "A1,sample,B1\n1,s1,2\n3,s2,4\n")
    t = read_expression(p, id_column="sample", orientation="samples x genes")
    assert t.sample_ids == ["s1", "s2"] and t.genes == ["A1", "B1"]
    np.testing.assert_array_equal(t.values, [[1, 2], [3, 4]])
    assert t.orientation_reason == "as requested"
    t2 = read_expression(p, id_column="sample", orientation="genes x samples")
    assert t2.genes == ["s1", "s2"] and t2.sample_ids == ["A1", "B1"]
    with pytest.raises(ExpressionError, match="no column 'nope'"):
        read_expression(p, id_column="nope")
    with pytest.raises(ExpressionError, match="orientation must be"):
        read_expression(p, orientation="rows")  # type: ignore[arg-type]


def test_r_style_header_without_label_cell(tmp_path):
    p = write(tmp_path, "TP53\tEGFR\nTCGA-AB-1234-01A\t1\t2\nTCGA-AB-1235-01A\t3\t4\n", "r.txt")
    t = read_expression(p)
    assert t.orientation == "samples x genes"
    assert t.genes == ["TP53", "EGFR"]
    np.testing.assert_array_equal(t.values, [[1, 2], [3, 4]])


def test_gzip(tmp_path):
    p = tmp_path / "e.csv.gz"
    with gzip.open(p, "wt") as fh:
        fh.write(SG)
    assert read_expression(p).values.shape == (2, 3)


def test_duplicate_samples_name_lines(tmp_path):
    p = write(tmp_path, "sample_id,TP53,EGFR\nS-1,1,2\nS-2,1,2\nS-1,3,4\n")
    msg = str(pytest.raises(ExpressionError, read_expression, p).value)
    assert str(p) in msg and "duplicate sample IDs" in msg and "S-1 (line 2, line 4)" in msg


def test_duplicate_genes_name_columns(tmp_path):
    p = write(tmp_path, "sample_id,TP53,EGFR,TP53\nS-1,1,2,3\n")
    msg = str(pytest.raises(ExpressionError, read_expression, p).value)
    assert "duplicate genes" in msg and "TP53 (column B, column D)" in msg


def test_non_numeric_cells_named(tmp_path):
    p = write(tmp_path, "sample_id,TP53,EGFR,KRAS\nS-1,1,abc,3\nS-2,4,5,1.2.3\n")
    msg = str(pytest.raises(ExpressionError, read_expression, p).value)
    assert str(p) in msg
    assert "line 2, column C (sample S-1, gene EGFR): 'abc'" in msg
    assert "line 3, column D (sample S-2, gene KRAS): '1.2.3'" in msg


def test_missing_values_error_and_policies(tmp_path):
    p = write(tmp_path, "Hugo_Symbol,TCGA-AB-0001-01A,TCGA-AB-0002-01A\nTP53,1,NA\nEGFR,2,3\n")
    msg = str(pytest.raises(ExpressionError, read_expression, p).value)
    assert "1 missing values" in msg
    assert "line 2, column C (sample TCGA-AB-0002-01A, gene TP53)" in msg
    z = read_expression(p, nan_policy="zero")
    np.testing.assert_array_equal(z.values, [[1, 2], [0, 3]])
    assert any("set to 0" in w for w in z.warnings)
    d = read_expression(p, nan_policy="drop-genes")
    assert d.genes == ["EGFR"] and any("TP53" in w for w in d.warnings)


def test_infinite_values(tmp_path):
    p = write(tmp_path, "sample_id,TP53\nS-1,inf\n")
    with pytest.raises(ExpressionError, match="infinite values: line 2, column B"):
        read_expression(p)


def test_empty_inputs(tmp_path):
    with pytest.raises(ExpressionError, match="does not exist"):
        read_expression(tmp_path / "none.csv")
    with pytest.raises(ExpressionError, match="is empty"):
        read_expression(write(tmp_path, "", "a.csv"))
    with pytest.raises(ExpressionError, match="no data rows"):
        read_expression(write(tmp_path, "sample_id,TP53\n", "b.csv"))
    with pytest.raises(ExpressionError, match="only a label column"):
        read_expression(write(tmp_path, "sample_id\nS-1\n", "c.csv"))
    with pytest.raises(ExpressionError, match="empty sample ID on line 3"):
        read_expression(write(tmp_path, "sample_id,TP53\nS-1,1\n,2\n", "d.csv"))


def test_ragged_row(tmp_path):
    p = write(tmp_path, "sample_id,TP53,EGFR\nS-1,1,2\nS-2,1,2,3\n")
    with pytest.raises(ExpressionError, match="line 3: 4 fields"):
        read_expression(p)


def test_all_zero_genes_reported(tmp_path):
    t = read_expression(write(tmp_path, "sample_id,TP53,DEAD1,EGFR\nS-1,1,0,2\nS-2,3,0,0\n"))
    assert t.all_zero_genes == ["DEAD1"]
    assert any("DEAD1" in w and "0 in every sample" in w for w in t.warnings)


def test_parquet_without_pyarrow_says_how_to_install(tmp_path, monkeypatch):
    p = tmp_path / "e.parquet"
    p.write_bytes(b"PAR1....PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import pyarrow -> ImportError
    msg = str(pytest.raises(ExpressionError, read_expression, p).value)
    assert "pip install pyarrow" in msg and str(p) in msg


def test_parquet_roundtrip(tmp_path):
    pytest.importorskip("pyarrow")
    import pandas as pd

    df = pd.DataFrame(
        {"TP53": [1.0, 2.0], "EGFR": [3.0, 4.0]},
        index=pd.Index(["TCGA-AB-0001-01A", "TCGA-AB-0002-01A"], name="sample"),
    )
    p = tmp_path / "e.parquet"
    df.to_parquet(p)
    t = read_expression(p)
    assert t.orientation == "samples x genes" and t.genes == ["TP53", "EGFR"]


# ---------------------------------------------------------------------------- matching


def table(sample_ids, genes=("TP53", "EGFR", "KRAS")):
    vals = np.arange(len(sample_ids) * len(genes), dtype=np.float32).reshape(len(sample_ids), -1)
    return ExpressionTable(values=vals, sample_ids=list(sample_ids), genes=list(genes))


def test_patient_key():
    assert patient_key("TCGA-AB-1234-01A-11R-A123-07") == "TCGA-AB-1234"
    assert patient_key("tcga-ab-1234-01a") == "TCGA-AB-1234"
    assert patient_key(" P-001 ") == "P-001"


def test_rows_for_tcga_12_chars_and_exact():
    t = table(["TCGA-AB-1234-01A-11R", "TCGA-AB-9999-01A", "P-7"])
    np.testing.assert_array_equal(t.rows_for(["TCGA-AB-9999", "TCGA-AB-1234", "P-7"]), [1, 0, 2])
    # a full barcode as patient id matches the same patient
    np.testing.assert_array_equal(t.rows_for(["TCGA-AB-1234-01A-99X"]), [0])
    with pytest.raises(ExpressionError):
        t.rows_for(["p-7"])  # non-TCGA IDs match exactly


def test_rows_for_prefers_the_tumour_sample_and_flags_ambiguity():
    t = table(["TCGA-AB-1234-11A", "TCGA-AB-1234-01A", "TCGA-AB-5678-01A", "TCGA-AB-5678-01B"])
    np.testing.assert_array_equal(t.rows_for(["TCGA-AB-1234"]), [1])
    msg = str(pytest.raises(ExpressionError, t.rows_for, ["TCGA-AB-5678"]).value)
    assert "several samples" in msg and "TCGA-AB-5678-01A, TCGA-AB-5678-01B" in msg
    np.testing.assert_array_equal(t.rows_for(["TCGA-AB-5678"], on_ambiguous="first"), [2])


def test_rows_for_unmatched_lists_first_ten_and_count():
    t = table(["TCGA-AB-0001-01A", "TCGA-AB-0002-01A"])
    wanted = ["TCGA-AB-0001"] + [f"TCGA-ZZ-{i:04d}" for i in range(15)]
    msg = str(pytest.raises(ExpressionError, t.rows_for, wanted).value)
    assert "15 of 16 patients have no sample" in msg
    assert "TCGA-ZZ-0000" in msg and "TCGA-ZZ-0009" in msg and "TCGA-ZZ-0010" not in msg
    assert "and 5 more" in msg
    assert "look like: TCGA-AB-0001-01A, TCGA-AB-0002-01A" in msg


def test_align_genes_order_and_missing():
    t = ExpressionTable(
        values=np.array([[1, 2, 3]], np.float32),
        sample_ids=["s"],
        genes=["TP53", "ENSG00000141510.5", "egfr"],
    )
    np.testing.assert_array_equal(t.align_genes(["EGFR", "TP53", "ENSG00000141510"]), [[3, 1, 2]])
    msg = str(
        pytest.raises(ExpressionError, t.align_genes, ["TP53", "MYC", "BRCA1", "EGFR", "X"]).value
    )
    assert "lacks 3 of the model's 5 genes: MYC, BRCA1, X" in msg


def test_matrix_and_subset():
    t = table(["TCGA-AB-0001-01A", "TCGA-AB-0002-01A"])
    np.testing.assert_array_equal(t.matrix(["TCGA-AB-0002"], ["KRAS", "TP53"]), [[5, 3]])
    s = t.subset(rows=[1], genes=["EGFR"])
    assert s.sample_ids == ["TCGA-AB-0002-01A"] and s.genes == ["EGFR"]
    np.testing.assert_array_equal(s.values, [[4]])
    assert t.to_frame().loc["TCGA-AB-0001-01A", "KRAS"] == 2


def test_shape_mismatch_in_constructor():
    with pytest.raises(ExpressionError, match="do not match"):
        ExpressionTable(values=np.zeros((2, 2)), sample_ids=["a"], genes=["x", "y"])


# ---------------------------------------------------------------------------- linear-time reader


@pytest.mark.parametrize("sep, ext", [(",", "csv"), ("\t", "tsv")])
@pytest.mark.parametrize("samples_as_rows", [True, False])
def test_wide_table_round_trip_both_orientations(tmp_path, sep, ext, samples_as_rows):
    """A 7 x 3,001 table with NA tokens, quoted lines, CRLF and a blank line: every value is
    the float32 of its text, the NA cells are named in the error, and 'zero' reads them as 0."""
    rng = np.random.default_rng(1)
    S, G = 7, 3001
    vals = np.round(rng.gamma(2.0, 2.0, (S, G)), 4)
    text = vals.astype(str)
    text[2, 17] = "NA"
    text[5, 3000] = ""
    samples = [f"TCGA-AB-{i:04d}-01A" for i in range(S)]
    genes = [f"GENE{g}" for g in range(G)]
    lines = []
    if samples_as_rows:
        lines.append(sep.join(["sample_id", *genes]))
        for i in range(S):
            cells = [samples[i], *text[i]]
            if i == 1:  # a quoted line
                cells = [f'"{c}"' for c in cells]
            lines.append(sep.join(cells))
    else:
        lines.append(sep.join(["gene_id", *samples]))
        for g in range(G):
            lines.append(sep.join([genes[g], *text[:, g]]))
    lines.insert(3, "")
    p = tmp_path / f"wide.{ext}"
    p.write_bytes(("\r\n".join(lines) + "\r\n").encode())
    with pytest.raises(ExpressionError, match="2 missing values") as err:
        read_expression(p)
    na_line = 5 if samples_as_rows else 20  # the blank line 4 shifts the lines below it
    assert f"line {na_line}, column" in str(err.value) and "gene GENE17" in str(err.value)
    t = read_expression(p, nan_policy="zero")
    assert t.orientation == ("samples x genes" if samples_as_rows else "genes x samples")
    assert t.sample_ids == samples and t.genes == genes
    want = vals.astype(np.float32)
    want[2, 17] = want[5, 3000] = 0
    np.testing.assert_array_equal(t.values, want)
    assert t.values.flags.c_contiguous and t.values.dtype == np.float32


def test_median_policy_keeps_missing_cells(tmp_path):
    p = write(tmp_path, "sample_id,TP53,EGFR\nS-1,1.5,NA\nS-2,2.5,3.5\nS-3,,4.5\n")
    t = read_expression(p, nan_policy="median")
    assert t.nan_policy == "median"
    assert np.isnan(t.values[0, 1]) and np.isnan(t.values[2, 0])
    assert any("2 missing values in 2 genes" in w and "median" in w for w in t.warnings)
    with pytest.raises(ExpressionError, match="nan_policy must be one of"):
        read_expression(p, nan_policy="mean")  # type: ignore[arg-type]


def test_zero_policy_warns_on_a_log_scale(tmp_path):
    p = write(tmp_path, "sample_id,TP53,EGFR\nS-1,5.52,NA\nS-2,6.25,3.5\n")
    t = read_expression(p, nan_policy="zero")
    assert any("looks log-scaled" in w and "0.5" not in w and "3.5" in w for w in t.warnings)


def test_negative_value_in_a_count_table_is_refused(tmp_path):
    p = write(tmp_path, "sample_id,TP53,EGFR\nS-1,120,4\nS-2,-3,800\n")
    msg = str(pytest.raises(ExpressionError, read_expression, p).value)
    assert "integer counts" in msg and "sample S-2, gene TP53: -3" in msg and str(p) in msg
    # a centred / log table may be negative
    t = read_expression(write(tmp_path, "sample_id,TP53,EGFR\nS-1,1.2,-0.4\nS-2,-3.1,0.8\n", "c.csv"))
    assert t.values.min() < 0


def test_float32_overflow_named(tmp_path):
    p = write(tmp_path, "sample_id,TP53\nS-1,1e39\n")
    with pytest.raises(ExpressionError, match="beyond float32 range.*line 2, column B"):
        read_expression(p)
