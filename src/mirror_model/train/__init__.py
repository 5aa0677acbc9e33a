"""Pretraining: patient-level splits, data pipeline, training loop, checkpoints, run folder.

Heavy submodules are imported lazily so ``import mirror_model.train`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "Embeddings",
    "FoldModel",
    "FoldResult",
    "FoldSplit",
    "PretrainResult",
    "RunInfo",
    "Splits",
    "TrainConfig",
    "FinalResult",
    "embed_patients",
    "final_epochs",
    "refit_final",
    "load_fold_model",
    "load_run",
    "make_splits",
    "pretrain",
]

_WHERE = {
    "TrainConfig": "config",
    "FoldSplit": "splits",
    "Splits": "splits",
    "make_splits": "splits",
    "FoldResult": "trainer",
    "PretrainResult": "trainer",
    "pretrain": "trainer",
    "FinalResult": "final",
    "final_epochs": "final",
    "refit_final": "final",
    "Embeddings": "run",
    "FoldModel": "run",
    "RunInfo": "run",
    "embed_patients": "run",
    "load_fold_model": "run",
    "load_run": "run",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
