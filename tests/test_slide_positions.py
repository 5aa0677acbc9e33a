"""Real tile positions in the slide encoder: lattice cells, PPEG on the real grid, input standardisation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _train_helpers import write_h5

from mirror_model.errors import FeatureFileError
from mirror_model.features import grid_positions
from mirror_model.layers import PPEG, FeatureStandardizer
from mirror_model.layers.ppeg import grid_neighbours
from mirror_model.models import create_model
from mirror_model.train.data import BatchLoader, FeatureStore, PatientBags


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


SMALL = dict(
    patch_dim=12, n_genes=20, embed_dim=24, slide_heads=4, rna_heads=4, slide_landmarks=6,
    n_prototypes=16, style_hidden_dims=(16, 8), latent_dim=4, nystrom_conv_kernel=5,
)  # fmt: skip


def _grid_model(**kw):
    torch.manual_seed(0)
    m = create_model("mirror-authors", **{**SMALL, "ppeg_layout": "grid", **kw}).double().eval()
    for conv in m.slide_encoder.ppeg.convs:  # non-trivial PPEG weights
        torch.nn.init.normal_(conv.weight, std=0.3)
    return m


def _slide(n=40, shape=(9, 11), seed=0):
    g = torch.Generator().manual_seed(seed)
    cells = torch.randperm(shape[0] * shape[1], generator=g)[:n]
    pos = torch.stack([cells % shape[1], cells // shape[1]], dim=1)  # (column, row)
    return torch.randn(n, 12, generator=g, dtype=torch.float64), pos


# ---------------------------------------------------------------------- lattice cells
def test_grid_positions_of_regular_overlapping_and_degenerate_grids():
    xy = np.array([[1000, 500], [1256, 500], [1000, 756], [1768, 1012]])
    np.testing.assert_array_equal(grid_positions(xy, 256), [[0, 0], [1, 0], [0, 1], [3, 2]])
    # an overlapping grid (step 128 < tile 256): the step is the lattice unit
    np.testing.assert_array_equal(grid_positions([[0, 0], [128, 0], [256, 128]], 256), [[0, 0], [1, 0], [2, 1]])
    # one tile, or no spacing to infer: cell (0, 0) / the tile size is the unit
    np.testing.assert_array_equal(grid_positions([[512, 512]], 256), [[0, 0]])
    np.testing.assert_array_equal(grid_positions([[0, 0], [0, 512]], 256), [[0, 0], [0, 2]])
    # jittered coordinates do not blow the lattice up: spacing < tile/2 falls back to the tile
    np.testing.assert_array_equal(grid_positions([[0, 0], [3, 256]], 256), [[0, 0], [0, 1]])


def test_grid_neighbours_index_real_tiles_and_mark_empty_cells():
    pos = torch.tensor([[[0, 0], [1, 0], [0, 2], [1, 0]]])  # tile 3 is tile 1 drawn twice
    nb = grid_neighbours(pos, torch.tensor([4]), 3)
    # offsets in row-major order: (dy, dx) = (-1,-1), (-1,0), (-1,1), (0,-1), (0,0), (0,1), ...
    assert nb[0, 0].tolist() == [4, 4, 4, 4, 0, nb[0, 1, 4].item(), 4, 4, 4]
    assert nb[0, 1, 4] == nb[0, 3, 4] and nb[0, 1, 4] in (1, 3)  # one of the two copies
    assert nb[0, 2].tolist() == [4, 4, 4, 4, 2, 4, 4, 4, 4]  # (0, 2) has no neighbour


def test_sparse_ppeg_equals_the_dense_convolution_of_a_canvas():
    torch.manual_seed(1)
    ppeg = PPEG(6).double()
    for conv in ppeg.convs:
        torch.nn.init.normal_(conv.weight)
        torch.nn.init.normal_(conv.bias)
    x, pos = _slide(n=50, shape=(10, 12))
    tokens = torch.randn(1, 50, 6, dtype=torch.float64)
    canvas = torch.zeros(1, 6, 10, 12, dtype=torch.float64)
    canvas[0, :, pos[:, 1], pos[:, 0]] = tokens[0].t()
    dense = ppeg(canvas)[0, :, pos[:, 1], pos[:, 0]].t()
    sparse = ppeg.forward_sparse(tokens, grid_neighbours(pos[None], torch.tensor([50]), 7))
    torch.testing.assert_close(sparse[0], dense, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------- encoder on the real grid
def test_grid_encoder_is_invariant_to_tile_order_given_the_same_cells():
    m = _grid_model()
    x, pos = _slide()
    perm = torch.randperm(40, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        a = m.encode_slide(x, positions=pos)
        b = m.encode_slide(x[perm], positions=pos[perm])
        shifted = m.encode_slide(x, positions=pos + torch.tensor([5, 7]))  # translation
        moved = pos.clone()
        moved[0] = torch.tensor([30, 30])  # one tile moved far from the others
        c = m.encode_slide(x, positions=moved)
    torch.testing.assert_close(a.embedding, b.embedding, rtol=0, atol=1e-12)
    torch.testing.assert_close(a.attention[0, perm], b.attention[0], rtol=0, atol=1e-12)
    torch.testing.assert_close(a.embedding, shifted.embedding, rtol=0, atol=1e-12)
    assert (a.embedding - c.embedding).abs().max() > 1e-4  # the cells matter


def test_authors_layout_depends_on_tile_order():
    torch.manual_seed(0)
    m = create_model("mirror-authors", **SMALL).double().eval()
    x, _ = _slide()
    perm = torch.randperm(40, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (m.encode_slide(x).embedding - m.encode_slide(x[perm]).embedding).abs().max() > 1e-6


def test_grid_encoder_in_a_padded_batch_equals_each_slide_alone():
    m = _grid_model()
    (x1, p1), (x2, p2) = _slide(40, seed=1), _slide(25, seed=2)
    xb = torch.zeros(2, 50, 12, dtype=torch.float64)
    pb = torch.zeros(2, 50, 2, dtype=torch.long)
    mask = torch.zeros(2, 50, dtype=torch.bool)
    xb[0, 3:43], pb[0, 3:43], mask[0, 3:43] = x1, p1, True
    idx = torch.arange(0, 50, 2)
    xb[1, idx], pb[1, idx], mask[1, idx] = x2, p2, True
    with torch.no_grad():
        batch = m.encode_slide(xb, mask, positions=pb)
        one, two = m.encode_slide(x1, positions=p1), m.encode_slide(x2, positions=p2)
    torch.testing.assert_close(batch.embedding[0], one.embedding[0], rtol=0, atol=1e-10)
    torch.testing.assert_close(batch.embedding[1], two.embedding[0], rtol=0, atol=1e-10)
    torch.testing.assert_close(batch.attention[1, idx], two.attention[0], rtol=0, atol=1e-12)
    assert float(batch.attention[~mask].abs().max()) == 0.0


def test_grid_encoder_needs_positions_and_checks_them():
    m = _grid_model()
    x, pos = _slide()
    with pytest.raises(FeatureFileError, match="positions="):
        m.encode_slide(x)
    with pytest.raises(FeatureFileError, match="grid_positions"):
        m.encode_slide(x, positions=pos[:5])
    with pytest.raises(FeatureFileError, match="not level-0 pixel"):
        m.encode_slide(x, positions=pos.double() * 256.5)
    assert m.needs_positions and not create_model("tangle", **SMALL).needs_positions


def test_grid_model_trains_with_gradients_everywhere():
    torch.manual_seed(0)
    m = create_model("mirror-authors", **{**SMALL, "ppeg_layout": "grid"})
    x = torch.randn(3, 30, 12)
    pos = torch.stack([_slide(30, seed=s)[1] for s in range(3)])
    out = m(x, torch.randn(3, 20), positions=pos)
    out.loss.backward()
    assert [n for n, p in m.named_parameters() if p.grad is None] == []
    ppeg_grad = m.slide_encoder.ppeg.convs[0].weight.grad
    assert ppeg_grad is not None and float(ppeg_grad.abs().sum()) > 0


# ---------------------------------------------------------------------- input standardisation
def test_feature_standardizer_learns_real_tile_statistics_only():
    std = FeatureStandardizer(3)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 10, 3, generator=g, dtype=torch.float64) * torch.tensor([0.1, 2.0, 0.0]) + 5
    x[..., 2] = 7.0  # a constant dimension
    valid = torch.arange(10)[None, :] < torch.tensor([10, 3, 7, 1])[:, None]
    x[~valid] = 1e6  # padding must not enter the statistics
    std.eval()
    assert torch.equal(std(x[:1, :2]), x[:1, :2])  # identity before any training tile
    std.train()
    std(x[:2], valid[:2])
    std(x[2:], valid[2:])  # two batches: the cumulative statistics are exact
    real = x[valid].numpy()
    np.testing.assert_allclose(std.mean.numpy(), real.mean(0), rtol=1e-12)
    np.testing.assert_allclose(std.scale().numpy()[:2], real.std(0)[:2], rtol=1e-12)
    assert float(std.count) == 21
    std.eval()
    before = std.mean.clone()
    z = std(x, valid)
    assert torch.equal(std.mean, before)  # frozen in eval mode
    np.testing.assert_allclose(z[valid].numpy()[:, :2].std(0), 1.0, rtol=1e-9)
    assert float(z[valid][:, 2].abs().max()) == 0.0  # constant dimension -> 0, not NaN
    assert float(std.scale()[2]) > 0  # floored


@pytest.mark.parametrize("preset", ["mirror-authors", "tangle"])
def test_standardized_input_makes_the_encoder_blind_to_feature_offsets_and_scales(preset):
    """Both slide encoders: after the same training tiles, an affine per-dimension change of
    the features (new offsets and scales, as another patch encoder's calibration) gives the
    same embedding once the statistics are learnt from the changed tiles."""
    torch.manual_seed(0)
    m = create_model(preset, **SMALL, slide_input_norm="standardize").double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 30, 12, generator=g, dtype=torch.float64)
    a, b = torch.rand(12, generator=g, dtype=torch.float64) * 5, torch.randn(12, generator=g) * 10
    m2 = create_model(preset, **SMALL, slide_input_norm="standardize").double()
    m2.load_state_dict(m.state_dict())
    m.train(), m2.train()
    m.slide_encoder.input_norm(x)
    m2.slide_encoder.input_norm(x * a + b)
    m.eval(), m2.eval()
    with torch.no_grad():
        e1 = m.encode_slide(x[0]).embedding
        e2 = m2.encode_slide(x[0] * a + b).embedding
    torch.testing.assert_close(e1, e2, rtol=1e-9, atol=1e-9)


# ---------------------------------------------------------------------- training data
def test_batches_carry_the_sampled_tiles_cells_and_slides_of_a_patient_never_touch(tmp_path):
    rng = np.random.default_rng(0)
    paths = {}
    for sid, n in (("A", 12), ("B", 9)):
        feats = rng.normal(size=(n, 4))
        feats[:, 0] = np.arange(n)  # feature 0 = row index, to match rows with cells
        p = tmp_path / f"{sid}.h5"
        write_h5(p, feats)  # coords: x = 256 * row index, y = 0
        paths[sid] = p
    store = FeatureStore(paths)
    bags = PatientBags(["P"], {"P": ["A", "B"]}, np.zeros((1, 3), np.float32), store)
    loader = BatchLoader(bags, 1, 16, seed=0, train=True, positions=True)
    batch = loader.make_batch(0, 0)
    x, pos = batch.features[0], batch.positions[0]
    assert pos.shape == (16, 2) and pos.dtype == torch.int64
    from_a = pos[:, 0] < 12
    assert 0 < int(from_a.sum()) < 16  # both slides drawn from
    # slide A's tiles sit at their own cell (column = row index); slide B's are shifted past A
    assert torch.equal(pos[from_a, 0], x[from_a, 0].long())
    shift = 12 + 16  # A's 12 columns, then a gap wider than any PPEG kernel reaches
    assert torch.equal(pos[~from_a, 0], x[~from_a, 0].long() + shift)
    assert bool((pos[:, 1] == 0).all())
    # the same draws with and without positions; a padded batch carries zeros at padding
    plain = BatchLoader(bags, 1, 16, seed=0, train=True).make_batch(0, 0)
    assert plain.positions is None and torch.equal(plain.features, batch.features)
    bags2 = PatientBags(["P", "Q"], {"P": ["A", "B"], "Q": ["B"]}, np.zeros((2, 3), np.float32), store)
    val = BatchLoader(bags2, 2, 16, seed=0, train=False, positions=True).make_batch(0, 0)
    assert val.positions.shape == (2, 16, 2) and bool(val.tile_mask[1, 9:].logical_not().all())


def test_pretrain_of_a_grid_model_refuses_features_without_coordinates_before_writing(tmp_path):
    import h5py
    from _train_helpers import make_toy, pretrain_toy, toy_config

    toy = make_toy(tmp_path / "toy", n_patients=8)
    victim = sorted(toy.features.glob("*.h5"))[3]
    with h5py.File(victim, "a") as fh:  # an authors'-style file: features only, no tile grid
        del fh["coords"]
    run = tmp_path / "run"
    with pytest.raises(FeatureFileError, match="--preset mirror ") as err:
        pretrain_toy(toy, run, toy_config(epochs=1, folds=2), preset="mirror-grid")
    assert victim.name in str(err.value) and "coordinates" in str(err.value)
    assert not (run / "config.yaml").exists() and not (run / "splits.json").exists()
    # the authors' layout needs no positions: the same inputs train
    res = pretrain_toy(toy, tmp_path / "run2", toy_config(epochs=1, folds=2, fold=0),
                       preset="mirror")
    assert res is not None and (tmp_path / "run2" / "fold_0" / "model.json").is_file()
