"""Atomic file writing: a crash or cancel never leaves a half-written file behind."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["atomic_path", "atomic_write_bytes", "atomic_write_text", "jsonable", "load_tensors"]


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it replaces ``path`` atomically.

    On any exception the temporary file is removed and ``path`` is left untouched.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    # mkstemp creates 0600; give the final file the usual permissions (0666 minus umask).
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_path, 0o666 & ~umask)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def jsonable(obj: Any, fallback: Callable[[Any], Any] | None = None) -> Any:
    """Plain JSON values, the one cleaner for every JSON/YAML file we write.

    Mappings → dicts with str keys, tuples → lists, numpy scalars/arrays → Python values,
    paths → str, bytes → text, str subclasses (e.g. torch's version string) → str, NaN/inf →
    None (strict JSON: "undefined" reads as null). Other objects are returned unchanged, or
    passed through ``fallback`` (e.g. ``str``) when given.
    """
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v, fallback) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v, fallback) for v in obj]
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist(), fallback)
    if isinstance(obj, np.generic):
        return jsonable(obj.item(), fallback)
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, bytes):
        return obj.decode("utf-8", "replace")
    if isinstance(obj, str):
        return str(obj)
    if obj is None or isinstance(obj, (bool, int, float)):
        return obj
    return obj if fallback is None else fallback(obj)


def load_tensors(path: Path, error: type[Exception], what: str, remedy: str) -> Any:
    """``torch.load(path, weights_only=True)``: tensors and plain containers only, never
    arbitrary Python objects. A file holding anything else, or not a torch file, raises
    ``error`` naming the file, ``what`` it is, and the ``remedy``."""
    import pickle

    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).splitlines()[0] if str(exc) else "unpickling refused"
        raise error(
            f"{path}: refused — the {what} contains Python objects besides tensors, and loading "
            f"it could run arbitrary code ({first}). {remedy}"
        ) from None
    except Exception as exc:
        raise error(f"{path}: not a readable PyTorch {what} ({exc}).") from None
