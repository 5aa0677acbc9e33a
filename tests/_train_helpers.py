"""A tiny paired toy cohort for the pretraining tests (features written as CLAM-layout h5).

Each patient has a latent vector z; its tiles are ``z @ W + noise`` and its expression is
``z @ V + noise`` (plus an offset so the values look like log-expression), so slide and
expression are truly paired and a contrastive model can learn the pairing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

PATCH_DIM = 16
N_GENES = 30

# a very small MIRROR so a step takes milliseconds
TINY_MODEL = {
    "embed_dim": 24,
    "n_prototypes": 16,
    "style_hidden_dims": [32, 16],
    "latent_dim": 8,
    "nystrom_conv_kernel": 3,
    "rna_mlp_hidden_dims": [32],
    "abmil_attention_dim": 16,
}


@dataclass
class Toy:
    root: Path
    cohort: Path
    expression: Path
    features: Path
    patients: list[str]
    slides: dict[str, list[str]]


def write_h5(path: Path, feats: np.ndarray, encoder: str = "toy-encoder") -> None:
    n = feats.shape[0]
    coords = np.stack([np.arange(n) * 256, np.zeros(n)], axis=1).astype(np.int64)
    with h5py.File(path, "w") as fh:
        ds = fh.create_dataset("features", data=feats.astype(np.float32))
        fh.create_dataset("coords", data=coords)
        fh["coords"].attrs["patch_size_level0"] = 256
        fh["coords"].attrs["patch_size"] = 256
        fh["coords"].attrs["patch_level"] = 0
        fh.attrs["encoder"] = encoder
        fh.attrs["patch_size_level0"] = 256
        fh.attrs["target_mpp"] = 0.5
        ds.attrs["encoder"] = encoder


def make_toy(
    root: Path,
    n_patients: int = 16,
    seed: int = 0,
    multi_slide_every: int = 4,
    tiles: tuple[int, int] = (12, 40),
    patch_dim: int = PATCH_DIM,
    n_genes: int = N_GENES,
) -> Toy:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    feat_dir = root / "features"
    feat_dir.mkdir(exist_ok=True)
    w = rng.normal(size=(4, patch_dim))
    v = rng.normal(size=(4, n_genes))
    rows, expr_rows, patients, slides = [], [], [], {}
    for i in range(n_patients):
        pid = f"P{i:03d}"
        patients.append(pid)
        z = rng.normal(size=4)
        sub = "A" if z[0] > 0 else "B"
        n_sl = 2 if (multi_slide_every and i % multi_slide_every == 0) else 1
        slides[pid] = []
        for j in range(n_sl):
            sid = f"{pid}-S{j}"
            n = int(rng.integers(tiles[0], tiles[1] + 1))
            feats = z @ w + 0.3 * rng.normal(size=(n, patch_dim))
            write_h5(feat_dir / f"{sid}.h5", feats)
            rows.append(f"{pid},{sid},slides/{sid}.svs,{sub},{10 + 5 * i},{i % 2}")
            slides[pid].append(sid)
        expr = 5.0 + z @ v + 0.3 * rng.normal(size=n_genes)
        expr_rows.append(pid + "," + ",".join(f"{x:.5f}" for x in expr))
    cohort = root / "cohort.csv"
    cohort.write_text(
        "patient_id,slide_id,slide_path,subtype,time,event\n" + "\n".join(rows) + "\n"
    )
    expression = root / "expression.csv"
    genes = [f"GENE{g}" for g in range(n_genes)]
    expression.write_text("sample_id," + ",".join(genes) + "\n" + "\n".join(expr_rows) + "\n")
    return Toy(root, cohort, expression, feat_dir, patients, slides)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest single-threaded, and the test machine's 2 cores are shared."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def pretrain_toy(toy: Toy, run: Path, config, **kw):
    """``pretrain`` of the toy cohort with the tiny model (the tests' one way to train)."""
    from mirror_model.train import pretrain

    kw.setdefault("model_overrides", TINY_MODEL)
    return pretrain(toy.cohort, toy.expression, toy.features, run, config=config, **kw)


def toy_cli_args(toy: Toy) -> list[str]:
    """The ``mirror-train pretrain`` input options for the toy cohort."""
    return ["--cohort", str(toy.cohort), "--expression", str(toy.expression),
            "--features", str(toy.features)]  # fmt: skip


def toy_config(**options):
    """A small, fast TrainConfig for the toy cohort (CPU, fp32); ``options`` override."""
    from mirror_model.train import TrainConfig

    base = dict(batch_size=4, lr=1e-3, tiles_per_slide=16, precision="fp32", device="cpu")
    return TrainConfig(**{**base, **options})
