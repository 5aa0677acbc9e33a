"""Patient-level splits: no leakage, stratification, determinism, JSON round trip."""

from __future__ import annotations

import collections

import pandas as pd
import pytest

from mirror_model.errors import CohortError
from mirror_model.train.splits import Splits, make_splits, patient_subtypes


def _labels(n: int) -> dict[str, str]:
    # 3 unbalanced classes: 50 % A, 30 % B, 20 % C
    out = {}
    for i in range(n):
        r = i % 10
        out[f"P{i:03d}"] = "A" if r < 5 else ("B" if r < 8 else "C")
    return out


def test_folds_partition_patients_and_never_leak():
    labels = _labels(53)
    s = make_splits(list(labels), labels, n_folds=5, inner_val_fraction=0.15, seed=3)
    assert s.n_folds == 5 and s.stratified_by == "subtype"
    all_test = [p for f in s.folds for p in f.test]
    assert sorted(all_test) == sorted(labels)  # each patient tested exactly once
    assert len(all_test) == len(set(all_test))
    for f in s.folds:
        tr, va, te = set(f.train), set(f.val), set(f.test)
        assert not (tr & va) and not (tr & te) and not (va & te)
        assert tr | va | te == set(labels)
        # inner val is ~15 % of the non-test patients
        assert len(va) == round(0.15 * (len(tr) + len(va)))
    sizes = [len(f.test) for f in s.folds]
    assert max(sizes) - min(sizes) <= 1


def test_stratification_balanced_within_one():
    labels = _labels(100)
    s = make_splits(list(labels), labels, n_folds=5, seed=0)
    for cls, total in collections.Counter(labels.values()).items():
        per_fold = [sum(labels[p] == cls for p in f.test) for f in s.folds]
        assert max(per_fold) - min(per_fold) <= 1
        assert sum(per_fold) == total
    # inner val of every fold holds every class (it has 12 of 80 patients: 6/4/2 expected)
    for f in s.folds:
        got = collections.Counter(labels[p] for p in f.val)
        assert got == {"A": 6, "B": 4, "C": 2}


def test_patients_with_several_slides_stay_on_one_side():
    rows = []
    for i in range(12):
        for j in range(1 + i % 3):  # 1-3 slides per patient
            rows.append(
                {"patient_id": f"P{i}", "slide_id": f"P{i}_s{j}", "subtype": "x" if i % 2 else "y"}
            )
    table = pd.DataFrame(rows)
    subtypes = patient_subtypes(table)
    s = make_splits(table["patient_id"].tolist(), subtypes, n_folds=3, seed=1)
    slide_side = {}
    for f in s.folds:
        for side in ("train", "val", "test"):
            for p in getattr(f, side):
                for sid in table.loc[table.patient_id == p, "slide_id"]:
                    slide_side.setdefault((f.fold, sid), set()).add(side)
        # all slides of a patient share the patient's side (splits are over patient ids)
    assert all(len(v) == 1 for v in slide_side.values())
    assert sorted({p for f in s.folds for p in f.test}) == sorted(subtypes)


def test_deterministic_and_seed_dependent_and_json_round_trip(tmp_path):
    labels = _labels(40)
    a = make_splits(list(labels), labels, 4, seed=7)
    b = make_splits(list(reversed(list(labels))), labels, 4, seed=7)
    c = make_splits(list(labels), labels, 4, seed=8)
    assert a.to_dict() == b.to_dict()
    assert a.to_dict() != c.to_dict()
    a.save(tmp_path / "splits.json")
    assert Splits.load(tmp_path / "splits.json").to_dict() == a.to_dict()


def test_no_cv_single_fold_and_unlabelled():
    ids = [f"p{i}" for i in range(20)]
    s = make_splits(ids, None, n_folds=1, inner_val_fraction=0.2, seed=0)
    assert s.n_folds == 1 and s.stratified_by is None
    f = s.folds[0]
    assert f.test == [] and len(f.val) == 4 and len(f.train) == 16
    assert set(f.train) | set(f.val) == set(ids)


def test_fewer_patients_than_folds_is_a_clear_error():
    with pytest.raises(CohortError, match="3 patient.*5 folds"):
        make_splits(["a", "b", "c"], None, n_folds=5)
