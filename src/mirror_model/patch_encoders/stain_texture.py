"""``stain-texture``: the embedded, weight-free baseline patch encoder.

This is a **hand-designed baseline**, not a foundation model: it needs no downloaded weights,
is deterministic, and runs fast on CPU, so the whole pipeline works out of the box. Features
from a pathology foundation model (UNI, Phikon, Virchow ... via ``timm:`` / ``vit`` weights)
are far more informative; use them for real studies.

What it computes (input RGB in [0, 1], resized to 64 px, i.e. 2 µm/px for a 256 px tile at
0.5 µm/px — nuclei are then 3-5 px blobs, matched by the σ = 1 px filters):

1. **Colour deconvolution** (Ruifrok & Johnston, 2001): optical density
   ``OD = -log10(max(I, 1/255))`` per RGB channel, unmixed into haematoxylin (H), eosin (E) and
   residual (R) concentrations with the inverse of the standard H/E/DAB stain matrix.
2. **Colour statistics** (45): mean and std of H, E, R and of the three RGB ODs; soft 8-bin
   histograms of H and E; a soft 4x4 joint H-E histogram; the fraction of near-background pixels.
3. **Fixed multi-scale filter bank** (78) on the H and E maps at three pyramid scales
   (2, 4, 8 µm/px, 2x2 average pooling between scales), 7x7 kernels with σ = 1 px
   (valid convolution, no border artefacts): Gaussian, first derivatives, second derivatives,
   Laplacian of Gaussian and a quadrature pair of Gabor filters (λ = 4 px) at 4 orientations.
   Pooled per map and scale (13): smoothed mean and std; mean gradient magnitude; mean local
   orientation coherence (structure tensor over 4x4 windows: fibrous stroma is coherent,
   nuclei are not); positive / negative parts of the Hessian determinant (blob vs ridge, as
   signed square roots); positive and negative LoG responses and LoG std (bright vs dark
   blobs, i.e. nuclei on the H map); Gabor energies sorted from the strongest orientation to
   the weakest (rotation invariant).
4. **Second-order statistics** (9, co-occurrence-like): autocorrelation of H and E at shifts
   of 1, 2, 4 px (mean product of the standardised map and its shifted copy, x and y averaged)
   and the H-E cross-correlation at each scale.

Unbounded quantities go through ``asinh(10 x)`` so every feature is O(1). Output: 132 float32
features. Computed in fp32 even under bf16 autocast (bf16 convolutions are slower on our CPUs
and OD differences need the precision). Everything is plain torch, so it runs on GPU too.
The design trades detail for speed (≈ 400+ tiles/s per CPU core for the encoder alone).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from ._registry import EncoderOptions, register_patch_encoder
from ._spec import PatchEncoder, PatchEncoderSpec

__all__ = ["STAIN_TEXTURE_SPEC", "StainTextureEncoder"]

_WORK_PX = 64
_N_SCALES = 3
_KSIZE = 7
_SIGMA = 1.0
_GABOR_LAMBDA = 4.0
_GABOR_SIGMA = 1.5
_N_ORIENT = 4
_HIST_BINS = 8
_JOINT_BINS = 4
_SHIFTS = (1, 2, 4)

# Ruifrok & Johnston stain vectors (rows: H, E, DAB as the residual direction), as in skimage.
_RGB_FROM_HER = torch.tensor(
    [[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=torch.float64
)


def _n_features() -> int:
    per_map_scale = 2 + 1 + 1 + 2 + 3 + _N_ORIENT  # 13
    colour = 12 + 2 * _HIST_BINS + _JOINT_BINS**2 + 1
    second = 2 * len(_SHIFTS) + _N_SCALES
    return 2 * _N_SCALES * per_map_scale + colour + second


STAIN_TEXTURE_SPEC = PatchEncoderSpec(
    name="stain-texture",
    input_px=_WORK_PX,
    mean=(0.0, 0.0, 0.0),
    std=(1.0, 1.0, 1.0),
    dim=_n_features(),
    kind="stain-texture",
    architecture="ruifrok-johnston H&E deconvolution + fixed multi-scale filter bank",
    pretrained=True,  # nothing to train: the filters are fixed by design
    version="1",
    description="weight-free colour/texture baseline (not a foundation model)",
)


def _filter_bank() -> torch.Tensor:
    """[15, 1, 7, 7] float64 kernels: G, Dx, Dy, Dxx, Dyy, Dxy, LoG, Gabor cos x4, Gabor sin x4."""
    r = (_KSIZE - 1) / 2
    coords = torch.arange(_KSIZE, dtype=torch.float64) - r
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    s2 = _SIGMA**2
    g = torch.exp(-(xx**2 + yy**2) / (2 * s2))
    g = g / g.sum()
    dx = -xx / s2 * g
    dy = -yy / s2 * g
    dxx = (xx**2 / s2**2 - 1 / s2) * g
    dyy = (yy**2 / s2**2 - 1 / s2) * g
    dxy = (xx * yy / s2**2) * g
    log = dxx + dyy
    kernels = [g, dx, dy, dxx, dyy, dxy, log]
    gs2 = _GABOR_SIGMA**2
    env = torch.exp(-(xx**2 + yy**2) / (2 * gs2))
    gab_c, gab_s = [], []
    for k in range(_N_ORIENT):
        th = math.pi * k / _N_ORIENT
        u = xx * math.cos(th) + yy * math.sin(th)
        gab_c.append(env * torch.cos(2 * math.pi * u / _GABOR_LAMBDA))
        gab_s.append(env * torch.sin(2 * math.pi * u / _GABOR_LAMBDA))
    kernels += gab_c + gab_s
    out = []
    for i, k in enumerate(kernels):
        if i > 0:  # every filter but the Gaussian responds 0 to a flat image
            k = k - k.mean()
            k = k / k.abs().sum()
        out.append(k)
    return torch.stack(out)[:, None]


class StainTextureEncoder(PatchEncoder):
    """Weight-free H&E colour + texture features (see module docstring). Output ``[B, 132]``."""

    def __init__(self) -> None:
        super().__init__(STAIN_TEXTURE_SPEC)
        her_from_rgb = torch.linalg.inv(_RGB_FROM_HER / _RGB_FROM_HER.norm(dim=1, keepdim=True))
        self.register_buffer("her_from_rgb", her_from_rgb.to(torch.float32), persistent=False)
        self.register_buffer("bank", _filter_bank().to(torch.float32), persistent=False)
        self.register_buffer(
            "hist_centers",
            torch.linspace(0.0, 1.0, _HIST_BINS, dtype=torch.float32),
            persistent=False,
        )
        self.register_buffer(
            "joint_centers",
            torch.linspace(0.0, 0.9, _JOINT_BINS, dtype=torch.float32),
            persistent=False,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.normalize(x)
        device_type = x.device.type if x.device.type in ("cpu", "cuda") else "cpu"
        with torch.autocast(device_type=device_type, enabled=False):
            return self._features(x.float())

    # ------------------------------------------------------------------ internals
    def _features(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        if x.shape[-2:] != (_WORK_PX, _WORK_PX):
            x = F.interpolate(
                x, size=(_WORK_PX, _WORK_PX), mode="bilinear", antialias=True, align_corners=False
            )
        od = -torch.log10(x.clamp(1.0 / 255.0, 1.0))  # [B,3,H,W], 0 = white
        her = torch.einsum("bchw,cd->bdhw", od, self.her_from_rgb)  # H, E, residual concentrations
        hmap, emap = her[:, 0], her[:, 1]
        odm = od.mean(1)
        feats: list[torch.Tensor] = []
        asinh_parts: list[torch.Tensor] = []

        # --- colour statistics
        colour = torch.cat([her, od], 1).flatten(2)  # [B,6,HW]
        asinh_parts += [colour.mean(-1), colour.std(-1)]
        feats.append(self._soft_hist(hmap, self.hist_centers))
        feats.append(self._soft_hist(emap, self.hist_centers))
        feats.append(self._joint_hist(hmap, emap))
        feats.append((odm < 0.05).float().flatten(1).mean(-1, keepdim=True))

        # --- filter bank on the H and E maps at _N_SCALES scales
        maps = torch.stack([hmap, emap], 1)  # [B,2,H,W]
        scale_stats = []
        cross = []
        for s in range(_N_SCALES):
            if s > 0:
                maps = F.avg_pool2d(maps, 2)
            h, w = maps.shape[-2:]
            resp = F.conv2d(maps.reshape(b * 2, 1, h, w), self.bank).reshape(
                b, 2, 15, h - _KSIZE + 1, w - _KSIZE + 1
            )
            scale_stats.append(self._pooled(resp))
            cross.append((_standardize(maps[:, 0]) * _standardize(maps[:, 1])).mean((1, 2)))
        asinh_parts.append(torch.cat(scale_stats, 1))

        # --- second order: autocorrelation of H and E at shifts, H-E cross-correlation per scale
        auto = []
        for m in (hmap, emap):
            z = _standardize(m)  # one standardisation, then products of shifted copies
            for d in _SHIFTS:
                ax = (z[:, :, :-d] * z[:, :, d:]).mean((1, 2))
                ay = (z[:, :-d, :] * z[:, d:, :]).mean((1, 2))
                auto.append(0.5 * (ax + ay))
        feats.append(torch.stack(auto + cross, 1))

        out = torch.cat([torch.asinh(10.0 * torch.cat(asinh_parts, 1))] + feats, 1)
        return out

    def _pooled(self, r: torch.Tensor) -> torch.Tensor:
        """[B,M,15,h,w] responses (M maps) -> [B, M*13] pooled statistics."""
        g, dx, dy, dxx, dyy, dxy, log = (r[:, :, i] for i in range(7))
        gab_c, gab_s = r[:, :, 7 : 7 + _N_ORIENT], r[:, :, 7 + _N_ORIENT :]
        flat = lambda t: t.flatten(-2)  # noqa: E731
        g_mean, g_std = flat(g).mean(-1), flat(g).std(-1)
        grad = torch.sqrt(dx * dx + dy * dy + 1e-12)
        grad_mean = flat(grad).mean(-1)
        # local structure tensor over 4x4 windows -> coherence in [0, 1]
        bh, c, h, w = dx.shape
        # crop symmetrically to a multiple of 4 so the windows are the same under flips/rotations
        oy, ox = (h % 4) // 2, (w % 4) // 2
        hc, wc = h - h % 4, w - w % 4

        def pool(t: torch.Tensor) -> torch.Tensor:
            t = t[..., oy : oy + hc, ox : ox + wc].reshape(bh * c, 1, hc, wc)
            return F.avg_pool2d(t, 4).reshape(bh, c, -1)

        jxx, jyy, jxy = pool(dx * dx), pool(dy * dy), pool(dx * dy)
        coh = torch.sqrt((jxx - jyy) ** 2 + 4 * jxy**2 + 1e-12) / (jxx + jyy + 1e-6)
        coh_mean = coh.mean(-1)
        det = flat(dxx * dyy - dxy * dxy)
        det_pos = torch.sqrt(F.relu(det).mean(-1) + 1e-12)
        det_neg = torch.sqrt(F.relu(-det).mean(-1) + 1e-12)
        logf = flat(log)
        log_pos, log_neg, log_std = F.relu(logf).mean(-1), F.relu(-logf).mean(-1), logf.std(-1)
        energy = torch.sqrt(gab_c**2 + gab_s**2 + 1e-12).flatten(-2).mean(-1)  # [B,M,4]
        energy = energy.sort(dim=-1, descending=True).values
        stats = torch.stack(
            [g_mean, g_std, grad_mean, coh_mean, det_pos, det_neg, log_pos, log_neg, log_std], -1
        )
        return torch.cat([stats, energy], -1).flatten(1)  # [B, M*13]

    @staticmethod
    def _soft_hist(m: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
        """Triangular-kernel soft histogram, fractions per bin (values outside clamp to the end bins)."""
        width = float(centers[1] - centers[0])
        v = m.flatten(1).clamp(float(centers[0]), float(centers[-1]))[..., None]
        wts = F.relu(1.0 - (v - centers).abs() / width)
        return wts.mean(1)

    def _joint_hist(self, hm: torch.Tensor, em: torch.Tensor) -> torch.Tensor:
        c = self.joint_centers
        width = float(c[1] - c[0])
        hv = hm.flatten(1).clamp(float(c[0]), float(c[-1]))[..., None]
        ev = em.flatten(1).clamp(float(c[0]), float(c[-1]))[..., None]
        wh = F.relu(1.0 - (hv - c).abs() / width)  # [B,P,4]
        we = F.relu(1.0 - (ev - c).abs() / width)
        return torch.einsum("bpi,bpj->bij", wh, we).flatten(1) / hm[0].numel()


def _standardize(m: torch.Tensor) -> torch.Tensor:
    """Zero mean, unit variance per batch item of ``[B, H, W]`` maps (flat maps -> 0)."""
    mu = m.mean((1, 2), keepdim=True)
    sd = m.std((1, 2), keepdim=True)
    return (m - mu) / (sd + 1e-4)


@register_patch_encoder("stain-texture", "stain_texture", "staintexture")
def _create(name: str, options: EncoderOptions) -> StainTextureEncoder:
    input_px, mean, std = options.input_px, options.mean, options.std
    if options.weights is not None:
        raise ConfigError(
            "the 'stain-texture' encoder has no weights; drop --weights or choose a ViT encoder."
        )
    fixed = (
        (input_px is None or int(input_px) == STAIN_TEXTURE_SPEC.input_px)
        and (mean is None or tuple(float(v) for v in mean) == STAIN_TEXTURE_SPEC.mean)
        and (std is None or tuple(float(v) for v in std) == STAIN_TEXTURE_SPEC.std)
    )
    if not fixed:
        raise ConfigError(
            "the 'stain-texture' encoder has a fixed input (64 px, no normalisation); "
            "input_px/mean/std (--input-px/--mean/--std) apply to TorchScript and ViT encoders only."
        )
    return StainTextureEncoder()
