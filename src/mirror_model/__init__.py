"""MIRROR: multi-modal self-supervised learning over whole-slide images and transcriptomics.

The public API is re-exported here lazily, so ``import mirror_model`` is cheap and never
imports napari or Qt. See ``docs/ARCHITECTURE.md`` for the module layout.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    # model
    "ModelConfig": "mirror_model.config",
    "get_preset": "mirror_model.config",
    "list_presets": "mirror_model.config",
    "create_model": "mirror_model.models",
    # data
    "open_slide": "mirror_model.slide",
    "make_tile_grid": "mirror_model.slide",
    "create_patch_encoder": "mirror_model.patch_encoders",
    "FeatureFile": "mirror_model.features",
    "read_features": "mirror_model.features",
    "write_features": "mirror_model.features",
    "read_cohort": "mirror_model.cohort",
    "read_expression": "mirror_model.expression",
    "synthesize_cohort": "mirror_model.synth",
    # bundles and inference
    "Bundle": "mirror_model.bundle",
    "load_bundle": "mirror_model.bundle",
    "Prediction": "mirror_model.inference",
    "predict": "mirror_model.inference",
    "TileMap": "mirror_model.maps",
    "INPUT_KIND_WORDS": "mirror_model._kinds",
    "default_bundle_path": "mirror_model.bundle",
    # errors
    "MirrorError": "mirror_model.errors",
    "Cancelled": "mirror_model.errors",
    # files (atomic writes, strict JSON) for tools built on the package, e.g. the plugin
    "atomic_path": "mirror_model._io",
    "atomic_write_text": "mirror_model._io",
    "jsonable": "mirror_model._io",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'mirror_model' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
