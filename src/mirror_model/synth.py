"""Synthetic cohort: H&E-like whole-slide images, bulk expression and survival from one model.

The generator exists so that every part of MIRROR can be exercised end to end without
patient data, with known answers. Everything is deterministic for a given ``seed``
(independent of the number of worker processes).

Generative model
----------------
For patient ``p`` (``p = 1..P``):

1. **Subtype** ``s_p``: ``P`` labels dealt round-robin over the ``K`` subtypes (2 or 3) and
   shuffled, so the classes are balanced. Each subtype has a morphology, in order:
   ``glandular`` (tumour glands with white lumina, a ring of columnar nuclei, desmoplastic
   stroma between glands), ``solid`` (sheets of large pleomorphic vesicular nuclei with
   nucleoli in purple (amphophilic) cytoplasm) and ``discohesive`` (single-file chains of small
   cells with pale cytoplasm haloes infiltrating loose stroma).
2. **Latent risk** ``r_p ~ N(0, 1)``, shared by morphology, expression and survival.
3. **Morphology** (per slide, with small slide-to-slide noise ``e ~ N(0, 1)``):
   tumour fraction of the tissue ``tf = 0.2 + 0.5 * sigmoid(r_p + 0.5 e)``;
   grade ``g = sigmoid(1.5 r_p + 0.3 e')``, which scales nuclear size (``x (1 + 0.35 g)``),
   pleomorphism, nuclear density and hyperchromasia; density of tumour-infiltrating lymphocytes
   (inside the tumour region) ``x exp(-0.6 r_p)`` (more TILs = better prognosis). The
   non-tumour tissue carries **nuisance variation only**, drawn per slide independently of the
   patient: stromal lymphocyte density ``x exp(0.5 n1)``, collagen eosin ``x exp(0.12 n2)``,
   fibroblast density ``x exp(0.3 n3)`` (``n ~ N(0, 1)``) — as in real slides, where the
   amount and look of the surrounding normal tissue depend on how the block was cut, not on
   the tumour's transcriptome. Only the tumour region (and its extent) carries the signal
   that the expression also carries.
4. **Expression** (counts, negative binomial): for gene ``j`` with baseline log-mean
   ``b_j ~ N(log 200, 1.2)``, ``eta_pj = b_j + 1.2 [j is a marker of s_p]
   + w_j r_p + v_j (tf_p - 0.45) * 3 + u_pj`` with ``u_pj ~ N(0, 0.3)``,
   ``w_j = +-0.6`` on risk genes (else 0), ``v_j = +-0.5`` on tumour-content genes
   (epithelial up / stromal down); library size ``L_p ~ logN(0, 0.25)``;
   ``count_pj ~ NB(mean = L_p exp(eta_pj), dispersion phi = 0.15)`` (gamma-Poisson).
   Role of each gene: ``generative_model.json`` (``gene_roles``). Gene names are neutral
   (``SYN00001``…), sample IDs are TCGA-style barcodes of the patients (``TCGA-SY-0001-01A``).
5. **Survival** (months): Weibull proportional hazards
   ``h(t) = lambda0 k t^(k-1) exp(beta r_p + gamma_s)`` with ``k = 1.3``, ``beta = 1.0``,
   ``gamma`` = ``linspace(0, 0.4, K)`` and ``lambda0 = ln 2 / 36^k`` (median 36 months at
   ``r = 0``); event time ``T = (E / (lambda0 exp(beta r + gamma)))^(1/k)``, ``E ~ Exp(1)``;
   independent censoring ``C ~ U(6, 120)``; ``time = min(T, C)``, ``event = [T <= C]``.

Slides
------
Square, ``slide_px`` pixels at ``mpp`` µm/px (default 4096 px at 0.5 µm/px = 2 mm). Tissue is
a blob of thresholded smooth noise; tumour is a second smooth field thresholded inside the
tissue at the slide's tumour fraction (set on a coarse grid, so the realised fraction is close
to, not exactly, ``tf``; the mask records the realised region). Stain is rendered in optical density (Beer–Lambert):
haematoxylin and eosin maps ``H``, ``E`` (quantised OD levels) combined with stain vectors
(haematoxylin of Ruifrok & Johnston, eosin a little bluer for a natural pink; both jittered 3 %
per slide, with a +-10 % eosin intensity "batch effect") into RGB ``255 exp(-(H h + E e + bg))``,
so colour deconvolution recovers them. Stroma: eosin with anisotropic fibre texture and sparse
elongated fibroblast nuclei along the local fibre direction; lymphocytes scattered over the
stroma (nuisance density) and inside the tumour (risk-dependent density). Nuclei are stamped
from per-slide banks of textured elliptical nuclei whose sizes are given in µm, so ``mpp``
changes their size in pixels. Written as a
pyramidal tiled TIFF (one page per level, downsample 4 between levels, 256-px JPEG tiles,
resolution tags in cm) that OpenSlide reads with ``openslide.mpp-x = mpp``.
The ground-truth tumour mask is ``masks/<slide_id>.png`` (255 = tumour, 0 = not), one pixel
per ``mask_downsample`` x ``mask_downsample`` level-0 pixels (tumour when >= half the block is).

Files written in ``out_dir``: ``cohort.csv`` (design §2 columns + ``mask_path``),
``expression.csv`` (samples x genes, first column ``sample_id``), ``curated_genes.txt``
(a curated list: half the informative genes plus as many noise genes), ``truth.csv``
(latent risk, tumour fraction, grade, event and censoring times), ``slides/``, ``masks/``,
``generative_model.json`` (all parameters) and ``README.md``.
"""

from __future__ import annotations

import json
import math
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ._io import atomic_path, atomic_write_text
from ._progress import ProgressFn, StopFn, check_cancel, report
from ._validation import FieldChecker
from .errors import ConfigError

__all__ = [
    "MORPHOLOGIES",
    "RenderedSlide",
    "SynthConfig",
    "SynthSummary",
    "synthesize_cohort",
    "synthesize_tiny_cohort",
    "write_pyramid_tiff",
]

MORPHOLOGIES = ("glandular", "solid", "discohesive")
DEFAULT_SUBTYPES = MORPHOLOGIES
FORMAT_VERSION = 1

# Ruifrok & Johnston stain vectors (optical density per unit stain, R, G, B)
_H_VEC = np.array([0.650, 0.704, 0.286], dtype=np.float64)
_E_VEC = np.array(
    [0.13, 0.88, 0.45], dtype=np.float64
)  # eosin, a little bluer than Ruifrok's (pinker stroma)
_BG_OD = np.array([0.025, 0.03, 0.02], dtype=np.float64)  # slightly warm white glass
_H_LEVELS, _E_LEVELS = 128, 128
_H_MAX, _E_MAX = 2.2, 1.4  # OD ranges mapped onto the colour lookup table


@dataclass(frozen=True)
class SynthConfig:
    """All parameters of the generative model (see the module docstring)."""

    n_patients: int = 40
    seed: int = 0
    slide_px: int = 4096
    mpp: float = 0.5
    n_genes: int = 500
    subtypes: tuple[str, ...] = DEFAULT_SUBTYPES
    slides_per_patient: int = 1
    mask_downsample: int = 16
    tile_px: int = 256
    pyramid_downsample: int = 4
    jpeg_quality: int = 90
    # survival
    weibull_shape: float = 1.3
    baseline_median_months: float = 36.0
    beta_risk: float = 1.0
    subtype_log_hazard_max: float = 0.4
    censor_min_months: float = 6.0
    censor_max_months: float = 120.0
    # expression
    marker_fraction: float = 0.04  # per subtype, fraction of genes
    risk_fraction: float = 0.06
    tumour_content_fraction: float = 0.04
    marker_log_fc: float = 1.2
    risk_loading: float = 0.6
    tumour_content_loading: float = 0.5
    biological_sd: float = 0.3
    library_sd: float = 0.25
    nb_dispersion: float = 0.15
    baseline_log_mean: float = math.log(200.0)
    baseline_log_sd: float = 1.2

    def validate(self) -> None:
        v = FieldChecker(self, "SynthConfig")
        v.integer("n_patients", 2)
        v.rule("n_patients", self.n_patients <= 9999, "must be <= 9999 (4-digit barcodes)")
        v.rule(
            "subtypes",
            2 <= len(self.subtypes) <= len(MORPHOLOGIES),
            f"must name 2 or 3 classes (morphologies {', '.join(MORPHOLOGIES)} in that order)",
        )
        v.rule(
            "subtypes",
            len(set(self.subtypes)) == len(self.subtypes) and all(self.subtypes),
            "subtype names must be distinct and non-empty",
        )
        v.integer("slide_px", 512)
        v.rule(
            "slide_px",
            self.slide_px % 256 == 0 and self.slide_px <= 32768,
            "must be a multiple of 256 in 512..32768",
        )
        v.choice("mask_downsample", (1, 2, 4, 8, 16, 32, 64))
        v.choice("pyramid_downsample", (2, 4))
        v.integer("tile_px", 64)
        v.rule(
            "tile_px",
            self.tile_px % 16 == 0 and self.tile_px <= 1024,
            "must be a multiple of 16 in 64..1024",
        )
        v.number("mpp", 0.0, lo_open=True)
        min_genes = 4 * len(self.subtypes) + 8
        v.integer("n_genes", min_genes, note=f"{len(self.subtypes)} subtypes need that many")
        v.integer("slides_per_patient", 1)
        v.integer("jpeg_quality", 1)
        v.rule("jpeg_quality", self.jpeg_quality <= 100, "must be in 1..100")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["subtypes"] = list(self.subtypes)
        return d


@dataclass
class SynthSummary:
    """What :func:`synthesize_cohort` wrote, with the ground truth as arrays (patient order)."""

    out_dir: Path
    cohort_csv: Path
    expression_csv: Path
    truth_csv: Path
    curated_genes: Path
    model_json: Path
    config: SynthConfig
    patient_ids: list[str]
    subtype: list[str]
    latent_risk: np.ndarray
    tumour_fraction: np.ndarray  # per patient, target fraction of tissue (first slide)
    grade: np.ndarray
    time_months: np.ndarray
    event: np.ndarray
    slide_ids: list[str]
    slide_paths: list[Path]
    mask_paths: list[Path]
    level_dimensions: list[tuple[int, int]]
    gene_roles: dict[str, list[str]] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def n_patients(self) -> int:
        return len(self.patient_ids)

    @property
    def n_slides(self) -> int:
        return len(self.slide_ids)


# ---------------------------------------------------------------------------- cohort level


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _patient_variables(cfg: SynthConfig, rng: np.random.Generator) -> dict:
    P, K = cfg.n_patients, len(cfg.subtypes)
    subtype_idx = np.arange(P) % K
    rng.shuffle(subtype_idx)
    risk = rng.standard_normal(P)
    # survival: Weibull PH
    k = cfg.weibull_shape
    lam0 = math.log(2.0) / cfg.baseline_median_months**k
    gamma = np.linspace(0.0, cfg.subtype_log_hazard_max, K)[subtype_idx]
    lin = cfg.beta_risk * risk + gamma
    event_time = (rng.exponential(1.0, P) / (lam0 * np.exp(lin))) ** (1.0 / k)
    censor_time = rng.uniform(cfg.censor_min_months, cfg.censor_max_months, P)
    time_m = np.round(np.minimum(event_time, censor_time), 2)
    time_m = np.maximum(time_m, 0.01)
    event = (event_time <= censor_time).astype(np.int64)
    return {
        "subtype_idx": subtype_idx,
        "risk": risk,
        "event_time": event_time,
        "censor_time": censor_time,
        "time": time_m,
        "event": event,
    }


def _slide_morphology(cfg: SynthConfig, risk: float, rng: np.random.Generator) -> dict:
    e1, e2 = rng.standard_normal(2)
    return {
        "tumour_fraction": float(0.2 + 0.5 * _sigmoid(risk + 0.5 * e1)),
        "grade": float(_sigmoid(1.5 * risk + 0.3 * e2)),
        "til_factor": float(math.exp(-0.6 * risk)),
    }


def _gene_roles(
    cfg: SynthConfig, rng: np.random.Generator
) -> tuple[list[str], dict[str, list[int]]]:
    G, K = cfg.n_genes, len(cfg.subtypes)
    genes = [f"SYN{j + 1:05d}" for j in range(G)]
    n_marker = max(2, round(cfg.marker_fraction * G))
    n_risk = max(2, round(cfg.risk_fraction * G))
    n_tc = max(2, round(cfg.tumour_content_fraction * G))
    need = K * n_marker + n_risk + n_tc
    if need > G:
        scale = G / need * 0.9
        n_marker, n_risk, n_tc = (max(1, int(x * scale)) for x in (n_marker, n_risk, n_tc))
    order = rng.permutation(G)
    roles: dict[str, list[int]] = {}
    pos = 0
    for s in cfg.subtypes:
        roles[f"marker:{s}"] = sorted(order[pos : pos + n_marker].tolist())
        pos += n_marker
    risk_idx = order[pos : pos + n_risk]
    pos += n_risk
    roles["risk_up"] = sorted(risk_idx[: (n_risk + 1) // 2].tolist())
    roles["risk_down"] = sorted(risk_idx[(n_risk + 1) // 2 :].tolist())
    tc_idx = order[pos : pos + n_tc]
    pos += n_tc
    roles["tumour_content_up"] = sorted(tc_idx[: (n_tc + 1) // 2].tolist())
    roles["stroma_content_up"] = sorted(tc_idx[(n_tc + 1) // 2 :].tolist())
    roles["noise"] = sorted(order[pos:].tolist())
    return genes, roles


def _expression_counts(
    cfg: SynthConfig,
    pv: dict,
    tf: np.ndarray,
    roles: dict[str, list[int]],
    rng: np.random.Generator,
) -> np.ndarray:
    P, G = cfg.n_patients, cfg.n_genes
    base = rng.normal(cfg.baseline_log_mean, cfg.baseline_log_sd, G)
    eta = np.broadcast_to(base, (P, G)).copy()
    for k, s in enumerate(cfg.subtypes):
        idx = roles[f"marker:{s}"]
        eta[np.ix_(pv["subtype_idx"] == k, idx)] += cfg.marker_log_fc
    w = np.zeros(G)
    w[roles["risk_up"]] = cfg.risk_loading
    w[roles["risk_down"]] = -cfg.risk_loading
    v = np.zeros(G)
    v[roles["tumour_content_up"]] = cfg.tumour_content_loading
    v[roles["stroma_content_up"]] = -cfg.tumour_content_loading
    eta += np.outer(pv["risk"], w) + np.outer((tf - 0.45) * 3.0, v)
    eta += rng.normal(0.0, cfg.biological_sd, (P, G))
    lib = np.exp(rng.normal(0.0, cfg.library_sd, P))
    mean = lib[:, None] * np.exp(eta)
    phi = cfg.nb_dispersion
    lam = rng.gamma(shape=1.0 / phi, scale=mean * phi)
    return rng.poisson(lam).astype(np.int64)


# ---------------------------------------------------------------------------- rendering


def _interp_matrix(n_out: int, n_in: int) -> np.ndarray:
    """Dense bilinear interpolation matrix [n_out, n_in] (pixel-centre aligned)."""
    x = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
    x = np.clip(x, 0, n_in - 1)
    i0 = np.floor(x).astype(np.int64)
    i1 = np.minimum(i0 + 1, n_in - 1)
    f = (x - i0).astype(np.float32)
    m = np.zeros((n_out, n_in), dtype=np.float32)
    m[np.arange(n_out), i0] += 1 - f
    m[np.arange(n_out), i1] += f
    return m


def _resize(a: np.ndarray, n_out: int) -> np.ndarray:
    """Bilinear resize of a square float32 field by two small matrix products (fast)."""
    m = _interp_matrix(n_out, a.shape[0])
    return (m @ a.astype(np.float32)) @ m.T


def _smooth_noise(rng: np.random.Generator, n: int, sigma: float) -> np.ndarray:
    """Unit-variance Gaussian-filtered white noise on an n x n grid (``sigma`` in grid px)."""
    from scipy import ndimage as ndi

    a = ndi.gaussian_filter(rng.standard_normal((n, n)).astype(np.float32), sigma, mode="reflect")
    return (a - a.mean()) / (a.std() + 1e-8)


def _uniform_noise(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Uniform integers 0..255 from raw bytes (much faster than normal variates)."""
    return np.frombuffer(rng.bytes(int(np.prod(shape))), dtype=np.uint8).reshape(shape)


def _up2(a: np.ndarray) -> np.ndarray:
    """Nearest-neighbour x2 upsampling in one broadcast copy."""
    n, m = a.shape
    out = np.empty((n, 2, m, 2), dtype=a.dtype)
    out[...] = a[:, None, :, None]
    return out.reshape(2 * n, 2 * m)


# Stain maps are kept as quantised optical density (uint8 levels) at level 0: 4x less memory
# traffic than float32, and the colour is then one lookup-table gather.
_QH = (_H_LEVELS - 1) / _H_MAX  # levels per unit haematoxylin OD
_QE = (_E_LEVELS - 1) / _E_MAX


def _q(od: np.ndarray | float, scale: float, levels: int) -> np.ndarray:
    return np.clip(np.round(np.asarray(od, dtype=np.float32) * scale), 0, levels - 1).astype(
        np.uint8
    )


def _nucleus_bank(
    rng: np.random.Generator,
    n: int,
    a_px: tuple[float, float],
    b_px: tuple[float, float],
    amp: tuple[float, float],
    *,
    vesicular: float = 0.0,
    nucleolus: bool = False,
    angles: np.ndarray | None = None,
    texture: float = 0.25,
    quantise: bool = True,
) -> list[np.ndarray]:
    """Stamps of haematoxylin OD (uint8 levels, or float in [0, 1] when ``quantise=False``):
    textured ellipses with soft, slightly irregular edges.

    ``a_px``/``b_px``: ranges of the semi-axes (px) along/across the angle; ``angles``: the
    angle (radians) of each stamp, default random; ``vesicular``: 0 = evenly dark, 1 = dark rim
    with a pale centre (open chromatin); ``nucleolus``: add a dark dot.
    """
    bank = []
    for i in range(n):
        a = rng.uniform(*a_px)
        b = rng.uniform(*b_px)
        th = angles[i] if angles is not None else rng.uniform(0, np.pi)
        r = int(math.ceil(max(a, b))) + 2
        yy, xx = np.mgrid[-r : r + 1, -r : r + 1].astype(np.float32)
        c, s = math.cos(th), math.sin(th)
        phi = np.arctan2(yy, xx)
        wob = (
            1.0
            + 0.08 * rng.standard_normal() * np.sin(2 * phi + rng.uniform(0, 6.3))
            + 0.05 * rng.standard_normal() * np.sin(3 * phi + rng.uniform(0, 6.3))
        )
        u = (xx * c + yy * s) / a
        v = (-xx * s + yy * c) / b
        d2 = (u * u + v * v) / (wob * wob)
        inside = np.clip((1.0 - d2) * 4.0, 0.0, 1.0)
        prof = 1.0 - vesicular * (1.0 - np.clip(d2, 0, 1)) * 0.6
        tex = 1.0 + texture * (rng.random(d2.shape, dtype=np.float32) * 2 - 1)
        st = rng.uniform(*amp) * inside * prof * tex
        if nucleolus:
            oy, ox = rng.uniform(-0.3, 0.3, 2) * b
            st += (
                0.9
                * inside
                * np.exp(-((yy - oy) ** 2 + (xx - ox) ** 2) / (2 * (0.14 * b + 0.8) ** 2))
            )
        bank.append(_q(st, _QH, _H_LEVELS) if quantise else st.astype(np.float32))
    return bank


def _clip_box(shape: tuple[int, int], y: int, x: int, h: int, w: int):
    H, W = shape
    y0, x0 = y - h // 2, x - w // 2
    y1, x1 = min(H, y0 + h), min(W, x0 + w)
    sy0, sx0 = max(0, -y0), max(0, -x0)
    y0, x0 = max(0, y0), max(0, x0)
    if y1 <= y0 or x1 <= x0:
        return None
    return (slice(y0, y1), slice(x0, x1)), (slice(sy0, sy0 + y1 - y0), slice(sx0, sx0 + x1 - x0))


def _stamp_regions(
    target: np.ndarray, ys: np.ndarray, xs: np.ndarray, bank: list[np.ndarray], choice: np.ndarray
):
    """(target view, stamp view) for each centred stamp ``bank[choice[i]]`` at (ys[i], xs[i]),
    clipped to the target."""
    for y, x, k in zip(ys.tolist(), xs.tolist(), choice.tolist(), strict=True):
        s = bank[k]
        box = _clip_box(target.shape, y, x, s.shape[0], s.shape[1])
        if box is not None:
            yield target[box[0]], s[box[1]]


def _stamp_max(
    target: np.ndarray, ys: np.ndarray, xs: np.ndarray, bank: list[np.ndarray], choice: np.ndarray
) -> None:
    """target = max(target, stamp) around each (y, x); stamps are centred."""
    for sub, s in _stamp_regions(target, ys, xs, bank, choice):
        np.maximum(sub, s, out=sub)


def _stamp_blend(
    target: np.ndarray,
    ys: np.ndarray,
    xs: np.ndarray,
    bank: list[np.ndarray],
    choice: np.ndarray,
    value: int,
) -> None:
    """target = target (1 - m) + value m around each point, m = float stamp in [0, 1]."""
    for sub, m in _stamp_regions(target, ys, xs, bank, choice):
        sub[...] = np.round(sub + (value - sub.astype(np.float32)) * m).astype(target.dtype)


def _poisson_points(
    rng: np.random.Generator, region_half: np.ndarray, n_px: int, density_per_px: float
) -> tuple[np.ndarray, np.ndarray]:
    """Uniform random level-0 points at ``density_per_px`` (per px^2) kept where the half-
    resolution mask ``region_half`` is True."""
    n = rng.poisson(density_per_px * n_px * n_px)
    ys = rng.integers(0, n_px, n)
    xs = rng.integers(0, n_px, n)
    keep = region_half[ys // 2, xs // 2]
    return ys[keep], xs[keep]


def _colour_lut(h_vec: np.ndarray, e_vec: np.ndarray, bg: np.ndarray) -> np.ndarray:
    """uint8 RGB lookup table indexed by ``hq << 7 | eq`` (quantised OD levels)."""
    h = (np.arange(_H_LEVELS) / _QH)[:, None, None]
    e = (np.arange(_E_LEVELS) / _QE)[None, :, None]
    od = h * h_vec + e * e_vec + bg
    rgb = np.clip(255.0 * np.exp(-od), 0, 255)
    return np.round(rgb).astype(np.uint8).reshape(_H_LEVELS * _E_LEVELS, 3)


@dataclass
class _SlideJob:
    index: int
    slide_id: str
    morphology: str
    tumour_fraction: float
    grade: float
    til_factor: float
    seed_entropy: tuple[int, ...]
    slide_px: int
    mpp: float
    tile_px: int = 256
    pyramid_downsample: int = 4
    mask_downsample: int = 16
    jpeg_quality: int = 90
    slide_path: str = ""
    mask_path: str = ""


@dataclass
class RenderedSlide:
    """One rendered slide before writing.

    ``rgb``: uint8 [N, N, 3] at level 0; ``tumour_half``: bool [N/2, N/2], the tumour region
    at downsample 2; ``haematoxylin``/``eosin``: the quantised OD maps (uint8 levels; OD =
    level / ``h_scale`` resp. ``e_scale``) when requested; ``n_tumour_nuclei``.
    """

    rgb: np.ndarray
    tumour_half: np.ndarray
    n_tumour_nuclei: int
    haematoxylin: np.ndarray | None = None
    eosin: np.ndarray | None = None
    h_scale: float = _QH
    e_scale: float = _QE

    def tumour_mask(self, downsample: int = 2) -> np.ndarray:
        """Tumour mask at ``downsample`` (>= 1, power of 2): a pixel is tumour when at least
        half of its level-0 block is."""
        t = self.tumour_half
        if downsample == 1:
            return _up2(t)
        if downsample == 2:
            return t.copy()
        f = downsample // 2
        n = t.shape[0] // f
        return t[: n * f, : n * f].reshape(n, f, n, f).mean(axis=(1, 3)) >= 0.5


def render_slide(job: _SlideJob, keep_stains: bool = False) -> RenderedSlide:
    """Render one slide (see the module docstring); deterministic for ``job.seed_entropy``."""
    from scipy import ndimage as ndi

    rng = np.random.default_rng(np.random.SeedSequence(list(job.seed_entropy)))
    N = job.slide_px
    s = 0.5 / job.mpp  # sizes below are in px at 0.5 µm/px
    half = N // 2
    g = job.grade
    morph = job.morphology
    size = 1.0 + 0.35 * g

    # ---- layout: tissue blob and tumour region, thresholded smooth fields. The fields live on
    # a small grid (their features are hundreds of µm wide) and are resized bilinearly, so the
    # region borders are smooth curves at every resolution.
    ng = 64
    yy, xx = (np.mgrid[0:ng, 0:ng].astype(np.float32) + 0.5) / ng
    cy, cx = 0.5 + rng.uniform(-0.05, 0.05, 2)
    rho2 = ((yy - cy) / 0.46) ** 2 + ((xx - cx) / 0.46) ** 2
    # smooth penalty near the border keeps a white margin without a jagged cut
    tissue_c = _smooth_noise(rng, ng, 5.0) - 1.6 * rho2 - 40.0 * np.clip(rho2 - 0.95, 0, None)
    coverage = rng.uniform(0.35, 0.5)
    thr_t = np.quantile(tissue_c, 1 - coverage)
    tumour_c = _smooth_noise(rng, ng, 4.6)
    thr_u = np.quantile(tumour_c[tissue_c > thr_t], 1 - job.tumour_fraction)
    tissue_h = _resize(tissue_c - thr_t, half) > 0
    tumour_h = (_resize(tumour_c - thr_u, half) > 0) & tissue_h

    # ---- stroma: eosin with fibre texture (half resolution, two orientations mixed)
    noise_h = _uniform_noise(rng, (half, half)).astype(np.float32)
    L = max(3, int(round(7 * s)) | 1)
    fib_a = ndi.uniform_filter1d(ndi.uniform_filter1d(noise_h, L, axis=1), L, axis=1)
    fib_b = ndi.uniform_filter1d(ndi.uniform_filter1d(noise_h[::-1].T, L, axis=0), L, axis=0)
    w = np.clip(0.5 + _resize(_smooth_noise(rng, ng, 1.3), half), 0.0, 1.0)
    fib = w * fib_a + (1 - w) * fib_b
    del fib_a, fib_b
    fib = (fib - fib.mean()) / (fib.std() + 1e-6)
    dens = _resize(_smooth_noise(rng, ng, 2.0), half)  # looser / denser collagen
    e_strength = rng.uniform(0.9, 1.1)  # per-slide stain intensity (batch effect)
    # per-slide nuisance of the non-tumour tissue, independent of the patient (module docstring)
    n_lym, n_col, n_fib = rng.standard_normal(3)
    E_h = (0.50 + 0.06 * fib + 0.06 * dens) * e_strength
    E_h = np.where(tumour_h, E_h, E_h * math.exp(0.12 * n_col))
    H_h = np.full((half, half), 0.04, dtype=np.float32)
    if morph == "solid":
        cyto = 0.30 + 0.04 * (noise_h / 127.5 - 1.0)
        E_h = np.where(tumour_h, cyto, E_h)
        H_h = np.where(tumour_h, 0.22 + 0.08 * g, H_h)
    elif morph == "glandular":
        E_h = np.where(tumour_h, E_h * 0.85, E_h)  # desmoplastic, looser stroma
    else:  # discohesive: loose oedematous stroma around the infiltrating cells
        E_h = np.where(tumour_h, E_h * 0.72, E_h)
        H_h = np.where(tumour_h, 0.07, H_h)
    # dithered quantisation (the dither doubles as fine grain)
    dith = noise_h[::-1, ::-1] / 255.0 - 0.5
    E_q = _q(np.where(tissue_h, np.clip(E_h, 0.05, None), 0.0) * _QE + dith, 1.0, _E_LEVELS)
    H_q = _q(np.where(tissue_h, H_h, 0.0) * _QH - dith, 1.0, _H_LEVELS)
    del E_h, H_h, dith, fib, dens
    E = _up2(E_q)
    H = _up2(H_q)
    del E_q, H_q

    # ---- tumour structures
    if morph == "glandular":
        n_tumour = _draw_glands(rng, E, H, tumour_h, g, s)
    elif morph == "solid":
        spacing = (30.0 - 6.0 * g) * s
        gy, gx = np.mgrid[0:N:spacing, 0:N:spacing]
        gx = gx + (np.arange(gy.shape[0])[:, None] % 2) * spacing / 2  # hexagonal packing
        ys = np.clip(
            (gy + rng.normal(0, 0.18 * spacing, gy.shape)).astype(np.int64).ravel(), 0, N - 1
        )
        xs = np.clip(
            (gx + rng.normal(0, 0.18 * spacing, gx.shape)).astype(np.int64).ravel(), 0, N - 1
        )
        keep = tumour_h[ys // 2, xs // 2]
        ys, xs = ys[keep], xs[keep]
        bank = _nucleus_bank(
            rng,
            64,
            (8 * s * size, 13 * s * size),
            (6 * s * size, 10 * s * size),
            (0.75 + 0.2 * g, 1.05 + 0.35 * g),
            vesicular=0.8,
            nucleolus=True,
            texture=0.3,
        )
        _stamp_max(H, ys, xs, bank, rng.integers(0, len(bank), len(ys)))
        n_tumour = len(ys)
    else:  # discohesive: chains of cells in single file
        n_cells_target = tumour_h.sum() * 4 / (34.0 * s) ** 2 * (0.9 + 0.3 * g)
        n_chains = max(1, int(n_cells_target / 9))
        main_dir = rng.uniform(0, np.pi)
        seeds_y, seeds_x = _poisson_points(rng, tumour_h, N, n_chains / tumour_h.size)
        ys_l, xs_l = [np.zeros(0)], [np.zeros(0)]
        for y0, x0 in zip(seeds_y.tolist(), seeds_x.tolist(), strict=True):
            n_cells = int(rng.integers(5, 15))
            ang = main_dir + rng.normal(0, 0.35) + rng.normal(0, 0.05) * np.arange(n_cells)
            step = 17.0 * s * (1 + 0.15 * g)
            ys_l.append(y0 + np.cumsum(np.sin(ang) * step))
            xs_l.append(x0 + np.cumsum(np.cos(ang) * step))
        ys = np.concatenate(ys_l).astype(np.int64)
        xs = np.concatenate(xs_l).astype(np.int64)
        ok = (ys >= 0) & (ys < N) & (xs >= 0) & (xs < N)
        ys, xs = ys[ok], xs[ok]
        ok = tumour_h[ys // 2, xs // 2]
        ys, xs = ys[ok], xs[ok]
        halo = _nucleus_bank(
            rng, 16, (11 * s, 14 * s), (9 * s, 12 * s), (1.0, 1.0), texture=0.0, quantise=False
        )
        _stamp_blend(E, ys, xs, halo, rng.integers(0, len(halo), len(ys)), int(0.16 * _QE))
        _stamp_blend(H, ys, xs, halo, rng.integers(0, len(halo), len(ys)), int(0.10 * _QH))
        bank = _nucleus_bank(
            rng,
            48,
            (5 * s * size, 7 * s * size),
            (4 * s * size, 6 * s * size),
            (1.1 + 0.2 * g, 1.4 + 0.3 * g),
            texture=0.2,
        )
        # nuclei pushed off-centre in their cell (signet-ring-like)
        off = np.round(rng.normal(0, 3.0 * s, (2, len(ys)))).astype(np.int64)
        _stamp_max(
            H,
            np.clip(ys + off[0], 0, N - 1),
            np.clip(xs + off[1], 0, N - 1),
            bank,
            rng.integers(0, len(bank), len(ys)),
        )
        n_tumour = len(ys)

    # ---- stromal fibroblasts (elongated along the local fibre direction) and lymphocytes
    angles = np.repeat(np.linspace(0, np.pi, 12, endpoint=False), 4)
    fibro = _nucleus_bank(
        rng,
        len(angles),
        (9 * s, 13 * s),
        (2.2 * s, 3.2 * s),
        (0.9, 1.2),
        angles=angles,
        texture=0.2,
    )
    stroma_like = tissue_h & ~tumour_h if morph == "solid" else tissue_h
    fy, fx = _poisson_points(rng, stroma_like, N, math.exp(0.3 * n_fib) / (45.0 * s) ** 2)
    # w≈1: fibres along x (angle 0); w≈0: along y (angle pi/2)
    wloc = w[fy // 2, fx // 2]
    fib_angle = np.where(rng.random(len(fy)) < wloc, 0.0, np.pi / 2) + rng.normal(0, 0.2, len(fy))
    bins = np.round((fib_angle % np.pi) / (np.pi / 12)).astype(np.int64) % 12
    _stamp_max(H, fy, fx, fibro, bins * 4 + rng.integers(0, 4, len(fy)))
    lymph = _nucleus_bank(
        rng, 24, (5.5 * s, 7.0 * s), (5.0 * s, 6.5 * s), (1.35, 1.65), texture=0.15
    )
    # stromal lymphocytes (nuisance density) and tumour-infiltrating ones (risk-dependent); the
    # TILs draw from their own stream so the patient's risk leaves the rest of the slide unchanged
    til_rng = np.random.default_rng(rng.integers(0, 2**63 - 1))
    sy, sx = _poisson_points(rng, tissue_h & ~tumour_h, N, math.exp(0.5 * n_lym) / (95.0 * s) ** 2)
    _stamp_max(H, sy, sx, lymph, rng.integers(0, len(lymph), len(sy)))
    ty, tx = _poisson_points(til_rng, tumour_h, N, job.til_factor / (95.0 * s) ** 2)
    _stamp_max(H, ty, tx, lymph, til_rng.integers(0, len(lymph), len(ty)))
    del w, noise_h

    # ---- colour: Beer-Lambert through a lookup table
    h_vec = _H_VEC * (1 + rng.normal(0, 0.03, 3))
    e_vec = _E_VEC * (1 + rng.normal(0, 0.03, 3))
    lut = _colour_lut(h_vec, e_vec, _BG_OD)
    idx = H.astype(np.uint16)
    idx <<= 7
    idx |= E
    rgb = lut[idx]
    del idx
    return RenderedSlide(
        rgb=rgb,
        tumour_half=tumour_h,
        n_tumour_nuclei=int(n_tumour),
        haematoxylin=H if keep_stains else None,
        eosin=E if keep_stains else None,
    )


def _draw_glands(
    rng: np.random.Generator, E: np.ndarray, H: np.ndarray, tumour_h: np.ndarray, g: float, s: float
) -> int:
    """Tumour glands: lumen (white), epithelial ring (pink-purple), columnar nuclei in one to
    two rows. Returns the number of nuclei drawn."""
    from scipy import ndimage as ndi

    N = E.shape[0]
    f = 8  # level-0 px per coarse px
    coarse = tumour_h[f // 4 :: f // 2, f // 4 :: f // 2]
    dist = ndi.distance_transform_edt(coarse) * f  # px to the tumour border (level 0)
    cand_y, cand_x = np.nonzero(coarse)
    if len(cand_y) == 0:
        return 0
    order = rng.permutation(len(cand_y))[:6000]
    centres: list[tuple[float, float, float]] = []
    r_lo, r_hi = (70 - 20 * g) * s, (170 - 50 * g) * s
    c_arr = np.zeros((0, 3))
    for i in order.tolist():
        R = rng.uniform(r_lo, r_hi)
        if dist[cand_y[i], cand_x[i]] < R * 0.9:
            continue
        cy = cand_y[i] * f + f // 2 + rng.uniform(-f / 2, f / 2)
        cx = cand_x[i] * f + f // 2 + rng.uniform(-f / 2, f / 2)
        if len(c_arr):
            d = np.hypot(c_arr[:, 0] - cy, c_arr[:, 1] - cx)
            if np.any(d < (c_arr[:, 2] + R) * (1.08 + 0.3 * (1 - g))):
                continue
        centres.append((cy, cx, R))
        c_arr = np.asarray(centres)
    n_angle = 16
    angles = np.linspace(0, np.pi, n_angle, endpoint=False)
    size = 1.0 + 0.35 * g
    bank = _nucleus_bank(
        rng,
        n_angle * 4,
        (7.5 * s * size, 10 * s * size),
        (3.2 * s * size, 4.5 * s * size),
        (0.95 + 0.2 * g, 1.25 + 0.3 * g),
        angles=np.repeat(angles, 4),
        texture=0.25,
    )
    epi_e, epi_h = _q(0.36 + 0.05 * g, _QE, _E_LEVELS), _q(0.18 + 0.06 * g, _QH, _H_LEVELS)
    lum_e, lum_h = _q(0.03, _QE, _E_LEVELS), _q(0.0, _QH, _H_LEVELS)
    all_y, all_x, all_k = [], [], []
    for cy, cx, R in centres:
        aspect = rng.uniform(0.6, 1.0)
        th = rng.uniform(0, np.pi)
        epi_px = rng.uniform(22, 30) * s * (1 + 0.3 * g)  # epithelium thickness (columnar cells)
        lumen_frac = max(0.2, 1.0 - epi_px / (R * aspect))
        r = int(R) + 3
        y0, y1 = max(0, int(cy) - r), min(N, int(cy) + r + 1)
        x0, x1 = max(0, int(cx) - r), min(N, int(cx) + r + 1)
        yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
        dy, dx = yy - cy, xx - cx
        c, si = math.cos(th), math.sin(th)
        u = (dx * c + dy * si) / R
        v = (-dx * si + dy * c) / (R * aspect)
        phi = np.arctan2(v, u)
        wob = (
            1
            + 0.07 * np.sin(3 * phi + rng.uniform(0, 6.3))
            + 0.05 * np.sin(5 * phi + rng.uniform(0, 6.3))
        )
        rho = np.sqrt(u * u + v * v) / wob
        epi = (rho < 1.0) & (rho >= lumen_frac)
        lumen = rho < lumen_frac
        Eb, Hb = E[y0:y1, x0:x1], H[y0:y1, x0:x1]
        Eb[epi] = epi_e
        Hb[epi] = epi_h
        Eb[lumen] = lum_e
        Hb[lumen] = lum_h
        # columnar nuclei on the basal side of the ring (long axis radial); crowded, partly
        # stratified in higher grade
        for row, (rad_frac, keep_p) in enumerate(((0.78, 1.0), (0.55, 0.35 + 0.5 * g))):
            rad = 1.0 - (1.0 - lumen_frac) * (1 - rad_frac)
            circ = 2 * np.pi * R * rad * (1 + aspect) / 2
            n_nuc = max(6, int(circ / (9.0 * s)))
            t = np.linspace(0, 2 * np.pi, n_nuc, endpoint=False) + rng.uniform(0, 1) + row * 0.1
            t = t + rng.normal(0, 0.02, n_nuc)
            t = t[rng.random(n_nuc) < keep_p]
            rr = rad * (1 + rng.normal(0, 0.03, len(t)))
            pu, pv = rr * np.cos(t), rr * np.sin(t) * aspect
            py = cy + (pu * si + pv * c) * R
            px = cx + (pu * c - pv * si) * R
            radial = np.arctan2(py - cy, px - cx) % np.pi
            k = (
                np.round(radial / (np.pi / n_angle)).astype(np.int64) % n_angle
            ) * 4 + rng.integers(0, 4, len(t))
            all_y.append(np.round(py).astype(np.int64))
            all_x.append(np.round(px).astype(np.int64))
            all_k.append(k)
    if not all_y:
        return 0
    ys, xs, ks = np.concatenate(all_y), np.concatenate(all_x), np.concatenate(all_k)
    ok = (ys >= 0) & (ys < N) & (xs >= 0) & (xs < N)
    _stamp_max(H, ys[ok], xs[ok], bank, ks[ok])
    return int(ok.sum())


def _pyramid(rgb: np.ndarray, factor: int, min_px: int) -> list[np.ndarray]:
    levels = [rgb]
    while levels[-1].shape[0] // factor >= min_px and levels[-1].shape[0] % factor == 0:
        a = levels[-1]
        n = a.shape[0] // factor
        s = a.reshape(n, factor, n, factor, 3).sum(axis=(1, 3), dtype=np.uint32)
        levels.append(((s + factor * factor // 2) // (factor * factor)).astype(np.uint8))
    return levels


def write_pyramid_tiff(
    path: str | os.PathLike[str],
    rgb: np.ndarray,
    mpp: float,
    *,
    tile_px: int = 256,
    factor: int = 4,
    jpeg_quality: int = 90,
    description: str = "",
) -> list[tuple[int, int]]:
    """Write an RGB image as a pyramidal tiled JPEG TIFF that OpenSlide reads.

    One page per level (level 0 full size, then /factor each while the side stays >=
    ``tile_px``), resolution tags in pixels per centimetre (1e4 / mpp / downsample).
    Written atomically. Returns the (width, height) of each level.
    """
    import tifffile

    levels = _pyramid(rgb, factor, tile_px)
    with atomic_path(path) as tmp:
        with tifffile.TiffWriter(tmp, bigtiff=rgb.nbytes > 2**31) as tw:
            for i, lv in enumerate(levels):
                ds = factor**i
                tw.write(
                    lv,
                    tile=(tile_px, tile_px),
                    compression="jpeg",
                    compressionargs={"level": jpeg_quality},
                    photometric="rgb",
                    resolution=(1e4 / (mpp * ds), 1e4 / (mpp * ds)),
                    resolutionunit="CENTIMETER",
                    subfiletype=0 if i == 0 else 1,
                    maxworkers=1,
                    metadata=None,
                    description=description if i == 0 else None,
                )
        os.chmod(tmp, 0o644)
    return [(lv.shape[1], lv.shape[0]) for lv in levels]


def _level_dims(side: int, factor: int, min_px: int) -> list[tuple[int, int]]:
    """(width, height) per pyramid level, as :func:`_pyramid` makes them."""
    dims = [(side, side)]
    while dims[-1][0] // factor >= min_px and dims[-1][0] % factor == 0:
        dims.append((dims[-1][0] // factor,) * 2)
    return dims


def _write_png(path: str | os.PathLike[str], img: np.ndarray) -> None:
    import imagecodecs

    with atomic_path(path) as tmp:
        tmp.write_bytes(imagecodecs.png_encode(img))
        os.chmod(tmp, 0o644)


def _run_job(job: _SlideJob) -> dict:
    r = render_slide(job)
    desc = (
        f"napari-mirror synthetic slide {job.slide_id}; morphology={job.morphology}; mpp={job.mpp}"
    )
    dims = write_pyramid_tiff(
        job.slide_path,
        r.rgb,
        job.mpp,
        tile_px=job.tile_px,
        factor=job.pyramid_downsample,
        jpeg_quality=job.jpeg_quality,
        description=desc,
    )
    mask = r.tumour_mask(job.mask_downsample)
    _write_png(job.mask_path, np.where(mask, 255, 0).astype(np.uint8))
    return {
        "index": job.index,
        "level_dimensions": dims,
        "tumour_fraction_of_slide": float(r.tumour_half.mean()),
        "n_tumour_nuclei": r.n_tumour_nuclei,
    }


# ---------------------------------------------------------------------------- driver


def synthesize_cohort(
    out_dir: str | os.PathLike[str],
    n_patients: int = 40,
    seed: int = 0,
    slide_px: int = 4096,
    n_genes: int = 500,
    subtypes: tuple[str, ...] | list[str] = DEFAULT_SUBTYPES,
    *,
    slides_per_patient: int = 1,
    mpp: float = 0.5,
    mask_downsample: int = 16,
    workers: int = 1,
    write_slides: bool = True,
    overwrite: bool = False,
    progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
    **model_params: float,
) -> SynthSummary:
    """Generate a synthetic cohort in ``out_dir`` (see the module docstring for the model).

    Parameters
    ----------
    out_dir
        Folder to write into (created). Refuses to overwrite an existing ``cohort.csv``
        unless ``overwrite=True``.
    n_patients, seed
        Cohort size and random seed; the same seed gives byte-identical files.
    slide_px
        Side of each square slide in level-0 pixels (multiple of 256, >= 512);
        1024 gives a fast test-size cohort.
    n_genes
        Number of expression genes.
    subtypes
        2 or 3 subtype names; morphologies glandular, solid, discohesive in that order.
    slides_per_patient
        Slides per patient (each rendered with its own tumour fraction and grade noise).
    mpp
        Level-0 resolution in µm per pixel (nuclear sizes are defined in µm).
    mask_downsample
        Level-0 pixels per mask pixel (per side).
    workers
        Processes rendering slides in parallel (1 = in this process). The output does not
        depend on it.
    write_slides
        False writes the tables only (cohort.csv still names the slide and mask paths the full
        run would write); fast, for expression/survival experiments.
    **model_params
        Any other :class:`SynthConfig` field (e.g. ``beta_risk``, ``nb_dispersion``).

    Returns
    -------
    SynthSummary
    """
    t0 = time.perf_counter()
    cfg = _make_config(
        model_params,
        n_patients=n_patients,
        seed=seed,
        slide_px=slide_px,
        mpp=mpp,
        n_genes=n_genes,
        subtypes=tuple(subtypes),
        slides_per_patient=slides_per_patient,
        mask_downsample=mask_downsample,
    )
    if workers < 1:
        raise ConfigError(f"workers must be >= 1, got {workers}.")
    out = _prepare_folder(Path(out_dir), overwrite=overwrite, write_slides=write_slides)

    root = np.random.SeedSequence(seed)
    ss_patients, ss_genes, ss_expr, ss_slides = root.spawn(4)
    pv = _patient_variables(cfg, np.random.default_rng(ss_patients))
    plan = _plan_slides(cfg, pv, ss_slides, out)
    genes, roles_idx = _gene_roles(cfg, np.random.default_rng(ss_genes))
    counts = _expression_counts(
        cfg, pv, plan.tumour_fraction, roles_idx, np.random.default_rng(ss_expr)
    )
    gene_roles = {k: [genes[j] for j in v] for k, v in roles_idx.items()}
    if write_slides:
        _render_slides(plan.jobs, workers, progress, should_stop)
    else:
        report(progress, 0, 0, "synthesising slides")
    files = _write_tables(out, cfg, pv, plan, genes, counts)
    curated_path = out / "curated_genes.txt"
    atomic_write_text(curated_path, "\n".join(_curated_genes(gene_roles, seed)) + "\n")
    dims = _level_dims(cfg.slide_px, cfg.pyramid_downsample, cfg.tile_px)
    model_json = out / "generative_model.json"
    doc = _generative_model(cfg, pv, dims, gene_roles, write_slides)
    atomic_write_text(model_json, json.dumps(doc, indent=2) + "\n")
    atomic_write_text(out / "README.md", _readme(cfg, dims, pv))
    return SynthSummary(
        out_dir=out,
        cohort_csv=files["cohort"],
        expression_csv=files["expression"],
        truth_csv=files["truth"],
        curated_genes=curated_path,
        model_json=model_json,
        config=cfg,
        patient_ids=plan.patient_ids,
        subtype=plan.subtype_names,
        latent_risk=pv["risk"],
        tumour_fraction=plan.tumour_fraction,
        grade=plan.grade,
        time_months=pv["time"],
        event=pv["event"],
        slide_ids=[j.slide_id for j in plan.jobs],
        slide_paths=[Path(j.slide_path) for j in plan.jobs],
        mask_paths=[Path(j.mask_path) for j in plan.jobs],
        level_dimensions=[tuple(d) for d in dims],
        gene_roles=gene_roles,
        seconds=time.perf_counter() - t0,
    )


def _make_config(model_params: dict[str, Any], **fields: Any) -> SynthConfig:
    unknown = set(model_params) - set(SynthConfig.__dataclass_fields__)
    if unknown:
        raise ConfigError(f"unknown synthetic-cohort parameter(s): {', '.join(sorted(unknown))}.")
    cfg = SynthConfig(**fields, **model_params)
    cfg.validate()
    return cfg


def _prepare_folder(out: Path, *, overwrite: bool, write_slides: bool) -> Path:
    if (out / "cohort.csv").exists() and not overwrite:
        raise ConfigError(
            f"{out / 'cohort.csv'} already exists; choose another folder or pass "
            "overwrite=True (--overwrite)."
        )
    out.mkdir(parents=True, exist_ok=True)
    if write_slides:
        (out / "slides").mkdir(exist_ok=True)
        (out / "masks").mkdir(exist_ok=True)
    return out


@dataclass
class _SlidePlan:
    """Every slide to render (jobs) and the cohort table's rows, in patient order; the first
    slide's tumour fraction and grade per patient (the expression and truth use them)."""

    patient_ids: list[str]
    subtype_names: list[str]
    jobs: list[_SlideJob]
    rows: list[tuple]
    tumour_fraction: np.ndarray
    grade: np.ndarray


def _plan_slides(
    cfg: SynthConfig, pv: dict, ss_slides: np.random.SeedSequence, out: Path
) -> _SlidePlan:
    P = cfg.n_patients
    patient_ids = [f"TCGA-SY-{i + 1:04d}" for i in range(P)]
    subtype_names = [cfg.subtypes[k] for k in pv["subtype_idx"]]
    slide_seeds = ss_slides.spawn(P * cfg.slides_per_patient)
    plan = _SlidePlan(patient_ids, subtype_names, [], [], np.zeros(P), np.zeros(P))
    for p in range(P):
        for k in range(cfg.slides_per_patient):
            i = p * cfg.slides_per_patient + k
            ss = slide_seeds[i]
            m = _slide_morphology(cfg, float(pv["risk"][p]), np.random.default_rng(ss.spawn(1)[0]))
            if k == 0:
                plan.tumour_fraction[p], plan.grade[p] = m["tumour_fraction"], m["grade"]
            slide_id = f"{patient_ids[p]}-01Z-00-DX{k + 1}"
            plan.jobs.append(
                _SlideJob(
                    index=i,
                    slide_id=slide_id,
                    morphology=MORPHOLOGIES[pv["subtype_idx"][p]],
                    tumour_fraction=m["tumour_fraction"],
                    grade=m["grade"],
                    til_factor=m["til_factor"],
                    seed_entropy=tuple(int(x) for x in ss.generate_state(4)),
                    slide_px=cfg.slide_px,
                    mpp=cfg.mpp,
                    tile_px=cfg.tile_px,
                    pyramid_downsample=cfg.pyramid_downsample,
                    mask_downsample=cfg.mask_downsample,
                    jpeg_quality=cfg.jpeg_quality,
                    slide_path=str(out / "slides" / f"{slide_id}.tiff"),
                    mask_path=str(out / "masks" / f"{slide_id}.png"),
                )
            )
            plan.rows.append(
                (
                    patient_ids[p],
                    slide_id,
                    f"slides/{slide_id}.tiff",
                    subtype_names[p],
                    f"{pv['time'][p]:.2f}",
                    int(pv["event"][p]),
                    f"masks/{slide_id}.png",
                )
            )
    return plan


def _render_slides(
    jobs: list[_SlideJob], workers: int, progress: ProgressFn | None, should_stop: StopFn | None
) -> None:
    """Render and write every slide and mask, in this process or in ``workers`` processes."""
    done = 0
    total = len(jobs)
    report(progress, 0, total, "synthesising slides")
    if workers == 1 or total == 1:
        for job in jobs:
            check_cancel(should_stop, "synthesising the cohort")
            _run_job(job)
            done += 1
            report(progress, done, total, "synthesising slides")
        return
    import multiprocessing as mp

    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    with ProcessPoolExecutor(max_workers=min(workers, total), mp_context=ctx) as ex:
        futures = [ex.submit(_run_job, j) for j in jobs]
        try:
            for fut in as_completed(futures):
                fut.result()
                done += 1
                report(progress, done, total, "synthesising slides")
                check_cancel(should_stop, "synthesising the cohort")
        except BaseException:
            for f in futures:
                f.cancel()
            raise


def _write_tables(
    out: Path, cfg: SynthConfig, pv: dict, plan: _SlidePlan, genes: list[str], counts: np.ndarray
) -> dict[str, Path]:
    """cohort.csv, expression.csv (samples x genes) and truth.csv."""
    import pandas as pd

    paths = {k: out / f"{k}.csv" for k in ("cohort", "expression", "truth")}
    header = "patient_id,slide_id,slide_path,subtype,time,event,mask_path\n"
    rows = "".join(",".join(map(str, r)) + "\n" for r in plan.rows)
    atomic_write_text(paths["cohort"], header + rows)
    df = pd.DataFrame(counts, columns=genes)
    df.insert(0, "sample_id", [f"{p}-01A" for p in plan.patient_ids])
    atomic_write_text(paths["expression"], df.to_csv(index=False, lineterminator="\n"))
    truth = pd.DataFrame(
        {
            "patient_id": plan.patient_ids,
            "subtype": plan.subtype_names,
            "morphology": [MORPHOLOGIES[k] for k in pv["subtype_idx"]],
            "latent_risk": np.round(pv["risk"], 6),
            "tumour_fraction": np.round(plan.tumour_fraction, 6),
            "grade": np.round(plan.grade, 6),
            "event_time_months": np.round(pv["event_time"], 4),
            "censor_time_months": np.round(pv["censor_time"], 4),
        }
    )
    atomic_write_text(paths["truth"], truth.to_csv(index=False, lineterminator="\n"))
    return paths


def _curated_genes(gene_roles: dict[str, list[str]], seed: int) -> list[str]:
    """Half of each informative role's genes plus as many noise genes (a 'curated' panel)."""
    curated = sorted(
        [g for k, v in gene_roles.items() if k != "noise" for g in v[: max(1, len(v) // 2)]]
    )
    noise = gene_roles["noise"]
    pick = np.random.default_rng(seed + 1).choice(
        noise, size=min(len(curated), len(noise)), replace=False
    )
    return sorted(curated + sorted(pick.tolist()))


def _generative_model(
    cfg: SynthConfig, pv: dict, dims: list, gene_roles: dict[str, list[str]], written: bool
) -> dict[str, Any]:
    """The ``generative_model.json`` document: the model, its parameters and gene roles."""
    return {
        "format": "napari-mirror synthetic cohort",
        "version": FORMAT_VERSION,
        "config": cfg.to_dict(),
        "morphology_of_subtype": {s: MORPHOLOGIES[k] for k, s in enumerate(cfg.subtypes)},
        "survival": {
            "model": "Weibull proportional hazards, h(t) = lambda0 k t^(k-1) exp(beta r + gamma_s)",
            "time_unit": "months",
            "k": cfg.weibull_shape,
            "lambda0": math.log(2.0) / cfg.baseline_median_months**cfg.weibull_shape,
            "beta": cfg.beta_risk,
            "gamma": dict(
                zip(
                    cfg.subtypes,
                    np.linspace(0, cfg.subtype_log_hazard_max, len(cfg.subtypes)).tolist(),
                    strict=True,
                )
            ),
            "censoring": f"uniform({cfg.censor_min_months}, {cfg.censor_max_months}) months",
            "event_rate": float(pv["event"].mean()),
        },
        "morphology": {
            "tumour_fraction": "0.2 + 0.5 * sigmoid(r + 0.5 e), e ~ N(0,1) per slide",
            "grade": "sigmoid(1.5 r + 0.3 e'), scales nuclear size x(1 + 0.35 g)",
            "lymphocyte_density": "tumour region x exp(-0.6 r); stroma x exp(0.5 n), n ~ N(0, 1) per slide",
            "stroma_nuisance": "collagen eosin x exp(0.12 n), fibroblast density x exp(0.3 n), n ~ N(0, 1) per slide",
        },
        "slides": {
            "mpp": cfg.mpp,
            "level_dimensions": dims,
            "level_downsamples": [cfg.pyramid_downsample**i for i in range(len(dims))],
            "tile_px": cfg.tile_px,
            "compression": f"JPEG q{cfg.jpeg_quality}",
            "mask_downsample": cfg.mask_downsample,
            "written": bool(written),
            "mask_encoding": "PNG, 255 = tumour, 0 = not tumour",
        },
        "expression": {
            "model": "negative binomial counts, log-mean = baseline + marker + risk + tumour content + noise",
            "file_orientation": "samples x genes",
            "sample_id": "<patient_id>-01A",
        },
        "gene_roles": gene_roles,
    }


def synthesize_tiny_cohort(
    out_dir: str | os.PathLike[str], n_patients: int = 12, seed: int = 0, **kwargs
) -> SynthSummary:
    """A fast test-size cohort: 1024-px slides (0.5 mm), 60 genes, 12 patients by default."""
    kwargs.setdefault("slide_px", 1024)
    kwargs.setdefault("n_genes", 60)
    return synthesize_cohort(out_dir, n_patients=n_patients, seed=seed, **kwargs)


def _readme(cfg: SynthConfig, dims, pv) -> str:
    side_mm = cfg.slide_px * cfg.mpp / 1000
    morph = ", ".join(f"{s} = {MORPHOLOGIES[k]}" for k, s in enumerate(cfg.subtypes))
    return f"""# Synthetic MIRROR cohort

Generated by `mirror_model.synth` (napari-mirror) with seed {cfg.seed}. **Synthetic data** —
no patient information. Everything below is deterministic for the seed.

- {cfg.n_patients} patients, {cfg.slides_per_patient} slide(s) each; subtypes: {morph}
  (balanced); events observed: {int(pv["event"].sum())} of {cfg.n_patients}.
- Slides: `slides/<slide_id>.tiff`, {cfg.slide_px} x {cfg.slide_px} px at {cfg.mpp} µm/px
  ({side_mm:g} mm square), pyramidal tiled JPEG TIFF, levels {", ".join(f"{w}x{h}" for w, h in dims)}.
- Tumour masks: `masks/<slide_id>.png`, 1 px per {cfg.mask_downsample} x {cfg.mask_downsample}
  level-0 px, 255 = tumour.
- `cohort.csv`: patient_id, slide_id, slide_path, subtype, time (months), event
  (1 = death observed), mask_path.
- `expression.csv`: {cfg.n_patients} samples x {cfg.n_genes} genes, raw counts
  (negative binomial); first column `sample_id` = `<patient_id>-01A` (TCGA-style barcode).
- `curated_genes.txt`: a curated gene list (half of the informative genes and as many
  uninformative ones), for `mirror-train select-genes --curated`.
- `truth.csv`: the latent risk, tumour fraction, grade, event and censoring times.
- `generative_model.json`: all parameters and the role of every gene.

Model: a latent risk r ~ N(0, 1) per patient raises tumour fraction, grade (nuclear size,
pleomorphism, density) and lowers the density of lymphocytes inside the tumour (the stroma
around it varies per slide, independently of the patient); shifts the risk genes
(+-{cfg.risk_loading} log-fold per SD); and sets the hazard h(t) = lambda0 k t^(k-1)
exp({cfg.beta_risk} r + gamma_subtype) (Weibull k = {cfg.weibull_shape}, median
{cfg.baseline_median_months:g} months at r = 0), with independent uniform censoring on
[{cfg.censor_min_months:g}, {cfg.censor_max_months:g}] months. Subtype marker genes are up
{cfg.marker_log_fc} log-fold in their subtype.
"""
