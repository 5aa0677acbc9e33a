"""Bulk expression tables: reading, orientation detection, patient and gene matching.

Accepted files (design §2): CSV or TSV (the delimiter is sniffed from the header line;
``.gz`` works too) and parquet (needs ``pyarrow``). Either orientation is accepted:

* **samples x genes** — one row per sample, the first column holds sample IDs
  (e.g. ``sample_id``), the header holds gene names;
* **genes x samples** — one row per gene (e.g. ``Hugo_Symbol`` or Ensembl IDs in the first
  column), the header holds sample IDs (the usual TCGA / GEO layout). Annotation columns
  such as ``Entrez_Gene_Id`` or ``Description`` next to the gene column are skipped.

The orientation is decided from the labels: which axis carries gene-like names (HGNC-style
symbols, Ensembl IDs) and which carries sample-like IDs (TCGA barcodes, IDs with digits),
with the first header cell (``gene``/``sample_id``…) as a hint, and the table's shape
(more genes than samples) as the last resort. :meth:`ExpressionTable.describe` says which
orientation was used and why; pass ``orientation=`` to override.

Sample IDs are matched to cohort patient IDs exactly, except that TCGA barcodes are compared
on their first 12 characters (``TCGA-AB-1234-01A-11R-A123-07`` is patient ``TCGA-AB-1234``).
"""

from __future__ import annotations

import csv
import gzip
import io
import math
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from .errors import ExpressionError
from .ids import is_tcga_barcode, patient_key, tcga_sample_type

__all__ = [
    "ORIENTATIONS",
    "ExpressionTable",
    "patient_key",
    "read_expression",
]

ORIENTATIONS = ("samples x genes", "genes x samples")
Orientation = Literal["samples x genes", "genes x samples"]
NanPolicy = Literal["error", "zero", "drop-genes"]

_MAX_LISTED = 10
_NA_TOKENS = ["", "NA", "N/A", "n/a", "NaN", "nan", "-nan", "NULL", "null", "#N/A", "None", "none"]
_ENSEMBL_RE = re.compile(r"^ENS[A-Z]*[GT]\d{6,}(\.\d+)?$", re.IGNORECASE)
# HGNC-like symbols: upper-case letters and digits, maybe '-', '.', '_' or '@' (HLA-A, C1orf112)
# and mouse/rat style (Trp53). Must contain a letter, must not be all digits.
_SYMBOL_RE = re.compile(r"^(?=.*[A-Za-z])[A-Z][A-Za-z0-9]*([-._@][A-Za-z0-9]+)*$")
_SAMPLE_HINT_RE = re.compile(r"(sample|patient|case|donor|subject|barcode|aliquot)", re.I)
_GENE_HEADERS = {
    "gene",
    "genes",
    "gene_id",
    "geneid",
    "gene_name",
    "genename",
    "gene_symbol",
    "genesymbol",
    "symbol",
    "hugo_symbol",
    "hugo",
    "ensembl",
    "ensembl_id",
    "ensembl_gene_id",
    "id_ref",
    "feature",
    "features",
    "probe",
    "gene id",
    "gene name",
    "gene symbol",
}
_SAMPLE_HEADERS = {
    "sample",
    "samples",
    "sample_id",
    "sampleid",
    "sample id",
    "sample_barcode",
    "barcode",
    "patient",
    "patient_id",
    "patientid",
    "case_id",
    "case_submitter_id",
    "submitter_id",
    "bcr_patient_barcode",
    "tcga_barcode",
    "aliquot",
    "specimen",
    "donor",
}
_ANNOTATION_COLUMNS = {
    "entrez_gene_id",
    "entrez",
    "entrezid",
    "entrez_id",
    "description",
    "gene_type",
    "gene_biotype",
    "biotype",
    "chromosome",
    "chr",
    "length",
    "gene_length",
    "name",
}


def _gene_key(gene: str) -> str:
    """Loose gene key: Ensembl version removed, upper case."""
    g = str(gene).strip()
    if _ENSEMBL_RE.match(g):
        g = g.split(".")[0]
    return g.upper()


def _gene_score(labels: Sequence[str]) -> float:
    if len(labels) == 0:
        return 0.0
    hits = sum(
        1 for s in labels if (_ENSEMBL_RE.match(s) or _SYMBOL_RE.match(s)) and not is_tcga_barcode(s)
    )
    return hits / len(labels)


def _sample_score(labels: Sequence[str]) -> float:
    if len(labels) == 0:
        return 0.0
    hits = 0
    for s in labels:
        if is_tcga_barcode(s) or _SAMPLE_HINT_RE.search(s):
            hits += 1
        elif re.fullmatch(r"[0-9][0-9A-Za-z._-]*", s):  # IDs starting with a digit: not symbols
            hits += 1
        elif re.search(r"\d", s) and re.search(r"[-_.]", s) and not _ENSEMBL_RE.match(s):
            hits += 0.5  # e.g. "GSM12-3", "S_001": weak evidence
    return hits / len(labels)


@dataclass
class ExpressionTable:
    """An expression matrix with sample and gene labels.

    Attributes
    ----------
    values
        float32 array [n_samples, n_genes], as in the file (no transform applied).
    sample_ids
        Sample IDs, one per row of ``values``.
    genes
        Gene names, one per column of ``values``.
    orientation
        How the file was laid out: ``"samples x genes"`` or ``"genes x samples"``.
    path
        Source file (None when built in memory).
    orientation_reason
        Why this orientation was chosen (for :meth:`describe`).
    all_zero_genes
        Genes that are 0 in every sample (kept here; gene selection drops them).
    warnings
        Human-readable notes (all-zero genes, skipped annotation columns, NaN replaced ...).
    """

    values: np.ndarray
    sample_ids: list[str]
    genes: list[str]
    orientation: str = "samples x genes"
    path: Path | None = None
    orientation_reason: str = ""
    all_zero_genes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.values = np.asarray(self.values, dtype=np.float32)
        self.sample_ids = [str(s) for s in self.sample_ids]
        self.genes = [str(g) for g in self.genes]
        if self.values.ndim != 2 or self.values.shape != (len(self.sample_ids), len(self.genes)):
            raise ExpressionError(
                f"{self._name()}: values of shape {self.values.shape} do not match "
                f"{len(self.sample_ids)} sample IDs x {len(self.genes)} genes."
            )
        if not self.all_zero_genes and self.values.size:
            zero = ~np.any(self.values != 0, axis=0)
            self.all_zero_genes = [g for g, z in zip(self.genes, zero, strict=True) if z]

    # ------------------------------------------------------------------ basic facts
    @property
    def n_samples(self) -> int:
        return len(self.sample_ids)

    @property
    def n_genes(self) -> int:
        return len(self.genes)

    def _name(self) -> str:
        return str(self.path) if self.path is not None else "expression table"

    def describe(self) -> str:
        """One line (plus notes) saying what was read and in which orientation."""
        line = (
            f"{self._name()}: {self.n_samples} samples x {self.n_genes} genes, "
            f"read as {self.orientation}"
        )
        if self.orientation_reason:
            line += f" ({self.orientation_reason})"
        line += "."
        return "\n".join([line, *(f"  note: {w}" for w in self.warnings)])

    def to_frame(self) -> pd.DataFrame:
        """samples x genes DataFrame indexed by sample ID."""
        return pd.DataFrame(
            self.values, index=pd.Index(self.sample_ids, name="sample_id"), columns=self.genes
        )

    # ------------------------------------------------------------------ matching
    def rows_for(
        self,
        patient_ids: Iterable[str],
        on_ambiguous: Literal["error", "first"] = "error",
    ) -> np.ndarray:
        """Row indices of ``values`` for each patient, in the given order.

        An exact sample-ID match wins; otherwise TCGA barcodes are compared on their first 12
        characters. When one patient has several samples (e.g. ``-01A`` tumour and ``-11A``
        normal), the only primary-tumour-type sample (types 01–09) is taken; if that still
        leaves several, ``on_ambiguous="error"`` raises and ``"first"`` takes the first in
        sorted barcode order.

        Raises
        ------
        ExpressionError
            Listing the unmatched patient IDs (first 10 and a count) and what the table's
            sample IDs look like.
        """
        pids = [str(p) for p in patient_ids]
        exact = {s: i for i, s in enumerate(self.sample_ids)}
        by_key: dict[str, list[int]] = {}
        for i, s in enumerate(self.sample_ids):
            by_key.setdefault(patient_key(s), []).append(i)
        rows: list[int] = []
        unmatched: list[str] = []
        ambiguous: list[str] = []
        for p in pids:
            if p in exact:
                rows.append(exact[p])
                continue
            cand = by_key.get(patient_key(p), [])
            if len(cand) > 1:
                tumour = [i for i in cand if (tcga_sample_type(self.sample_ids[i]) or 99) < 10]
                if len(tumour) == 1:
                    cand = tumour
                elif on_ambiguous == "first":
                    cand = sorted(tumour or cand, key=lambda i: self.sample_ids[i])[:1]
                else:
                    ambiguous.append(f"{p} -> {', '.join(self.sample_ids[i] for i in cand)}")
                    rows.append(-1)
                    continue
            if not cand:
                unmatched.append(p)
                rows.append(-1)
            else:
                rows.append(cand[0])
        if unmatched:
            shown = ", ".join(unmatched[:_MAX_LISTED])
            more = (
                f" (and {len(unmatched) - _MAX_LISTED} more)"
                if len(unmatched) > _MAX_LISTED
                else ""
            )
            examples = ", ".join(self.sample_ids[:5])
            raise ExpressionError(
                f"{self._name()}: {len(unmatched)} of {len(pids)} patients have no sample in the "
                f"expression table: {shown}{more}. The table's sample IDs look like: {examples} "
                f"({self.n_samples} samples, read as {self.orientation}). Sample IDs must equal "
                "the cohort's patient_id (TCGA barcodes are compared on the first 12 characters)."
            )
        if ambiguous:
            raise ExpressionError(
                f"{self._name()}: {len(ambiguous)} patients match several samples: "
                f"{'; '.join(ambiguous[:_MAX_LISTED])}. Keep one sample per patient in the table "
                "(or use on_ambiguous='first')."
            )
        return np.asarray(rows, dtype=np.int64)

    def gene_indices(self, genes: Sequence[str], what: str = "requested") -> np.ndarray:
        """Column indices of ``genes`` (in that order).

        Exact names first; then Ensembl IDs without version suffix and case-insensitive
        symbols. Raises ExpressionError listing the missing genes.
        """
        genes = [str(g) for g in genes]
        exact = {g: i for i, g in enumerate(self.genes)}
        loose: dict[str, int | None] = {}
        for i, g in enumerate(self.genes):
            k = _gene_key(g)
            loose[k] = None if k in loose else i  # None marks an ambiguous loose key
        idx: list[int] = []
        missing: list[str] = []
        for g in genes:
            if g in exact:
                idx.append(exact[g])
                continue
            j = loose.get(_gene_key(g))
            if j is None:
                missing.append(g)
                idx.append(-1)
            else:
                idx.append(j)
        if missing:
            shown = ", ".join(missing[:_MAX_LISTED])
            more = (
                f", ... ({len(missing) - _MAX_LISTED} more)" if len(missing) > _MAX_LISTED else ""
            )
            raise ExpressionError(
                f"The expression file {self._name()} lacks {len(missing)} of the {what} "
                f"{len(genes)} genes: {shown}{more}. Its genes look like: "
                f"{', '.join(self.genes[:5])}. Provide a table with these genes (same naming: "
                "symbols vs Ensembl IDs)."
            )
        return np.asarray(idx, dtype=np.int64)

    def align_genes(self, genes: Sequence[str], what: str = "model's") -> np.ndarray:
        """``values`` with columns in the order of ``genes`` (float32 [n_samples, len(genes)]).

        Raises ExpressionError like "the expression file X lacks 12 of the model's 300 genes:
        TP53, ..." when genes are missing.
        """
        return self.values[:, self.gene_indices(genes, what=what)]

    def matrix(self, patient_ids: Iterable[str], genes: Sequence[str] | None = None) -> np.ndarray:
        """float32 [len(patient_ids), n_genes]: rows matched to patients, columns to ``genes``."""
        rows = self.rows_for(patient_ids)
        cols = self.gene_indices(genes) if genes is not None else slice(None)
        return self.values[rows][:, cols]

    def subset(
        self, rows: Sequence[int] | None = None, genes: Sequence[str] | None = None
    ) -> ExpressionTable:
        """A new table with the given rows (indices) and/or genes (names, in that order)."""
        r = np.arange(self.n_samples) if rows is None else np.asarray(rows, dtype=np.int64)
        c = np.arange(self.n_genes) if genes is None else self.gene_indices(genes)
        return ExpressionTable(
            values=self.values[r][:, c],
            sample_ids=[self.sample_ids[i] for i in r],
            genes=[self.genes[j] for j in c],
            orientation=self.orientation,
            path=self.path,
            orientation_reason=self.orientation_reason,
        )


# ---------------------------------------------------------------------- reading


def _open_text(path: Path) -> io.TextIOBase:
    if path.suffix.lower() == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8-sig")
    return open(path, encoding="utf-8-sig", newline="")


def _sniff(first_line: str) -> str:
    counts = {d: first_line.count(d) for d in ("\t", ",", ";")}
    best = max(counts, key=counts.get)
    return best if counts[best] > 0 else ","


def _col_name(j: int) -> str:
    """Spreadsheet column letters for a 0-based column index (0 -> A, 26 -> AA)."""
    s = ""
    j += 1
    while j:
        j, r = divmod(j - 1, 26)
        s = chr(65 + r) + s
    return s


def read_expression(
    path: str | os.PathLike[str],
    id_column: str | None = None,
    orientation: Orientation | None = None,
    nan_policy: NanPolicy = "error",
) -> ExpressionTable:
    """Read an expression table (CSV/TSV/parquet), detecting its orientation.

    Parameters
    ----------
    path
        ``.csv``, ``.tsv``, ``.txt`` (optionally ``.gz``) or ``.parquet``/``.pq``.
    id_column
        Name of the label column (sample IDs for samples x genes, gene names for genes x
        samples). Default: the first column (for parquet: a named index, else the first
        text column).
    orientation
        Force ``"samples x genes"`` or ``"genes x samples"`` instead of detecting it.
    nan_policy
        ``"error"`` (default): empty / NA cells are an error naming them; ``"zero"``: they are
        read as 0 (noted in ``warnings``); ``"drop-genes"``: genes with any missing value are
        dropped (noted in ``warnings``).

    Raises
    ------
    ExpressionError
        For a missing/empty/unreadable file, ragged rows, duplicate sample IDs or genes,
        non-numeric or infinite cells, and missing values under ``nan_policy="error"``;
        the message names the file and the row, column, sample and gene at fault.
    """
    path = Path(path)
    name = str(path)
    if orientation is not None and orientation not in ORIENTATIONS:
        raise ExpressionError(f"orientation must be one of {ORIENTATIONS}, not {orientation!r}.")
    if nan_policy not in ("error", "zero", "drop-genes"):
        raise ExpressionError(
            f"nan_policy must be 'error', 'zero' or 'drop-genes', not {nan_policy!r}."
        )
    if not path.exists():
        raise ExpressionError(f"Expression table {name} does not exist.")
    if path.is_dir():
        raise ExpressionError(f"Expression table {name} is a folder; give the file inside it.")
    if path.stat().st_size == 0:
        raise ExpressionError(f"Expression table {name} is empty.")
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in (".parquet", ".pq"):
        header, labels, data, label_name, first_row_line = _load_parquet(path, id_column)
        line_of = None
    else:
        header, labels, data, label_name, first_row_line = _load_text(path, id_column)
        line_of = first_row_line
    return _build(path, header, labels, data, label_name, orientation, nan_policy, line_of)


def _load_parquet(path: Path, id_column: str | None):
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        raise ExpressionError(
            f"Reading the parquet file {path} needs pyarrow: pip install pyarrow "
            "(or save the table as CSV/TSV)."
        ) from None
    try:
        df = pd.read_parquet(path)
    except Exception as exc:  # pyarrow raises many types for corrupt files
        raise ExpressionError(f"Cannot read the parquet file {path}: {exc}") from None
    if id_column is not None:
        if id_column not in df.columns:
            raise ExpressionError(
                f"{path}: no column {id_column!r} (columns start: {', '.join(map(str, df.columns[:5]))})."
            )
        labels = df[id_column].astype(str).tolist()
        data = df.drop(columns=[id_column])
        label_name = id_column
    elif not isinstance(df.index, pd.RangeIndex):
        labels = [str(x) for x in df.index]
        data = df.reset_index(drop=True)
        label_name = str(df.index.name or "")
    else:
        text_cols = [c for c in df.columns if not pd.api.types.is_numeric_dtype(df[c])]
        if not text_cols:
            raise ExpressionError(
                f"{path}: no column holds sample IDs or gene names (all columns are numeric "
                "and the index is a plain row number). Store the IDs as the index or a column."
            )
        label_name = str(text_cols[0])
        labels = df[text_cols[0]].astype(str).tolist()
        data = df.drop(columns=[text_cols[0]]).reset_index(drop=True)
    header = [str(c) for c in data.columns]
    data.columns = range(data.shape[1])
    return header, labels, data, label_name, None


def _load_text(path: Path, id_column: str | None):
    name = str(path)
    try:
        with _open_text(path) as fh:
            first = fh.readline()
    except (UnicodeDecodeError, OSError, EOFError, gzip.BadGzipFile) as exc:
        raise ExpressionError(f"Cannot read the expression table {name} as text: {exc}") from None
    if not first.strip():
        raise ExpressionError(f"Expression table {name} is empty (no header line).")
    sep = _sniff(first)
    header = [h.strip() for h in next(csv.reader([first], delimiter=sep))]
    lower = [h.lower() for h in header]
    if id_column is not None:
        if id_column not in header and id_column.lower() not in lower:
            raise ExpressionError(
                f"{name}: no column {id_column!r} in the header (it starts: "
                f"{', '.join(header[:5])})."
            )
        j = header.index(id_column) if id_column in header else lower.index(id_column.lower())
    else:
        j = 0
    ncol_header = len(header)
    try:
        # numbers parse in pandas' C parser (fast); the label column stays text and only the
        # usual NA spellings count as missing values elsewhere (a gene may be called "NA").
        df = pd.read_csv(
            path,
            sep=sep,
            header=None,
            skiprows=1,
            keep_default_na=False,
            na_values={k: _NA_TOKENS for k in range(ncol_header + 1) if k != j},
            dtype={j: str},
            skip_blank_lines=False,
            encoding="utf-8-sig",
            engine="c",
        )
    except pd.errors.EmptyDataError:
        raise ExpressionError(f"Expression table {name} has a header but no data rows.") from None
    except pd.errors.ParserError as exc:
        msg = str(exc)
        m = re.search(r"Expected (\d+) fields in line (\d+), saw (\d+)", msg)
        if m:
            line = int(m.group(2))  # pandas counts file lines, header included
            raise ExpressionError(
                f"Expression table {name}, line {line}: {m.group(3)} fields where earlier rows "
                f"have {m.group(1)}. Every row needs the same number of cells."
            ) from None
        raise ExpressionError(f"Cannot parse the expression table {name}: {msg}") from None
    except UnicodeDecodeError as exc:
        raise ExpressionError(f"Expression table {name} is not UTF-8 text: {exc}") from None
    ncol = df.shape[1]
    if ncol_header == ncol - 1:
        # R's write.table: row names without a header cell; the label column is column 0
        header = ["", *header]
        lower = ["", *lower]
        j = 0 if id_column is None else j + 1
        df[j] = df[j].astype(str)
    elif ncol_header != ncol:
        raise ExpressionError(
            f"Expression table {name}: the header (line 1) has {ncol_header} fields but the rows "
            f"have {ncol}. Every row needs the same number of cells."
        )
    lines = np.arange(df.shape[0]) + 2
    others = [k for k in range(ncol) if k != j]
    blank = (df[others].isna().all(axis=1) & df[j].fillna("").str.strip().eq("")).to_numpy()
    if blank.any():  # empty lines
        df = df[~blank]
        lines = lines[~blank]
    if df.shape[0] == 0:
        raise ExpressionError(f"Expression table {name} has a header but no data rows.")
    label_name = header[j]
    labels = df.iloc[:, j].fillna("").astype(str).tolist()
    keep = [k for k in range(ncol) if k != j]
    # annotation columns (Entrez IDs, descriptions) that sit beside the gene-name column
    skipped = [header[k] for k in keep if lower[k] in _ANNOTATION_COLUMNS]
    keep = [k for k in keep if lower[k] not in _ANNOTATION_COLUMNS]
    data = df.iloc[:, keep].reset_index(drop=True)
    data.columns = range(len(keep))
    hdr = [header[k] for k in keep]
    data.attrs["lines"] = lines
    data.attrs["file_cols"] = keep
    data.attrs["skipped"] = skipped
    return hdr, labels, data, label_name, lines


def _detect(header: list[str], labels: list[str], label_name: str) -> tuple[str, str]:
    """Return (orientation, reason)."""
    col_gene, row_gene = _gene_score(header), _gene_score(labels)
    col_samp, row_samp = _sample_score(header), _sample_score(labels)
    hint = label_name.strip().lower()
    # positive: columns are genes (samples x genes)
    score = (col_gene - row_gene) + (row_samp - col_samp)

    def pct(x: float) -> str:
        return f"{100 * x:.0f}%"

    if score > 0.3:
        return "samples x genes", (
            f"column labels look like genes ({pct(col_gene)}), row labels like sample IDs "
            f"({pct(row_samp)})"
        )
    if score < -0.3:
        return "genes x samples", (
            f"row labels look like genes ({pct(row_gene)}), column labels like sample IDs "
            f"({pct(col_samp)})"
        )
    if hint in _GENE_HEADERS or "gene" in hint or "symbol" in hint or "ensembl" in hint:
        return "genes x samples", f"the label column is named {label_name!r}"
    if hint in _SAMPLE_HEADERS or _SAMPLE_HINT_RE.search(hint):
        return "samples x genes", f"the label column is named {label_name!r}"
    if len(header) >= len(labels):
        return "samples x genes", (
            f"labels were inconclusive; the table has more columns ({len(header)}) than rows "
            f"({len(labels)}) and expression tables have more genes than samples"
        )
    return "genes x samples", (
        f"labels were inconclusive; the table has more rows ({len(labels)}) than columns "
        f"({len(header)}) and expression tables have more genes than samples"
    )


def _build(path, header, labels, data: pd.DataFrame, label_name, orientation, nan_policy, lines):
    name = str(path)
    warnings: list[str] = []
    if data.attrs.get("skipped"):
        warnings.append(f"skipped annotation column(s): {', '.join(data.attrs['skipped'])}")
    if len(header) == 0:
        raise ExpressionError(f"Expression table {name} has only a label column and no values.")
    labels = [str(x).strip() for x in labels]
    if orientation is None:
        orientation, reason = _detect(header, labels, label_name)
    else:
        reason = "as requested"
    samples_are_rows = orientation == "samples x genes"
    file_cols = data.attrs.get("file_cols", list(range(1, len(header) + 1)))

    def where(i: int, j: int) -> str:
        """Describe cell (row i of data, column j of data) for the user."""
        row_txt = f"line {lines[i]}" if lines is not None else f"row {i + 1}"
        col_txt = f"column {_col_name(file_cols[j])}"
        sample, gene = (labels[i], header[j]) if samples_are_rows else (header[j], labels[i])
        return f"{row_txt}, {col_txt} (sample {sample}, gene {gene})"

    # ---- empty labels and duplicates
    row_kind, col_kind = ("sample ID", "gene") if samples_are_rows else ("gene", "sample ID")
    empty_rows = [i for i, s in enumerate(labels) if not s]
    if empty_rows:
        locs = ", ".join(
            (f"line {lines[i]}" if lines is not None else f"row {i + 1}")
            for i in empty_rows[:_MAX_LISTED]
        )
        raise ExpressionError(f"Expression table {name}: empty {row_kind} on {locs}.")
    empty_cols = [j for j, s in enumerate(header) if not s]
    if empty_cols:
        raise ExpressionError(
            f"Expression table {name}: empty {col_kind} name in the header, column(s) "
            f"{', '.join(_col_name(file_cols[j]) for j in empty_cols[:_MAX_LISTED])}."
        )
    _check_dups(
        name,
        labels,
        row_kind,
        lambda i: f"line {lines[i]}" if lines is not None else f"row {i + 1}",
    )
    _check_dups(name, header, col_kind, lambda j: f"column {_col_name(file_cols[j])}")

    # ---- numbers
    obj_cols = [c for c in data.columns if not pd.api.types.is_numeric_dtype(data[c])]
    bad_cells: list[tuple[int, int, str]] = []
    if obj_cols:
        # only columns the C parser could not read as numbers need a closer look
        conv = data[obj_cols].apply(
            lambda s: pd.to_numeric(s.astype("string").str.strip(), errors="coerce")
        )
        bad = conv.isna().to_numpy() & data[obj_cols].notna().to_numpy()
        for i, jj in np.argwhere(bad)[: _MAX_LISTED + 1]:
            bad_cells.append((int(i), int(obj_cols[jj]), str(data.iat[int(i), int(obj_cols[jj])])))
        if not bad_cells:
            data = data.copy()
            data[obj_cols] = conv
    if bad_cells:
        bad_cells.sort()
        n_bad = len(bad_cells)
        listed = "; ".join(f"{where(i, j)}: {v!r}" for i, j, v in bad_cells[:5])
        raise ExpressionError(
            f"Expression table {name} has non-numeric values: {listed}"
            + (" ..." if n_bad > 5 else "")
            + ". Every value must be a number (empty cells count as missing)."
        )
    arr = data.to_numpy(dtype=np.float64)
    inf_pos = np.argwhere(np.isinf(arr))
    if len(inf_pos):
        listed = "; ".join(where(int(i), int(j)) for i, j in inf_pos[:5])
        raise ExpressionError(
            f"Expression table {name} has {len(inf_pos)} infinite values: {listed}."
        )
    nan_mask = np.isnan(arr)
    if nan_mask.any():
        n_nan = int(nan_mask.sum())
        if nan_policy == "error":
            pos = np.argwhere(nan_mask)
            listed = "; ".join(where(int(i), int(j)) for i, j in pos[:5])
            raise ExpressionError(
                f"Expression table {name} has {n_nan} missing values: {listed}"
                + (" ..." if n_nan > 5 else "")
                + ". Fill them, or read with nan_policy='zero' (treat as 0) or 'drop-genes'."
            )
        if nan_policy == "zero":
            arr[nan_mask] = 0.0
            warnings.append(f"{n_nan} missing values were set to 0 (nan_policy='zero')")
        else:  # drop-genes: gene axis depends on orientation
            gene_has_nan = nan_mask.any(axis=0 if samples_are_rows else 1)
            dropped = [
                g
                for g, d in zip(header if samples_are_rows else labels, gene_has_nan, strict=True)
                if d
            ]
            if samples_are_rows:
                arr = arr[:, ~gene_has_nan]
                header = [h for h, d in zip(header, gene_has_nan, strict=True) if not d]
            else:
                arr = arr[~gene_has_nan]
                labels = [h for h, d in zip(labels, gene_has_nan, strict=True) if not d]
            warnings.append(
                f"{len(dropped)} genes with missing values were dropped: "
                f"{', '.join(dropped[:_MAX_LISTED])}"
                + (" ..." if len(dropped) > _MAX_LISTED else "")
            )
    if samples_are_rows:
        values, sample_ids, genes = arr, labels, header
    else:
        values, sample_ids, genes = arr.T, header, labels
    if len(genes) == 0 or len(sample_ids) == 0:
        raise ExpressionError(f"Expression table {name} has no values left to use.")
    big = np.abs(values).max() if values.size else 0.0
    if big > np.finfo(np.float32).max:
        raise ExpressionError(f"Expression table {name} has values beyond float32 range ({big:g}).")
    table = ExpressionTable(
        values=np.ascontiguousarray(values, dtype=np.float32),
        sample_ids=sample_ids,
        genes=genes,
        orientation=orientation,
        path=path,
        orientation_reason=reason,
        warnings=warnings,
    )
    if table.all_zero_genes:
        z = table.all_zero_genes
        table.warnings.append(
            f"{len(z)} genes are 0 in every sample and will not be selected: "
            f"{', '.join(z[:_MAX_LISTED])}" + (" ..." if len(z) > _MAX_LISTED else "")
        )
    return table


def _check_dups(name: str, labels: list[str], kind: str, loc) -> None:
    seen: dict[str, list[int]] = {}
    for i, s in enumerate(labels):
        seen.setdefault(s, []).append(i)
    dups = {s: idx for s, idx in seen.items() if len(idx) > 1}
    if dups:
        parts = [
            f"{s} ({', '.join(loc(i) for i in idx[:3])})"
            for s, idx in list(dups.items())[:_MAX_LISTED]
        ]
        more = f" and {len(dups) - _MAX_LISTED} more" if len(dups) > _MAX_LISTED else ""
        raise ExpressionError(
            f"Expression table {name} has duplicate {kind}s: {'; '.join(parts)}{more}. "
            f"Each {kind} must appear once (merge or remove the repeats)."
        )


def _is_finite_number(x: object) -> bool:  # pragma: no cover - tiny helper kept for clarity
    try:
        return math.isfinite(float(x))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False
