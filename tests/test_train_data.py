"""Tile sampling, batching and feature caching of the pretraining data pipeline."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _train_helpers import write_h5

from mirror_model.errors import FeatureFileError
from mirror_model.train.data import (
    BatchLoader,
    FeatureStore,
    PatientBags,
    find_feature_files,
    sample_tile_indices,
    step_generator,
)


def test_sampling_never_repeats_a_tile():
    g = step_generator(1, 2, 3)
    idx = sample_tile_indices(100, 10, g)
    assert len(set(idx.tolist())) == 10 and idx.max() < 100
    idx = sample_tile_indices(5, 12, step_generator(1, 2, 3))
    assert sorted(idx.tolist()) == [0, 1, 2, 3, 4]  # a small bag: each tile exactly once
    a = sample_tile_indices(50, 7, step_generator(9, 1))
    b = sample_tile_indices(50, 7, step_generator(9, 1))
    c = sample_tile_indices(50, 7, step_generator(9, 2))
    assert torch.equal(a, b) and not torch.equal(a, c)


def _bags(tmp_path, mode="memory", cache_bytes=None):
    # slide rows encode (slide number, row) so the sampled values tell where they came from
    paths = {}
    for s, n in (("a", 6), ("b", 3), ("c", 40)):
        feats = np.zeros((n, 4))
        feats[:, 0] = ord(s)
        feats[:, 1] = np.arange(n)
        write_h5(tmp_path / f"{s}.h5", feats)
        paths[s] = tmp_path / f"{s}.h5"
    store = FeatureStore(paths, mode=mode, cache_bytes=cache_bytes)
    bags = PatientBags(
        ["p1", "p2"], {"p1": ["a", "b"], "p2": ["c"]}, np.eye(2, 3, dtype=np.float32), store
    )
    return bags


def test_pooled_multi_slide_bag_covers_both_slides(tmp_path):
    bags = _bags(tmp_path)
    x = bags.bag(0, 9, step_generator(0), "pool")  # 6 + 3 tiles pooled, 9 drawn: all of them
    got = sorted((int(r[0]), int(r[1])) for r in x)
    assert got == sorted([(ord("a"), i) for i in range(6)] + [(ord("b"), i) for i in range(3)])
    one = bags.bag(0, 4, step_generator(5), "one")
    assert len({int(r[0]) for r in one}) == 1  # a single slide per step


def test_lazy_reads_equal_memory_cache(tmp_path):
    mem = _bags(tmp_path, "memory")
    lazy = _bags(tmp_path, "lazy", cache_bytes=0)
    for i in range(2):
        g1, g2 = step_generator(3, i), step_generator(3, i)
        assert torch.equal(mem.bag(i, 16, g1), lazy.bag(i, 16, g2))
    assert lazy.store._cached_bytes == 0  # nothing cached with a zero budget


def test_batches_are_deterministic_and_validation_keeps_last_batch(tmp_path):
    paths = {}
    for i in range(7):
        write_h5(tmp_path / f"s{i}.h5", np.full((5, 4), float(i)))
        paths[f"s{i}"] = tmp_path / f"s{i}.h5"
    store = FeatureStore(paths)
    ids = [f"p{i}" for i in range(7)]
    bags = PatientBags(
        ids, {p: [f"s{i}"] for i, p in enumerate(ids)}, np.zeros((7, 2), np.float32), store
    )
    val = BatchLoader(bags, 4, 3, seed=1, train=False)
    seen = [p for _, b in val.iterate(0) for p in b.patient_ids]
    assert seen == ids  # the last batch of 3 is not dropped
    tr = BatchLoader(bags, 4, 3, seed=1, train=True)
    assert tr.steps_per_epoch() == 1  # 7 // 4, remainder reshuffled next epoch
    b1 = [b.features for _, b in tr.iterate(2)]
    b2 = [
        b.features for _, b in BatchLoader(bags, 4, 3, seed=1, train=True, num_workers=2).iterate(2)
    ]
    assert all(torch.equal(x, y) for x, y in zip(b1, b2, strict=True))
    # two ranks each get half of the same global batch
    r0 = BatchLoader(bags, 4, 3, seed=1, rank=0, world_size=2).make_batch(2, 0)
    r1 = BatchLoader(bags, 4, 3, seed=1, rank=1, world_size=2).make_batch(2, 0)
    full = tr.make_batch(2, 0)
    assert torch.equal(torch.stack([full.features[0], full.features[2]]), r0.features)
    assert torch.equal(torch.stack([full.features[1], full.features[3]]), r1.features)


def test_missing_and_inconsistent_feature_files_are_listed(tmp_path):
    write_h5(tmp_path / "x.h5", np.zeros((3, 4)))
    write_h5(tmp_path / "y.h5", np.zeros((3, 8)))
    with pytest.raises(FeatureFileError, match="2 slide.*m1, m2"):
        find_feature_files(tmp_path, ["x", "m1", "m2"])
    store = FeatureStore(find_feature_files(tmp_path, ["x", "y"]))
    with pytest.raises(FeatureFileError, match="y \\(y.h5\\) has 8"):
        store.check_consistent(["x", "x", "y"])


def test_small_bags_are_padded_and_masked_not_repeated(tmp_path):
    """Slides of 6+3 and 40 tiles with tiles_per_slide=16: patient 1 gets its 9 tiles once
    each, patient 2 16 of its 40; the batch is 16 long and the mask marks the real tiles."""
    bags = _bags(tmp_path)
    batch = BatchLoader(bags, 2, 16, seed=3, train=True).make_batch(0, 0)
    assert batch.features.shape == (2, 16, 4)
    by_id = dict(zip(batch.patient_ids, range(2), strict=True))
    m1, m2 = batch.tile_mask[by_id["p1"]], batch.tile_mask[by_id["p2"]]
    assert int(m1.sum()) == 9 and bool(m1[:9].all()) and int(m2.sum()) == 16
    real = batch.features[by_id["p1"]][m1]
    assert len({(int(r[0]), int(r[1])) for r in real}) == 9  # no tile twice
    assert torch.count_nonzero(batch.features[by_id["p1"]][~m1]) == 0
    # a batch of small bags is only as long as its longest bag
    small = PatientBags(["p1"], {"p1": ["b"]}, np.zeros((1, 3), np.float32), bags.store)
    b = BatchLoader(small, 1, 2048, seed=0).make_batch(0, 0)
    assert b.features.shape == (1, 3, 4) and b.tile_mask is None


def test_expression_only_bags_give_rna_batches(tmp_path):
    bags = PatientBags(["p1", "p2", "p3"], {}, np.arange(9, dtype=np.float32).reshape(3, 3), None)
    batch = BatchLoader(bags, 2, 16, seed=0, train=False).make_batch(0, 1)
    assert batch.features is None and batch.patient_ids == ["p3"]
    assert torch.equal(batch.rna, torch.tensor([[6.0, 7.0, 8.0]]))
