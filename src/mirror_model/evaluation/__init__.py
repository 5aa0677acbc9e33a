"""Downstream evaluation of frozen encoders: subtype probes, survival heads, report.

Submodules: :mod:`.metrics` (accuracy, balanced accuracy, macro AUROC/F1, C-index),
:mod:`.probes` (:class:`LinearProbe`, k-shot sampling), :mod:`.survival` (:class:`CoxHead`,
:class:`DiscreteHazardHead`, Kaplan–Meier, log-rank), :mod:`.heads` (fitting the heads on
frozen embeddings: the one place evaluation and export share), :mod:`.evaluate`
(cross-validated evaluation → ``metrics.json``), :mod:`.export` (a fold → a model bundle) and
:mod:`.report` (Markdown report with PNG figures).
Imports are lazy so ``from mirror_model.evaluation import LinearProbe`` does not load torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "CLASSIFICATION_METRICS": "metrics",
    "accuracy": "metrics",
    "auroc_macro": "metrics",
    "balanced_accuracy": "metrics",
    "c_index": "metrics",
    "classification_metrics": "metrics",
    "confusion_matrix": "metrics",
    "f1_macro": "metrics",
    "summarize": "metrics",
    "LinearProbe": "probes",
    "sample_k_shot": "probes",
    "CoxHead": "survival",
    "DiscreteHazardHead": "survival",
    "KMCurve": "survival",
    "LogRankResult": "survival",
    "choose_risk_cutoff": "survival",
    "discrete_hazard_nll": "survival",
    "kaplan_meier": "survival",
    "logrank_p": "survival",
    "logrank_test": "survival",
    "risk_groups": "survival",
    "survival_bin_edges": "survival",
    "EvaluationResult": "evaluate",
    "FoldEmbeddings": "evaluate",
    "evaluate_embeddings": "evaluate",
    "evaluate_run": "evaluate",
    "evaluate_runs": "evaluate",
    "RAW_NAME": "raw",
    "evaluate_raw": "raw",
    "mean_pooled_features": "raw",
    "load_metrics": "evaluate",
    "write_report": "report",
    "HeatmapEvaluation": "heatmaps",
    "evaluate_heatmaps": "heatmaps",
    "write_heatmap_report": "heatmaps",
    "write_heatmap_results": "heatmaps",
    "ExportResult": "export",
    "export_bundle": "export",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
