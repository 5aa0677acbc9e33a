"""Feature files: our HDF5 layout, CLAM and TRIDENT files, safe .pt, validation, encoder checks."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from mirror_model.errors import FeatureFileError
from mirror_model.features import FeatureFile, check_encoder, read_features, write_features
from mirror_model.patch_encoders import create_patch_encoder


def _ff(n: int = 12, d: int = 8, seed: int = 0) -> FeatureFile:
    rng = np.random.default_rng(seed)
    coords = np.stack(np.meshgrid(np.arange(4), np.arange(3)), -1).reshape(-1, 2)[:n] * 512
    return FeatureFile(
        features=rng.standard_normal((n, d)).astype(np.float32),
        coords_level0=coords.astype(np.int64),
        patch_size_level0=512,
        target_mpp=0.5,
        encoder="stain-texture",
        attrs={
            "slide_id": "S1",
            "slide_path": "/data/S1.svs",
            "slide_mpp": 0.25,
            "tile_px": 256,
            "encoder_spec": {"name": "stain-texture", "dim": d, "weights_sha256": None},
        },
    )


def test_round_trip(tmp_path: Path) -> None:
    ff = _ff()
    path = write_features(tmp_path / "S1.h5", ff)
    got = read_features(path)
    np.testing.assert_array_equal(got.features, ff.features)
    np.testing.assert_array_equal(got.coords_level0, ff.coords_level0)
    assert got.features.dtype == np.float32 and got.coords_level0.dtype == np.int64
    assert got.patch_size_level0 == 512 and got.target_mpp == 0.5 and got.encoder == "stain-texture"
    assert got.encoder_spec == {"name": "stain-texture", "dim": 8, "weights_sha256": None}
    assert (
        got.attrs["slide_id"] == "S1"
        and got.attrs["slide_mpp"] == 0.25
        and got.attrs["tile_px"] == 256
    )
    assert got.attrs["source_format"] == "mirror"
    assert got.n_tiles == 12 and got.dim == 8 and got.path == path
    # CLAM/TRIDENT readers find what they look for
    with h5py.File(path, "r") as h5:
        assert h5["features"].shape == (12, 8) and h5["coords"].shape == (12, 2)
        assert h5["coords"].attrs["patch_size_level0"] == 512
        assert h5["coords"].attrs["patch_level"] == 0 and h5["coords"].attrs["patch_size"] == 256
    # quick read without the matrix
    meta = read_features(path, load_features=False)
    assert meta.attrs["n_tiles"] == 12 and meta.features.shape == (0, 8)


def test_write_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "S1.h5"
    write_features(target, _ff(seed=1))
    before = target.read_bytes()

    def boom(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(h5py.Group, "create_dataset", boom)
    with pytest.raises(OSError, match="disk full"):
        write_features(target, _ff(seed=2))
    assert target.read_bytes() == before  # old file untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["S1.h5"]  # no temp file left


def _write_clam(
    path: Path,
    n: int = 10,
    d: int = 1024,
    patch_level: int = 0,
    downsample: float = 1.0,
    with_attrs: bool = True,
) -> None:
    """As CLAM's save_hdf5 does: datasets at the root, coords attrs from the patching step."""
    rng = np.random.default_rng(0)
    with h5py.File(path, "w") as f:
        f.create_dataset(
            "features", data=rng.standard_normal((n, d)).astype(np.float32), maxshape=(None, d)
        )
        coords = f.create_dataset(
            "coords",
            data=(np.arange(2 * n).reshape(n, 2) * 256).astype(np.int64),
            maxshape=(None, 2),
        )
        if with_attrs:
            coords.attrs["patch_size"] = 256
            coords.attrs["patch_level"] = patch_level
            coords.attrs["downsample"] = np.array([downsample, downsample])
            coords.attrs["downsampled_level_dim"] = np.array([10000, 8000])
            coords.attrs["level_dim"] = np.array([10000, 8000])
            coords.attrs["name"] = "slide_1"
            coords.attrs["save_path"] = "/results/patches"


def test_clam_file(tmp_path: Path) -> None:
    p = tmp_path / "clam.h5"
    _write_clam(p)
    ff = read_features(p)
    assert ff.features.shape == (10, 1024) and ff.coords_level0.shape == (10, 2)
    assert (
        ff.patch_size_level0 == 256 and ff.encoder is None and ff.attrs["source_format"] == "clam"
    )
    _write_clam(p, patch_level=1, downsample=4.0)
    assert read_features(p).patch_size_level0 == 1024  # 256 px at a 4x level
    _write_clam(p, with_attrs=False)  # CLAM's extract_features_fp writes no attrs
    ff = read_features(p)
    assert ff.patch_size_level0 is None and ff.target_mpp is None and ff.coords_level0 is not None


def test_trident_file(tmp_path: Path) -> None:
    p = tmp_path / "trident.h5"
    rng = np.random.default_rng(0)
    with h5py.File(p, "w") as f:
        f.create_dataset("features", data=rng.standard_normal((7, 1536)).astype(np.float32))
        c = f.create_dataset("coords", data=np.arange(14).reshape(7, 2) * 512)
        c.attrs.update(
            {
                "patch_size": 256,
                "patch_size_level0": 512,
                "level0_magnification": 40,
                "target_magnification": 20,
                "overlap": 0,
                "name": "slide_2",
            }
        )
    ff = read_features(p)
    assert ff.patch_size_level0 == 512 and ff.target_mpp == pytest.approx(0.5)
    assert ff.attrs["source_format"] == "trident" and ff.features.shape == (7, 1536)


def test_pt_files(tmp_path: Path) -> None:
    p = tmp_path / "S.pt"
    torch.save(torch.randn(9, 768), p)
    ff = read_features(p)
    assert ff.features.shape == (9, 768) and ff.coords_level0 is None and not ff.has_coords
    assert "heatmaps cannot be drawn" in ff.attrs["note"]
    q = tmp_path / "S2.pt"
    torch.save({"features": torch.randn(4, 5), "coords": torch.arange(8).reshape(4, 2)}, q)
    ff = read_features(q)
    assert ff.coords_level0.tolist() == [[0, 1], [2, 3], [4, 5], [6, 7]]


class _Evil:
    """Stands for any pickled Python object (which could run code when unpickled)."""


def test_pt_with_python_object_is_refused(tmp_path: Path) -> None:
    p = tmp_path / "evil.pt"
    torch.save({"features": torch.randn(3, 4), "x": _Evil()}, p)
    with pytest.raises(FeatureFileError, match=r"evil\.pt: refused.*arbitrary code"):
        read_features(p)
    s = tmp_path / "str.pt"
    torch.save("hello", s)
    with pytest.raises(FeatureFileError, match=r"str\.pt: expected a \[N, D\] tensor"):
        read_features(s)


def _h5(path: Path, **datasets: np.ndarray) -> Path:
    with h5py.File(path, "w") as f:
        for k, v in datasets.items():
            f.create_dataset(k, data=v)
    return path


@pytest.mark.parametrize(
    ("case", "match"),
    [
        ("missing", "feature file not found"),
        ("text", "not a readable HDF5"),
        ("truncated", "(not a readable HDF5|damaged|corrupt)"),
        ("no_features", "no 'features' dataset"),
        ("n_mismatch", "10 feature rows but 9 coordinates"),
        ("nan", "NaN or infinite"),
        ("inf", "NaN or infinite"),
        ("one_d", "2-D"),
        ("coords_shape", r"coords must be \[tiles, 2\]"),
        ("empty", "holds no tiles"),
        ("folder", "is a folder"),
    ],
)
def test_bad_feature_files(tmp_path: Path, case: str, match: str) -> None:
    f = np.random.default_rng(0).standard_normal((10, 4)).astype(np.float32)
    c = np.zeros((10, 2), np.int64)
    p = tmp_path / f"{case}.h5"
    if case == "missing":
        pass
    elif case == "text":
        p.write_text("features,coords\n")
    elif case == "truncated":
        write_features(p, _ff())
        p.write_bytes(p.read_bytes()[:1500])
    elif case == "no_features":
        _h5(p, coords=c)
    elif case == "n_mismatch":
        _h5(p, features=f, coords=c[:9])
    elif case in ("nan", "inf"):
        f[3, 2] = np.nan if case == "nan" else np.inf
        _h5(p, features=f, coords=c)
    elif case == "one_d":
        _h5(p, features=f[:, 0], coords=c)
    elif case == "coords_shape":
        _h5(p, features=f, coords=np.zeros((10, 3)))
    elif case == "empty":
        _h5(p, features=np.zeros((0, 4), np.float32), coords=np.zeros((0, 2)))
    elif case == "folder":
        p.mkdir()
    with pytest.raises(FeatureFileError, match=match) as info:
        read_features(p)
    assert p.name in str(info.value)


def test_write_refuses_invalid(tmp_path: Path) -> None:
    ff = _ff()
    ff.features[0, 0] = np.nan
    with pytest.raises(FeatureFileError, match="NaN"):
        write_features(tmp_path / "x.h5", ff)
    assert not (tmp_path / "x.h5").exists()


def test_check_encoder(tmp_path: Path) -> None:
    spec = create_patch_encoder("stain-texture").spec
    rng = np.random.default_rng(0)
    ff = FeatureFile(
        features=rng.standard_normal((3, spec.dim)).astype(np.float32),
        encoder="stain-texture",
        target_mpp=0.5,
        attrs={"encoder_spec": spec.to_dict()},
        path=tmp_path / "a.h5",
    )
    check_encoder(ff, spec)
    check_encoder(ff, "stain-texture", target_mpp=0.5)
    with pytest.raises(
        FeatureFileError, match=r"a\.h5: features come from encoder 'stain-texture'.*'uni'"
    ):
        check_encoder(ff, "uni")
    with pytest.raises(FeatureFileError, match=r"dimension 132, but the model expects 1024"):
        check_encoder(ff, {"name": "stain-texture", "dim": 1024})
    with pytest.raises(
        FeatureFileError, match=r"encoded at 0.5 µm/px but the model expects 1 µm/px"
    ):
        check_encoder(ff, spec, target_mpp=1.0)
    other = dict(spec.to_dict(), weights_sha256="b" * 64)
    ff.attrs["encoder_spec"] = dict(spec.to_dict(), weights_sha256="a" * 64)
    with pytest.raises(FeatureFileError, match="different weights"):
        check_encoder(ff, other)
    foreign = FeatureFile(
        features=rng.standard_normal((3, 132)).astype(np.float32), path=tmp_path / "clam.h5"
    )
    check_encoder(foreign, spec)  # unknown encoder, matching dim: accepted
    with pytest.raises(FeatureFileError, match="does not record which patch encoder"):
        check_encoder(foreign, spec, strict=True)


def test_one_dimensional_features_named_before_row_counts(tmp_path):
    """pretrain probes headers only (load_features=False): the 1-D array is the problem."""
    import h5py

    p = tmp_path / "oned.h5"
    with h5py.File(p, "w") as fh:
        fh.create_dataset("features", data=np.zeros(384, np.float32))
        fh.create_dataset("coords", data=np.zeros((1, 2), np.int64))
    for load in (True, False):
        with pytest.raises(FeatureFileError, match=r"2-D \[tiles, dim\] array, got shape \(384,\)"):
            read_features(p, load_features=load)
