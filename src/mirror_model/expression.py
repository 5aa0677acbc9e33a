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
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from .errors import ExpressionError
from .ids import is_tcga_barcode, patient_key, tcga_sample_type

__all__ = [
    "NAN_POLICIES",
    "ORIENTATIONS",
    "ExpressionTable",
    "patient_key",
    "read_expression",
]

ORIENTATIONS = ("samples x genes", "genes x samples")
Orientation = Literal["samples x genes", "genes x samples"]
NanPolicy = Literal["error", "drop-genes", "median", "zero"]
NAN_POLICIES: tuple[str, ...] = ("error", "drop-genes", "median", "zero")

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


def _lookup(
    names: Sequence[str], exact: dict[str, int], loose: Callable[[str], int | None]
) -> tuple[list[int], list[str]]:
    """Index of each name: its exact match, else ``loose(name)``; ``-1`` where neither finds
    it. Also returns the names not found, in order (samples and genes alike)."""
    idx: list[int] = []
    missing: list[str] = []
    for name in names:
        i = exact[name] if name in exact else loose(name)
        if i is None:
            missing.append(name)
        idx.append(-1 if i is None else i)
    return idx, missing


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
    nan_policy
        How missing cells were read (see :func:`read_expression`); under ``"median"`` the
        missing cells are NaN in ``values``.
    """

    values: np.ndarray
    sample_ids: list[str]
    genes: list[str]
    orientation: str = "samples x genes"
    path: Path | None = None
    orientation_reason: str = ""
    all_zero_genes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    nan_policy: str = "error"

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
        ambiguous: list[str] = []

        def by_barcode(p: str) -> int | None:  # -1: several samples, listed in ``ambiguous``
            cand = by_key.get(patient_key(p), [])
            if len(cand) > 1:
                tumour = [i for i in cand if (tcga_sample_type(self.sample_ids[i]) or 99) < 10]
                if len(tumour) == 1:
                    cand = tumour
                elif on_ambiguous == "first":
                    cand = sorted(tumour or cand, key=lambda i: self.sample_ids[i])[:1]
                else:
                    ambiguous.append(f"{p} -> {', '.join(self.sample_ids[i] for i in cand)}")
                    return -1
            return cand[0] if cand else None

        rows, unmatched = _lookup(pids, exact, by_barcode)
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
        idx, missing = _lookup(genes, exact, lambda g: loose.get(_gene_key(g)))
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


# ---------------------------------------------------------------------- reading


def _open_text(path: Path) -> io.TextIOBase:
    if path.suffix.lower() == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8-sig", newline="")
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


@dataclass
class _Parsed:
    """A table as read, before orientation and checks: value columns only.

    ``values`` is float32 [rows, value columns] with NaN for missing cells; it is None when
    some cells are not numbers (``bad_cells`` then lists the first of them).
    """

    header: list[str]  # names of the value columns
    labels: list[str]  # one per row
    values: np.ndarray | None
    label_name: str
    lines: np.ndarray | None  # file line of each row (text files)
    file_cols: list[int]  # file column of each value column
    skipped: list[str] = field(default_factory=list)  # annotation columns left out
    bad_cells: list[tuple[int, int, str]] = field(default_factory=list)
    overflow: np.ndarray | None = None  # bool [rows, cols]: finite in the file, beyond float32
    # text files only: how to re-read a cell's text (error messages)
    sep: str = ","


def read_expression(
    path: str | os.PathLike[str],
    id_column: str | None = None,
    orientation: Orientation | None = None,
    nan_policy: NanPolicy = "error",
) -> ExpressionTable:
    """Read an expression table (CSV/TSV/parquet), detecting its orientation.

    Reading takes time and memory linear in the file: a 1,000 x 60,000 table (either
    orientation) is parsed by pandas' C parser as one stream of numbers, straight into float32
    (peak memory about twice the float32 matrix).

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
        What to do with empty / NA cells: ``"error"`` (default) names them; ``"zero"`` reads
        them as 0 (noted in ``warnings``; on a log scale 0 is an extreme value, also noted);
        ``"drop-genes"`` drops every gene with a missing value; ``"median"`` keeps them as NaN
        in ``values`` — training fills them with each gene's median over the *training*
        patients (stored with the model), prediction with the model's stored medians.

    Raises
    ------
    ExpressionError
        For a missing/empty/unreadable file, ragged rows, duplicate sample IDs or genes,
        non-numeric or infinite cells, negative values in a table of integer counts, and
        missing values under ``nan_policy="error"``; the message names the file and the
        row, column, sample and gene at fault.
    """
    path = Path(path)
    name = str(path)
    if orientation is not None and orientation not in ORIENTATIONS:
        raise ExpressionError(f"orientation must be one of {ORIENTATIONS}, not {orientation!r}.")
    if nan_policy not in NAN_POLICIES:
        raise ExpressionError(
            f"nan_policy must be one of {', '.join(repr(p) for p in NAN_POLICIES)}, "
            f"not {nan_policy!r}."
        )
    if not path.exists():
        raise ExpressionError(f"Expression table {name} does not exist.")
    if path.is_dir():
        raise ExpressionError(f"Expression table {name} is a folder; give the file inside it.")
    if path.stat().st_size == 0:
        raise ExpressionError(f"Expression table {name} is empty.")
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in (".parquet", ".pq"):
        parsed = _load_parquet(path, id_column)
    else:
        parsed = _load_text(path, id_column)
    return _build(path, parsed, orientation, nan_policy)


def _load_parquet(path: Path, id_column: str | None) -> _Parsed:
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
        text_cols = [c for c, dt in df.dtypes.items() if not pd.api.types.is_numeric_dtype(dt)]
        if not text_cols:
            raise ExpressionError(
                f"{path}: no column holds sample IDs or gene names (all columns are numeric "
                "and the index is a plain row number). Store the IDs as the index or a column."
            )
        label_name = str(text_cols[0])
        labels = df[text_cols[0]].astype(str).tolist()
        data = df.drop(columns=[text_cols[0]]).reset_index(drop=True)
    header = [str(c) for c in data.columns]
    file_cols = list(range(1, len(header) + 1))
    parsed = _Parsed(header, labels, None, label_name, None, file_cols)
    # dtypes once (per-column access of a 60k-column frame is what made reading quadratic)
    numeric = np.array([pd.api.types.is_numeric_dtype(dt) for dt in data.dtypes], dtype=bool)
    if not numeric.all():
        obj = np.flatnonzero(~numeric)
        block = data.iloc[:, obj]
        conv = block.apply(lambda s: pd.to_numeric(s.astype("string").str.strip(), errors="coerce"))
        bad = conv.isna().to_numpy() & block.notna().to_numpy()
        for i, jj in np.argwhere(bad)[: _MAX_LISTED + 1]:
            parsed.bad_cells.append((int(i), int(obj[jj]), str(block.iat[int(i), int(jj)])))
        if parsed.bad_cells:
            return parsed
        data = data.copy()
        data.iloc[:, obj] = conv.to_numpy()
    arr = data.to_numpy(dtype=np.float64)
    with np.errstate(over="ignore"):
        parsed.values = arr.astype(np.float32)
    parsed.overflow = np.isfinite(arr) & ~np.isfinite(parsed.values)
    return parsed


class _NumberStream:
    """File-like view of a delimited table's numeric cells, one cell per line.

    pandas' C parser reads a single column of numbers fast and in linear time; a table with
    60,000 columns, read as such, costs per-column overhead on every chunk. This stream feeds
    the parser the value cells of each row (label and annotation columns removed) as lines,
    and records each row's label and file line. A row with a different number of fields stops
    the stream (``error``) so the caller can name the line.
    """

    def __init__(self, fh: Any, sep: str, ncol: int, drop: Sequence[int], label_col: int,
                 first: tuple[int, str] | None, line_no: int, name: str) -> None:  # fmt: skip
        self.fh = fh
        self.sep = sep
        self.ncol = ncol
        self.drop = sorted(set(drop))
        self.label_col = label_col
        self.simple = self.drop == [0] and label_col == 0
        self.pending = first
        self.line_no = line_no
        self.name = name
        self.labels: list[str] = []
        self.lines: list[int] = []
        self.error: ExpressionError | None = None
        self._buf = ""

    def _row(self, line_no: int, line: str) -> str | None:
        line = line.rstrip("\r\n")
        if not line.strip(self.sep + " \t"):
            return None  # blank line
        sep = self.sep
        cells = None
        if '"' in line:  # quoted cells: let csv split this line
            cells = next(csv.reader([line], delimiter=sep))
            n = len(cells)
        else:
            n = line.count(sep) + 1
        if n != self.ncol:
            self.error = ExpressionError(
                f"Expression table {self.name}, line {line_no}: {n} fields where earlier rows "
                f"have {self.ncol}. Every row needs the same number of cells."
            )
            return None
        if cells is None and self.simple:
            label, rest = line.split(sep, 1)
            body = rest.replace(sep, "\n")
        else:
            cells = cells if cells is not None else line.split(sep)
            label = cells[self.label_col]
            drop = self.drop
            body = "\n".join(c for k, c in enumerate(cells) if k not in drop)
        self.labels.append(label)
        self.lines.append(line_no)
        return body + "\n"

    def read(self, n: int = -1) -> str:
        out = [self._buf] if self._buf else []
        size = len(self._buf)
        self._buf = ""
        while self.error is None and (n is None or n < 0 or size < n):
            if self.pending is not None:
                line_no, line = self.pending
                self.pending = None
            else:
                line = self.fh.readline()
                if not line:
                    break
                self.line_no += 1
                line_no = self.line_no
            piece = self._row(line_no, line)
            if piece:
                out.append(piece)
                size += len(piece)
        return "".join(out)


def _read_header(path: Path) -> tuple[str, list[str], int, tuple[int, str] | None]:
    """(separator, header cells, line number of the first data row, that row) of a text table."""
    name = str(path)
    try:
        with _open_text(path) as fh:
            first = fh.readline()
            line_no = 1
            row = None
            while True:
                line = fh.readline()
                if not line:
                    break
                line_no += 1
                if line.strip(",;\t \r\n"):
                    row = (line_no, line)
                    break
    except (UnicodeDecodeError, OSError, EOFError, gzip.BadGzipFile) as exc:
        raise ExpressionError(f"Cannot read the expression table {name} as text: {exc}") from None
    if not first.strip():
        raise ExpressionError(f"Expression table {name} is empty (no header line).")
    sep = _sniff(first)
    header = [h.strip() for h in next(csv.reader([first.rstrip("\r\n")], delimiter=sep))]
    return sep, header, line_no, row


def _load_text(path: Path, id_column: str | None) -> _Parsed:
    name = str(path)
    sep, header, first_line_no, first_row = _read_header(path)
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
    if first_row is None:
        raise ExpressionError(f"Expression table {name} has a header but no data rows.")
    cells = next(csv.reader([first_row[1].rstrip("\r\n")], delimiter=sep))
    ncol = len(cells)
    if len(header) == ncol - 1:
        # R's write.table: row names without a header cell; the label column is column 0
        header = ["", *header]
        lower = ["", *lower]
        j = 0 if id_column is None else j + 1
    elif len(header) != ncol:
        raise ExpressionError(
            f"Expression table {name}: the header (line 1) has {len(header)} fields but the rows "
            f"have {ncol}. Every row needs the same number of cells."
        )
    # annotation columns (Entrez IDs, descriptions) that sit beside the gene-name column
    skipped = [header[k] for k in range(ncol) if k != j and lower[k] in _ANNOTATION_COLUMNS]
    keep = [k for k in range(ncol) if k != j and lower[k] not in _ANNOTATION_COLUMNS]
    if not keep:
        raise ExpressionError(f"Expression table {name} has only a label column and no values.")
    kept = set(keep)
    drop = [k for k in range(ncol) if k not in kept]
    n_kept = len(keep)
    try:
        with _open_text(path) as fh:
            fh.readline()
            # skip to the first data row (already read for the field count)
            for _ in range(first_line_no - 1):
                fh.readline()
            stream = _NumberStream(fh, sep, ncol, drop, j, first_row, first_line_no, name)
            flat = _parse_numbers(stream)
    except UnicodeDecodeError as exc:
        raise ExpressionError(f"Expression table {name} is not UTF-8 text: {exc}") from None
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise ExpressionError(f"Cannot read the expression table {name}: {exc}") from None
    if stream.error is not None:
        raise stream.error
    parsed = _Parsed(
        header=[header[k] for k in keep],
        labels=stream.labels,
        values=None,
        label_name=header[j],
        lines=np.asarray(stream.lines, dtype=np.int64),
        file_cols=keep,
        skipped=skipped,
        sep=sep,
    )
    if not stream.labels:
        raise ExpressionError(f"Expression table {name} has a header but no data rows.")
    if flat is None:  # some cell is not a number: find the first ones (slow path, errors only)
        parsed.bad_cells = _find_bad_cells(path, parsed, drop, j)
        if not parsed.bad_cells:  # pragma: no cover - the parser and float() disagree
            raise ExpressionError(f"Cannot parse the expression table {name}.")
        return parsed
    if flat.size != len(stream.labels) * n_kept:  # pragma: no cover - e.g. newlines in quotes
        raise ExpressionError(
            f"Cannot parse the expression table {name}: found {flat.size} values for "
            f"{len(stream.labels)} rows x {n_kept} columns (a quoted cell with a line break?)."
        )
    parsed.values = flat.reshape(len(stream.labels), n_kept)
    inf = np.isinf(parsed.values)
    if inf.any():  # was it "inf" in the file, or a finite number beyond float32?
        parsed.overflow = np.zeros(parsed.values.shape, dtype=bool)
        pos = np.argwhere(inf)[:1000]
        wanted = {int(i) for i, _ in pos}
        for i, cells in _iter_rows(path, parsed):  # one pass over the file
            if i not in wanted:
                continue
            for k in pos[pos[:, 0] == i, 1]:
                try:
                    parsed.overflow[i, k] = math.isfinite(float(cells[parsed.file_cols[k]]))
                except ValueError:
                    pass
    return parsed


def _parse_numbers(stream: _NumberStream) -> np.ndarray | None:
    """All value cells as one float32 vector (NaN for NA tokens); None if a cell is not a number."""
    chunks: list[np.ndarray] = []
    try:
        # float32 overflow ("1e39") is detected afterwards and named; no RuntimeWarning here
        with warnings.catch_warnings(), np.errstate(over="ignore"):
            warnings.simplefilter("ignore", RuntimeWarning)
            chunks = _read_number_chunks(stream)
    except pd.errors.EmptyDataError:
        return np.zeros(0, np.float32)
    except (ValueError, pd.errors.ParserError):
        if stream.error is not None:
            return np.zeros(0, np.float32)
        return None
    if not chunks:
        return np.zeros(0, np.float32)
    return chunks[0] if len(chunks) == 1 else np.concatenate(chunks)


def _read_number_chunks(stream: _NumberStream) -> list[np.ndarray]:
    chunks: list[np.ndarray] = []
    reader = pd.read_csv(
        stream,
        header=None,
        names=["v"],
        dtype={"v": np.float32},
        keep_default_na=False,
        na_values=_NA_TOKENS,
        skip_blank_lines=False,
        engine="c",
        chunksize=1 << 22,
    )
    for chunk in reader:
        chunks.append(chunk["v"].to_numpy(dtype=np.float32))
    return chunks


def _row_cells(line: str, sep: str) -> list[str]:
    line = line.rstrip("\r\n")
    if '"' in line:
        return next(csv.reader([line], delimiter=sep))
    return line.split(sep)


def _iter_rows(path: Path, parsed: _Parsed) -> Iterator[tuple[int, list[str]]]:
    """(row index, cells) of the data rows, in file order."""
    wanted = {int(ln): i for i, ln in enumerate(parsed.lines)}
    with _open_text(path) as fh:
        for line_no, line in enumerate(fh, start=1):
            i = wanted.get(line_no)
            if i is not None:
                yield i, _row_cells(line, parsed.sep)


def _find_bad_cells(
    path: Path, parsed: _Parsed, drop: Sequence[int], j: int
) -> list[tuple[int, int, str]]:
    """The first non-numeric cells (row, value column, text), in file order; stops after 11."""
    na = set(_NA_TOKENS)
    bad: list[tuple[int, int, str]] = []
    for i, cells in _iter_rows(path, parsed):
        for k, col in enumerate(parsed.file_cols):
            text = cells[col].strip()
            if text in na:
                continue
            try:
                float(text)
            except ValueError:
                bad.append((i, k, cells[col]))
                if len(bad) > _MAX_LISTED:
                    return bad
    return bad


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


def _build(path: Path, parsed: _Parsed, orientation, nan_policy) -> ExpressionTable:
    name = str(path)
    header, labels, lines, file_cols = parsed.header, parsed.labels, parsed.lines, parsed.file_cols
    notes: list[str] = []
    if parsed.skipped:
        notes.append(f"skipped annotation column(s): {', '.join(parsed.skipped)}")
    if len(header) == 0:
        raise ExpressionError(f"Expression table {name} has only a label column and no values.")
    labels = [str(x).strip() for x in labels]
    if orientation is None:
        orientation, reason = _detect(header, labels, parsed.label_name)
    else:
        reason = "as requested"
    samples_are_rows = orientation == "samples x genes"

    def row_txt(i: int) -> str:
        return f"line {lines[i]}" if lines is not None else f"row {i + 1}"

    def where(i: int, j: int) -> str:
        """Describe cell (row i of data, column j of data) for the user."""
        sample, gene = (labels[i], header[j]) if samples_are_rows else (header[j], labels[i])
        return f"{row_txt(i)}, column {_col_name(file_cols[j])} (sample {sample}, gene {gene})"

    # ---- empty labels and duplicates
    row_kind, col_kind = ("sample ID", "gene") if samples_are_rows else ("gene", "sample ID")
    empty_rows = [i for i, s in enumerate(labels) if not s]
    if empty_rows:
        locs = ", ".join(row_txt(i) for i in empty_rows[:_MAX_LISTED])
        raise ExpressionError(f"Expression table {name}: empty {row_kind} on {locs}.")
    empty_cols = [j for j, s in enumerate(header) if not s]
    if empty_cols:
        raise ExpressionError(
            f"Expression table {name}: empty {col_kind} name in the header, column(s) "
            f"{', '.join(_col_name(file_cols[j]) for j in empty_cols[:_MAX_LISTED])}."
        )
    _check_dups(name, labels, row_kind, row_txt)
    _check_dups(name, header, col_kind, lambda j: f"column {_col_name(file_cols[j])}")

    # ---- numbers
    if parsed.bad_cells or parsed.values is None:
        bad_cells = sorted(parsed.bad_cells)
        listed = "; ".join(f"{where(i, j)}: {v!r}" for i, j, v in bad_cells[:5])
        raise ExpressionError(
            f"Expression table {name} has non-numeric values: {listed}"
            + (" ..." if len(bad_cells) > 5 else "")
            + ". Every value must be a number (empty cells count as missing)."
        )
    arr = parsed.values
    inf = np.isinf(arr)
    if inf.any():
        over = parsed.overflow if parsed.overflow is not None else np.zeros_like(inf)
        true_inf = inf & ~over
        if true_inf.any():
            pos = np.argwhere(true_inf)
            listed = "; ".join(where(int(i), int(j)) for i, j in pos[:5])
            raise ExpressionError(
                f"Expression table {name} has {len(pos)} infinite values: {listed}."
            )
        pos = np.argwhere(over)
        raise ExpressionError(
            f"Expression table {name} has values beyond float32 range (about 3.4e38): "
            + "; ".join(where(int(i), int(j)) for i, j in pos[:5])
            + "."
        )
    nan_mask = np.isnan(arr)
    n_nan = int(nan_mask.sum())
    if n_nan:
        if nan_policy == "error":
            pos = np.argwhere(nan_mask)
            listed = "; ".join(where(int(i), int(j)) for i, j in pos[:5])
            raise ExpressionError(
                f"Expression table {name} has {n_nan} missing values: {listed}"
                + (" ..." if n_nan > 5 else "")
                + ". Fill them, or choose a missing-value policy: --nan-policy median (each "
                "gene's median over the training patients), drop-genes or zero."
            )
        gene_has_nan = nan_mask.any(axis=0 if samples_are_rows else 1)
        if nan_policy == "zero":
            arr[nan_mask] = 0.0
            notes.append(f"{n_nan} missing values were set to 0 (nan_policy='zero')")
            finite = arr[~nan_mask]
            pos_vals = finite[finite > 0]
            lo = float(pos_vals.min()) if pos_vals.size else 0.0
            integer = bool(np.all(finite == np.round(finite)))
            if finite.size and not integer and float(finite.min()) >= 0 and lo > 0.1:
                notes.append(
                    f"the table looks log-scaled (smallest non-zero value {lo:.3g}): a missing "
                    "value read as 0 is an extreme value there; --nan-policy median is safer"
                )
        elif nan_policy == "median":
            notes.append(
                f"{n_nan} missing values in {int(gene_has_nan.sum())} genes are kept as missing "
                "and filled with each gene's median over the training patients "
                "(nan_policy='median')"
            )
        else:  # drop-genes: gene axis depends on orientation
            gene_names = header if samples_are_rows else labels
            dropped = [g for g, d in zip(gene_names, gene_has_nan, strict=True) if d]
            if samples_are_rows:
                arr = arr[:, ~gene_has_nan]
                header = [h for h, d in zip(header, gene_has_nan, strict=True) if not d]
            else:
                arr = arr[~gene_has_nan]
                labels = [h for h, d in zip(labels, gene_has_nan, strict=True) if not d]
            notes.append(
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
    _check_counts_not_negative(name, values, sample_ids, genes)
    table = ExpressionTable(
        values=np.ascontiguousarray(values, dtype=np.float32),
        sample_ids=sample_ids,
        genes=genes,
        orientation=orientation,
        path=path,
        orientation_reason=reason,
        warnings=notes,
        nan_policy=nan_policy,
    )
    if table.all_zero_genes:
        z = table.all_zero_genes
        table.warnings.append(
            f"{len(z)} genes are 0 in every sample and will not be selected: "
            f"{', '.join(z[:_MAX_LISTED])}" + (" ..." if len(z) > _MAX_LISTED else "")
        )
    return table


def _check_counts_not_negative(
    name: str, values: np.ndarray, sample_ids: list[str], genes: list[str]
) -> None:
    """A table of integer counts with a few negative entries is corrupt, not log-scaled:
    refuse it (a negative value would otherwise switch the model's log1p off)."""
    neg = values < 0
    if not neg.any():
        return
    finite = values[np.isfinite(values)]
    if finite.size == 0 or float(finite.max()) <= 50 or not np.all(finite == np.round(finite)):
        return  # a log / centred scale: negatives are fine
    pos = np.argwhere(neg)
    listed = "; ".join(
        f"sample {sample_ids[i]}, gene {genes[j]}: {values[i, j]:g}" for i, j in pos[:5]
    )
    raise ExpressionError(
        f"Expression table {name} holds integer counts (values up to {float(finite.max()):g}) "
        f"but {len(pos)} negative value(s): {listed}"
        + (" ..." if len(pos) > 5 else "")
        + ". Counts cannot be negative; fix or remove these cells."
    )


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
