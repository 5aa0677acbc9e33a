"""Atomic checkpoints: resume state (``last.ckpt``) and best weights (``best.safetensors``).

``last.ckpt`` is a ``torch.save`` file holding only tensors and plain containers (dict, list,
str, int, float, bool, None), so it is loaded with ``torch.load(weights_only=True)``: nothing is
ever unpickled. It holds the model weights, optimizer and scheduler state, the RNG states
(python, numpy, torch CPU, every CUDA device), the position in training (epoch, step in epoch,
global step), the best validation loss so far and the training configuration.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._io import atomic_path, atomic_write_text, jsonable
from ..errors import TrainingError

__all__ = [
    "CHECKPOINT_VERSION",
    "TrainState",
    "capture_rng_state",
    "load_checkpoint",
    "load_safetensors_state",
    "restore_rng_state",
    "save_checkpoint",
    "save_json",
    "save_safetensors_state",
]

CHECKPOINT_VERSION = 1


@dataclass
class TrainState:
    """Position of a training run; everything needed to continue it bit for bit.

    ``epoch`` is the 0-based epoch in progress and ``step_in_epoch`` the number of its
    optimisation steps already taken (``step_in_epoch == 0`` with ``epoch == E`` means epoch
    ``E`` has not started; a finished run has ``epoch == epochs``).
    """

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    best_val_loss: float = float("inf")
    best_epoch: int = -1
    # running sums of the training losses of the epoch in progress (for its log line)
    epoch_sums: dict[str, float] = field(default_factory=dict)
    epoch_count: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "global_step": self.global_step,
            "best_val_loss": float(self.best_val_loss),
            "best_epoch": self.best_epoch,
            "epoch_sums": {k: float(v) for k, v in self.epoch_sums.items()},
            "epoch_count": self.epoch_count,
            "seconds": float(self.seconds),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TrainState:
        return cls(
            int(d["epoch"]),
            int(d["step_in_epoch"]),
            int(d["global_step"]),
            float(d["best_val_loss"]),
            int(d["best_epoch"]),
            {str(k): float(v) for k, v in dict(d.get("epoch_sums", {})).items()},
            int(d.get("epoch_count", 0)),
            float(d.get("seconds", 0.0)),
        )


def capture_rng_state() -> dict[str, Any]:
    """Python, numpy, torch CPU and all CUDA RNG states as tensors / plain containers."""
    py = random.getstate()
    npst = np.random.get_state(legacy=False)  # noqa: NPY002 - saving the global RNG
    state: dict[str, Any] = {
        "python": [int(py[0]), torch.tensor(py[1], dtype=torch.int64), py[2]],
        "numpy": {
            "bit_generator": str(npst["bit_generator"]),
            "key": torch.from_numpy(np.asarray(npst["state"]["key"], dtype=np.int64)),
            "pos": int(npst["state"]["pos"]),
            "has_gauss": int(npst["has_gauss"]),
            "gauss": float(npst["gauss"]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    py = state["python"]
    random.setstate((int(py[0]), tuple(int(v) for v in py[1].tolist()), py[2]))
    n = state["numpy"]
    np.random.set_state(  # noqa: NPY002 - restoring the global RNG
        {
            "bit_generator": n["bit_generator"],
            "state": {"key": n["key"].numpy().astype(np.uint32), "pos": int(n["pos"])},
            "has_gauss": int(n["has_gauss"]),
            "gauss": float(n["gauss"]),
        }
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = list(state["cuda"])
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)


def save_checkpoint(
    path: str | os.PathLike[str],
    *,
    model_state: Mapping[str, torch.Tensor],
    optimizer_state: Mapping[str, Any],
    scheduler_state: Mapping[str, Any],
    train_state: TrainState,
    rng_state: Mapping[str, Any],
    extra: Mapping[str, Any] | None = None,
) -> None:
    """Write a resume checkpoint atomically (a crash never leaves a half-written file)."""
    payload = {
        "version": CHECKPOINT_VERSION,
        "model": {k: v.detach().cpu() for k, v in model_state.items()},
        "optimizer": _to_cpu(optimizer_state),
        "scheduler": dict(scheduler_state),
        "train_state": train_state.to_dict(),
        "rng": dict(rng_state),
        "extra": json.loads(json.dumps(dict(extra or {}))),  # plain containers only
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` (``weights_only=True``: no pickle code)."""
    p = Path(path)
    if not p.is_file():
        raise TrainingError(f"no checkpoint at {p}; run without --resume to start a new run.")
    try:
        payload = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupted/truncated/foreign file
        raise TrainingError(
            f"checkpoint {p} cannot be read ({type(exc).__name__}: {exc}); delete it to start over."
        ) from None
    if not isinstance(payload, dict) or "train_state" not in payload:
        raise TrainingError(f"{p} is not a mirror-train checkpoint.")
    if int(payload.get("version", 0)) > CHECKPOINT_VERSION:
        raise TrainingError(
            f"checkpoint {p} has format version {payload['version']}, newer than this mirror_model "
            f"supports ({CHECKPOINT_VERSION}); upgrade mirror_model."
        )
    payload["train_state"] = TrainState.from_dict(payload["train_state"])
    return payload


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, Mapping):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def save_safetensors_state(
    path: str | os.PathLike[str],
    state: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write a state dict as safetensors atomically (tensors made contiguous, shared storage split)."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=dict(metadata or {}))


def load_safetensors_state(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    p = Path(path)
    if not p.is_file():
        raise TrainingError(f"model weights {p} are missing.")
    try:
        return load_file(str(p))
    except Exception as exc:
        raise TrainingError(f"model weights {p} cannot be read ({exc}).") from None


def save_json(path: str | os.PathLike[str], doc: Any) -> None:
    atomic_write_text(
        path, json.dumps(jsonable(doc), indent=1, sort_keys=False, allow_nan=False) + "\n"
    )
