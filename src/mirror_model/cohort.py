"""The cohort table: one row per slide, patients with optional subtype and survival.

File format (design §2): a CSV (comma; tab- or semicolon-separated files are detected too)
with a header row and the columns

=============  ========  =====================================================================
column         required  meaning
=============  ========  =====================================================================
patient_id     yes       patient identifier (TCGA barcodes are fine; several slides may share one)
slide_id       no        unique slide identifier; feature files are named ``<slide_id>.h5``
                         (default: the slide file's name without extension)
slide_path     no        path of the slide file, relative to the table's folder or absolute
                         (a local file: URLs are refused)
subtype        no        class label (text); empty = unlabelled patient
time           no        follow-up time (any unit, e.g. months), >= 0; needs ``event``
event          no        1 = death observed at ``time``, 0 = censored at ``time``
=============  ========  =====================================================================

A table without ``slide_id`` and ``slide_path`` is an **expression-only cohort**: one row per
patient (RNA-side pretraining, evaluation and export work on it; see ``Cohort.has_slides``).
With slides, every row needs a slide, each slide file is listed once and each ``slide_id`` is
unique. Other columns are kept as they are. Column names are matched case-insensitively and
surrounding blanks are ignored. Errors name the file and the line number as a spreadsheet
shows it (the header is line 1, the first patient row is line 2).
"""

from __future__ import annotations

import csv
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from .errors import CohortError

__all__ = ["OPTIONAL_COLUMNS", "REQUIRED_COLUMNS", "SLIDE_COLUMNS", "Cohort", "read_cohort"]

REQUIRED_COLUMNS = ("patient_id",)
SLIDE_COLUMNS = ("slide_id", "slide_path")
OPTIONAL_COLUMNS = ("subtype", "time", "event")
_URL_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_MAX_LISTED = 10


@dataclass
class Cohort:
    """A validated cohort table.

    Attributes
    ----------
    table
        One row per slide: ``patient_id``, ``slide_id``, ``slide_path`` (absolute path, str;
        absent in an expression-only cohort, which has one row per patient),
        ``line`` (1-based line of the row in the file) and, when present, ``subtype`` (str or
        None), ``time`` (float, NaN when unknown) and ``event`` (int 0/1; float with NaN when
        some patients have no survival data), plus any extra columns of the file.
    path
        The CSV file it was read from (None when built in memory).
    """

    table: pd.DataFrame
    path: Path | None = None
    warnings: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.table)

    @property
    def has_slides(self) -> bool:
        """False for an expression-only cohort (no ``slide_id`` column)."""
        return "slide_id" in self.table

    @property
    def slide_ids(self) -> list[str]:
        """Slide IDs in file order (empty for an expression-only cohort)."""
        return self.table["slide_id"].tolist() if self.has_slides else []

    @property
    def patient_ids(self) -> list[str]:
        """Unique patient IDs in order of first appearance."""
        return list(dict.fromkeys(self.table["patient_id"].tolist()))

    @property
    def has_subtype(self) -> bool:
        """True when a ``subtype`` column exists and at least one patient is labelled."""
        return "subtype" in self.table and bool(self.table["subtype"].notna().any())

    @property
    def has_survival(self) -> bool:
        """True when ``time``/``event`` exist and at least one patient has both."""
        return "time" in self.table and bool(self.table["time"].notna().any())

    @property
    def subtypes(self) -> list[str]:
        """Sorted distinct subtype labels (empty when there is no label)."""
        if "subtype" not in self.table:
            return []
        return sorted(self.table["subtype"].dropna().unique().tolist())

    def patients(self) -> pd.DataFrame:
        """One row per patient, in order of first appearance.

        Columns: ``patient_id``, ``n_slides``, ``slide_ids`` (list; empty without slides), and
        ``subtype``, ``time``, ``event`` when the table has them (a patient's slides agree on
        these; checked on read).
        """
        t = self.table
        grouped = t.groupby("patient_id", sort=False)
        n = len(grouped.groups)
        out = pd.DataFrame(
            {
                "patient_id": list(grouped.groups.keys()),
                "n_slides": grouped.size().to_numpy() if self.has_slides else np.zeros(n, int),
                "slide_ids": [list(v) for v in grouped["slide_id"].agg(list)]
                if self.has_slides
                else [[] for _ in range(n)],
            }
        )
        for col in OPTIONAL_COLUMNS:
            if col in t:
                out[col] = (
                    grouped[col].first().to_numpy()
                    if col != "subtype"
                    else [_first_not_none(v) for v in grouped[col].agg(list)]
                )
        if "event" in out and out["event"].notna().all():
            out["event"] = out["event"].astype(np.int64)
        return out.reset_index(drop=True)

    def slides_for(self, patient_id: str) -> list[str]:
        """Slide IDs of one patient (file order); CohortError if the patient is unknown."""
        rows = self.table.loc[self.table["patient_id"] == patient_id]
        if rows.empty:
            raise CohortError(f"{self._name()}: no patient {patient_id!r} in the cohort.")
        return rows["slide_id"].tolist() if self.has_slides else []

    def missing_files(self) -> list[str]:
        """Slide paths that do not exist on disk (file order)."""
        if "slide_path" not in self.table:
            return []
        return [p for p in self.table["slide_path"] if not os.path.exists(p)]

    def _name(self) -> str:
        return str(self.path) if self.path is not None else "cohort table"


def _first_not_none(values: list) -> object:
    for v in values:
        if v is not None and not (isinstance(v, float) and math.isnan(v)):
            return v
    return None


def _sniff_delimiter(first_line: str) -> str:
    counts = {d: first_line.count(d) for d in (",", "\t", ";")}
    best = max(counts, key=counts.get)
    return best if counts[best] > 0 else ","


def _parse_time(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value


def _parse_event(text: str) -> int | None:
    t = text.strip().lower()
    if t in ("1", "1.0", "true", "dead", "deceased"):
        return 1
    if t in ("0", "0.0", "false", "alive", "living", "censored"):
        return 0
    return None


def _fmt_lines(lines: list[int]) -> str:
    shown = ", ".join(str(x) for x in lines[:_MAX_LISTED])
    more = f" and {len(lines) - _MAX_LISTED} more" if len(lines) > _MAX_LISTED else ""
    return shown + more


def read_cohort(path: str | os.PathLike[str], check_files: bool = False) -> Cohort:
    """Read and validate a cohort CSV.

    Parameters
    ----------
    path
        The CSV file. Relative ``slide_path`` values are resolved against its folder.
    check_files
        Also check that every slide file exists; all missing files are listed in the error
        (nothing to check in an expression-only cohort).

    Returns
    -------
    Cohort

    Raises
    ------
    CohortError
        Naming the file and the line(s) at fault: missing file or columns, empty IDs,
        duplicate ``slide_id``, one slide file on several rows, a URL as ``slide_path``, a
        patient on several rows of an expression-only cohort, bad ``time``/``event``,
        survival given only in part, inconsistent subtype/survival between slides of one
        patient, missing slide files.
    """
    path = Path(path)
    name = str(path)
    if not path.exists():
        raise CohortError(f"Cohort table {name} does not exist.")
    if path.is_dir():
        raise CohortError(f"Cohort table {name} is a folder; give the CSV file inside it.")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise CohortError(
            f"Cohort table {name} is not UTF-8 text ({exc}); save it as CSV (UTF-8)."
        ) from None
    if not text.strip():
        raise CohortError(
            f"Cohort table {name} is empty; it needs a header row with "
            f"{', '.join(REQUIRED_COLUMNS)} and one row per slide."
        )

    first_line = text.splitlines()[0]
    reader = csv.reader(text.splitlines(keepends=True), delimiter=_sniff_delimiter(first_line))
    rows: list[tuple[int, list[str]]] = []
    header: list[str] | None = None
    try:
        for cells in reader:
            if header is None:
                header = [c.strip() for c in cells]
                continue
            if not any(c.strip() for c in cells):
                continue  # blank line
            rows.append((reader.line_num, [c.strip() for c in cells]))
    except csv.Error as exc:
        raise CohortError(f"Cohort table {name}, line {reader.line_num}: {exc}") from None
    assert header is not None

    lower = [h.lower() for h in header]
    missing = [c for c in REQUIRED_COLUMNS if c not in lower]
    if missing:
        raise CohortError(
            f"Cohort table {name} lacks the column(s) {', '.join(missing)} (found: "
            f"{', '.join(repr(h) for h in header)}). The header needs "
            f"{', '.join(REQUIRED_COLUMNS)} and optionally "
            f"{', '.join(SLIDE_COLUMNS + OPTIONAL_COLUMNS)}."
        )
    has_sid, has_spath = "slide_id" in lower, "slide_path" in lower
    row_cols = REQUIRED_COLUMNS + tuple(c for c in SLIDE_COLUMNS if c in lower)
    dup_cols = sorted({h for h in lower if h and lower.count(h) > 1})
    if dup_cols:
        raise CohortError(
            f"Cohort table {name}: column(s) {', '.join(dup_cols)} appear twice "
            "in the header; keep one of each."
        )
    if not rows:
        raise CohortError(f"Cohort table {name} has a header but no slide rows.")
    has_time, has_event = "time" in lower, "event" in lower
    if has_time != has_event:
        given, absent = ("time", "event") if has_time else ("event", "time")
        raise CohortError(
            f"Cohort table {name} has a '{given}' column but no '{absent}' column; survival "
            "needs both (time = follow-up, event = 1 if death observed, 0 if censored)."
        )

    col = {h: i for i, h in enumerate(lower)}
    problems: list[str] = []
    records: dict[str, list] = {h: [] for h in lower if h}
    lines: list[int] = []
    for line, cells in rows:
        if len(cells) != len(header):
            problems.append(f"line {line}: {len(cells)} fields but the header has {len(header)}")
            continue
        rec = {h: cells[i] for h, i in col.items() if h}
        for c in row_cols:
            if not rec[c]:
                problems.append(f"line {line}: empty {c}")
        if has_spath and _URL_RE.match(rec["slide_path"]):
            problems.append(
                f"line {line}: slide_path {rec['slide_path']!r} is a URL; napari-mirror reads "
                "local files only — download the slide and give its path"
            )
        if "subtype" in rec:
            rec["subtype"] = rec["subtype"] or None
        if has_time:
            t_text, e_text = rec["time"], rec["event"]
            t_val = _parse_time(t_text) if t_text else None
            e_val = _parse_event(e_text) if e_text else None
            if t_text and t_val is None:
                problems.append(f"line {line}: time {t_text!r} is not a number")
            elif t_val is not None and not math.isfinite(t_val):
                problems.append(f"line {line}: time {t_text!r} is not finite")
            elif t_val is not None and t_val < 0:
                problems.append(f"line {line}: time {t_text} is negative")
            if e_text and e_val is None:
                problems.append(
                    f"line {line}: event {e_text!r} must be 1 (death observed) or 0 (censored)"
                )
            if bool(t_text) != bool(e_text):
                problems.append(
                    f"line {line}: "
                    + ("time without event" if t_text else "event without time")
                    + " (give both or leave both empty)"
                )
            rec["time"] = t_val if t_val is not None else math.nan
            rec["event"] = e_val if e_val is not None else math.nan
        for h in records:
            records[h].append(rec[h])
        lines.append(line)

    if problems:
        shown = "; ".join(problems[:_MAX_LISTED])
        more = f"; and {len(problems) - _MAX_LISTED} more" if len(problems) > _MAX_LISTED else ""
        raise CohortError(f"Cohort table {name}: {shown}{more}.")

    table = pd.DataFrame(records)
    table.insert(len(table.columns), "line", lines)
    base = path.resolve().parent
    if has_spath:
        table["slide_path"] = [
            os.path.abspath(p if os.path.isabs(p) else base / p)
            for p in (os.path.expanduser(s) for s in table["slide_path"])
        ]
        if not has_sid:  # feature files are named after the slide file
            table.insert(1, "slide_id", [_slide_stem(p) for p in table["slide_path"]])

    if not has_spath and not has_sid:
        # expression-only cohort: one row per patient
        dup = table["patient_id"].duplicated(keep=False)
        if dup.any():
            parts = [
                f"{pid!r} on lines {_fmt_lines(grp['line'].tolist())}"
                for pid, grp in table[dup].groupby("patient_id", sort=False)
            ]
            raise CohortError(
                f"Cohort table {name} has no slide columns (an expression-only cohort: one row "
                f"per patient) but lists patient(s) {'; '.join(parts[:_MAX_LISTED])} more than "
                "once. Keep one row per patient, or add slide_id/slide_path columns."
            )
    dup = table["slide_id"].duplicated(keep=False) if has_sid or has_spath else None
    if dup is not None and dup.any():
        parts = []
        for sid, grp in table[dup].groupby("slide_id", sort=False):
            parts.append(f"{sid!r} on lines {_fmt_lines(grp['line'].tolist())}")
        raise CohortError(
            f"Cohort table {name}: duplicate slide_id {'; '.join(parts[:_MAX_LISTED])}. "
            "Each slide needs its own row and a unique slide_id."
        )

    # one patient, several slides: labels must agree
    for c in [c for c in OPTIONAL_COLUMNS if c in table]:
        for pid, grp in table.groupby("patient_id", sort=False):
            vals = {_key(v) for v in grp[c]}
            if len(vals) > 1:
                raise CohortError(
                    f"Cohort table {name}: patient {pid!r} has different {c} values on lines "
                    f"{_fmt_lines(grp['line'].tolist())} ({', '.join(sorted(map(str, vals)))}); "
                    "a patient's slides must agree on subtype, time and event."
                )

    if has_spath:
        # one slide file on several rows: thousands of identical feature files otherwise
        dup_path = table["slide_path"].duplicated(keep=False)
        if dup_path.any():
            parts = []
            for sp, grp in table[dup_path].groupby("slide_path", sort=False):
                parts.append(
                    f"{sp} on {len(grp)} rows (lines {_fmt_lines(grp['line'].tolist())})"
                )
            raise CohortError(
                f"Cohort table {name}: the same slide file is listed on several rows: "
                f"{'; '.join(parts[:_MAX_LISTED])}. Each slide file needs exactly one row; "
                "a patient with several slides has one row per slide file."
            )
    if has_time:
        table["time"] = table["time"].astype(np.float64)
        ev = table["event"].astype(np.float64)
        table["event"] = ev.astype(np.int64) if ev.notna().all() else ev

    cohort = Cohort(table=table, path=path)
    if check_files and has_spath:
        missing_rows = table[[not os.path.exists(p) for p in table["slide_path"]]]
        if len(missing_rows):
            listed = "; ".join(
                f"line {ln}: {p}"
                for ln, p in zip(missing_rows["line"], missing_rows["slide_path"], strict=True)
            )
            raise CohortError(
                f"Cohort table {name}: {len(missing_rows)} of {len(table)} slide files do not "
                f"exist: {listed}. Paths are relative to {base}."
            )
    if "subtype" in table:
        n_unlab = int(table["subtype"].isna().sum())
        if 0 < n_unlab:
            cohort.warnings.append(f"{n_unlab} slide row(s) have no subtype (unlabelled).")
    return cohort


def _slide_stem(path: str) -> str:
    """File name without its (double) extension: ``a/b/S1.ome.tiff`` -> ``S1``."""
    name = os.path.basename(path)
    for ext in (".ome.tiff", ".ome.tif"):
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return os.path.splitext(name)[0]


def _key(v: object) -> object:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "(empty)"
    return v
