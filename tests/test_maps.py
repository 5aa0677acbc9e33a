"""Per-tile maps: the TileMap contract, attribution on models with a known answer, orientation."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from mirror_model import TileMap


def _map(values, signed):
    return TileMap(name="m", values=values, label="M", description="d", signed=signed,
                   method="test", units="u")


def test_tilemap_is_frozen_float64_and_read_only():
    m = _map([1, 2, 3], signed=False)
    assert m.values.dtype == np.float64 and m.n_tiles == 3
    with pytest.raises(ValueError):
        m.values[0] = 5.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        m.name = "other"


def test_display_range_signed_is_symmetric_and_robust_to_one_outlier():
    v = np.linspace(-1.0, 1.0, 1001)
    v[0] = -1000.0  # one extreme tile must not squash the colour range
    lo, hi = _map(v, signed=True).display_range(99.0)
    assert lo == -hi and 0.97 < hi < 1.0
    lo, hi = _map(np.arange(101.0), signed=False).display_range(99.0)
    assert (lo, hi) == pytest.approx((1.0, 99.0))
    # constant and empty maps still give a range of positive width
    assert _map(np.zeros(5), signed=True).display_range() == (-1.0, 1.0)
    lo, hi = _map(np.full(4, 0.25), signed=False).display_range()
    assert lo == 0.25 and hi > lo
    assert _map(np.zeros(0), signed=False).display_range() == (0.0, 1.0)


# ------------------------------------------------------------------------------------------
# attribution on models whose answer is known by construction
# ------------------------------------------------------------------------------------------
class _MarkedEncoder:
    """A slide encoder whose embedding depends only on the *marked* tiles (feature 0 > 0):
    ``tanh(W · mean of the marked tiles' other features)`` (0 for a bag without marked tiles).
    The mark is a hard threshold, so it carries no gradient itself."""

    def __init__(self, patch_dim, dim, seed=0):
        import torch

        g = torch.Generator().manual_seed(seed)
        self.w = torch.randn(dim, patch_dim - 1, generator=g) / patch_dim**0.5

    def parameters(self):
        return []

    def encode_slide(self, x, tile_mask=None):
        from types import SimpleNamespace

        import torch

        x = x if x.dim() == 3 else x[None]
        marked = (x[..., :1] > 0).to(x.dtype)
        pooled = (marked * x[..., 1:]).sum(1) / marked.sum(1).clamp(min=1.0)
        emb = torch.tanh(pooled @ self.w.T)
        att = torch.full(x.shape[:2], 1.0 / x.shape[1])
        return SimpleNamespace(embedding=emb, attention=att)


def _heads(dim, classes, seed=1):
    from mirror_model.maps import SlideHeads

    rng = np.random.default_rng(seed)
    lw = rng.normal(size=(len(classes), dim))
    return SlideHeads("slide", tuple(classes), lw, np.zeros(len(classes)), rng.normal(size=dim), 0.1)


@pytest.mark.parametrize("method", ["tile-alone", "gradient"])
@pytest.mark.parametrize("classes", [("A", "B"), ("A", "B", "C")])
def test_maps_rank_the_only_tiles_that_matter_first(classes, method):
    import torch

    from mirror_model.maps import head_maps

    n, dp, d = 60, 12, 8
    marked = np.array([3, 17, 18, 40, 59])
    enc = _MarkedEncoder(dp, d)
    heads = _heads(d, classes)
    rng = np.random.default_rng(0)
    x = (0.1 * rng.normal(size=(n, dp))).astype(np.float32)
    x[:, 0] = -10.0
    x[marked, 0] = 10.0
    # move the marked tiles along the direction that raises class A's centred logit (and risk):
    # they are evidence FOR A and for higher risk, everything else is evidence for nothing
    centred = heads.logit_weights - heads.logit_weights.mean(0)
    up_a = np.linalg.pinv(enc.w.numpy()) @ centred[0]
    up_r = np.linalg.pinv(enc.w.numpy()) @ heads.risk_weights
    for up, name in ((up_a, f"subtype:{classes[0]}"), (up_r, "risk")):
        xx = x.copy()
        xx[marked, 1:] += 0.5 * up / np.linalg.norm(up)
        maps = head_maps(enc, torch.from_numpy(xx), heads, method=method)
        assert list(maps) == [*(f"subtype:{c}" for c in classes), "risk"]
        v = maps[name].values
        assert set(np.argsort(-v)[: marked.size]) == set(marked.tolist())
        others = np.setdiff1d(np.arange(n), marked)
        for m in maps.values():  # tiles the encoder ignores are all alike: no evidence
            assert np.ptp(m.values[others]) < 1e-9 and m.signed
            if method == "gradient":  # ... and exactly none by attribution
                assert np.all(m.values[others] == 0.0)
        # subtype maps are centred logits: they sum to zero over the classes, tile by tile
        total = sum(maps[f"subtype:{c}"].values for c in classes)
        np.testing.assert_allclose(total, 0.0, atol=1e-9)


class _MeanEncoder:
    """``tanh`` of the mean tile: the slide embedding is monotone in each feature's mean."""

    def parameters(self):
        return []

    def encode_slide(self, x, tile_mask=None):
        from types import SimpleNamespace

        import torch

        x = x if x.dim() == 3 else x[None]
        return SimpleNamespace(embedding=torch.tanh(x.mean(1)),
                               attention=torch.full(x.shape[:2], 1.0 / x.shape[1]))


@pytest.mark.parametrize("method", ["tile-alone", "gradient"])
def test_a_head_reading_one_feature_ranks_tiles_by_that_feature(method):
    """Risk reads feature 2 only, class B's logit feature 5 against A: the risk map orders the
    tiles exactly as feature 2 does, B's map as feature 5 (and A's reversed)."""
    import torch

    from mirror_model.maps import SlideHeads, head_maps

    n, d = 300, 8
    x = np.random.default_rng(3).normal(scale=0.5, size=(n, d)).astype(np.float32)
    e = np.eye(d)
    heads = SlideHeads("slide", ("A", "B"), np.stack([np.zeros(d), e[5]]), np.zeros(2), e[2], 0.0)
    maps = head_maps(_MeanEncoder(), torch.from_numpy(x), heads, method=method)
    order = lambda v: np.argsort(-v, kind="stable")  # noqa: E731
    np.testing.assert_array_equal(order(maps["risk"].values), order(x[:, 2]))
    np.testing.assert_array_equal(order(maps["subtype:B"].values), order(x[:, 5]))
    np.testing.assert_array_equal(order(maps["subtype:A"].values), order(-x[:, 5]))
    # closed forms: tile-alone = the tile's own read-out minus the slide's mean read-out;
    # gradient x input = slope at the midpoint (the mean tile) x distance from the mean tile
    for name, j, scale in (("risk", 2, 1.0), ("subtype:B", 5, 0.5)):
        xj = x[:, j].astype(np.float64)
        if method == "tile-alone":
            want = np.tanh(xj) - np.tanh(xj).mean()
        else:
            want = (1 - np.tanh(xj.mean()) ** 2) * (xj - xj.mean()) / n
        np.testing.assert_allclose(maps[name].values, scale * want, rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("method", ["tile-alone", "gradient"])
def test_flipping_a_heads_sign_flips_its_map_through_the_real_encoder(method):
    """The map's orientation is the head's: negate the risk weights (or every class's logit
    weights) and the map is negated, tile by tile; swap the two classes of a binary probe and
    the two subtype maps swap. Nothing in the maps depends on the encoder's own orientation."""
    import torch

    from mirror_model.maps import SlideHeads, head_maps
    from mirror_model.models import create_model

    torch.manual_seed(0)
    model = create_model("mirror", patch_dim=16, embed_dim=32, n_prototypes=8).eval()
    x = torch.randn(120, 16)
    rng = np.random.default_rng(2)
    lw, rw = rng.normal(size=(3, 32)), rng.normal(size=32)
    kw = {"method": method}
    a = head_maps(model, x, SlideHeads("slide", ("p", "q", "r"), lw, np.zeros(3), rw, 0.3), **kw)
    b = head_maps(model, x, SlideHeads("slide", ("p", "q", "r"), -lw, np.ones(3), -rw, -2.0), **kw)
    for name in a:
        assert np.abs(a[name].values).max() > 1e-6
        np.testing.assert_allclose(b[name].values, -a[name].values, rtol=1e-4, atol=1e-7)
    w2 = np.stack([np.zeros(32), lw[0]])
    c = head_maps(model, x, SlideHeads("slide", ("p", "q"), w2, np.zeros(2), rw, 0.0), **kw)
    f = head_maps(model, x, SlideHeads("slide", ("q", "p"), -w2, np.zeros(2), rw, 0.0), **kw)
    np.testing.assert_allclose(c["subtype:p"].values, f["subtype:p"].values, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(c["subtype:p"].values, -c["subtype:q"].values, atol=1e-9)


def test_maps_of_an_encoder_that_needs_tile_positions():
    """A grid-PPEG encoder (tiles mixed with their lattice neighbours) gets the slide's cells
    for the gradient method, cell (0, 0) for each one-tile slide; without cells: a clear error."""
    import torch

    from mirror_model.features import grid_positions
    from mirror_model.maps import SlideHeads, head_maps
    from mirror_model.models import create_model

    torch.manual_seed(0)
    model = create_model("mirror", patch_dim=16, embed_dim=32, n_prototypes=8,
                         ppeg_layout="grid").eval()
    assert model.needs_positions
    gy, gx = np.divmod(np.arange(80), 10)
    cells = grid_positions(np.stack([gx, gy], 1) * 256, 256)
    x = torch.randn(80, 16)
    rng = np.random.default_rng(0)
    heads = SlideHeads("slide", ("a", "b"), rng.normal(size=(2, 32)), np.zeros(2),
                       rng.normal(size=32), 0.0)
    for method in ("tile-alone", "gradient"):
        maps = head_maps(model, x, heads, method=method, positions=cells)
        assert all(np.all(np.isfinite(m.values)) and np.ptp(m.values) > 0 for m in maps.values())
    # the gradient map depends on where the tiles are: shuffle the cells, another map
    moved = head_maps(model, x, heads, method="gradient", positions=cells[rng.permutation(80)])
    assert not np.allclose(moved["risk"].values, maps["risk"].values)
    with pytest.raises(ValueError, match="lattice cells"):
        head_maps(model, x, heads, method="gradient")


def test_integrated_gradients_are_complete_on_the_real_slide_encoder():
    """Summed over tiles, integrated gradients give f(X) − f(mean tile) (completeness), through
    the real TransMIL encoder; gradient × input (1 step) approximates it."""
    import torch

    from mirror_model.maps import attribute_tiles
    from mirror_model.models import create_model

    torch.manual_seed(0)
    model = create_model("mirror", patch_dim=16, embed_dim=32, n_prototypes=8).eval()
    x = torch.randn(150, 16)  # more tiles than landmarks: the Nyström path
    dirs = np.random.default_rng(0).normal(size=(2, 32))
    with torch.no_grad():
        f = model.encode_slide(x).embedding[0].double().numpy() @ dirs.T
        f0 = model.encode_slide(x.mean(0, keepdim=True).expand_as(x)).embedding[0].double().numpy() @ dirs.T
    ig = attribute_tiles(model, x, dirs, steps=64)
    np.testing.assert_allclose(ig.sum(axis=1), f - f0, rtol=0.02, atol=0.02 * np.abs(f - f0).max())
    assert all(p.requires_grad for p in model.parameters())  # left as found


# ------------------------------------------------------------------------------------------
# the maps through predict, on a real bundle
# ------------------------------------------------------------------------------------------
# (``case``: the module-scoped bundle fixture of conftest)
def test_slide_heads_reproduce_the_bundle_heads(case):
    from mirror_model.inference import predict
    from mirror_model.maps import slide_heads

    for kw in ({}, {"expression_path": case.expression_path}):
        pred = predict(case.bundle, features_path=case.features_path, device="cpu",
                       precision="fp32", maps=False, **kw)
        heads = slide_heads(case.bundle, pred.input_kind, pred.rna_embedding)
        p = heads.probabilities(pred.slide_embedding)
        np.testing.assert_allclose(p, list(pred.subtype_probabilities.values()), atol=1e-9)
        assert heads.classes == tuple(pred.subtype_probabilities)
        assert float(heads.risk(pred.slide_embedding)) == pytest.approx(pred.risk_score, abs=1e-9)
        assert list(pred.maps) == ["attention"]  # maps=False: only the encoder's attention


def test_predict_returns_a_map_per_output_with_and_without_expression(case):
    from mirror_model.inference import predict

    slide = predict(case.bundle, features_path=case.features_path, device="cpu", precision="fp32")
    both = predict(case.bundle, features_path=case.features_path,
                   expression_path=case.expression_path, device="cpu", precision="fp32")
    names = ["attention", *(f"subtype:{c}" for c in case.classes), "risk"]
    for pred, head in ((slide, "slide-only"), (both, "slide + expression")):
        assert list(pred.maps) == names
        assert "maps" in pred.timings_s
        for name in names[1:]:
            m = pred.maps[name]
            assert m.signed and m.values.shape == (pred.n_tiles,) and np.all(np.isfinite(m.values))
            assert head in m.description and m.label.startswith("Evidence for")
        total = sum(pred.maps[f"subtype:{c}"].values for c in case.classes)
        np.testing.assert_allclose(total, 0.0, atol=1e-9)
    # the combined head weighs the slide embedding differently: another map
    a, b = slide.maps[names[1]].values, both.maps[names[1]].values
    assert not np.allclose(a, b)
    assert slide.maps["attention"].values == pytest.approx(both.maps["attention"].values)


def test_tile_alone_scores_are_one_tile_slides_through_the_real_encoder():
    import torch

    from mirror_model.maps import tile_alone_scores
    from mirror_model.models import create_model

    torch.manual_seed(0)
    model = create_model("mirror", patch_dim=16, embed_dim=32, n_prototypes=8).eval()
    x = torch.randn(70, 16)
    dirs = np.random.default_rng(1).normal(size=(3, 32))
    got = tile_alone_scores(model, x, dirs, batch_size=16)  # several batches
    with torch.no_grad():
        one = np.stack([model.encode_slide(x[i : i + 1]).embedding[0].double().numpy()
                        for i in range(70)]) @ dirs.T
    np.testing.assert_allclose(got, (one - one.mean(0)).T, atol=1e-5)
