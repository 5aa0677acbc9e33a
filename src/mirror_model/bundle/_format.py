"""The ``.mirror`` file format: document schema, tensors, safetensors container, integrity checks.

This module knows bytes and JSON only (numpy, no torch): :func:`write_bundle_file` and
:func:`read_bundle_file` are the only functions that touch bundle files. The :class:`Bundle`
view over what they return lives in :mod:`._bundle`.

Container
---------
One safetensors file (read and written with the ``safetensors`` library): tensors
``model.*`` (the model's state dict, float32) and ``doc.*`` (numeric arrays of the document,
float64 / int64 / bool), and ``__metadata__["mirror_bundle"]`` = the JSON document, in which
each such array is replaced by ``{"__tensor__": "doc.<path>"}``. A folder bundle holds the
same tensors in ``model.safetensors`` and the same document in ``bundle.json``.

The document (``format_version`` 1)
-----------------------------------
``format``, ``format_version``, ``created`` (UTC ISO-8601), ``package_version``;
``model``: ``preset``, ``architecture``, ``config`` (``ModelConfig.to_dict()``), ``n_parameters``;
``genes``: the RNA encoder's input genes **in order**; ``preprocessing``: the fold's
``Preprocessing.to_dict()`` (gene list and normalisation statistics fitted on training patients);
``patch_encoder``: the patch encoder spec (``name``, ``dim``, ``input_px``, ...);
``tiling``: ``target_mpp`` (µm/px of the tiles) and ``tile_px`` (tile edge in pixels at that mpp);
``class_names``; ``heads``: per input kind (``"slide"``, ``"rna"``, ``"both"``) a ``subtype``
probe (``LinearProbe.to_dict()``) and a ``survival`` head (``CoxHead.to_dict()``);
``risk``: per input kind the ``cutoff`` separating the ``"low"`` and ``"high"`` risk groups
(chosen on the *training* patients' risks); ``reference_cohort``: per input kind the held-out
patients' ``risk``, ``time``, ``event`` and Kaplan–Meier curves ``km`` per risk group;
``metrics`` (validation metrics, the honest held-out numbers of ``mirror-train evaluate``);
``training`` (cohort summary); ``source`` (run folder, fold); ``tensor_sha256`` (one SHA-256
per tensor, over its dtype, shape and bytes).

Checks on reading (each a :class:`~mirror_model.errors.BundleError` naming the file):
too short / bad header length / truncated data / trailing bytes / garbled header or document
JSON / not a bundle / a ``format_version`` newer than this package reads ("made by a newer
napari-mirror, upgrade") / missing parts / missing, extra or altered tensors (checksums).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .._io import atomic_write_bytes, atomic_write_text, jsonable
from .._kinds import INPUT_KINDS
from ..errors import BundleError

FORMAT_NAME = "mirror-bundle"
#: The newest bundle format this version of napari-mirror reads and writes.
FORMAT_VERSION = 1
BUNDLE_SUFFIX = ".mirror"
METADATA_KEY = "mirror_bundle"

MODEL_PREFIX = "model."
_TENSOR_REF = "__tensor__"
# safetensors refuses headers over 100 MB; a larger length field means garbage.
_MAX_HEADER_BYTES = 100 * 1024 * 1024
FOLDER_TENSORS = "model.safetensors"
FOLDER_DOC = "bundle.json"
# Lists of numbers at least this long go into tensors rather than into the JSON text.
_MIN_TENSOR_LEN = 8


def short_list(items: list[str], n: int = 6) -> str:
    head = ", ".join(str(i) for i in items[:n])
    return head + (f", … ({len(items)} in all)" if len(items) > n else "")


# --------------------------------------------------------------------------------------------
# the document
# --------------------------------------------------------------------------------------------
def build_document(
    *,
    config: Any,
    preset: str,
    patch_encoder: Mapping[str, Any],
    target_mpp: float | None,
    tile_px: int | None,
    class_names: list[str],
    heads: Mapping[str, Mapping[str, Any]],
    genes: list[str] | None = None,
    preprocessing: Mapping[str, Any] | None = None,
    risk: Mapping[str, Mapping[str, Any]] | None = None,
    reference_cohort: Mapping[str, Mapping[str, Any]] | None = None,
    metrics: Mapping[str, Any] | None = None,
    training: Mapping[str, Any] | None = None,
    source: Mapping[str, Any] | None = None,
    n_parameters: int | None = None,
    provenance: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Assemble the bundle's JSON document (numpy arrays allowed anywhere; see module doc).

    ``config`` is a ModelConfig (or its ``to_dict()``); ``heads[kind][task]`` are head dicts
    (``LinearProbe.to_dict()`` / ``CoxHead.to_dict()``) or objects with ``to_dict()``.
    ``provenance`` holds ``name``, ``training_data``, ``intended_use``, ``synthetic`` and
    ``survival_time_unit`` (:class:`~mirror_model.bundle.ModelProvenance`; none is required).
    """
    from .. import __version__
    from ._provenance import ModelProvenance

    cfg = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    unknown = set(heads) - set(INPUT_KINDS)
    if unknown:
        raise BundleError(f"unknown head input kinds {sorted(unknown)}; use {INPUT_KINDS}.")
    heads_d = {
        kind: {
            task: (h.to_dict() if hasattr(h, "to_dict") else dict(h))
            for task, h in tasks.items()
            if h is not None
        }
        for kind, tasks in heads.items()
    }
    pp = preprocessing.to_dict() if hasattr(preprocessing, "to_dict") else preprocessing
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
        "package_version": __version__,
        "model": {
            "preset": preset,
            "architecture": cfg.get("architecture", preset),
            "config": cfg,
            "n_parameters": n_parameters,
        },
        "genes": list(genes or []),
        "preprocessing": pp,
        "patch_encoder": dict(patch_encoder),
        # None for an expression-only model (no slide encoder was trained)
        "tiling": {
            "target_mpp": None if target_mpp is None else float(target_mpp),
            "tile_px": None if tile_px is None else int(tile_px),
        },
        "class_names": [str(c) for c in class_names],
        "heads": heads_d,
        "risk": dict(risk or {}),
        "reference_cohort": dict(reference_cohort or {}),
        "metrics": dict(metrics or {}),
        "training": dict(training or {}),
        "source": dict(source or {}),
        "provenance": ModelProvenance.check(provenance or {}),
    }


_REQUIRED_PARTS = {
    "model": "model description",
    "patch_encoder": "patch-encoder spec",
    "tiling": "tiling (target mpp, tile px)",
    "heads": "prediction heads",
    "class_names": "class names",
}


def _check_version(doc: Mapping[str, Any], where: str) -> None:
    if doc.get("format") != FORMAT_NAME:
        raise BundleError(
            f"{where} is not a napari-mirror model bundle (format {doc.get('format')!r}, expected "
            f"{FORMAT_NAME!r})."
        )
    version = doc.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise BundleError(f"{where} has an invalid format_version {version!r}; file is corrupted.")
    if version > FORMAT_VERSION:
        from .. import __version__

        raise BundleError(
            f"{where} was made by a newer napari-mirror: it is in bundle format version "
            f"{version}, but napari-mirror {__version__} reads versions up to {FORMAT_VERSION}; "
            "upgrade napari-mirror (pip install -U napari-mirror) to use it."
        )


def _check_parts(doc: Mapping[str, Any], where: str) -> None:
    missing = [f"{k} ({v})" for k, v in _REQUIRED_PARTS.items() if k not in doc]
    model = doc.get("model")
    if "model" in doc and (not isinstance(model, dict) or "config" not in model):
        missing.append("model.config (model configuration)")
    if isinstance(doc.get("tiling"), dict):
        missing += [f"tiling.{k}" for k in ("target_mpp", "tile_px") if k not in doc["tiling"]]
    if isinstance(doc.get("patch_encoder"), dict) and "name" not in doc["patch_encoder"]:
        missing.append("patch_encoder.name")
    if missing:
        raise BundleError(
            f"{where} is missing parts: {', '.join(missing)}; re-export the bundle with "
            "mirror-train export."
        )


def _check_tensors(digests: Any, tensors: Mapping[str, np.ndarray], where: str) -> None:
    if not isinstance(digests, dict):
        raise BundleError(f"{where} is missing its tensor checksums (tensor_sha256); re-export it.")
    absent = sorted(set(digests) - set(tensors))
    if absent:
        raise BundleError(
            f"{where} is missing tensors {short_list(absent)} (missing parts); re-export it."
        )
    extra = sorted(set(tensors) - set(digests))
    if extra:
        raise BundleError(
            f"{where} holds tensors the document does not list ({short_list(extra)}); the file "
            "was modified — re-export it."
        )
    for name, digest in digests.items():
        if _tensor_digest(tensors[name]) != digest:
            raise BundleError(
                f"{where}: tensor {name!r} does not match its checksum; the file is corrupted — "
                "copy or download the bundle again."
            )
    if not any(k.startswith(MODEL_PREFIX) for k in tensors):
        raise BundleError(f"{where} holds no model weights (missing part); re-export it.")


# --------------------------------------------------------------------------------------------
# document <-> tensors
# --------------------------------------------------------------------------------------------
def _is_numeric_list(x: Any) -> bool:
    """A (nested, rectangular) list of plain numbers (no bools, no strings)."""
    try:
        arr = np.asarray(x)
    except (ValueError, TypeError):
        return False
    return arr.dtype.kind in "fiu" and arr.size >= _MIN_TENSOR_LEN and arr.dtype != object


def _split_tensors(obj: Any, prefix: str, out: dict[str, np.ndarray]) -> Any:
    """Replace numeric arrays / long numeric lists in ``obj`` by tensor references."""
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind in "fiub" and obj.dtype != object:
            out[prefix] = np.array(obj, order="C", copy=True)
            return {_TENSOR_REF: prefix}
        return obj.tolist()
    if isinstance(obj, Mapping):
        res = {}
        for k, v in obj.items():
            if not isinstance(k, str):
                raise TypeError(f"bundle document keys must be strings; got {k!r} under {prefix}")
            res[k] = _split_tensors(v, f"{prefix}.{k}", out)
        return res
    if isinstance(obj, (list, tuple)):
        if obj and _is_numeric_list(obj):
            arr = np.asarray(obj)
            arr = arr.astype(np.float64) if arr.dtype.kind == "f" else arr.astype(np.int64)
            out[prefix] = np.array(arr, order="C", copy=True)
            return {_TENSOR_REF: prefix}
        return [_split_tensors(v, f"{prefix}.{i}", out) for i, v in enumerate(obj)]
    # numpy scalars, paths, NaN/inf (JSON has none: "undefined" reads as null)
    return jsonable(obj)


def _resolve_tensors(obj: Any, tensors: Mapping[str, np.ndarray], where: str) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {_TENSOR_REF}:
            name = obj[_TENSOR_REF]
            if name not in tensors:
                raise BundleError(
                    f"{where}: the document refers to tensor {name!r}, which the file does not "
                    "contain (missing part); re-export the bundle."
                )
            return tensors[name]
        return {k: _resolve_tensors(v, tensors, where) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_resolve_tensors(v, tensors, where) for v in obj]
    return obj


def _tensor_digest(arr: np.ndarray) -> str:
    h = hashlib.sha256()
    h.update(f"{arr.dtype.str}|{tuple(arr.shape)}|".encode())
    h.update(np.asarray(arr, order="C").tobytes())
    return h.hexdigest()


def _encode(
    document: Mapping[str, Any], model_state: Mapping[str, Any]
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Split the document into (JSON-able document, tensors) with per-tensor digests."""
    tensors: dict[str, np.ndarray] = {}
    doc = dict(document)
    doc.pop("tensor_sha256", None)
    doc = _split_tensors(doc, "doc", tensors)
    for k, v in model_state.items():
        arr = v.detach().cpu().float().numpy() if hasattr(v, "detach") else np.asarray(v)
        if arr.dtype.kind == "f":
            arr = arr.astype(np.float32)
        tensors[MODEL_PREFIX + k] = np.array(arr, order="C", copy=True)
    doc["tensor_sha256"] = {name: _tensor_digest(arr) for name, arr in sorted(tensors.items())}
    return jsonable(doc), tensors


# --------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------
def write_bundle_file(
    document: Mapping[str, Any],
    model_state: Mapping[str, Any],
    path: str | os.PathLike[str],
    *,
    as_folder: bool,
) -> Path:
    """Write ``document`` + ``model_state`` atomically as one ``.mirror`` file or a folder."""
    from safetensors.numpy import save as st_save

    target = Path(path)
    doc, tensors = _encode(document, model_state)
    if as_folder:
        target.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(target / FOLDER_TENSORS, st_save(tensors))
        atomic_write_text(target / FOLDER_DOC, json.dumps(doc, indent=1, allow_nan=False))
    else:
        text = json.dumps(doc, separators=(",", ":"), allow_nan=False)
        atomic_write_bytes(
            target, st_save(tensors, metadata={METADATA_KEY: text, "format": FORMAT_NAME})
        )
    return target


# --------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------
@dataclass
class BundleContents:
    """What a bundle file holds, checked: the document (tensor references resolved to numpy
    arrays, checksums removed), the model weights, and the SHA-256 of the bytes read."""

    document: dict[str, Any]
    model_state: dict[str, np.ndarray]
    sha256: str


def _header_length(data: bytes, where: str) -> int:
    """The header length field, checked against the file size (the library's messages do not
    say whether a file is truncated; ours do, with the numbers)."""
    size = len(data)
    if size < 8:
        raise BundleError(
            f"{where} is too short to be a model bundle ({size} bytes): the file is truncated "
            "or not a .mirror file."
        )
    n = int.from_bytes(data[:8], "little")
    if n == 0 or n > _MAX_HEADER_BYTES or 8 + n > size:
        raise BundleError(
            f"{where} has a bad header (declares {n} header bytes, file has {size}): the file is "
            "truncated, corrupted, or not a .mirror bundle."
        )
    return n


def _json_object(raw: str | bytes, where: str, what: str) -> dict[str, Any]:
    """``raw`` parsed as a JSON object, or a BundleError saying ``what`` is garbled."""
    try:
        obj = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(
            f"{where} has a garbled {what} (not valid JSON: {exc}); the file is corrupted or "
            "not a .mirror bundle."
        ) from None
    if not isinstance(obj, dict):
        raise BundleError(f"{where} has a garbled {what} (not a JSON object); file is corrupted.")
    return obj


def _explain_layout(header: Mapping[str, Any], data_len: int, where: str, why: str) -> BundleError:
    """A specific message for a file safetensors refused: truncated, trailing bytes or else."""
    ends = []
    for info in header.values():
        try:
            ends.append(int(info["data_offsets"][1]))
        except (KeyError, TypeError, ValueError, IndexError):
            continue
    end = max(ends, default=0)
    if end > data_len:
        return BundleError(
            f"{where} is truncated: its tensors need {end} bytes of data but the file holds only "
            f"{data_len}; copy or download the bundle again."
        )
    if end < data_len and ends:
        return BundleError(
            f"{where} has {data_len - end} unexpected bytes after the tensor data; the file is "
            "corrupted."
        )
    return BundleError(f"{where}: the tensor data is corrupted ({why}); re-export the bundle.")


def _read_safetensors(data: bytes, where: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(metadata, tensors as numpy) of a safetensors byte string, read by the library."""
    from safetensors import SafetensorError
    from safetensors.numpy import load as st_load

    n = _header_length(data, where)
    header = _json_object(data[8 : 8 + n], where, "header")
    meta = header.pop("__metadata__", None) or {}
    try:
        tensors = st_load(data)
    except SafetensorError as exc:
        raise _explain_layout(header, len(data) - 8 - n, where, str(exc)) from None
    except KeyError as exc:  # a dtype numpy lacks (bf16)
        raise BundleError(
            f"{where}: a tensor has unsupported dtype {exc} (bundles store float32/float64/int); "
            "re-export the bundle."
        ) from None
    if not isinstance(meta, dict):
        raise BundleError(f"{where} has garbled metadata; the file is corrupted.")
    return meta, {k: np.array(v) for k, v in tensors.items()}


def _read_folder(p: Path, where: str, h: Any) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    doc_file, tensor_file = p / FOLDER_DOC, p / FOLDER_TENSORS
    for f in (doc_file, tensor_file):
        if not f.is_file():
            raise BundleError(
                f"{where} is a folder but has no {f.name} (a bundle folder holds "
                f"{FOLDER_DOC} and {FOLDER_TENSORS})."
            )
    doc_bytes = doc_file.read_bytes()
    data = tensor_file.read_bytes()
    h.update(doc_bytes)
    h.update(data)
    _, tensors = _read_safetensors(data, f"{where}/{FOLDER_TENSORS}")
    try:
        text = doc_bytes.decode("utf-8")
    except UnicodeDecodeError:
        raise BundleError(f"{where}/{FOLDER_DOC} is not UTF-8 text; corrupted.") from None
    return _json_object(text, f"{where}/{FOLDER_DOC}", "bundle document"), tensors


def _read_file(p: Path, where: str, h: Any) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise BundleError(f"cannot read {where}: {exc.strerror or exc}.") from None
    h.update(data)
    meta, tensors = _read_safetensors(data, where)
    if METADATA_KEY not in meta:
        raise BundleError(
            f"{where} is a safetensors file without a napari-mirror document (no "
            f"{METADATA_KEY!r} metadata): it is plain weights, not a model bundle. Export a "
            "bundle with `mirror-train export --run RUN --out FILE.mirror`."
        )
    return _json_object(meta[METADATA_KEY], where, "bundle document"), tensors


def read_bundle_file(p: Path, where: str) -> BundleContents:
    """Read and check a ``.mirror`` file or bundle folder (see the module doc for the checks)."""
    h = hashlib.sha256()
    doc, tensors = (_read_folder if p.is_dir() else _read_file)(p, where, h)
    _check_version(doc, where)
    _check_parts(doc, where)
    _check_tensors(doc.pop("tensor_sha256", None), tensors, where)
    doc = _resolve_tensors(doc, tensors, where)
    model_state = {
        k[len(MODEL_PREFIX) :]: v for k, v in tensors.items() if k.startswith(MODEL_PREFIX)
    }
    return BundleContents(document=doc, model_state=model_state, sha256=h.hexdigest())
