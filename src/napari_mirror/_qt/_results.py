"""Results panel: subtype probabilities, risk against the reference cohort, KM curves, metrics."""

from __future__ import annotations

import html
import math
from collections.abc import Mapping
from typing import Any

from qtpy.QtCore import Qt
from qtpy.QtWidgets import QLabel, QSizePolicy, QVBoxLayout, QWidget

from .._run import modality_kind, modality_sentence

__all__ = ["ResultsPanel", "flatten_metrics", "format_number", "ordinal"]

# Risk-group colours: the same in the text and the KM plot.
GROUP_COLOURS = {"low": "#2b83ba", "high": "#d7191c", "intermediate": "#fdae61", "medium": "#fdae61"}
_FALLBACK_COLOURS = ["#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e"]


def format_number(x: Any, digits: int = 3) -> str:
    """``digits`` significant digits; ``n/a`` for None/NaN."""
    try:
        v = float(x)
    except (TypeError, ValueError):
        return "n/a"
    if not math.isfinite(v):
        return "n/a"
    return f"{v:.{digits}g}" if abs(v) < 1e5 else f"{v:.3e}"


def ordinal(p: float) -> str:
    """``62.4 -> '62nd'`` (percentiles rounded to integers)."""
    n = round(float(p))
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


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


class ResultsPanel(QWidget):
    """Shows one prediction. ``shown`` keeps the displayed strings (tests read it)."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.shown: dict[str, str] = {}
        self._summary = QLabel("No result yet: pick inputs and press Run.")
        self._summary.setWordWrap(True)
        self._summary.setTextFormat(Qt.TextFormat.RichText)
        self._summary.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self._metrics = QLabel("")
        self._metrics.setWordWrap(True)
        self._metrics.setTextFormat(Qt.TextFormat.RichText)
        self._metrics.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self._canvas = None
        self._figure = None
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.addWidget(self._summary)
        self._canvas_holder = QVBoxLayout()
        lay.addLayout(self._canvas_holder)
        lay.addWidget(self._metrics)

    # ------------------------------------------------------------------------------------------
    def summary_text(self) -> str:
        return self._summary.text()

    def metrics_text(self) -> str:
        return self._metrics.text()

    def clear(self) -> None:
        self.shown = {}
        self._summary.setText("No result yet: pick inputs and press Run.")
        self._metrics.setText("")
        if self._figure is not None:
            self._figure.clear()
            self._canvas.draw_idle()

    def show_result(self, prediction: Any, bundle: Any, seconds: float | None = None) -> None:
        """Fill the panel from a :class:`~mirror_model.inference.Prediction` and its bundle."""
        shown: dict[str, str] = {}
        parts: list[str] = []
        mods = tuple(getattr(prediction, "modalities", ()) or ())
        shown["modalities"] = modality_sentence(mods)
        parts.append(f"<b>Inputs used:</b> {html.escape(shown['modalities'])}")

        probs = getattr(prediction, "subtype_probabilities", None)
        if probs:
            best = getattr(prediction, "predicted_subtype", None) or max(probs, key=probs.get)
            shown["predicted_subtype"] = str(best)
            rows = []
            for name, p in sorted(probs.items(), key=lambda kv: -kv[1]):
                shown[f"p[{name}]"] = f"{100.0 * float(p):.1f}%"
                bar = "█" * max(0, round(20 * float(p)))
                weight = "b" if name == best else "span"
                rows.append(
                    f"<tr><td><{weight}>{html.escape(str(name))}</{weight}></td>"
                    f"<td align='right'>{shown[f'p[{name}]']}</td>"
                    f"<td><span style='color:#4a90d9'>{bar}</span></td></tr>"
                )
            parts.append(
                f"<b>Predicted subtype:</b> {html.escape(str(best))}<table cellspacing='4'>{''.join(rows)}</table>"
            )
        else:
            parts.append("<b>Subtype:</b> the bundle has no subtype head for these inputs.")

        risk = getattr(prediction, "risk_score", None)
        group = getattr(prediction, "risk_group", None)
        pct = getattr(prediction, "risk_percentile", None)
        if risk is not None:
            shown["risk_score"] = format_number(risk, 4)
            shown["risk_percentile"] = ordinal(pct) if pct is not None else "n/a"
            shown["risk_group"] = str(group) if group is not None else "n/a"
            colour = GROUP_COLOURS.get(str(group).lower(), "#444")
            parts.append(
                f"<b>Risk score:</b> {shown['risk_score']} (higher = worse prognosis)<br>"
                f"<b>Percentile in reference cohort:</b> {shown['risk_percentile']}<br>"
                f"<b>Risk group:</b> <span style='color:{colour}'><b>{html.escape(shown['risk_group'])}"
                "</b></span>"
            )
        else:
            parts.append("<b>Risk:</b> the bundle has no survival head for these inputs.")
        if seconds is not None:
            shown["seconds"] = f"{seconds:.1f}"
            parts.append(f"<span style='color:gray'>Computed in {seconds:.1f} s.</span>")

        sid = getattr(prediction, "sample_id", None)
        if sid:
            how = getattr(prediction, "sample_match", None)
            shown["sample_id"] = str(sid)
            parts.insert(1, f"<b>Expression row:</b> {html.escape(str(sid))}"
                         + (f" <span style='color:gray'>({html.escape(str(how))})</span>" if how else ""))
        warns = [str(w) for w in (getattr(prediction, "warnings", None) or [])]
        if warns:
            shown["warnings"] = " | ".join(warns)
            parts.append("<span style='color:#c77c00'>" + "<br>".join(html.escape(w) for w in warns) + "</span>")
        self._summary.setText("<br>".join(parts))

        # The prediction carries the reference curves of the input kind it used; older
        # predictions without them fall back to the bundle.
        km: dict[str, Any] = dict(getattr(prediction, "reference_km", None) or {})
        if not km and bundle is not None and mods:
            try:
                km = bundle.reference_km_for(modality_kind(mods))
            except AttributeError:
                km = getattr(bundle, "reference_km", {}) or {}
        self._plot_km(km, str(group) if group is not None else None)
        shown["km_groups"] = ", ".join(sorted(km))

        metrics = dict(getattr(bundle, "metrics", {}) or {}) if bundle is not None else {}
        rows = flatten_metrics(metrics)
        if rows:
            body = "".join(
                f"<tr><td>{html.escape(k)}</td><td align='right'>{html.escape(v)}</td></tr>" for k, v in rows[:40]
            )
            more = f"<br>… {len(rows) - 40} more in the JSON report" if len(rows) > 40 else ""
            self._metrics.setText(
                f"<b>Bundle validation metrics</b> ({html.escape(getattr(bundle, 'name', 'bundle'))}):"
                f"<table cellspacing='3'>{body}</table>{more}"
            )
        else:
            self._metrics.setText("<b>Bundle validation metrics:</b> none stored in this bundle.")
        shown["n_metrics"] = str(len(rows))
        self.shown = shown

    # ------------------------------------------------------------------------------------------
    def _ensure_canvas(self) -> None:
        if self._canvas is not None:
            return
        from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
        from matplotlib.figure import Figure

        self._figure = Figure(figsize=(3.6, 2.6), dpi=90, layout="constrained")
        self._canvas = FigureCanvasQTAgg(self._figure)
        self._canvas.setMinimumHeight(220)
        self._canvas.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)
        self._canvas_holder.addWidget(self._canvas)

    def _plot_km(self, km: Mapping[str, Any], patient_group: str | None) -> None:
        if not km:
            if self._figure is not None:
                self._figure.clear()
                self._canvas.draw_idle()
            return
        self._ensure_canvas()
        fig = self._figure
        fig.clear()
        ax = fig.add_subplot(1, 1, 1)
        for i, (group, curve) in enumerate(sorted(km.items())):
            t = [0.0, *list(curve.get("time", []))]
            s = [1.0, *list(curve.get("survival", []))]
            colour = GROUP_COLOURS.get(str(group).lower(), _FALLBACK_COLOURS[i % len(_FALLBACK_COLOURS)])
            mine = patient_group is not None and str(group) == patient_group
            n = curve.get("n")
            label = f"{group} risk" + (f" (n={n})" if n is not None else "")
            if mine:
                label += "  ← this patient"
            ax.step(t, s, where="post", color=colour, lw=3.0 if mine else 1.3, alpha=1.0 if mine else 0.7,
                    label=label)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("time")
        ax.set_ylabel("survival")
        ax.set_title("Reference cohort (Kaplan–Meier)", fontsize=9)
        ax.legend(fontsize=7, loc="lower left")
        ax.tick_params(labelsize=7)
        self._canvas.draw_idle()
