"""The end-to-end demo: synthetic cohort → features → MIRROR pretraining → evaluation → bundle.

``mirror-train demo --out DIR`` (or :func:`run_demo`) runs every part of the package on a
synthetic cohort whose ground truth is known (:mod:`mirror_model.synth`), on a CPU, in a few
minutes, and shows that the pipeline *learns*:

1. ``synth``    — ``DIR/cohort.csv``, ``DIR/expression.csv``, ``DIR/slides/``, ``DIR/masks/``
   (:func:`mirror_model.synth.synthesize_cohort` with :data:`DEMO_SYNTH_KWARGS`);
2. ``extract``  — ``DIR/features/<slide_id>.h5`` with the embedded ``stain-texture`` encoder
   (:data:`DEMO_EXTRACT_KWARGS`);
3. ``pretrain`` — ``DIR/run/``: preset ``mirror-grid`` at a small width (:data:`DEMO_MODEL_OVERRIDES`,
   :data:`DEMO_TRAIN_KWARGS`), one model per patient-level fold;
4. ``evaluate`` — ``DIR/evaluation/`` (frozen encoders, probes and survival heads fitted on each
   fold's training patients, scored on its held-out test patients);
5. ``heatmap``  — ``DIR/evaluation/heatmaps/`` (:mod:`mirror_model.evaluation.heatmaps`, the
   ``mirror-train heatmaps`` command): every per-tile map (subtype evidence, risk evidence,
   attention) and two baselines of each held-out slide against its ground-truth tumour mask
   (``DIR/masks``), with the model of the fold that held the slide out, plus the deletion test;
6. ``export``   — ``DIR/demo.mirror``: the model trained on all patients for the number of
   epochs the folds validated (``DIR/run/final``), with heads fitted on all patients and
   out-of-fold reference curves (see :func:`mirror_model.evaluation.export.export_bundle`);
7. ``report``   — ``DIR/metrics.json`` (the evaluation tree plus ``"heatmap"`` and ``"demo"``)
   and ``DIR/report.md`` with the figures.

Every stage is resumable: a finished stage is skipped when the demo is run again on the same
folder (``DIR/demo_state.json`` records what was done, with which settings), an interrupted
extraction or pretraining continues where it stopped.

Stable keys of ``DIR/metrics.json`` (besides evaluate's ``task → input → metric`` tree):
``metrics["heatmap"]["tumour_auroc"]`` (tumour AUROC of the map of each held-out slide's true
subtype, mean over folds; every map under ``metrics["heatmap"]["maps"]``),
``metrics["headline"]["auroc_macro" | "c_index"]`` (``{"mean", "sd", "input"}``) and
``metrics["demo"]`` (settings, timings, versions).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._io import atomic_write_bytes, atomic_write_text, jsonable
from ._progress import ProgressFn, StopFn, check_cancel
from .errors import ConfigError, MirrorError

__all__ = [
    "DEMO_EVAL_KWARGS",
    "DEMO_EXTRACT_KWARGS",
    "DEMO_MODEL_OVERRIDES",
    "DEMO_PRESET",
    "DEMO_SEED",
    "DEMO_SYNTH_KWARGS",
    "DEMO_TRAIN_KWARGS",
    "STAGES",
    "DemoResult",
    "DemoSettings",
    "demo_provenance",
    "SampleCase",
    "make_sample_case",
    "run_demo",
]

#: Seed of the demo cohort (and so of its generative model: gene roles, baselines).
DEMO_SEED = 2024
DEMO_PRESET = "mirror-grid"
_STATE_FILE = "demo_state.json"
_STATE_VERSION = 1


@dataclass(frozen=True)
class DemoSettings:
    """Sizes of the demo. :meth:`full` is ``mirror-train demo``; :meth:`tiny` is for tests.

    Cohort: ``n_patients`` patients, one ``slide_px``² slide each at ``slide_mpp`` µm/px,
    ``n_genes`` genes, 3 subtypes. Tiles: ``tile_px`` px at ``target_mpp`` µm/px. Model:
    preset ``mirror-grid`` with ``embed_dim`` and the smaller widths in :meth:`model_overrides`.
    Training: ``folds`` patient-level folds, ``epochs`` epochs of ``batch_size`` patients,
    ``tiles_per_slide`` tiles re-sampled per slide per step, Adam at ``lr``.
    """

    n_patients: int = 90
    slide_px: int = 2048
    slide_mpp: float = 0.5
    n_genes: int = 200
    seed: int = DEMO_SEED
    target_mpp: float = 1.0
    tile_px: int = 64
    folds: int = 5
    epochs: int = 20
    batch_size: int = 16
    lr: float = 5e-4
    tiles_per_slide: int = 256
    embed_dim: int = 96
    n_prototypes: int = 64
    k_shots: tuple[int, ...] = (1, 10)
    n_draws: int = 5
    fast_heads: bool = False
    precision: str = "fp32"

    @classmethod
    def full(cls) -> DemoSettings:
        return cls()

    @classmethod
    def tiny(cls) -> DemoSettings:
        """A few-seconds-per-stage version for tests (numbers are not meaningful)."""
        return cls(
            n_patients=10,
            slide_px=768,
            n_genes=40,
            folds=2,
            epochs=2,
            batch_size=4,
            tiles_per_slide=32,
            embed_dim=48,
            n_prototypes=16,
            k_shots=(1,),
            n_draws=1,
            fast_heads=True,
        )

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["k_shots"] = list(self.k_shots)
        return d

    # -- the exact arguments each stage passes ------------------------------------------------
    def synth_kwargs(self) -> dict[str, Any]:
        return {
            "n_patients": self.n_patients,
            "seed": self.seed,
            "slide_px": self.slide_px,
            "n_genes": self.n_genes,
            "mpp": self.slide_mpp,
        }

    def extract_kwargs(self) -> dict[str, Any]:
        return {
            "encoder": "stain-texture",
            "target_mpp": self.target_mpp,
            "tile_px": self.tile_px,
            "tissue_threshold": 0.25,
        }

    def model_overrides(self) -> dict[str, Any]:
        # everything else is the authors' configuration (D = 96 keeps the authors' 8 slide and
        # 12 RNA attention heads, which must divide D); prototypes are scaled down with the
        # cohort (K = 3000 prototypes for 90 patients would be mostly empty)
        return {"embed_dim": self.embed_dim, "n_prototypes": self.n_prototypes}

    def train_kwargs(self) -> dict[str, Any]:
        return {
            "epochs": self.epochs,
            "batch_size": self.batch_size,
            "lr": self.lr,
            "schedule": "cosine",
            "warmup_epochs": 2.0 if self.epochs > 4 else 0.0,
            "min_lr_ratio": 0.1,
            "optimizer": "adamw",
            "weight_decay": 1e-4,
            "tiles_per_slide": self.tiles_per_slide,
            "seed": 42,
            "folds": self.folds,
            "gene_selection": "none",
            # fp32, not "auto": bf16 autocast made a step of this small model ~5x slower on our
            # CPUs (Nyström pinv / small bmm are not faster in bf16 and pay the casts)
            "precision": self.precision,
            "num_workers": 0,
        }

    def eval_kwargs(self) -> dict[str, Any]:
        kw: dict[str, Any] = {"k_shots": tuple(self.k_shots), "n_draws": self.n_draws, "seed": 0}
        if self.fast_heads:
            # fixed regularisation instead of inner cross-validation (tests: speed, not numbers)
            kw.update(
                probe_C=1.0, cox_penalizer=0.05, cox_l1_ratio=0.5, hazard_weight_decay=0.01,
                hazard_max_iter=100,
            )
        return kw


_FULL = DemoSettings.full()
#: Arguments of :func:`mirror_model.synth.synthesize_cohort` for the demo cohort.
DEMO_SYNTH_KWARGS: dict[str, Any] = _FULL.synth_kwargs()
#: Arguments of :func:`mirror_model.extract.extract_cohort` (encoder and tiling).
DEMO_EXTRACT_KWARGS: dict[str, Any] = _FULL.extract_kwargs()
#: ``ModelConfig`` overrides of preset ``mirror-grid`` for the demo model.
DEMO_MODEL_OVERRIDES: dict[str, Any] = _FULL.model_overrides()
#: ``TrainConfig`` fields of the demo pretraining.
DEMO_TRAIN_KWARGS: dict[str, Any] = _FULL.train_kwargs()
#: ``EvaluationSettings`` fields of the demo evaluation.
DEMO_EVAL_KWARGS: dict[str, Any] = _FULL.eval_kwargs()


# --------------------------------------------------------------------------------------------
# results
# --------------------------------------------------------------------------------------------
@dataclass
class DemoResult:
    """What :func:`run_demo` produced.

    Attributes
    ----------
    out_dir : the demo folder.  metrics_path, report_path, bundle_path : its main outputs.
    metrics : the content of ``metrics.json``.
    timings_s : seconds per stage (0 for stages skipped because already done).
    skipped : stages found finished and skipped.
    installed_to : where the bundle was also copied (``--install`` / ``bundle_out``), or None.
    """

    out_dir: Path
    metrics_path: Path
    report_path: Path
    bundle_path: Path
    metrics: dict[str, Any]
    timings_s: dict[str, float] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    installed_to: Path | None = None

    @property
    def headline(self) -> dict[str, Any]:
        """``{"auroc_macro": ..., "c_index": ..., "tumour_auroc": ...}`` (floats or None)."""
        h = self.metrics.get("headline") or {}

        def mean(k: str) -> float | None:
            v = h.get(k)
            return None if not v else v.get("mean")

        return {
            "auroc_macro": mean("auroc_macro"),
            "c_index": mean("c_index"),
            "tumour_auroc": (self.metrics.get("heatmap") or {}).get("tumour_auroc"),
        }


@dataclass
class SampleCase:
    """One synthetic patient from the demo's generative model (for trying the plugin).

    Attributes
    ----------
    slide_path : pyramidal TIFF of the patient's slide.
    expression_path : CSV with one row (this patient), the demo genes.
    sample_id : the row's sample ID (a TCGA-style barcode).
    mask_path : ground-truth tumour mask PNG (1 px per ``mask_downsample`` level-0 px).
    subtype : the true subtype.  mask_downsample : level-0 px per mask px.
    """

    slide_path: Path
    expression_path: Path
    sample_id: str
    mask_path: Path
    subtype: str = ""
    mask_downsample: int = 16


# --------------------------------------------------------------------------------------------
# sample case
# --------------------------------------------------------------------------------------------
def make_sample_case(
    out_dir: str | os.PathLike[str],
    settings: DemoSettings | None = None,
    *,
    overwrite: bool = False,
) -> SampleCase:
    """Write ONE synthetic patient of the demo's generative model to ``out_dir``.

    Same seed, gene set and generative parameters as the demo cohort the shipped bundle was
    trained on (gene roles and baseline expression depend on them, not on the cohort size), so
    the shipped bundle applies to it. A fresh patient (not one of the training patients): the
    generator is run for a 2-patient cohort and the first patient is kept. Takes a few seconds.

    Files: ``<slide_id>.tiff``, ``<slide_id>_tumour_mask.png``, ``expression.csv`` (one row)
    and ``case.json`` (the truth). Existing files are reused unless ``overwrite``.
    """
    from .synth import synthesize_cohort

    s = settings or DemoSettings.full()
    out = Path(out_dir)
    meta = out / "case.json"
    if meta.is_file() and not overwrite:
        try:
            d = json.loads(meta.read_text())
            case = SampleCase(
                slide_path=out / d["slide"],
                expression_path=out / d["expression"],
                sample_id=d["sample_id"],
                mask_path=out / d["mask"],
                subtype=d.get("subtype", ""),
                mask_downsample=int(d.get("mask_downsample", 16)),
            )
            if case.slide_path.is_file() and case.expression_path.is_file():
                return case
        except (OSError, ValueError, KeyError):
            pass  # unreadable: rebuild below
    out.mkdir(parents=True, exist_ok=True)
    import tempfile

    with tempfile.TemporaryDirectory(prefix=".mirror_case_", dir=out) as tmp:
        kw = s.synth_kwargs()
        # the generator needs >= 2 patients; a separate cohort size gives a new patient
        kw["n_patients"] = 2
        summ = synthesize_cohort(Path(tmp), overwrite=True, **kw)
        slide_id = summ.slide_ids[0]
        pid = summ.patient_ids[0]
        slide_dst = out / f"{slide_id}.tiff"
        mask_dst = out / f"{slide_id}_tumour_mask.png"
        shutil.copyfile(summ.slide_paths[0], slide_dst)
        shutil.copyfile(summ.mask_paths[0], mask_dst)
        lines = Path(summ.expression_csv).read_text().splitlines()
        header, rows = lines[0], [ln for ln in lines[1:] if ln.split(",", 1)[0].startswith(pid)]
        atomic_write_text(out / "expression.csv", "\n".join([header, rows[0]]) + "\n")
        sample_id = rows[0].split(",", 1)[0]
        case = SampleCase(
            slide_path=slide_dst,
            expression_path=out / "expression.csv",
            sample_id=sample_id,
            mask_path=mask_dst,
            subtype=summ.subtype[0],
            mask_downsample=int(summ.config.mask_downsample),
        )
        truth = {
            "slide": slide_dst.name,
            "expression": "expression.csv",
            "mask": mask_dst.name,
            "sample_id": sample_id,
            "patient_id": pid,
            "subtype": summ.subtype[0],
            "latent_risk": float(summ.latent_risk[0]),
            "tumour_fraction": float(summ.tumour_fraction[0]),
            "time_months": float(summ.time_months[0]),
            "event": int(summ.event[0]),
            "mask_downsample": case.mask_downsample,
            "generator": {**kw, "note": "patient 1 of a 2-patient cohort of the demo model"},
        }
        atomic_write_text(meta, json.dumps(truth, indent=2) + "\n")
    return case


# --------------------------------------------------------------------------------------------
# state
# --------------------------------------------------------------------------------------------
def _load_state(out: Path, settings: DemoSettings) -> dict[str, Any]:
    path = out / _STATE_FILE
    if path.is_file():
        try:
            state = json.loads(path.read_text())
        except (OSError, ValueError):
            raise ConfigError(
                f"{path} is unreadable; delete the folder {out} (or choose another --out) and "
                "run the demo again."
            ) from None
        if state.get("settings") != settings.to_dict():
            raise ConfigError(
                f"{out} holds a demo built with other settings ({path}); choose another --out "
                "folder (or delete this one) to build a new demo."
            )
        return state
    if out.exists() and any(out.iterdir()):
        raise ConfigError(
            f"{out} is not empty and is not a demo folder (no {_STATE_FILE}); choose an empty or "
            "new --out folder."
        )
    return {"version": _STATE_VERSION, "settings": settings.to_dict(), "stages": {}}


def _save_state(out: Path, state: dict[str, Any]) -> None:
    atomic_write_text(out / _STATE_FILE, json.dumps(state, indent=2) + "\n")


def _stage_progress(progress: ProgressFn | None, i: int, name: str) -> ProgressFn | None:
    if progress is None:
        return None
    prefix = f"[{i + 1}/{len(STAGES)}] {name}"

    def fn(done: int, total: int, stage: str) -> None:
        progress(done, total, f"{prefix}: {stage}" if stage else prefix)

    return fn


# --------------------------------------------------------------------------------------------
# stages
# --------------------------------------------------------------------------------------------
@dataclass
class _DemoRun:
    """What every stage reads: the demo folder and its fixed paths, the settings, where to
    compute, and the state recorded in ``DIR/demo_state.json``."""

    out: Path
    settings: DemoSettings
    device: str
    workers: int
    should_stop: StopFn | None
    state: dict[str, Any]
    timings: dict[str, float] = field(default_factory=dict)

    # the demo folder's fixed layout
    cohort_csv: Path = field(init=False)
    expression_csv: Path = field(init=False)
    features_dir: Path = field(init=False)
    run_dir: Path = field(init=False)
    eval_dir: Path = field(init=False)
    bundle_path: Path = field(init=False)

    def __post_init__(self) -> None:
        self.cohort_csv, self.expression_csv = self.out / "cohort.csv", self.out / "expression.csv"
        self.features_dir, self.run_dir = self.out / "features", self.out / "run"
        self.eval_dir, self.bundle_path = self.out / "evaluation", self.out / "demo.mirror"

    def done(self, stage: str) -> bool:
        return bool(self.state["stages"].get(stage, {}).get("done"))


def _synth_stage(r: _DemoRun, progress: ProgressFn | None) -> dict[str, Any]:
    """Cohort tables, slides and masks in ``DIR`` (the documented generative model)."""
    from .synth import synthesize_cohort

    synthesize_cohort(
        r.out,
        overwrite=True,
        workers=r.workers,
        progress=progress,
        should_stop=r.should_stop,
        **r.settings.synth_kwargs(),
    )
    return {}


def _extract_stage(r: _DemoRun, progress: ProgressFn | None) -> dict[str, Any]:
    """``DIR/features/<slide_id>.h5`` with the embedded encoder (resumes per slide)."""
    from .extract import extract_cohort

    ex = extract_cohort(
        r.cohort_csv,
        r.features_dir,
        device=r.device,
        precision="auto",
        num_workers=r.workers,
        progress=progress,
        should_stop=r.should_stop,
        **r.settings.extract_kwargs(),
    )
    return _extract_info(ex)


def _pretrain_stage(r: _DemoRun, progress: ProgressFn | None) -> dict[str, Any]:
    """``DIR/run``: one model per fold (an interrupted run resumes from its checkpoints)."""
    from .train import TrainConfig, pretrain

    res = pretrain(
        r.cohort_csv,
        r.expression_csv,
        r.features_dir,
        r.run_dir,
        preset=DEMO_PRESET,
        config=TrainConfig(**{**r.settings.train_kwargs(), "device": r.device}),
        model_overrides=r.settings.model_overrides(),
        resume=(r.run_dir / "config.yaml").is_file(),
        progress=progress,
        should_stop=r.should_stop,
    )
    if not getattr(res, "completed", True):
        raise MirrorError(f"pretraining of {r.run_dir} stopped before the end; run again.")
    return {
        "folds": [
            {"fold": f.fold, "best_epoch": f.best_epoch, "best_val_loss": f.best_val_loss}
            for f in res.folds
        ]
    }


def _evaluate_stage(r: _DemoRun, progress: ProgressFn | None) -> dict[str, Any]:
    """``DIR/evaluation``: frozen encoders, heads fitted per fold, scored on held-out patients."""
    from .evaluation.evaluate import EvaluationSettings, evaluate_run, save_evaluation

    known = {f.name for f in dataclasses.fields(EvaluationSettings)}
    ev = EvaluationSettings(**{k: v for k, v in r.settings.eval_kwargs().items() if k in known})
    res = evaluate_run(r.run_dir, ev, device=r.device, progress=progress, should_stop=r.should_stop)
    save_evaluation(r.eval_dir, {DEMO_PRESET: res}, {DEMO_PRESET: r.run_dir})
    return {}


def _heatmap_stage(r: _DemoRun, progress: ProgressFn | None) -> dict[str, Any]:
    """``DIR/evaluation/heatmaps/`` (``mirror-train heatmaps``): every map of every held-out
    slide against its ground-truth tumour mask, faithfulness by deletion, baselines."""
    from .evaluation.heatmaps import (
        evaluate_heatmaps,
        write_heatmap_report,
        write_heatmap_results,
    )

    out = r.eval_dir / "heatmaps"
    res = evaluate_heatmaps(
        r.run_dir,
        r.cohort_csv,
        r.out / "masks",
        out,
        features_dir=r.features_dir,
        device="cpu",
        progress=progress,
        should_stop=r.should_stop,
    )
    write_heatmap_results(out, res)
    write_heatmap_report(out, res, device="cpu")
    _write_metrics(r.out, r.settings, r.state, r.timings)
    return {}


def demo_provenance(s: DemoSettings) -> dict[str, Any]:
    """What the demo bundle says about itself: a synthetic cohort, not for patient material."""
    from .bundle import SYNTHETIC_INTENDED_USE

    return {
        "name": "MIRROR demo model (synthetic data)",
        "training_data": (
            f"synthetic cohort from mirror_model.synth (seed {s.seed}): {s.n_patients} "
            f"generated patients with one generated slide each ({s.slide_px}² px at "
            f"{s.slide_mpp} µm/px), {s.n_genes} generated genes, 3 subtypes; no real patient data"
        ),
        "intended_use": SYNTHETIC_INTENDED_USE,
        "synthetic": True,
        "survival_time_unit": "months",
    }




def _export_stage(r: _DemoRun, progress: ProgressFn | None) -> dict[str, Any]:
    """``DIR/demo.mirror``: the model trained on all patients for the epochs the folds
    validated (``DIR/run/final``), its heads, out-of-fold reference curves, the demo's metrics."""
    from .evaluation.export import export_bundle

    _write_metrics(r.out, r.settings, r.state, r.timings)
    ex = export_bundle(
        r.run_dir,
        r.bundle_path,
        refit=True,
        metrics_path=r.out / "metrics.json",
        evaluation_path=r.eval_dir / "evaluation.json",
        device="cpu",
        provenance=demo_provenance(r.settings),
        progress=progress,
        should_stop=r.should_stop,
    )
    return {
        "bundle_sha256": ex.bundle.sha256,
        "reference_metrics": jsonable(ex.reference_metrics),
        "notes": ex.notes,
    }


def _report_stage(r: _DemoRun, progress: ProgressFn | None) -> dict[str, Any]:
    """``DIR/metrics.json`` and ``DIR/report.md`` with the figures (rewritten every run)."""
    r.timings["report"] = 0.0
    metrics = _write_metrics(r.out, r.settings, r.state, r.timings)
    _write_report(r.out, r.settings, r.state, metrics)
    return {}


@dataclass(frozen=True)
class _Stage:
    """One demo stage: ``run(demo_run, progress) -> info`` recorded in ``demo_state.json``.
    A finished stage is skipped on the next run unless ``always``."""

    name: str
    run: Callable[[_DemoRun, ProgressFn | None], dict[str, Any]]
    always: bool = False


_STAGE_TABLE: tuple[_Stage, ...] = (
    _Stage("synth", _synth_stage),
    _Stage("extract", _extract_stage),
    _Stage("pretrain", _pretrain_stage),
    _Stage("evaluate", _evaluate_stage),
    _Stage("heatmap", _heatmap_stage),
    _Stage("export", _export_stage),
    _Stage("report", _report_stage, always=True),
)
#: The demo's stages, in order (``DIR/metrics.json["demo"]["stage_seconds"]`` keys).
STAGES: tuple[str, ...] = tuple(st.name for st in _STAGE_TABLE)


# --------------------------------------------------------------------------------------------
# run
# --------------------------------------------------------------------------------------------
def run_demo(
    out_dir: str | os.PathLike[str],
    settings: DemoSettings | None = None,
    *,
    bundle_out: str | os.PathLike[str] | None = None,
    device: str = "auto",
    workers: int | None = None,
    progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
    log: Callable[[str], None] | None = None,
) -> DemoResult:
    """Run (or resume) the end-to-end demo in ``out_dir``; see the module docstring.

    Parameters
    ----------
    out_dir : the demo folder (created; must be empty or a previous demo with the same settings).
    settings : :class:`DemoSettings` (default: :meth:`DemoSettings.full`).
    bundle_out : also copy the bundle there (``mirror-train demo --install`` passes the
        package's ``data/demo.mirror``).
    device : ``"auto"``, ``"cpu"`` or ``"cuda"`` for extraction, training and evaluation.
    workers : processes rendering slides / threads reading tiles (default: CPU count, ≤ 4).
    progress, should_stop : progress callback and cancellation poll (Cancelled is raised;
        finished work is kept and the next run resumes).
    log : called with one line per stage (the CLI prints it).
    """
    s = settings or DemoSettings.full()
    out = Path(out_dir).expanduser().resolve()
    state = _load_state(out, s)
    out.mkdir(parents=True, exist_ok=True)
    _save_state(out, state)
    say = log or (lambda msg: None)
    r = _DemoRun(
        out=out,
        settings=s,
        device=device,
        workers=workers if workers is not None else max(1, min(4, os.cpu_count() or 1)),
        should_stop=should_stop,
        state=state,
    )
    skipped: list[str] = []
    for i, stage in enumerate(_STAGE_TABLE):
        check_cancel(should_stop, "the demo")
        if r.done(stage.name) and not stage.always:
            skipped.append(stage.name)
            r.timings[stage.name] = 0.0
            say(f"{stage.name}: already done, skipped")
            continue
        t0 = time.perf_counter()
        info = stage.run(r, _stage_progress(progress, i, stage.name))
        seconds = time.perf_counter() - t0
        state["stages"][stage.name] = {"done": True, "seconds": round(seconds, 2), **info}
        _save_state(out, state)
        r.timings[stage.name] = round(seconds, 2)
        say(f"{stage.name}: done in {seconds:.1f} s")
    installed = None
    if bundle_out is not None:
        installed = Path(bundle_out).expanduser().resolve()
        atomic_write_bytes(installed, r.bundle_path.read_bytes())
        os.chmod(installed, r.bundle_path.stat().st_mode & 0o777)
        say(f"bundle copied to {installed}")
    metrics = _write_metrics(out, s, state, r.timings)
    return DemoResult(
        out_dir=out,
        metrics_path=out / "metrics.json",
        report_path=out / "report.md",
        bundle_path=r.bundle_path,
        metrics=metrics,
        timings_s=r.timings,
        skipped=skipped,
        installed_to=installed,
    )


def _extract_info(ex: Any) -> dict[str, Any]:
    info: dict[str, Any] = {}
    for name in ("n_slides", "n_done", "n_skipped", "n_failed", "n_tiles"):
        v = getattr(ex, name, None)
        if isinstance(v, (int, float)):
            info[name] = v
    return info


def _write_metrics(
    out: Path, s: DemoSettings, state: dict[str, Any], timings: dict[str, float]
) -> dict[str, Any]:
    """DIR/metrics.json = evaluate's tree + headline + heatmap + demo facts."""
    from . import __version__
    from .bundle import headline_metrics

    eval_metrics = out / "evaluation" / "metrics.json"
    metrics: dict[str, Any] = {}
    if eval_metrics.is_file():
        metrics.update(json.loads(eval_metrics.read_text()))
    metrics["headline"] = headline_metrics(metrics)
    hm_path = out / "evaluation" / "heatmaps" / "heatmaps.json"
    if hm_path.is_file():
        metrics["heatmap"] = _heatmap_metrics(json.loads(hm_path.read_text()))
    exp = state["stages"].get("export", {})
    stage_seconds = {k: v.get("seconds") for k, v in state["stages"].items() if v.get("done")}
    metrics["demo"] = {
        "settings": s.to_dict(),
        "synth": s.synth_kwargs(),
        "extract": s.extract_kwargs(),
        "model_preset": DEMO_PRESET,
        "model_overrides": {
            k: list(v) if isinstance(v, tuple) else v for k, v in s.model_overrides().items()
        },
        "training": s.train_kwargs(),
        "stage_seconds": stage_seconds,
        "total_seconds": round(sum(v for v in stage_seconds.values() if v), 2),
        "bundle": "demo.mirror" if (out / "demo.mirror").is_file() else None,
        "bundle_sha256": exp.get("bundle_sha256"),
        "bundle_reference": exp.get("reference_metrics"),
        "package_version": __version__,
    }
    atomic_write_text(out / "metrics.json", json.dumps(jsonable(metrics), indent=2) + "\n")
    return metrics


#: The map whose tumour AUROC is the demo's headline heatmap figure.
HEADLINE_MAP = "subtype:true"


def _heatmap_metrics(doc: dict[str, Any]) -> dict[str, Any]:
    """``metrics["heatmap"]``: the headline (the true-class map's tumour AUROC) and every map."""
    maps = doc.get("maps") or {}
    head = (maps.get(HEADLINE_MAP) or {}).get("auroc") or {}
    return {
        "map": HEADLINE_MAP,
        "tumour_auroc": head.get("mean"),
        "tumour_auroc_sd": head.get("sd"),
        "tumour_auroc_min_fold": head.get("min_fold"),
        "per_fold": head.get("per_fold", {}),
        "n_slides": (doc.get("settings") or {}).get("n_slides"),
        "tumour_tile_fraction": (doc.get("settings") or {}).get("region_share"),
        "maps": maps,
        "report": "evaluation/heatmaps/report.md",
        "definition": (
            "held-out slides, each with the model of the fold that held it out: AUROC of the map "
            "of the slide's true subtype vs tiles >= 50 % tumour; mean over folds of the fold "
            "means (all maps and baselines under 'maps', see mirror_model.evaluation.heatmaps)"
        ),
    }


def _fmt(v: Any) -> str:
    if isinstance(v, dict):
        if v.get("mean") is None:
            return "n/a"
        sd = v.get("sd")
        return f"{v['mean']:.3f}" + (f" ± {sd:.3f}" if sd is not None else "")
    if isinstance(v, (int, float)):
        return f"{v:.3f}"
    return "n/a"


def _write_report(
    out: Path, s: DemoSettings, state: dict[str, Any], metrics: dict[str, Any]
) -> Path:
    h = metrics.get("headline") or {}
    hm = metrics.get("heatmap") or {}
    demo = metrics.get("demo") or {}
    auc, ci = h.get("auroc_macro") or {}, h.get("c_index") or {}

    def verdict(v: Any, chance: float, margin: float) -> str:
        if not isinstance(v, (int, float)):
            return "not available"
        return "above chance" if v > chance + margin else "NOT clearly above chance"

    lines = [
        "# MIRROR end-to-end demo",
        "",
        "Synthetic cohort (known ground truth) → `stain-texture` patch features → MIRROR "
        "pretraining (no labels) → frozen-encoder evaluation on held-out patients → model "
        "bundle. Every number below is measured on patients the model and the heads never "
        "saw (patient-level cross-validation).",
        "",
        "## Does it learn?",
        "",
        "| what | held-out value | chance | verdict |",
        "|---|---|---|---|",
        f"| subtype macro AUROC (linear probe, input `{auc.get('input', '?')}`) | {_fmt(auc)} | "
        f"0.5 | {verdict(auc.get('mean'), 0.5, 0.1)} |",
        f"| survival C-index (Cox head, input `{ci.get('input', '?')}`) | {_fmt(ci)} | 0.5 | "
        f"{verdict(ci.get('mean'), 0.5, 0.05)} |",
        f"| heatmap: the true subtype's evidence map vs tumour mask, AUROC (mean over folds, "
        f"{hm.get('n_slides', 0)} held-out slides) | {_fmt(hm.get('tumour_auroc'))} | 0.5 | "
        f"{verdict(hm.get('tumour_auroc'), 0.5, 0.05)} |",
        "",
    ]
    if hm.get("maps"):
        from .evaluation.heatmaps import map_rows

        lines += [
            "### Per-tile maps of held-out slides",
            "",
            "Each held-out slide with the model of its fold (tumour = 50 % of the tile in the "
            f"ground-truth mask, {_fmt(hm.get('tumour_tile_fraction'))} of the tiles). Mean ± sd "
            "over folds (worst fold); deletion ratio = change of the displayed output when the "
            "map's top 10 % of tiles are removed over the change for random 10 % (see "
            "[the heatmap report](evaluation/heatmaps/report.md), with example slides).",
            "",
            *map_rows(hm["maps"]),
            "",
        ]
    ref = demo.get("bundle_reference") or {}
    lines += [
        "## The bundle",
        "",
        f"`demo.mirror` (sha256 `{(demo.get('bundle_sha256') or '')[:16]}…`): the model trained "
        "on all patients for the number of epochs the folds validated (the median of their "
        "selected epochs), with subtype and Cox heads for slide-only, RNA-only and both inputs "
        "fitted on all patients. It has no held-out patients of its own: its reference curves "
        "and the numbers below are the cross-validation's out-of-fold predictions (each patient "
        "scored by the fold model that never saw it):",
        "",
        "| input | AUROC | accuracy | C-index | n |",
        "|---|---|---|---|---|",
    ]
    for kind, m in ref.items():
        if isinstance(m, dict):
            lines.append(
                f"| {kind} | {_fmt(m.get('auroc_macro'))} | {_fmt(m.get('accuracy'))} | "
                f"{_fmt(m.get('c_index'))} | {m.get('n', '?')} |"
            )
    ss = demo.get("stage_seconds") or {}
    lines += [
        "",
        "## Settings and timings",
        "",
        f"- cohort: {s.n_patients} patients, {s.slide_px}² px slides at {s.slide_mpp} µm/px, "
        f"{s.n_genes} genes, seed {s.seed}",
        f"- tiles: {s.tile_px} px at {s.target_mpp} µm/px, encoder `stain-texture`",
        f"- model: preset `{DEMO_PRESET}` with {json.dumps(demo.get('model_overrides', {}))}",
        f"- training: {s.folds} folds, {s.epochs} epochs, batch {s.batch_size}, lr {s.lr:g} "
        f"(cosine), {s.tiles_per_slide} tiles per slide per step",
        f"- seconds per stage: {', '.join(f'{k} {v:.0f}' for k, v in ss.items() if v is not None)}"
        f" (total {demo.get('total_seconds', 0):.0f} s)",
        "",
        "---",
        "",
    ]
    eval_md = out / "evaluation" / "report.md"
    if eval_md.is_file():
        body = eval_md.read_text()
        body = body.replace("](figures/", "](evaluation/figures/")
        body = body.replace("\n# ", "\n## ", 1) if body.startswith("#") else body
        lines.append(body.replace("# MIRROR downstream evaluation", "## Full evaluation", 1))
    path = out / "report.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path
