"""A small but complete model bundle on real synthetic slides, for the bundle / inference tests.

A 2-patient synthetic cohort (768-px slides, 40 genes) gives real slides, masks and an
expression table; a small random-weight MIRROR model embeds 36 pseudo-patients (tile bags
resampled from the real slides' features, expression rows with noise), and the heads are
fitted on those embeddings exactly as :func:`mirror_model.evaluation.export.export_bundle` does. The
result is an in-memory :class:`~mirror_model.bundle.Bundle` plus the same bundle saved to disk.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

TARGET_MPP = 1.0
TILE_PX = 64
EMBED_DIM = 48


@dataclass
class BundleCase:
    root: Path
    bundle: object  # in-memory Bundle (never saved)
    document: dict
    state: dict
    path: Path  # the same bundle saved as one .mirror file
    slide_path: Path
    features_path: Path
    expression_path: Path
    sample_id: str
    genes: list[str]
    classes: list[str]


def build_case(root: Path) -> BundleCase:
    from mirror_model.bundle import Bundle, build_document, save_bundle
    from mirror_model.config import get_preset
    from mirror_model.evaluation.probes import LinearProbe
    from mirror_model.evaluation.survival import (
        CoxHead,
        choose_risk_cutoff,
        kaplan_meier,
        risk_groups,
    )
    from mirror_model.expression import read_expression
    from mirror_model.extract import extract_features_in_memory
    from mirror_model.features import write_features
    from mirror_model.genes import fit_preprocessing
    from mirror_model.models import create_model
    from mirror_model.patch_encoders import create_patch_encoder
    from mirror_model.synth import synthesize_cohort

    summ = synthesize_cohort(root / "cohort", n_patients=2, seed=11, slide_px=768, n_genes=40)
    enc = create_patch_encoder("stain-texture")
    feats = []
    for i, sp in enumerate(summ.slide_paths):
        ff = extract_features_in_memory(
            sp,
            enc,
            target_mpp=TARGET_MPP,
            tile_px=TILE_PX,
            device="cpu",
            precision="fp32",
            num_workers=1,
        )
        if i == 0:
            features_path = write_features(root / f"{summ.slide_ids[0]}.h5", ff)
        feats.append(ff.features)
    expr = read_expression(summ.expression_csv)
    pp = fit_preprocessing(expr, summ.patient_ids, None, select=False)
    genes = list(pp.genes)
    cfg = get_preset("mirror").replace(
        patch_dim=int(feats[0].shape[1]), n_genes=len(genes), embed_dim=EMBED_DIM, n_prototypes=16
    )
    torch.manual_seed(0)
    model = create_model(cfg).eval()

    # pseudo-patients: resampled tile bags and noisy expression rows of the three patients
    rng = np.random.default_rng(0)
    x_rna = np.asarray(pp.transform(expr), dtype=np.float32)
    n = 36
    src = np.arange(n) % len(feats)
    slide_emb, rna_emb = [], []
    with torch.no_grad():
        for s in src:
            f = feats[s]
            bag = f[rng.integers(0, len(f), 40)] + rng.normal(0, 0.05, (40, f.shape[1]))
            slide_emb.append(
                model.encode_slide(torch.tensor(bag, dtype=torch.float32)).embedding[0]
            )
            r = x_rna[s] + rng.normal(0, 0.3, x_rna.shape[1])
            rna_emb.append(model.encode_rna(torch.tensor(r[None], dtype=torch.float32))[0])
    S = torch.stack(slide_emb).double().numpy()
    R = torch.stack(rna_emb).double().numpy()
    y = np.array(summ.subtype)[src]
    t = rng.uniform(5, 100, n)
    e = rng.integers(0, 2, n)
    e[:3] = 1
    heads, risk, reference = {}, {}, {}
    for kind, X in (("slide", S), ("rna", R), ("both", np.concatenate([S, R], 1))):
        cox = CoxHead(penalizer=1.0, max_components=8).fit(X[:28], t[:28], e[:28])
        heads[kind] = {"subtype": LinearProbe(C=1.0).fit(X[:28], y[:28]), "survival": cox}
        cut = choose_risk_cutoff(cox.predict_risk(X[:28]))
        r = cox.predict_risk(X[28:])
        g = risk_groups(r, cut)
        risk[kind] = {"cutoff": cut}
        reference[kind] = {
            "risk": r,
            "time": t[28:],
            "event": e[28:],
            "km": {
                grp: kaplan_meier(t[28:][g == grp], e[28:][g == grp]).to_dict()
                for grp in ("low", "high")
                if np.any(g == grp)
            },
        }
    classes = sorted(set(summ.subtype))
    doc = build_document(
        config=cfg,
        preset="mirror",
        patch_encoder=enc.spec.to_dict(),
        target_mpp=TARGET_MPP,
        tile_px=TILE_PX,
        class_names=classes,
        heads=heads,
        genes=genes,
        preprocessing=pp.to_dict(),
        risk=risk,
        reference_cohort=reference,
        metrics={"subtype_linear": {"both": {"auroc_macro": {"mean": 0.9, "sd": 0.05}}}},
        training={"n_patients": n, "n_slides": n, "subtype_counts": {c: 12 for c in classes}},
    )
    doc["tiling"]["tissue_threshold"] = 0.25
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    bundle = Bundle(document=doc, model_state={k: v.numpy() for k, v in state.items()})
    path = save_bundle(doc, root / "test.mirror", state)
    return BundleCase(
        root=root,
        bundle=bundle,
        document=doc,
        state=state,
        path=path,
        slide_path=summ.slide_paths[0],
        features_path=Path(features_path),
        expression_path=summ.expression_csv,
        sample_id=f"{summ.patient_ids[0]}-01A",
        genes=genes,
        classes=classes,
    )


def absolute_paths(obj, where="document"):
    """Every string in a bundle document that is an absolute path (or holds one), with where
    it sits; numeric arrays are skipped. For the shipped-bundle test too."""
    found = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            found += absolute_paths(v, f"{where}.{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            found += absolute_paths(v, f"{where}[{i}]")
    elif isinstance(obj, str):
        if os.path.isabs(obj) or any(p in obj for p in ("/tmp/", "/home/", "/root/", "/work/", ":\\")):
            found.append((where, obj))
    return found
