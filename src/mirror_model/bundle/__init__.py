"""Model bundles: the one deployable artefact that ``predict`` and the napari plugin load.

A bundle is **one ``.mirror`` file**: a `safetensors <https://github.com/huggingface/safetensors>`_
file whose tensors are the model weights plus the numeric parts of the heads, preprocessing
and reference cohort, and whose metadata holds one JSON document. A folder holding
``model.safetensors`` and ``bundle.json`` is accepted too (handy for inspecting by eye).

Nothing is ever unpickled: safetensors reads the tensors, every tensor is checked against a
SHA-256 digest that the document stores, and truncation, corruption, a newer format version
and missing parts are reported as a :class:`~mirror_model.errors.BundleError` naming the file
and the problem.

Parts
-----
- :mod:`._format` — the file format: document schema (:func:`build_document`), tensors,
  safetensors container, integrity and version checks. Bytes and JSON only.
- :mod:`._provenance` — :class:`ModelProvenance`: name, training data, date, intended use.
- :mod:`._bundle` — the :class:`Bundle` view (model, preprocessing, heads built once) and
  :func:`load_bundle` / :func:`save_bundle`.
- Making a bundle from a pretraining run is training-side work and lives in
  :mod:`mirror_model.evaluation.export` (:func:`export_bundle`, re-exported here lazily), so
  loading a bundle for inference never imports training or head-fitting code.
"""

from __future__ import annotations

import importlib
from typing import Any

from .._kinds import INPUT_KINDS
from ._bundle import Bundle, default_bundle_path, headline_metrics, load_bundle, save_bundle
from ._format import BUNDLE_SUFFIX, FORMAT_NAME, FORMAT_VERSION, build_document
from ._provenance import SYNTHETIC_INTENDED_USE, SYNTHETIC_WARNING, ModelProvenance

__all__ = [
    "BUNDLE_SUFFIX",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "INPUT_KINDS",
    "SYNTHETIC_INTENDED_USE",
    "SYNTHETIC_WARNING",
    "Bundle",
    "ExportResult",
    "ModelProvenance",
    "build_document",
    "default_bundle_path",
    "export_bundle",
    "headline_metrics",
    "load_bundle",
    "save_bundle",
]

# made from a pretraining run: imported only when asked for (keeps inference light)
_LAZY = {
    "export_bundle": "mirror_model.evaluation.export",
    "ExportResult": "mirror_model.evaluation.export",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
