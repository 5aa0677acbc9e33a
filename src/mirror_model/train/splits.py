"""Patient-level cross-validation splits with an honest inner validation set.

For every outer fold ``k`` the patients of fold ``k`` are the **test** patients: pretraining never
reads their data. The remaining patients are split again (stratified, seeded) into inner
**train** and inner **val**; gene selection and normalisation are fitted on inner-train and the
best epoch is chosen by the inner-val loss. Splits are made over *patients*, so a patient with
several slides always sits on exactly one side.

With ``n_folds == 1`` ("no CV", for deployment) there is a single fold whose test set is empty.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .._io import atomic_write_text
from ..errors import CohortError, ConfigError

__all__ = ["FoldSplit", "Splits", "make_splits", "patient_subtypes"]

_NO_LABEL = "<no subtype>"


@dataclass(frozen=True)
class FoldSplit:
    """One outer fold: disjoint lists of patient ids (sorted)."""

    fold: int
    train: list[str]
    val: list[str]
    test: list[str]

    def to_dict(self) -> dict[str, Any]:
        return {
            "fold": self.fold,
            "train": list(self.train),
            "val": list(self.val),
            "test": list(self.test),
        }


@dataclass(frozen=True)
class Splits:
    """All folds plus how they were made (the ``splits.json`` document)."""

    folds: list[FoldSplit]
    seed: int
    stratified_by: str | None
    inner_val_fraction: float = 0.15
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def n_folds(self) -> int:
        return len(self.folds)

    def fold(self, k: int) -> FoldSplit:
        for f in self.folds:
            if f.fold == k:
                return f
        raise ConfigError(f"fold {k} does not exist; folds are {[f.fold for f in self.folds]}.")

    def to_dict(self) -> dict[str, Any]:
        return {
            "folds": [f.to_dict() for f in self.folds],
            "seed": self.seed,
            "stratified_by": self.stratified_by,
            "inner_val_fraction": self.inner_val_fraction,
            **({"extra": self.extra} if self.extra else {}),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Splits:
        try:
            folds = [
                FoldSplit(
                    int(f["fold"]),
                    [str(p) for p in f["train"]],
                    [str(p) for p in f["val"]],
                    [str(p) for p in f.get("test", [])],
                )
                for f in d["folds"]
            ]
            return cls(
                folds,
                int(d["seed"]),
                d.get("stratified_by"),
                float(d.get("inner_val_fraction", 0.15)),
                dict(d.get("extra", {})),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(
                f"malformed splits document ({exc!r}); expected keys folds/seed."
            ) from None

    def save(self, path: str | os.PathLike[str]) -> None:
        atomic_write_text(path, json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Splits:
        p = Path(path)
        try:
            return cls.from_dict(json.loads(p.read_text()))
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"cannot read splits file {p}: {exc}") from None


def patient_subtypes(table: Any) -> dict[str, str | None]:
    """Map patient id -> subtype (the most frequent non-missing label of its slides, or None).

    ``table`` is a cohort DataFrame with ``patient_id`` and optionally ``subtype``.
    """
    out: dict[str, str | None] = {}
    has = "subtype" in table.columns
    for pid, grp in table.groupby("patient_id", sort=True):
        label = None
        if has:
            vals = grp["subtype"].dropna().astype(str)
            vals = vals[vals.str.strip() != ""]
            if len(vals):
                label = vals.value_counts().sort_index().idxmax()
        out[str(pid)] = label
    return out


def _rng_order(items: Sequence[str], rng: np.random.Generator) -> list[str]:
    items = sorted(items)
    return [items[i] for i in rng.permutation(len(items))]


def _strata(
    patients: Sequence[str], labels: Mapping[str, str | None] | None
) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {}
    for p in patients:
        lab = None if labels is None else labels.get(p)
        groups.setdefault(_NO_LABEL if lab is None else str(lab), []).append(p)
    return dict(sorted(groups.items()))


def _holdout(
    patients: list[str],
    labels: Mapping[str, str | None] | None,
    fraction: float,
    rng: np.random.Generator,
) -> tuple[list[str], list[str]]:
    """Stratified hold-out: about ``fraction`` of ``patients`` (at least 1, leaving at least 1)."""
    n = len(patients)
    n_val = int(min(n - 1, max(1, round(fraction * n))))
    groups = _strata(patients, labels)
    # largest-remainder allocation of n_val over the strata, proportional to their size
    quotas = {g: n_val * len(m) / n for g, m in groups.items()}
    alloc = {g: int(np.floor(q)) for g, q in quotas.items()}
    rest = n_val - sum(alloc.values())
    order = sorted(groups, key=lambda g: (-(quotas[g] - alloc[g]), g))
    for g in order[:rest]:
        alloc[g] += 1
    val: list[str] = []
    for g, members in groups.items():
        val.extend(_rng_order(members, rng)[: alloc[g]])
    train = sorted(set(patients) - set(val))
    return train, sorted(val)


def make_splits(
    patient_ids: Sequence[str],
    subtypes: Mapping[str, str | None] | None = None,
    n_folds: int = 5,
    inner_val_fraction: float = 0.15,
    seed: int = 42,
) -> Splits:
    """Patient-level outer folds, each with a stratified inner train/val split.

    Parameters
    ----------
    patient_ids : sequence of str
        Patients (duplicates are collapsed: splitting is per patient, never per slide).
    subtypes : mapping patient -> label or None, optional
        Stratify by this label when given and at least one patient has one. Patients without a
        label form their own stratum.
    n_folds : int
        Outer folds (``1`` = no CV: all patients in train/val, empty test).
    inner_val_fraction : float
        Share of each fold's non-test patients held out as inner validation (at least 1).
    seed : int
        Seeds every shuffle; the same inputs and seed give the same splits.

    Returns
    -------
    Splits
        ``folds[k].test`` are disjoint and cover all patients (when ``n_folds > 1``);
        ``train``, ``val`` and ``test`` of a fold are disjoint.

    Raises
    ------
    CohortError
        Fewer patients than folds, or too few to hold out a validation patient.
    """
    patients = sorted({str(p) for p in patient_ids})
    if n_folds < 1:
        raise ConfigError(f"folds must be >= 1, got {n_folds}.")
    if n_folds > 1 and len(patients) < n_folds:
        raise CohortError(
            f"the cohort has {len(patients)} patient(s) but {n_folds} folds were requested; "
            "use fewer folds (--folds) or more patients."
        )
    need = 3 if n_folds == 1 else n_folds + 2
    if len(patients) < need:
        raise CohortError(
            f"the cohort has {len(patients)} patient(s); with {n_folds} fold(s) at least {need} are "
            "needed so that every fold keeps >= 1 inner-training and >= 1 inner-validation patient."
        )
    labels = None
    if subtypes is not None and any(subtypes.get(p) is not None for p in patients):
        labels = {p: subtypes.get(p) for p in patients}
    rng = np.random.default_rng(seed)
    if n_folds == 1:
        train, val = _holdout(patients, labels, inner_val_fraction, rng)
        folds = [FoldSplit(0, train, val, [])]
    else:
        # Stratified assignment: shuffle each stratum, concatenate strata, deal round-robin.
        # Each stratum is spread over folds within +-1, and fold sizes differ by at most 1.
        dealt: list[str] = []
        for members in _strata(patients, labels).values():
            dealt.extend(_rng_order(members, rng))
        assignment = {p: i % n_folds for i, p in enumerate(dealt)}
        folds = []
        for k in range(n_folds):
            test = sorted(p for p in patients if assignment[p] == k)
            rest = [p for p in patients if assignment[p] != k]
            train, val = _holdout(rest, labels, inner_val_fraction, rng)
            folds.append(FoldSplit(k, train, val, test))
    return Splits(
        folds, int(seed), "subtype" if labels is not None else None, float(inner_val_fraction)
    )
