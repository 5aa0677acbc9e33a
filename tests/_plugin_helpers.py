"""Helpers for the napari-mirror plugin tests (no Qt)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def write_pyramidal_tiff(
    path: Path,
    width: int = 4096,
    height: int = 3072,
    mpp: float = 0.5,
    n_levels: int = 4,
    tile: int = 256,
) -> np.ndarray:
    """Write a tiled pyramidal RGB TIFF (one page per level, resolution in cm) that OpenSlide reads.

    Level 0 is a smooth colour gradient with a dark square at (x, y) = (1024..1535, 512..1023), so
    any region read can be checked against the returned level-0 array.
    """
    import tifffile

    yy, xx = np.mgrid[0:height, 0:width]
    img = np.empty((height, width, 3), np.uint8)
    img[..., 0] = (xx * 255 // max(width - 1, 1)).astype(np.uint8)
    img[..., 1] = (yy * 255 // max(height - 1, 1)).astype(np.uint8)
    img[..., 2] = 200
    img[512:1024, 1024:1536] = (20, 30, 40)
    px_per_cm = 1e4 / mpp
    with tifffile.TiffWriter(path, bigtiff=False) as tw:
        level = img
        for i in range(n_levels):
            d = 2**i
            res = (px_per_cm / d, px_per_cm / d)
            tw.write(
                level,
                tile=(tile, tile),
                photometric="rgb",
                compression="zlib",
                resolution=res,
                resolutionunit="CENTIMETER",
                subfiletype=1 if i else 0,
            )
            h, w = level.shape[:2]
            level = (
                level[: h - h % 2, : w - w % 2]
                .reshape(h // 2, 2, w // 2, 2, 3)
                .mean(axis=(1, 3))
                .astype(np.uint8)
            )
    return img


def write_blank_tiff(path: Path, width: int = 1024, height: int = 1024, mpp: float = 0.5) -> None:
    """A white slide (glass only, no tissue) with resolution metadata, tiled so OpenSlide reads it."""
    import tifffile

    img = np.full((height, width, 3), 245, np.uint8)
    tifffile.imwrite(
        path,
        img,
        tile=(256, 256),
        photometric="rgb",
        resolution=(1e4 / mpp, 1e4 / mpp),
        resolutionunit="CENTIMETER",
    )


def wait_for_run(qtbot, widget, timeout_ms: int = 120_000) -> None:
    """Let the event loop run until the widget's worker has finished and its results are shown."""
    qtbot.waitUntil(lambda: not widget.is_running, timeout=timeout_ms)
    qtbot.wait(50)  # deliver queued signals (returned/finished) to the GUI thread


class NotificationRecorder:
    """Collects napari notifications (text and severity) while active."""

    def __init__(self) -> None:
        from napari.utils.notifications import notification_manager

        self._manager = notification_manager
        self.items: list[tuple[str, str]] = []

    def _on(self, event) -> None:
        n = getattr(event, "value", event)
        self.items.append((str(getattr(n, "severity", "")), str(getattr(n, "message", n))))

    def __enter__(self) -> NotificationRecorder:
        self._manager.notification_ready.connect(self._on)
        return self

    def __exit__(self, *exc) -> None:
        self._manager.notification_ready.disconnect(self._on)

    def errors(self) -> list[str]:
        return [m for s, m in self.items if "error" in s.lower()]

    def infos(self) -> list[str]:
        return [m for s, m in self.items if "info" in s.lower()]


def camera_of(viewer):
    """The viewer's camera (``viewer.scene.camera`` since napari 0.9, ``viewer.camera`` before)."""
    scene = getattr(viewer, "scene", None)
    return scene.camera if scene is not None else viewer.camera


def make_random_bundle(path: Path, genes: list[str] | None = None, seed: int = 0) -> Path:
    """A small random-weight MIRROR bundle written with the package's own save API.

    Slide heads always (stain-texture features, 64-px tiles at 1 µm/px like the demo); RNA and
    joint heads too when ``genes`` is given. Heads are fitted on random embeddings, the reference
    cohort is random: the numbers mean nothing, but every part a real bundle has is there.
    """
    import dataclasses

    import torch

    from mirror_model.bundle import build_document, save_bundle
    from mirror_model.config import get_preset
    from mirror_model.evaluation.probes import LinearProbe
    from mirror_model.evaluation.survival import CoxHead, kaplan_meier
    from mirror_model.models import create_model
    from mirror_model.patch_encoders import create_patch_encoder

    spec = create_patch_encoder("stain-texture").spec
    torch.manual_seed(seed)
    n_genes = len(genes) if genes else 8
    cfg = get_preset("mirror").replace(
        patch_dim=spec.dim, n_genes=n_genes, embed_dim=48, n_prototypes=16
    )
    model = create_model(cfg)
    rng = np.random.default_rng(seed)
    classes = ["glandular", "solid", "mixed"]
    n = 30
    t = rng.uniform(1, 60, n)
    e = (rng.random(n) < 0.7).astype(int)
    y = np.array(classes * (n // 3))
    kinds = {"slide": 48} | ({"rna": 48, "both": 96} if genes else {})
    heads, risk, ref = {}, {}, {}
    for kind, dim in kinds.items():
        Z = rng.normal(size=(n, dim))
        cox = CoxHead(penalizer=1.0).fit(Z, t, e)
        r = np.asarray(cox.predict_risk(Z), dtype=float)
        cut = float(np.median(r))
        km = {}
        for g, m in (("low", r <= cut), ("high", r > cut)):
            c = kaplan_meier(t[m], e[m])
            km[g] = {
                "time": np.asarray(c.time),
                "survival": np.asarray(c.survival),
                "n": int(m.sum()),
            }
        heads[kind] = {"subtype": LinearProbe(C=1.0).fit(Z, y), "survival": cox}
        risk[kind] = {"cutoff": cut}
        ref[kind] = {"risk": r, "time": t, "event": e, "km": km}
    preprocessing = None
    if genes:
        from mirror_model.genes import ExpressionNormalizer, Preprocessing

        X = rng.lognormal(size=(n, n_genes))
        preprocessing = Preprocessing(
            genes=list(genes), normalizer=ExpressionNormalizer().fit(X, list(genes))
        )
    spec_d = spec.to_dict() if hasattr(spec, "to_dict") else dataclasses.asdict(spec)
    doc = build_document(
        config=cfg,
        preset="mirror",
        patch_encoder=spec_d,
        target_mpp=1.0,
        tile_px=64,
        class_names=classes,
        heads=heads,
        genes=list(genes or []),
        preprocessing=preprocessing,
        risk=risk,
        reference_cohort=ref,
        metrics={
            "subtype": {"slide": {"auroc_macro": {"mean": 0.5, "sd": 0.1}}},
            "note": "random weights",
        },
    )
    doc["tiling"]["tissue_threshold"] = 0.25
    return save_bundle(doc, path, model.state_dict())
