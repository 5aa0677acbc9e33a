"""Feature extraction: one slide, in memory, cohorts (resume, shards, failures, cancel), CLI."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from _slides import tissue_slide_array, write_cohort_csv, write_ome_pyramid, write_pyramidal_tiff

from mirror_model.cli import main
from mirror_model.errors import Cancelled, FeatureFileError, SlideError
from mirror_model.extract import extract_cohort, extract_features_in_memory, extract_slide
from mirror_model.features import FeatureFile, read_features, write_features
from mirror_model.patch_encoders import create_patch_encoder
from mirror_model.slide import make_tile_grid, open_slide

EXPECTED = {
    (x, y) for y in range(256, 1280, 256) for x in range(512, 1536, 256)
}  # the tissue rectangle


@pytest.fixture(scope="module")
def slides(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("slides")
    out = {}
    for i in range(3):
        img = tissue_slide_array(2048, 1536, seed=i, rect=(512, 256, 1536, 1280))
        if i == 1:
            p = d / f"s{i}.ome.tif"
            write_ome_pyramid(p, img, physical_size=0.5, n_levels=3)
        else:
            p = d / f"s{i}.tif"
            write_pyramidal_tiff(p, img, mpp=0.5, n_levels=3)
        out[f"S{i}"] = p
    return out


@pytest.fixture(scope="module")
def encoder() -> torch.nn.Module:
    return create_patch_encoder("stain-texture")


def test_in_memory_features(slides: dict[str, Path], encoder: torch.nn.Module) -> None:
    ff = extract_features_in_memory(
        slides["S0"], encoder, batch_size=5, device="cpu", num_workers=2
    )
    assert isinstance(ff, FeatureFile)
    assert {tuple(c) for c in ff.coords_level0.tolist()} == EXPECTED
    assert ff.features.shape == (16, encoder.spec.dim) and np.isfinite(ff.features).all()
    assert ff.patch_size_level0 == 256 and ff.target_mpp == 0.5 and ff.encoder == "stain-texture"
    assert ff.attrs["encoder_spec"]["dim"] == encoder.spec.dim
    assert ff.attrs["slide_mpp"] == 0.5 and (ff.attrs["slide_width"], ff.attrs["slide_height"]) == (
        2048,
        1536,
    )
    # rows match the tiles: encode tile k by hand (read at the 4x level = 64 px, the encoder input)
    with open_slide(slides["S0"]) as s:
        k = 7
        x, y = ff.coords_level0[k]
        tile = s.read_region((int(x), int(y)), 2, (64, 64))
    with torch.no_grad():
        ref = encoder(torch.from_numpy(tile).permute(2, 0, 1)[None].float() / 255.0)[0].numpy()
    np.testing.assert_allclose(ff.features[k], ref, atol=1e-5)
    # reader threads / batch size do not change the result or its order
    ff1 = extract_features_in_memory(
        slides["S0"], encoder, batch_size=16, device="cpu", num_workers=1
    )
    np.testing.assert_array_equal(ff1.coords_level0, ff.coords_level0)
    np.testing.assert_allclose(ff1.features, ff.features, atol=1e-5)


def test_in_memory_with_given_grid_and_open_handle(
    slides: dict[str, Path], encoder: torch.nn.Module
) -> None:
    with open_slide(slides["S1"]) as s:  # OME-TIFF through the tifffile backend
        grid = make_tile_grid(s, target_mpp=1.0, tile_px=128)
        calls: list[tuple[int, int]] = []
        ff = extract_features_in_memory(
            s,
            encoder,
            grid=grid,
            batch_size=4,
            device="cpu",
            progress=lambda d, t, stage: calls.append((d, t)),
        )
    assert {tuple(c) for c in ff.coords_level0.tolist()} == EXPECTED
    assert ff.target_mpp == 1.0 and ff.attrs["tile_px"] == 128
    assert calls[0] == (0, 16) and calls[-1] == (16, 16)


def test_extract_slide_writes_and_skips(
    tmp_path: Path, slides: dict[str, Path], encoder: torch.nn.Module
) -> None:
    out = tmp_path / "S0.h5"
    r = extract_slide(slides["S0"], encoder, out, device="cpu")
    assert r.status == "extracted" and r.n_tiles == 16 and out.exists()
    ff = read_features(out)
    assert ff.attrs["slide_id"] == "s0" and ff.encoder == "stain-texture"
    mtime = out.stat().st_mtime_ns
    r2 = extract_slide(slides["S0"], encoder, out, device="cpu")
    assert r2.status == "skipped" and out.stat().st_mtime_ns == mtime
    # a file from another encoder is never silently replaced
    other = FeatureFile(
        features=np.ones((2, 3), np.float32), encoder="uni", coords_level0=np.zeros((2, 2))
    )
    write_features(out, other)
    with pytest.raises(FeatureFileError, match=r"S0\.h5: features come from encoder 'uni'"):
        extract_slide(slides["S0"], encoder, out, device="cpu")
    assert (
        extract_slide(slides["S0"], encoder, out, device="cpu", overwrite=True).status
        == "extracted"
    )
    # a damaged file is re-extracted
    out.write_bytes(b"broken")
    assert extract_slide(slides["S0"], encoder, out, device="cpu").status == "extracted"
    assert read_features(out).n_tiles == 16


def test_cohort_resume_and_shards(
    tmp_path: Path, slides: dict[str, Path], encoder: torch.nn.Module
) -> None:
    csv = write_cohort_csv(tmp_path / "cohort.csv", slides)
    out = tmp_path / "feats"
    r0 = extract_cohort(csv, out, encoder, device="cpu", rank=0, world_size=2)
    r1 = extract_cohort(csv, out, encoder, device="cpu", rank=1, world_size=2)
    assert [r.slide_id for r in r0.results] == ["S0", "S2"] and [
        r.slide_id for r in r1.results
    ] == ["S1"]
    assert r0.n_extracted == 2 and r1.n_extracted == 1
    assert sorted(p.name for p in out.iterdir()) == ["S0.h5", "S1.h5", "S2.h5"]
    again = extract_cohort(csv, out, encoder, device="cpu")  # single process, everything done
    assert again.n_skipped == 3 and again.n_extracted == 0
    assert again.n_slides == 3 and again.n_done == 3 and again.n_tiles == 48 and again.n_failed == 0


def test_cohort_rank_from_torchrun_env(
    tmp_path: Path,
    slides: dict[str, Path],
    encoder: torch.nn.Module,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    csv = write_cohort_csv(tmp_path / "cohort.csv", slides)
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "3")
    res = extract_cohort(csv, tmp_path / "f", encoder, device="cpu")
    assert (res.rank, res.world_size) == (2, 3) and [r.slide_id for r in res.results] == ["S2"]


def test_cohort_failures(tmp_path: Path, slides: dict[str, Path], encoder: torch.nn.Module) -> None:
    blank = tmp_path / "blank.tif"
    write_pyramidal_tiff(blank, np.full((768, 768, 3), 250, np.uint8), mpp=0.5, n_levels=1)
    csv = write_cohort_csv(tmp_path / "cohort.csv", {"B": blank, "S0": slides["S0"]})
    with pytest.raises(SlideError, match=r"blank\.tif: no tissue found"):
        extract_cohort(csv, tmp_path / "a", encoder, device="cpu")
    res = extract_cohort(csv, tmp_path / "b", encoder, device="cpu", on_error="continue")
    assert [r.status for r in res.results] == ["failed", "extracted"]
    assert "no tissue found" in res.failed[0].error
    assert not (tmp_path / "b" / "B.h5").exists()


def test_cancel_leaves_no_file(
    tmp_path: Path, slides: dict[str, Path], encoder: torch.nn.Module
) -> None:
    calls = {"n": 0}

    def stop() -> bool:
        calls["n"] += 1
        return calls["n"] > 3  # after a couple of batches

    csv = write_cohort_csv(tmp_path / "cohort.csv", slides)
    out = tmp_path / "feats"
    with pytest.raises(Cancelled):
        extract_cohort(csv, out, encoder, device="cpu", batch_size=2, should_stop=stop)
    assert list(out.iterdir()) == []  # neither a partial .h5 nor a temp file
    res = extract_cohort(csv, out, encoder, device="cpu")  # the rerun completes
    assert res.n_extracted == 3


def test_cli_extract(
    tmp_path: Path, slides: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    csv = write_cohort_csv(tmp_path / "cohort.csv", {"S0": slides["S0"]})
    out = tmp_path / "f"
    rc = main(
        [
            "extract",
            "--cohort",
            str(csv),
            "--out",
            str(out),
            "--device",
            "cpu",
            "--batch-size",
            "8",
            "--quiet",
        ]
    )
    assert rc == 0 and (out / "S0.h5").exists()
    assert "1 extracted, 0 already done, 0 failed" in capsys.readouterr().out
    assert main(["extract", "--cohort", str(csv), "--out", str(out), "--quiet"]) == 0
    assert "0 extracted, 1 already done" in capsys.readouterr().out
    rc = main(["extract", "--cohort", str(csv), "--out", str(out), "--encoder", "uni", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "needs its pretrained weights" in err and "Traceback" not in err
    rc = main(["extract", "--cohort", str(tmp_path / "none.csv"), "--out", str(out), "--quiet"])
    assert rc == 2


def test_cli_extract_reports_failed_slides(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    nores = tmp_path / "nores.tif"
    import tifffile

    tifffile.imwrite(
        nores,
        tissue_slide_array(768, 768, rect=(0, 0, 768, 768)),
        tile=(128, 128),
        photometric="rgb",
    )
    csv = write_cohort_csv(tmp_path / "cohort.csv", {"N": nores})
    rc = main(["extract", "--cohort", str(csv), "--out", str(tmp_path / "f"), "--quiet"])
    captured = capsys.readouterr()
    assert rc == 2 and "failed N" in captured.err and "no resolution metadata" in captured.err
    rc = main(
        ["extract", "--cohort", str(csv), "--out", str(tmp_path / "f"), "--quiet", "--mpp", "0.5"]
    )
    assert rc == 0 and (tmp_path / "f" / "N.h5").exists()


def test_real_slide_extraction(cmu_small_svs: Path, encoder: torch.nn.Module) -> None:
    ff = extract_features_in_memory(cmu_small_svs, encoder, device="cpu")
    with open_slide(cmu_small_svs) as s:
        grid = make_tile_grid(s)
    np.testing.assert_array_equal(ff.coords_level0, grid.coords_level0)
    assert ff.patch_size_level0 == 257 and ff.attrs["slide_mpp"] == pytest.approx(0.499)
    assert np.isfinite(ff.features).all() and ff.features.std(0).max() > 0.05


def test_no_threads_left_behind(slides: dict[str, Path], encoder: torch.nn.Module) -> None:
    import threading

    before = {t.name for t in threading.enumerate()}
    extract_features_in_memory(slides["S0"], encoder, device="cpu", num_workers=3, batch_size=2)
    after = {t.name for t in threading.enumerate() if t.name.startswith("mirror-tile-reader")}
    assert after <= before


def test_single_level_slide_read_once_gives_same_features(tmp_path: Path, encoder: torch.nn.Module) -> None:
    from mirror_model.extract import _InMemoryLevel0

    path = tmp_path / "flat.tif"
    write_pyramidal_tiff(path, tissue_slide_array(1300, 1100, rect=(256, 256, 1024, 1024)), mpp=0.5, n_levels=1)
    cached = extract_features_in_memory(path, encoder, device="cpu")  # decoded once, served from memory
    with open_slide(path) as s:
        grid = make_tile_grid(s)
        direct = extract_features_in_memory(s, encoder, grid=grid, device="cpu")  # tile reads from the file
        mem = _InMemoryLevel0(s)
        for xy, size in [((1200, 1000), (300, 200)), ((-50, 10), (100, 100)), ((5, 7), (64, 64))]:
            np.testing.assert_array_equal(mem.read_region(xy, 0, size), s.read_region(xy, 0, size))
    np.testing.assert_array_equal(cached.coords_level0, direct.coords_level0)
    assert len(cached.coords_level0) == 9
    np.testing.assert_allclose(cached.features, direct.features, atol=1e-6)
