"""What the MIRROR panel shows, computed without Qt (so the job thread can prepare it and tests
can read it without a viewer): number formats, the model card, headline metrics and the
Kaplan–Meier plot of the bundle's reference cohort (lifelines, drawn with matplotlib's Agg
canvas into an RGBA array, never through pyplot's global figure state).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "SMALL_GROUP",
    "Headline",
    "KMPlot",
    "ModelCard",
    "ResultSummary",
    "flatten_metrics",
    "format_number",
    "format_percentile",
    "format_probability",
    "PreparedResult",
    "km_plot",
    "layer_names",
    "metric_headlines",
    "model_card",
    "prepare_result",
    "summarize",
]

#: Reference risk groups smaller than this get a note under the Kaplan–Meier plot.
SMALL_GROUP = 20
#: Risk-group colours: the same in the text and the Kaplan–Meier plot.
GROUP_COLOURS = {"low": "#2b83ba", "high": "#d7191c", "intermediate": "#fdae61"}
_FALLBACK_COLOURS = ["#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e"]


# ------------------------------------------------------------------------------ formats
def _finite(x: Any) -> float | None:
    """``x`` as a float, or None when it is missing or not finite (shown as ``n/a``)."""
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def format_number(x: Any, digits: int = 3) -> str:
    """``digits`` significant digits; ``n/a`` for None/NaN."""
    v = _finite(x)
    if v is None:
        return "n/a"
    return f"{v:.{digits}g}" if abs(v) < 1e5 else f"{v:.3e}"


def format_probability(p: Any) -> str:
    """A probability as a percentage with one decimal, never claiming certainty:
    ``0.9996 -> '> 99.9 %'``, ``0.0004 -> '< 0.1 %'``, ``0.4567 -> '45.7 %'``."""
    v = _finite(p)
    if v is None:
        return "n/a"
    v *= 100.0
    if v >= 99.95:
        return "> 99.9 %"
    if v < 0.05:
        return "< 0.1 %"
    return f"{v:.1f} %"


def format_percentile(p: Any) -> str:
    """``62.4 -> '62nd'``, ``99.93 -> '99.9th'``: whole percentiles unless a decimal matters
    (above 99 or below 1, where the top tiles of a large slide sit)."""
    v = _finite(p)
    if v is None:
        return "n/a"
    if 1.0 <= v <= 99.0 or abs(v - round(v)) < 1e-9:
        n = int(round(v))
        suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
        return f"{n}{suffix}"
    return f"{math.floor(v * 10) / 10:.1f}th"


def flatten_metrics(metrics: Mapping[str, Any], prefix: str = "") -> list[tuple[str, str]]:
    """Nested metric dicts as ``("a / b / c", "0.81 ± 0.03")`` rows; mean/sd pairs merged."""
    rows: list[tuple[str, str]] = []
    for key, val in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(val, Mapping):
            if "mean" in val and not isinstance(val["mean"], Mapping):
                sd = val.get("sd", val.get("std"))
                txt = format_number(val["mean"])
                if sd is not None:
                    txt += f" ± {format_number(sd, 2)}"
                rows.append((name, txt))
            else:
                rows.extend(flatten_metrics(val, f"{name} / "))
        elif isinstance(val, (int, float)) and not isinstance(val, bool):
            rows.append((name, format_number(val)))
        elif isinstance(val, str):
            rows.append((name, val))
    return rows


# --------------------------------------------------------------------------- model card
@dataclass(frozen=True)
class ModelCard:
    """Where a bundle comes from, in the words the panel and the exports use.

    Attributes
    ----------
    name, created, training_data, intended_use : str
    synthetic : bool
        The model was trained on synthetic data (the embedded demo): never for patient material.
    time_unit : str or None
        Unit of the reference cohort's survival times (None: not recorded).
    warning : str or None
        The banner text (None for bundles that declare a real intended use).
    """

    name: str
    created: str
    training_data: str
    intended_use: str
    synthetic: bool
    time_unit: str | None
    warning: str | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "created": self.created,
            "training_data": self.training_data,
            "intended_use": self.intended_use,
            "synthetic": self.synthetic,
            "survival_time_unit": self.time_unit,
            "warning": self.warning,
        }


def model_card(bundle: Any) -> ModelCard:
    """The :class:`ModelCard` of a loaded bundle, from its recorded provenance
    (:attr:`mirror_model.bundle.Bundle.provenance`)."""
    prov = bundle.provenance
    return ModelCard(
        name=str(prov.name),
        created=_date(prov.created),
        training_data=str(prov.training_data or "not recorded"),
        intended_use=str(prov.intended_use or "not stated"),
        synthetic=bool(prov.synthetic),
        time_unit=prov.survival_time_unit,
        warning=prov.warning,
    )


def _date(stamp: Any) -> str:
    """``2026-11-29T00:22:02+00:00 -> '2026-11-29'`` (ISO dates as recorded; others as they are)."""
    text = str(stamp or "").strip()
    if not text:
        return "unknown date"
    return text[:10] if len(text) >= 10 and text[4] == "-" and text[7] == "-" else text


# ------------------------------------------------------------------------------ metrics
@dataclass(frozen=True)
class Headline:
    """One headline validation figure: ``label: value`` (``detail`` in a tooltip)."""

    label: str
    value: str
    detail: str = ""


def _mean_sd(node: Any) -> str | None:
    if not isinstance(node, Mapping) or "mean" not in node:
        return None
    return _pm(node["mean"], node.get("sd"))


def _pm(mean: Any, sd: Any = None) -> str:
    """``0.999 ± 0.002``: a metric in [0, 1] and its spread, both with three decimals."""
    m, s = _finite(mean), _finite(sd)
    if m is None:
        return "n/a"
    return f"{m:.3f}" + (f" ± {s:.3f}" if s is not None else "")


def metric_headlines(metrics: Mapping[str, Any], input_kind: str | None) -> list[Headline]:
    """A few figures that say how good the model is for the inputs of this prediction:
    held-out subtype macro AUROC and balanced accuracy (linear probe), survival C-index (Cox)
    and, where the bundle has it, the heatmap-vs-tumour-mask AUROC (mean ± sd over folds)."""
    from mirror_model import INPUT_KIND_WORDS

    out: list[Headline] = []
    kinds = [input_kind] if input_kind else []
    kinds += [k for k in ("both", "slide", "rna") if k not in kinds]
    n_folds = None

    def pick(task: str, metric: str) -> tuple[str | None, str | None]:
        nonlocal n_folds
        for kind in kinds:
            node = ((metrics.get(task) or {}).get(kind) or {}).get(metric)
            txt = _mean_sd(node)
            if txt is not None:
                per = node.get("per_fold") if isinstance(node, Mapping) else None
                if per is not None and n_folds is None:
                    n_folds = len(per)
                return txt, kind
        return None, None

    for task, metric, label in (
        ("subtype_linear", "auroc_macro", "Subtype macro AUROC"),
        ("subtype_linear", "balanced_accuracy", "Subtype balanced accuracy"),
        ("survival_cox", "c_index", "Survival C-index"),
    ):
        txt, kind = pick(task, metric)
        if txt is not None:
            words = INPUT_KIND_WORDS.get(kind or "", kind or "")
            out.append(Headline(f"{label} ({words})", txt, f"{task} / {kind} / {metric}"))
    heat = metrics.get("heatmap")
    # the heatmap's figure says nothing about an expression-only prediction
    if input_kind != "rna" and isinstance(heat, Mapping) and heat.get("tumour_auroc") is not None:
        txt = _pm(heat["tumour_auroc"], heat.get("tumour_auroc_sd"))
        out.append(
            Headline(
                "Heatmap vs tumour mask AUROC",
                txt,
                str(heat.get("definition", "")),
            )
        )
    if out:
        folds = f"{n_folds} held-out folds" if n_folds else "held-out folds"
        out = [Headline(h.label, h.value, f"{h.detail} (mean ± sd over {folds})") for h in out]
    return out


# ------------------------------------------------------------------------- Kaplan–Meier
@dataclass(frozen=True)
class KMPlot:
    """A rendered Kaplan–Meier plot: ``rgba [H, W, 4]`` uint8 at ``scale`` device pixels per
    logical pixel, and notes to print under it."""

    rgba: np.ndarray
    scale: float
    notes: tuple[str, ...]
    groups: dict[str, int]


def _reference_groups(bundle: Any, input_kind: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    ref = bundle.reference(input_kind) if bundle is not None else None
    if not ref or ref.get("time") is None or ref.get("group") is None:
        return {}
    time = np.asarray(ref["time"], dtype=float)
    event = np.asarray(ref["event"], dtype=float).astype(bool)
    group = np.asarray([str(g) for g in ref["group"]])
    out = {}
    for g in sorted(set(group.tolist()), key=lambda g: (g != "low", g)):
        m = group == g
        out[g] = (time[m], event[m])
    return out


def km_plot(
    bundle: Any,
    input_kind: str,
    patient_group: str | None,
    time_unit: str | None,
    *,
    width_px: int = 360,
    height_px: int = 290,
    scale: float = 2.0,
) -> KMPlot | None:
    """Kaplan–Meier curves of the bundle's reference cohort by risk group (lifelines), with 95 %
    confidence bands, numbers at risk under the axis, this patient's group drawn thick and
    labelled. None when the bundle has no reference cohort for ``input_kind``.

    ``width_px``/``height_px`` are logical pixels of the panel; the image has ``scale`` times as
    many device pixels so it stays sharp on high-DPI screens.
    """
    groups = _reference_groups(bundle, input_kind)
    if not groups:
        return None
    from lifelines import KaplanMeierFitter
    from lifelines.plotting import add_at_risk_counts
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    dpi = 100.0 * scale
    fig = Figure(figsize=(width_px / 100.0, height_px / 100.0), dpi=dpi)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0.16, 0.33, 0.80, 0.58))
    fitters = []
    labels = []
    for i, (g, (t, e)) in enumerate(groups.items()):
        colour = GROUP_COLOURS.get(g.lower(), _FALLBACK_COLOURS[i % len(_FALLBACK_COLOURS)])
        mine = patient_group is not None and g == str(patient_group)
        label = f"{g} risk (n={len(t)})" + (" ← this patient" if mine else "")
        kmf = KaplanMeierFitter(label=label).fit(t, e)
        kmf.plot_survival_function(
            ax=ax,
            ci_show=True,
            ci_alpha=0.25 if mine else 0.12,
            color=colour,
            lw=2.8 if mine else 1.2,
            alpha=1.0 if mine else 0.75,
            show_censors=True,
            censor_styles={"ms": 4, "marker": "|"},
        )
        fitters.append(kmf)
        labels.append(f"{g}")
    unit = time_unit or "unit not recorded in the bundle"
    ax.set_xlabel(f"time ({unit})", fontsize=8)
    ax.set_ylabel("survival probability", fontsize=8)
    ax.set_ylim(0, 1.02)
    ax.set_xlim(left=0)
    ax.tick_params(labelsize=7)
    ax.set_title("Reference cohort by risk group (95 % CI)", fontsize=8.5)
    ax.legend(fontsize=6.5, loc="lower left", frameon=False)
    add_at_risk_counts(*fitters, ax=ax, fig=fig, labels=labels, rows_to_show=["At risk"], ypos=-0.3)
    for txt in fig.findobj(match=lambda a: hasattr(a, "set_fontsize") and a is not ax.title):
        if getattr(txt, "get_text", None) and txt.get_text().strip().startswith(("At risk", "\n")):
            txt.set_fontsize(6.5)
    for a in fig.axes:
        a.tick_params(labelsize=6.5)
    canvas = fig.canvas
    canvas.draw()
    rgba = np.asarray(canvas.buffer_rgba()).copy()
    notes = []
    small = [(g, len(t)) for g, (t, _) in groups.items() if len(t) < SMALL_GROUP]
    if small:
        which = ", ".join(f"{g} {n}" for g, n in small)
        one = len(small) == 1
        notes.append(
            f"Small reference group{'' if one else 's'} ({which} patients; fewer than "
            f"{SMALL_GROUP}): {'its curve is' if one else 'the curves are'} uncertain; read the "
            f"band{'' if one else 's'}, not the line{'' if one else 's'}."
        )
    if not time_unit:
        notes.append("The bundle does not record the unit of its survival times.")
    return KMPlot(rgba=rgba, scale=scale, notes=tuple(notes), groups={g: len(t) for g, (t, _) in groups.items()})


# ---------------------------------------------------------------------- result summary
@dataclass(frozen=True)
class ResultSummary:
    """Everything the results sections show for one prediction, as plain values.

    ``shown`` maps stable keys to the displayed strings (tests and the report read it).
    """

    card: ModelCard
    inputs: str
    sample: str | None
    subtype_rows: tuple[tuple[str, str, float, bool], ...]  # (class, text, p, is_predicted)
    predicted_subtype: str | None
    risk_lines: tuple[str, ...]
    risk_group: str | None
    warnings: tuple[str, ...]
    headlines: tuple[Headline, ...]
    metric_rows: tuple[tuple[str, str], ...]
    km: KMPlot | None
    seconds: float | None
    shown: dict[str, str] = field(default_factory=dict)


def summarize(
    prediction: Any,
    bundle: Any,
    seconds: float | None = None,
    *,
    km_width_px: int = 360,
) -> ResultSummary:
    """Prepare the panel's content for ``prediction`` (runs on the job thread)."""
    from ._run import input_sentence

    shown: dict[str, str] = {}
    card = model_card(bundle)
    shown["model"] = card.name
    kind = str(getattr(prediction, "input_kind", "") or "")
    shown["inputs"] = input_sentence(kind)

    sample = None
    sid = getattr(prediction, "sample_id", None)
    if sid:
        how = getattr(prediction, "sample_match", None)
        sample = f"{sid} ({how})" if how else str(sid)
        shown["sample_id"] = str(sid)

    rows: list[tuple[str, str, float, bool]] = []
    probs = getattr(prediction, "subtype_probabilities", None) or {}
    best = getattr(prediction, "predicted_subtype", None) or (max(probs, key=probs.get) if probs else None)
    for name, p in sorted(probs.items(), key=lambda kv: -kv[1]):
        text = format_probability(p)
        shown[f"p[{name}]"] = text
        rows.append((str(name), text, float(p), name == best))
    if best is not None:
        shown["predicted_subtype"] = str(best)

    risk_lines: list[str] = []
    risk = getattr(prediction, "risk_score", None)
    group = getattr(prediction, "risk_group", None)
    if risk is not None:
        pct = getattr(prediction, "risk_percentile", None)
        ref = bundle.reference(kind) if bundle is not None else None
        n_ref = len(ref["risk"]) if ref and ref.get("risk") is not None else None
        shown["risk_score"] = format_number(risk, 4)
        shown["risk_percentile"] = format_percentile(pct) if pct is not None else "n/a"
        shown["risk_group"] = str(group) if group is not None else "n/a"
        of = f" of the {n_ref} reference patients" if n_ref else " of the reference cohort"
        risk_lines.append(f"Risk group: {shown['risk_group']}")
        if pct is not None:
            risk_lines.append(f"Higher risk than {float(pct):.0f} %{of}")
        risk_lines.append(f"Risk score {shown['risk_score']} (Cox; higher = worse prognosis)")

    # the model's own warning is the banner above the results: not repeated in the list
    warnings = tuple(
        str(w) for w in (getattr(prediction, "warnings", None) or []) if str(w) != card.warning
    )
    if warnings:
        shown["warnings"] = " | ".join(warnings)

    metrics = dict(getattr(bundle, "metrics", {}) or {}) if bundle is not None else {}
    headlines = tuple(metric_headlines(metrics, kind))
    table = tuple(flatten_metrics(metrics))
    shown["headlines"] = " | ".join(f"{h.label}: {h.value}" for h in headlines)
    shown["n_metrics"] = str(len(table))

    km = None
    if risk is not None and bundle is not None:
        km = km_plot(bundle, kind, None if group is None else str(group), card.time_unit, width_px=km_width_px)
        if km is not None:
            shown["km_groups"] = ", ".join(f"{g} (n={n})" for g, n in km.groups.items())
            shown["km_notes"] = " ".join(km.notes)
    if seconds is not None:
        shown["seconds"] = f"{seconds:.1f}"
    return ResultSummary(
        card=card,
        inputs=shown["inputs"],
        sample=sample,
        subtype_rows=tuple(rows),
        predicted_subtype=None if best is None else str(best),
        risk_lines=tuple(risk_lines),
        risk_group=None if group is None else str(group),
        warnings=warnings,
        headlines=headlines,
        metric_rows=table,
        km=km,
        seconds=seconds,
        shown=shown,
    )


# ------------------------------------------------------------------------ prepared result
@dataclass(frozen=True)
class PreparedResult:
    """A result made ready for display on the job thread: the panel's content and the napari
    layer objects (built, not yet added to a viewer)."""

    summary: ResultSummary
    map_name: str | None
    heatmap: Any = None
    top_tiles_layer: Any = None
    tops: tuple[Any, ...] = ()


def legend_note(card: ModelCard) -> str | None:
    """The first line of the map's legend for a synthetic-data model, so that every screenshot
    and PNG export of its maps says what the model is."""
    return "DEMO MODEL (synthetic data): not for patient material" if card.synthetic else None


def layer_names(slide_name: str) -> tuple[str, str]:
    """Names of the heatmap and top-tile layers of a slide."""
    return f"{slide_name} heatmap", f"{slide_name} top tiles"


def prepare_result(
    result: Any,
    should_stop: Any = None,
    *,
    display: Any = None,
    map_name: str | None = None,
    k: int = 10,
    slide_name: str = "MIRROR",
    km_width_px: int = 360,
    make_layers: bool = True,
) -> PreparedResult:
    """Everything :meth:`MirrorWidget.show_result` needs, computed without Qt.

    ``map_name`` is kept when the new prediction has that map, else its first map is shown.
    """
    from ._layers import heatmap_layer_data, make_layer, top_tiles, top_tiles_layer_data
    from ._run import _check_stop

    pred = result.prediction
    summary = summarize(pred, result.bundle, result.seconds, km_width_px=km_width_px)
    _check_stop(should_stop)
    maps = getattr(pred, "maps", None) or {}
    if not maps:
        return PreparedResult(summary=summary, map_name=None)
    name = map_name if map_name in maps else next(iter(maps))
    mpp = float(pred.slide_mpp)
    source = {"slide_path": result.request.slide_path}
    heat_name, tops_name = layer_names(slide_name)
    tops = top_tiles(pred, k, map_name=name, mpp=mpp)
    heat_data = heatmap_layer_data(
        pred, map_name=name, mpp=mpp, display=display, name=heat_name, source=source,
        note=legend_note(summary.card),
    )
    tops_data = None
    if k > 0:
        tops_data = top_tiles_layer_data(
            pred, k, map_name=name, mpp=mpp, name=tops_name, source=source, tops=tops
        )
    heat = top_layer = None
    if make_layers:
        heat = make_layer(heat_data)
        heat.colorbar.visible = True
        heat.colorbar.position = "top_left"  # its label goes in the same corner: napari stacks them
        _check_stop(should_stop)
        top_layer = make_layer(tops_data) if tops_data is not None else None
    return PreparedResult(summary=summary, map_name=name, heatmap=heat, top_tiles_layer=top_layer, tops=tuple(tops))
