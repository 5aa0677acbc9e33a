"""Readable evaluation report: ``report.md`` with PNG figures (matplotlib, Agg backend).

Contents: settings; a comparison table (one row per task / input / metric, one column per
run, "mean ± sd over folds"); per run: pretraining loss curves of every fold (from
``RUN/fold_k/log.jsonl``), Kaplan–Meier curves of the pooled test patients by risk group
(each fold's cut-off = median training risk) with the log-rank p-value, and the confusion
matrix of the linear probe's pooled test predictions. Figures go to ``figures/``.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .._io import atomic_path, atomic_write_text
from .metrics import confusion_matrix

__all__ = ["comparison_table", "format_mean_sd", "read_loss_log", "write_report"]

_TITLES = {
    "subtype_linear": "Subtyping, linear probe",
    "survival_cox": "Survival, Cox model",
    "survival_hazard": "Survival, discrete-time hazard head",
}


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "run"


def format_mean_sd(cell: Mapping[str, Any] | None) -> str:
    if not cell or cell.get("mean") is None:
        return "—"
    sd = cell.get("sd")
    return f"{cell['mean']:.3f}" if sd is None else f"{cell['mean']:.3f} ± {sd:.3f}"


def comparison_table(trees: Mapping[str, Mapping[str, Any]]) -> str:
    """Markdown table: rows task / input / metric, one column per run (mean ± sd)."""
    names = list(trees)
    rows: list[tuple[str, str, str]] = []
    for tree in trees.values():
        for task, inps in tree.items():
            for inp, ms in inps.items():
                for m in ms:
                    if (task, inp, m) not in rows:
                        rows.append((task, inp, m))
    lines = [
        "| task | input | metric | " + " | ".join(names) + " |",
        "|---|---|---|" + "---|" * len(names),
    ]
    for task, inp, m in rows:
        cells = [format_mean_sd(trees[n].get(task, {}).get(inp, {}).get(m)) for n in names]
        lines.append(f"| {task} | {inp} | {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def read_loss_log(path: str | os.PathLike[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Loss series of one ``log.jsonl``: ``{key: (x, y)}`` for every numeric key containing
    "loss"; x is the record's ``epoch`` (else ``step``, else the line number). Unreadable
    lines are skipped (a log being written may end mid-line)."""
    series: dict[str, tuple[list[float], list[float]]] = {}
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError:
        return {}
    for n, line in enumerate(lines):
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if not isinstance(rec, dict):
            continue
        x = rec.get("epoch", rec.get("step", n))
        if not isinstance(x, (int, float)):
            x = n
        for key, val in rec.items():
            if "loss" in key and isinstance(val, (int, float)) and not isinstance(val, bool):
                if math.isfinite(val):
                    xs, ys = series.setdefault(key, ([], []))
                    xs.append(float(x))
                    ys.append(float(val))
    return {k: (np.asarray(x), np.asarray(y)) for k, (x, y) in series.items()}


def _best_epoch(path: Path) -> float | None:
    """Epoch of the last log record flagged ``"best": true`` (the model kept), if any."""
    best = None
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return None
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if (
            isinstance(rec, dict)
            and rec.get("best") is True
            and isinstance(rec.get("epoch"), (int, float))
        ):
            best = float(rec["epoch"])
    return best


def _subplots(nrows: int, ncols: int, figsize: tuple[float, float], **kw: Any) -> tuple[Any, Any]:
    """A Figure on the Agg canvas without pyplot: no global backend switch, no window, and
    nothing left open in a GUI session (the plugin's) that calls the report."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(nrows, ncols, **kw)


def _save(fig: Any, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)


def _loss_figure(run_dir: Path, path: Path, title: str) -> bool:
    logs = sorted(
        (p for p in run_dir.glob("fold_*/log.jsonl")),
        key=lambda p: int(re.sub(r"\D", "", p.parent.name) or 0),
    )
    per_fold = [(p.parent.name, read_loss_log(p)) for p in logs]
    per_fold = [(n, s) for n, s in per_fold if s]
    if not per_fold:
        return False
    # the headline curves: total train/val loss when present, else every loss key
    fig, axes = _subplots(1, len(per_fold), figsize=(4 * len(per_fold), 3.2), squeeze=False)
    for ax, (name, series) in zip(axes[0], per_fold, strict=True):
        keys = [
            k for k in series if k in ("loss", "train_loss", "val_loss", "train/loss", "val/loss")
        ]
        for key in keys or list(series):
            x, y = series[key]
            ax.plot(x, y, label=key, marker="." if x.size < 30 else None)
        best = _best_epoch(run_dir / name / "log.jsonl")
        if best is not None:  # the epoch kept by pretraining (lowest inner-validation loss)
            ax.axvline(
                best, color="grey", linestyle="--", linewidth=1, label=f"kept (epoch {best:g})"
            )
        ax.set_title(name)
        ax.set_xlabel("epoch")
        ax.set_ylabel("loss")
        ax.legend(fontsize=7)
    fig.suptitle(title)
    _save(fig, path)
    return True


def _km_figure(km: Mapping[str, Any], path: Path, title: str) -> bool:
    inputs = list(km)
    if not inputs:
        return False
    fig, axes = _subplots(1, len(inputs), figsize=(4 * len(inputs), 3.4), squeeze=False)
    for ax, inp in zip(axes[0], inputs, strict=True):
        d = km[inp]
        for grp, color in (("low", "tab:blue"), ("high", "tab:red")):
            if grp in d:
                ax.step(
                    d[grp]["time"],
                    d[grp]["survival"],
                    where="post",
                    color=color,
                    label=f"{grp} risk (n={d.get('n_' + grp, '?')})",
                )
        p = d.get("logrank_p")
        ax.set_title(
            f"{inp}: log-rank p = {p:.3g}" if p is not None else f"{inp}: log-rank p = n/a"
        )
        ax.set_xlabel("time")
        ax.set_ylabel("survival probability")
        ax.set_ylim(0, 1.02)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    _save(fig, path)
    return True


def _confusion_figure(pred: Mapping[str, Any], path: Path, title: str) -> bool:
    inputs = [i for i, d in pred.items() if d.get("y_true")]
    if not inputs:
        return False
    fig, axes = _subplots(1, len(inputs), figsize=(3.8 * len(inputs), 3.6), squeeze=False)
    for ax, inp in zip(axes[0], inputs, strict=True):
        d = pred[inp]
        classes = list(d["classes"])
        y_pred = np.asarray(classes, dtype=object)[np.argmax(np.asarray(d["proba"]), axis=1)]
        cm = confusion_matrix(np.asarray(d["y_true"], dtype=object), y_pred, classes)
        ax.imshow(cm, cmap="Blues")
        for (r, c), v in np.ndenumerate(cm):
            ax.text(
                c,
                r,
                str(v),
                ha="center",
                va="center",
                color="white" if v > cm.max() / 2 else "black",
            )
        ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
        ax.set_yticks(range(len(classes)), classes)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(inp)
    fig.suptitle(title)
    _save(fig, path)
    return True


def _choices_table(res: Any) -> list[str]:
    """Per fold and input: what was chosen on the training patients (C, penalties, cut-off)."""
    rows = []
    for f in res.folds:
        for inp in res.settings.inputs:
            d = f.get(inp) or {}
            lin = d.get("subtype_linear", {})
            cox = d.get("survival_cox", {})
            haz = d.get("survival_hazard", {})
            if not (lin or cox or haz):
                continue
            edges = haz.get("bin_edges")
            edges_txt = ", ".join(f"{x:.3g}" for x in edges) if edges else "—"
            cut = cox.get("risk_cutoff")
            cut_txt = "—" if cut is None else f"{cut:.3g}"
            rows.append(
                f"| {f['fold']} | {inp} | {f['n_train']} / {f['n_test']} | "
                f"{lin.get('C', '—')} | {cox.get('penalizer', '—')} | "
                f"{haz.get('weight_decay', '—')} | {edges_txt} | {cut_txt} |"
            )
    if not rows:
        return []
    return [
        "### Choices made on training patients only",
        "",
        "| fold | input | train / test patients | probe C | Cox penaliser | hazard weight decay "
        "| hazard bin edges | Cox risk cut-off |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
        "",
    ]


def write_report(
    out_dir: str | os.PathLike[str],
    results: Mapping[str, Any],
    run_dirs: Mapping[str, str | os.PathLike[str]] | None = None,
) -> Path:
    """Write ``out_dir/report.md`` and its PNGs under ``out_dir/figures``; return the path.

    Parameters
    ----------
    results : ``{run_name: EvaluationResult}``.
    run_dirs : ``{run_name: run folder}`` for the loss curves (skipped when absent).
    """
    out = Path(out_dir)
    fig_dir = out / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    run_dirs = dict(run_dirs or {})
    first = next(iter(results.values()))
    s = first.settings
    md = [
        "# MIRROR downstream evaluation",
        "",
        f"Runs: {', '.join(f'`{n}`' for n in results)}. Frozen encoders; per fold, probes and "
        "survival heads are fitted on the fold's training patients (train + val) and scored on "
        "its test patients. Values are mean ± sd (sample sd) over folds.",
        "",
        f"Settings: inputs {', '.join(s.inputs)}; k-shot k = {', '.join(map(str, s.k_shots))} "
        f"({s.n_draws} seeded draws per fold); probe C = {s.probe_C}; Cox penaliser = "
        f"{s.cox_penalizer} (PCA to ≤ {s.cox_max_components} components); hazard head "
        f"{s.hazard_bins} bins from training-patient quartiles, weight decay = "
        f'{s.hazard_weight_decay}, fitted to convergence by full-batch L-BFGS. "cv" = chosen by '
        "inner cross-validation on training patients only. C-index: higher risk = earlier death.",
        "",
        "## Comparison" if len(results) > 1 else "## Metrics",
        "",
        comparison_table({n: r.metrics for n, r in results.items()}),
        "",
    ]
    for name, res in results.items():
        safe = _safe_name(name)
        md += [f"## Run `{name}`", ""]
        if name in run_dirs:
            p = fig_dir / f"{safe}_loss.png"
            if _loss_figure(Path(run_dirs[name]), p, f"{name}: pretraining loss per fold"):
                md += [
                    "### Pretraining loss",
                    "",
                    f"![loss curves of {name}](figures/{p.name})",
                    "",
                ]
        for task in ("survival_cox", "survival_hazard"):
            km = res.km.get(task, {})
            p = fig_dir / f"{safe}_km_{task}.png"
            if km and _km_figure(km, p, f"{name}: {_TITLES[task]} (test patients, all folds)"):
                md += [
                    f"### {_TITLES[task]}: Kaplan–Meier by risk group",
                    "",
                    f"![KM curves {task} of {name}](figures/{p.name})",
                    "",
                ]
                rows = ["| input | n low | n high | log-rank p |", "|---|---|---|---|"]
                for inp, d in km.items():
                    pv = d.get("logrank_p")
                    rows.append(
                        f"| {inp} | {d.get('n_low')} | {d.get('n_high')} | "
                        f"{'n/a' if pv is None else f'{pv:.3g}'} |"
                    )
                md += rows + [""]
        pred = res.predictions.get("subtype_linear", {})
        p = fig_dir / f"{safe}_confusion_subtype_linear.png"
        if pred and _confusion_figure(pred, p, f"{name}: linear probe, test patients of all folds"):
            md += [
                "### Subtyping: confusion matrix",
                "",
                f"![confusion matrix of {name}](figures/{p.name})",
                "",
            ]
        md += _choices_table(res)
        if res.notes:
            md += ["### Notes", ""] + [f"- {n}" for n in res.notes] + [""]
    path = out / "report.md"
    atomic_write_text(path, "\n".join(md))
    return path
