"""Model bundles: the one deployable artefact that ``predict`` and the napari plugin load.

A bundle is **one ``.mirror`` file**: a `safetensors <https://github.com/huggingface/safetensors>`_
file whose tensors are the model weights (``model.*``) plus the numeric parts of the heads,
preprocessing and reference cohort (``doc.*``), and whose ``__metadata__`` holds one JSON
document (key ``"mirror_bundle"``). A folder holding ``model.safetensors`` (the tensors) and
``bundle.json`` (the same document) is accepted too; it is handy for inspecting a bundle by eye.

Nothing is ever unpickled: the file header is parsed and checked by hand (length, JSON, offsets),
the tensors are read by safetensors, and every tensor is checked against a SHA-256 digest that
the document stores, so truncation, corruption and missing parts are reported as a
:class:`~mirror_model.errors.BundleError` naming the file and the problem.

The JSON document (``format_version`` 1)
-------------------------------------
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
``training`` (cohort summary); ``source`` (run folder, fold); ``tensor_sha256``.

Numeric arrays inside the document are stored as tensors and referenced as
``{"__tensor__": "doc.heads.slide.subtype.coef"}``; :func:`load_bundle` resolves them back to numpy
arrays (float64 as saved), so the heads' ``from_dict`` see exactly what ``to_dict`` gave.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ._io import jsonable
from .errors import BundleError

__all__ = [
    "BUNDLE_SUFFIX",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "INPUT_KINDS",
    "Bundle",
    "ExportResult",
    "build_document",
    "default_bundle_path",
    "export_bundle",
    "headline_metrics",
    "load_bundle",
    "save_bundle",
]

FORMAT_NAME = "mirror-bundle"
#: The newest bundle format this version of napari-mirror reads and writes.
FORMAT_VERSION = 1
BUNDLE_SUFFIX = ".mirror"
METADATA_KEY = "mirror_bundle"
#: Input kinds a bundle may carry heads for: slide only, expression only, both concatenated.
INPUT_KINDS: tuple[str, ...] = ("slide", "rna", "both")

_MODEL_PREFIX = "model."
_DOC_PREFIX = "doc."
_TENSOR_REF = "__tensor__"
# safetensors refuses headers over 100 MB; a larger length field means garbage.
_MAX_HEADER_BYTES = 100 * 1024 * 1024
_FOLDER_TENSORS = "model.safetensors"
_FOLDER_DOC = "bundle.json"
# Lists of numbers at least this long go into tensors rather than into the JSON text.
_MIN_TENSOR_LEN = 8

_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": None,  # no numpy dtype; torch-only
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}
_ITEMSIZE = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
}


def default_bundle_path() -> Path:
    """The demo bundle shipped inside the package (``mirror_model/data/demo.mirror``).

    It is built by ``mirror-train demo --install`` from a synthetic cohort (see
    ``mirror_model/data/README.md``); it is meant for trying the tools, not for patients.
    """
    return Path(__file__).resolve().parent / "data" / "demo.mirror"


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
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.bool_,)):
        return bool(obj)
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, float) and not np.isfinite(obj):
        return None  # JSON has no NaN/inf; "undefined" reads as null
    return obj


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


# --------------------------------------------------------------------------------------------
# Bundle
# --------------------------------------------------------------------------------------------
@dataclass(eq=False)
class Bundle:
    """A loaded model bundle: the JSON document, its tensors, and lazily built parts.

    Use :func:`load_bundle` to read one; the attributes below are read-only views of the
    document. ``model``, ``preprocessing`` and :meth:`head` build (and cache) the torch model
    and numpy heads on first use; :func:`load_bundle` builds them once so a broken bundle is
    refused at load time, not at prediction time.

    Attributes
    ----------
    document : dict
        The JSON document with tensor references resolved to numpy arrays.
    model_state : dict[str, numpy.ndarray]
        Model weights (names of ``model.state_dict()``), float32.
    path : Path or None
        The file or folder it was loaded from.
    sha256 : str
        SHA-256 (hex) of the file's bytes; for a folder bundle, of ``bundle.json`` followed by
        ``model.safetensors``. Identifies the exact model in reports.
    """

    document: dict[str, Any]
    model_state: dict[str, np.ndarray]
    path: Path | None = None
    sha256: str = ""
    _cache: dict[str, Any] = field(default_factory=dict, repr=False)

    # -- plain views -------------------------------------------------------------------------
    @property
    def format_version(self) -> int:
        return int(self.document["format_version"])

    @property
    def name(self) -> str:
        """A short display name: the file name, or the preset for an in-memory bundle."""
        if self.path is not None:
            return self.path.name
        return f"{self.preset} bundle"

    @property
    def preset(self) -> str:
        return str(self.document["model"].get("preset", "custom"))

    @property
    def config_dict(self) -> dict[str, Any]:
        return dict(self.document["model"]["config"])

    @property
    def genes(self) -> list[str]:
        """The RNA encoder's input genes in order (empty for a slide-only model)."""
        return list(self.document.get("genes") or [])

    @property
    def class_names(self) -> list[str]:
        return [str(c) for c in self.document.get("class_names") or []]

    @property
    def patch_encoder(self) -> dict[str, Any]:
        """The patch-encoder spec the slide features must come from (``name``, ``dim``, ...)."""
        return dict(self.document["patch_encoder"])

    @property
    def patch_encoder_name(self) -> str:
        return str(self.document["patch_encoder"]["name"])

    @property
    def target_mpp(self) -> float:
        """Resolution of the tiles, µm per pixel."""
        return float(self.document["tiling"]["target_mpp"])

    @property
    def tile_px(self) -> int:
        """Tile edge in pixels at :attr:`target_mpp`."""
        return int(self.document["tiling"]["tile_px"])

    @property
    def input_kinds(self) -> tuple[str, ...]:
        """Input kinds with heads: a subset of ``("slide", "rna", "both")``."""
        heads = self.document.get("heads") or {}
        return tuple(k for k in INPUT_KINDS if k in heads)

    @property
    def has_slide_encoder(self) -> bool:
        return any(k in self.input_kinds for k in ("slide", "both"))

    @property
    def has_rna_encoder(self) -> bool:
        return bool(self.genes) and any(k in self.input_kinds for k in ("rna", "both"))

    @property
    def metrics(self) -> dict[str, Any]:
        """Validation metrics (held-out folds of ``mirror-train evaluate``); ``{}`` if none."""
        return dict(self.document.get("metrics") or {})

    @property
    def training(self) -> dict[str, Any]:
        """Summary of the training data (patients, slides, subtype counts, encoder, fold)."""
        return dict(self.document.get("training") or {})

    @property
    def created(self) -> str:
        return str(self.document.get("created", ""))

    @property
    def package_version(self) -> str:
        return str(self.document.get("package_version", ""))

    def risk_cutoff(self, kind: str) -> float | None:
        """Risk score at or above which a patient is in the ``"high"`` group (None: no head)."""
        r = (self.document.get("risk") or {}).get(kind)
        return None if r is None or r.get("cutoff") is None else float(r["cutoff"])

    def reference(self, kind: str) -> dict[str, Any] | None:
        """Reference cohort of ``kind``: ``risk``, ``time``, ``event`` arrays and ``km`` curves."""
        return (self.document.get("reference_cohort") or {}).get(kind)

    def reference_km_for(self, kind: str) -> dict[str, dict[str, list[float]]]:
        """KM curves ``{group: {"time": [...], "survival": [...]}}`` of ``kind``'s reference."""
        ref = self.reference(kind) or {}
        km = ref.get("km") or {}
        return {
            str(g): {
                k: np.asarray(v, dtype=float).tolist()
                for k, v in curve.items()
                if k in ("time", "survival", "n_at_risk", "lower", "upper")
            }
            | {k: v for k, v in curve.items() if k in ("n", "n_events")}
            for g, curve in km.items()
        }

    @property
    def reference_km(self) -> dict[str, dict[str, list[float]]]:
        """KM curves of the reference cohort for the richest input kind the bundle has."""
        for kind in ("both", "slide", "rna"):
            if self.reference(kind):
                return self.reference_km_for(kind)
        return {}

    # -- built parts -------------------------------------------------------------------------
    @property
    def config(self) -> Any:
        """The :class:`~mirror_model.config.ModelConfig` of the model."""
        if "config" not in self._cache:
            from .config import ModelConfig

            try:
                self._cache["config"] = ModelConfig.from_dict(self.config_dict)
            except Exception as exc:  # ConfigError or a malformed dict
                raise BundleError(
                    f"{self._where()}: the model configuration in the bundle is invalid ({exc})."
                ) from None
        return self._cache["config"]

    @property
    def model(self) -> Any:
        """The torch model (on CPU, eval mode) with the bundle's weights loaded."""
        if "model" not in self._cache:
            self._cache["model"] = self._build_model()
        return self._cache["model"]

    def _build_model(self) -> Any:
        import torch

        from .models import create_model

        try:
            model = create_model(self.config)
        except BundleError:
            raise
        except Exception as exc:
            raise BundleError(
                f"{self._where()}: cannot build the model {self.preset!r} from the bundle's "
                f"configuration ({exc})."
            ) from None
        state = {k: torch.from_numpy(np.array(v)) for k, v in self.model_state.items()}
        expected = model.state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        if missing or unexpected:
            parts = []
            if missing:
                parts.append(f"missing weights {_short_list(missing)}")
            if unexpected:
                parts.append(f"unexpected weights {_short_list(unexpected)}")
            raise BundleError(
                f"{self._where()}: the weights do not match the model configuration "
                f"({'; '.join(parts)}); the bundle is incomplete or was edited — re-export it."
            )
        bad = [
            f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}"
            for k, v in expected.items()
            if tuple(state[k].shape) != tuple(v.shape)
        ]
        if bad:
            raise BundleError(
                f"{self._where()}: weight shapes do not match the model configuration: "
                f"{_short_list(bad)}; re-export the bundle."
            )
        model.load_state_dict({k: state[k].to(expected[k].dtype) for k in expected}, strict=True)
        model.eval()
        return model

    @property
    def preprocessing(self) -> Any:
        """The fold's expression :class:`~mirror_model.genes.Preprocessing` (None: no RNA)."""
        if "preprocessing" not in self._cache:
            d = self.document.get("preprocessing")
            if d is None:
                self._cache["preprocessing"] = None
            else:
                from .genes import Preprocessing

                try:
                    self._cache["preprocessing"] = Preprocessing.from_dict(_listify(d))
                except Exception as exc:
                    raise BundleError(
                        f"{self._where()}: the expression preprocessing in the bundle is invalid "
                        f"({exc}); re-export the bundle."
                    ) from None
        return self._cache["preprocessing"]

    def head(self, kind: str, task: str) -> Any:
        """The fitted head of input ``kind`` for ``task`` (``"subtype"`` or ``"survival"``).

        Returns a :class:`~mirror_model.evaluation.probes.LinearProbe` (subtype) or
        :class:`~mirror_model.evaluation.survival.CoxHead` (survival), or None if absent.
        """
        key = f"head:{kind}:{task}"
        if key not in self._cache:
            d = ((self.document.get("heads") or {}).get(kind) or {}).get(task)
            if d is None:
                self._cache[key] = None
            else:
                try:
                    if task == "subtype":
                        from .evaluation.probes import LinearProbe as cls
                    elif task == "survival":
                        from .evaluation.survival import CoxHead as cls
                    else:
                        raise BundleError(f"unknown head task {task!r}")
                    self._cache[key] = cls.from_dict(_listify(d))
                except BundleError:
                    raise
                except Exception as exc:
                    raise BundleError(
                        f"{self._where()}: the {task} head for input {kind!r} is invalid ({exc}); "
                        "re-export the bundle."
                    ) from None
        return self._cache[key]

    def validate(self) -> Bundle:
        """Build every part once (model, preprocessing, heads); raises BundleError if broken."""
        _ = self.model
        if self.has_rna_encoder and self.preprocessing is None:
            raise BundleError(
                f"{self._where()}: the bundle has RNA heads but no expression preprocessing "
                "(missing part); re-export the bundle."
            )
        if self.preprocessing is not None:
            pp_genes = list(getattr(self.preprocessing, "genes", self.genes) or [])
            if pp_genes and pp_genes != self.genes:
                raise BundleError(
                    f"{self._where()}: the gene list disagrees with the preprocessing's genes; "
                    "re-export the bundle."
                )
        for kind in self.input_kinds:
            sub = self.head(kind, "subtype")
            if sub is not None and self.class_names:
                got = [str(c) for c in np.asarray(sub.classes_).tolist()]
                if sorted(got) != sorted(self.class_names):
                    raise BundleError(
                        f"{self._where()}: the {kind} subtype head knows classes {got}, the bundle "
                        f"lists {self.class_names}; re-export the bundle."
                    )
            self.head(kind, "survival")
        return self

    # -- reporting ---------------------------------------------------------------------------
    def summary(self) -> str:
        """A few human-readable lines: model, inputs, genes, encoder, training data, metrics."""
        cfg = self.config_dict
        t = self.training
        lines = [
            f"MIRROR bundle {self.name} (format {self.format_version}, "
            f"napari-mirror {self.package_version or '?'}, created {self.created or '?'})",
            f"  sha256        {self.sha256[:16]}…"
            if self.sha256
            else "  sha256        (not saved)",
            f"  model         preset {self.preset!r}, embed_dim {cfg.get('embed_dim', '?')}, "
            f"{self.document['model'].get('n_parameters', '?')} parameters",
            f"  patch encoder {self.patch_encoder_name} (dim {self.patch_encoder.get('dim', '?')}), "
            f"tiles {self.tile_px} px at {self.target_mpp:g} µm/px",
            f"  genes         {len(self.genes)}"
            + (
                f" ({', '.join(self.genes[:5])}{', …' if len(self.genes) > 5 else ''})"
                if self.genes
                else " (no RNA encoder)"
            ),
            f"  classes       {', '.join(self.class_names) or '(no subtype head)'}",
            f"  inputs        {', '.join(self.input_kinds) or '(none)'}",
        ]
        if t:
            counts = t.get("subtype_counts") or {}
            lines.append(
                f"  trained on    {t.get('n_patients', '?')} patients, {t.get('n_slides', '?')} "
                f"slides"
                + (f" ({', '.join(f'{k}: {v}' for k, v in counts.items())})" if counts else "")
                + (f"; fold {t['fold']}" if "fold" in t else "")
            )
        headline = _headline_metrics(self.metrics)
        if headline:
            lines.append(f"  validation    {headline}")
        return "\n".join(lines)

    def _where(self) -> str:
        return f"model bundle {self.path}" if self.path is not None else "model bundle"


def _short_list(items: list[str], n: int = 6) -> str:
    head = ", ".join(str(i) for i in items[:n])
    return head + (f", … ({len(items)} in all)" if len(items) > n else "")


def _listify(obj: Any) -> Any:
    """Numpy arrays back to the plain lists a ``to_dict`` produced (for ``from_dict``)."""
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, dict):
        return {k: _listify(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_listify(v) for v in obj]
    return obj


def _headline_metrics(metrics: Mapping[str, Any]) -> str:
    """E.g. 'subtype AUROC 0.91 ± 0.03 (both), C-index 0.70 ± 0.04 (both)'."""
    if not isinstance(metrics, Mapping):
        return ""
    head = metrics.get("headline") or headline_metrics(metrics)
    if isinstance(head, Mapping):
        parts = []
        for key, label in (("auroc_macro", "subtype AUROC"), ("c_index", "C-index")):
            v = head.get(key)
            if isinstance(v, Mapping) and v.get("mean") is not None:
                sd = v.get("sd")
                parts.append(
                    f"{label} {v['mean']:.3f}"
                    + (f" ± {sd:.3f}" if sd is not None else "")
                    + (f" ({v['input']})" if v.get("input") else "")
                )
            elif isinstance(v, (int, float)):
                parts.append(f"{label} {v:.3f}")
        return ", ".join(parts)
    return ""


# --------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------
def build_document(
    *,
    config: Any,
    preset: str,
    patch_encoder: Mapping[str, Any],
    target_mpp: float,
    tile_px: int,
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
) -> dict[str, Any]:
    """Assemble the bundle's JSON document (numpy arrays allowed anywhere; see module doc).

    ``config`` is a ModelConfig (or its ``to_dict()``); ``heads[kind][task]`` are head dicts
    (``LinearProbe.to_dict()`` / ``CoxHead.to_dict()``) or objects with ``to_dict()``.
    """
    from . import __version__

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
        "tiling": {"target_mpp": float(target_mpp), "tile_px": int(tile_px)},
        "class_names": [str(c) for c in class_names],
        "heads": heads_d,
        "risk": dict(risk or {}),
        "reference_cohort": dict(reference_cohort or {}),
        "metrics": dict(metrics or {}),
        "training": dict(training or {}),
        "source": dict(source or {}),
    }


def _serialise(
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
        tensors[_MODEL_PREFIX + k] = np.array(arr, order="C", copy=True)
    doc["tensor_sha256"] = {name: _tensor_digest(arr) for name, arr in sorted(tensors.items())}
    return jsonable(doc), tensors


def save_bundle(
    bundle_or_document: Bundle | Mapping[str, Any],
    path: str | os.PathLike[str],
    model_state: Mapping[str, Any] | None = None,
    *,
    as_folder: bool | None = None,
) -> Path:
    """Write a bundle atomically, as one ``.mirror`` file (default) or as a folder.

    Parameters
    ----------
    bundle_or_document : a :class:`Bundle`, or a document from :func:`build_document`.
    path : output file (``.mirror``) or folder.
    model_state : the model's ``state_dict()`` (tensors or arrays); taken from the Bundle if
        a Bundle is given.
    as_folder : write ``path/bundle.json`` + ``path/model.safetensors``; default: True when
        ``path`` is an existing folder or has no suffix.

    Returns
    -------
    Path of what was written.
    """
    from safetensors.numpy import save as st_save

    from ._io import atomic_write_bytes, atomic_write_text

    if isinstance(bundle_or_document, Bundle):
        document = bundle_or_document.document
        model_state = bundle_or_document.model_state if model_state is None else model_state
    else:
        document = bundle_or_document
    if model_state is None:
        raise BundleError("save_bundle needs the model weights (model_state).")
    target = Path(path)
    if as_folder is None:
        as_folder = target.is_dir() or target.suffix == ""
    doc, tensors = _serialise(document, model_state)
    text = json.dumps(doc, separators=(",", ":"), allow_nan=False)
    if as_folder:
        target.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(target / _FOLDER_TENSORS, st_save(tensors))
        atomic_write_text(target / _FOLDER_DOC, json.dumps(doc, indent=1, allow_nan=False))
        _readable(target / _FOLDER_TENSORS, target / _FOLDER_DOC)
    else:
        atomic_write_bytes(
            target, st_save(tensors, metadata={METADATA_KEY: text, "format": FORMAT_NAME})
        )
        _readable(target)
    return target


def _readable(*paths: Path) -> None:
    """Give written bundles the usual file mode (the atomic temp file is created 0600):
    a bundle is meant to be shared and shipped."""
    umask = os.umask(0)
    os.umask(umask)
    for p in paths:
        os.chmod(p, 0o666 & ~umask)


# --------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------
def _parse_safetensors(data: bytes, where: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Check a safetensors byte string by hand and return (metadata, tensors as numpy)."""
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
    try:
        header = json.loads(data[8 : 8 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(
            f"{where} has a garbled header (not valid JSON: {exc}); the file is corrupted or "
            "not a .mirror bundle."
        ) from None
    if not isinstance(header, dict):
        raise BundleError(f"{where} has a garbled header (not a JSON object); file is corrupted.")
    meta = header.pop("__metadata__", None) or {}
    data_len = size - 8 - n
    tensors: dict[str, np.ndarray] = {}
    end_max = 0
    for name, info in header.items():
        try:
            dtype_name = info["dtype"]
            shape = tuple(int(s) for s in info["shape"])
            b, e = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise BundleError(
                f"{where}: tensor {name!r} has a malformed header entry; the file is corrupted."
            ) from None
        if dtype_name not in _DTYPES or _DTYPES[dtype_name] is None:
            raise BundleError(
                f"{where}: tensor {name!r} has unsupported dtype {dtype_name!r} (bundles store "
                "float32/float64/int); re-export the bundle."
            )
        nbytes = int(np.prod(shape, dtype=np.int64)) * _ITEMSIZE[dtype_name]
        if b < 0 or e < b or e - b != nbytes:
            raise BundleError(
                f"{where}: tensor {name!r} has inconsistent offsets; the file is corrupted."
            )
        if e > data_len:
            raise BundleError(
                f"{where} is truncated: tensor {name!r} needs bytes up to {e} of the data section "
                f"but the file holds only {data_len}; copy or download the bundle again."
            )
        end_max = max(end_max, e)
        arr = np.frombuffer(
            data, dtype=_DTYPES[dtype_name], count=nbytes // _ITEMSIZE[dtype_name], offset=8 + n + b
        )
        tensors[name] = arr.reshape(shape).copy()
    if end_max != data_len:
        raise BundleError(
            f"{where} has {data_len - end_max} unexpected trailing bytes after the tensor data; "
            "the file is corrupted."
        )
    if not isinstance(meta, dict):
        raise BundleError(f"{where} has garbled metadata; the file is corrupted.")
    return meta, tensors


def _read_document(text: str, where: str) -> dict[str, Any]:
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BundleError(
            f"{where}: the bundle document is not valid JSON ({exc}); the file is corrupted."
        ) from None
    if not isinstance(doc, dict):
        raise BundleError(f"{where}: the bundle document is not a JSON object; file is corrupted.")
    return doc


def _check_document(doc: dict[str, Any], tensors: Mapping[str, np.ndarray], where: str) -> None:
    if doc.get("format") != FORMAT_NAME:
        raise BundleError(
            f"{where} is not a napari-mirror model bundle (format {doc.get('format')!r}, expected "
            f"{FORMAT_NAME!r})."
        )
    version = doc.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise BundleError(f"{where} has an invalid format_version {version!r}; file is corrupted.")
    if version > FORMAT_VERSION:
        from . import __version__

        raise BundleError(
            f"{where} was written in bundle format version {version}, but napari-mirror "
            f"{__version__} reads versions up to {FORMAT_VERSION}; upgrade napari-mirror "
            "(pip install -U napari-mirror) to use it."
        )
    required = {
        "model": "model description",
        "patch_encoder": "patch-encoder spec",
        "tiling": "tiling (target mpp, tile px)",
        "heads": "prediction heads",
        "class_names": "class names",
    }
    missing = [f"{k} ({v})" for k, v in required.items() if k not in doc]
    if (
        "model" in doc
        and not isinstance(doc["model"], dict)
        or (isinstance(doc.get("model"), dict) and "config" not in doc["model"])
    ):
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
    digests = doc.get("tensor_sha256")
    if not isinstance(digests, dict):
        raise BundleError(f"{where} is missing its tensor checksums (tensor_sha256); re-export it.")
    absent = sorted(set(digests) - set(tensors))
    if absent:
        raise BundleError(
            f"{where} is missing tensors {_short_list(absent)} (missing parts); re-export it."
        )
    extra = sorted(set(tensors) - set(digests))
    if extra:
        raise BundleError(
            f"{where} holds tensors the document does not list ({_short_list(extra)}); the file "
            "was modified — re-export it."
        )
    for name, digest in digests.items():
        if _tensor_digest(tensors[name]) != digest:
            raise BundleError(
                f"{where}: tensor {name!r} does not match its checksum; the file is corrupted — "
                "copy or download the bundle again."
            )
    if not any(k.startswith(_MODEL_PREFIX) for k in tensors):
        raise BundleError(f"{where} holds no model weights (missing part); re-export it.")


def load_bundle(path: str | os.PathLike[str] | None = None, *, validate: bool = True) -> Bundle:
    """Load a ``.mirror`` bundle file or bundle folder; never unpickles anything.

    Parameters
    ----------
    path : the ``.mirror`` file or a folder with ``bundle.json`` + ``model.safetensors``;
        None loads the shipped demo bundle (:func:`default_bundle_path`).
    validate : build the model, preprocessing and heads now (default), so a broken bundle
        is refused here rather than at prediction time.

    Raises
    ------
    BundleError
        The path does not exist, or the bundle is truncated, corrupted (bad header, garbled
        JSON, checksum mismatch), from a newer format version, or lacks parts / tensors.
    """
    p = Path(default_bundle_path() if path is None else path).expanduser()
    where = f"model bundle {p}"
    if not p.exists():
        hint = (
            " (the shipped demo bundle is missing: rebuild it with `mirror-train demo --install`)"
            if path is None
            else ""
        )
        raise BundleError(f"{where} does not exist{hint}.")
    h = hashlib.sha256()
    if p.is_dir():
        doc_file, tensor_file = p / _FOLDER_DOC, p / _FOLDER_TENSORS
        for f in (doc_file, tensor_file):
            if not f.is_file():
                raise BundleError(
                    f"{where} is a folder but has no {f.name} (a bundle folder holds "
                    f"{_FOLDER_DOC} and {_FOLDER_TENSORS})."
                )
        doc_bytes = doc_file.read_bytes()
        data = tensor_file.read_bytes()
        h.update(doc_bytes)
        h.update(data)
        _, tensors = _parse_safetensors(data, f"{where}/{_FOLDER_TENSORS}")
        try:
            text = doc_bytes.decode("utf-8")
        except UnicodeDecodeError:
            raise BundleError(f"{where}/{_FOLDER_DOC} is not UTF-8 text; corrupted.") from None
        doc = _read_document(text, f"{where}/{_FOLDER_DOC}")
    else:
        try:
            data = p.read_bytes()
        except OSError as exc:
            raise BundleError(f"cannot read {where}: {exc.strerror or exc}.") from None
        h.update(data)
        meta, tensors = _parse_safetensors(data, where)
        if METADATA_KEY not in meta:
            raise BundleError(
                f"{where} is a safetensors file without a napari-mirror document (no "
                f"{METADATA_KEY!r} metadata): it is plain weights, not a model bundle. Export a "
                "bundle with `mirror-train export --run RUN --out FILE.mirror`."
            )
        doc = _read_document(meta[METADATA_KEY], where)
    _check_document(doc, tensors, where)
    digests = doc.pop("tensor_sha256")
    del digests
    doc = _resolve_tensors(doc, tensors, where)
    model_state = {
        k[len(_MODEL_PREFIX) :]: v for k, v in tensors.items() if k.startswith(_MODEL_PREFIX)
    }
    bundle = Bundle(document=doc, model_state=model_state, path=p, sha256=h.hexdigest())
    if validate:
        bundle.validate()
    return bundle


# --------------------------------------------------------------------------------------------
# export from a pretraining run
# --------------------------------------------------------------------------------------------
@dataclass
class ExportResult:
    """What :func:`export_bundle` wrote.

    Attributes
    ----------
    path : the bundle written.  fold : the fold whose model it holds.
    bundle : the bundle as loaded back from ``path`` (validated).
    reference_metrics : this fold's held-out numbers of the bundle's own heads, per input kind
        (``auroc_macro``, ``accuracy``, ``c_index``, ``n``).
    notes : choices worth telling the user (e.g. no test patients in a no-CV run).
    """

    path: Path
    fold: int
    bundle: Bundle
    reference_metrics: dict[str, dict[str, Any]]
    notes: list[str]


_METRICS_CANDIDATES = ("metrics.json", "evaluation/metrics.json", "eval/metrics.json")


def _find_metrics(run_dir: Path, metrics_path: str | os.PathLike[str] | None) -> dict[str, Any]:
    if metrics_path is not None:
        p = Path(metrics_path)
        if not p.is_file():
            raise BundleError(f"metrics file {p} does not exist (from mirror-train evaluate).")
        cands = [p]
    else:
        cands = [run_dir / c for c in _METRICS_CANDIDATES if (run_dir / c).is_file()]
    for p in cands:
        try:
            doc = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise BundleError(f"cannot read validation metrics {p}: {exc}") from None
        if isinstance(doc, dict) and "runs" in doc and isinstance(doc["runs"], dict):
            # a comparison file: take the entry of this run (by folder name) if present
            doc = doc["runs"].get(run_dir.name) or next(iter(doc["runs"].values()), {})
        if isinstance(doc, dict):
            # the file name only: a shipped bundle must not carry the builder's folder layout
            return {"source": p.name, **doc}
    return {}


def headline_metrics(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """Best-input summary of an evaluate ``metrics.json`` tree: subtype macro AUROC of the
    linear probe and Cox C-index, each ``{"mean", "sd", "input"}`` (None where absent)."""
    out: dict[str, Any] = {}
    for key, task, metric in (
        ("auroc_macro", "subtype_linear", "auroc_macro"),
        ("c_index", "survival_cox", "c_index"),
    ):
        best = None
        for inp in ("both", "slide", "rna"):
            v = ((metrics.get(task) or {}).get(inp) or {}).get(metric) or {}
            if isinstance(v, Mapping) and v.get("mean") is not None:
                best = {
                    "mean": float(v["mean"]),
                    "sd": None if v.get("sd") is None else float(v["sd"]),
                    "input": inp,
                }
                break
        out[key] = best
    return out


def _encoder_spec(enc: Mapping[str, Any]) -> dict[str, Any]:
    """The patch-encoder spec of a run: from the feature files' attrs, else the registry."""
    attrs = dict(enc.get("attrs") or {})
    spec = enc.get("encoder_spec") or attrs.get("encoder_spec")
    if isinstance(spec, str):
        try:
            spec = json.loads(spec)
        except ValueError:
            spec = None
    if not isinstance(spec, dict):
        spec = None
        name = enc.get("name")
        if name:
            try:  # weight-free encoders (stain-texture) can describe themselves
                from .patch_encoders import create_patch_encoder

                spec = create_patch_encoder(str(name)).spec.to_dict()
            except Exception:
                spec = None
        if spec is None:
            spec = {"name": str(name or "unknown")}
    spec = dict(spec)
    spec.setdefault("name", str(enc.get("name") or "unknown"))
    if enc.get("dim") is not None:
        spec["dim"] = int(enc["dim"])
    return spec


def _anonymous_preprocessing(d: Mapping[str, Any]) -> dict[str, Any]:
    """The preprocessing record without the training patients' IDs (only their number):
    a bundle is shared beyond the institution that trained it."""
    out = dict(d)
    ids = out.pop("train_patient_ids", None)
    if ids is not None:
        out["n_train_patients"] = len(ids)
    return out


def _feature_attrs(features_dir: Any) -> dict[str, Any]:
    """Attributes of one of the run's feature files (tiling facts such as tissue_threshold)."""
    if not features_dir or not Path(features_dir).is_dir():
        return {}
    from .errors import MirrorError
    from .features import read_features

    for p in sorted(Path(features_dir).glob("*.h5"))[:1]:
        try:
            ff = read_features(p, load_features=False)
        except MirrorError:
            return {}
        return {k: v for k, v in ff.attrs.items() if k in ("tissue_threshold", "tile_px")} | (
            {"target_mpp": ff.target_mpp} if ff.target_mpp else {}
        )
    return {}


def export_bundle(
    run_dir: str | os.PathLike[str],
    out: str | os.PathLike[str],
    fold: int | None = None,
    *,
    metrics_path: str | os.PathLike[str] | None = None,
    device: str = "cpu",
    seed: int = 0,
    progress: Any = None,
    should_stop: Any = None,
) -> ExportResult:
    """Export one fold of a pretraining run as a deployable bundle.

    Which model: the best checkpoint of ``fold`` (default: fold 0, or the single model of a
    no-CV run). Heads: a :class:`~mirror_model.evaluation.probes.LinearProbe` (subtype) and a
    :class:`~mirror_model.evaluation.survival.CoxHead` (survival) for each input kind
    (``slide``, ``rna``, ``both`` = concatenation), fitted on the frozen embeddings of that
    fold's **non-test** patients (train + val). Risk cut-off: median risk of those patients.
    Reference cohort: the fold's **test** patients (never seen by the model or the heads);
    for a no-CV run (no test patients) the heads are fitted on the training patients and the
    inner-validation patients serve as reference. Validation metrics: the run's
    ``metrics.json`` from ``mirror-train evaluate`` (all folds, honest) when present.

    Parameters
    ----------
    run_dir : the ``mirror-train pretrain`` output folder.
    out : the ``.mirror`` file to write (or a folder: see :func:`save_bundle`).
    fold : the fold to export.
    metrics_path : an evaluate ``metrics.json`` (default: looked for in ``run_dir``).
    device : where to embed the patients.
    seed : seed of the heads' inner cross-validation.
    """
    from ._progress import check_cancel, report
    from .errors import MirrorError
    from .evaluation.metrics import c_index, classification_metrics
    from .evaluation.probes import LinearProbe
    from .evaluation.survival import (
        CoxHead,
        choose_risk_cutoff,
        kaplan_meier,
        logrank_test,
        risk_groups,
    )
    from .train.run import embed_patients, load_fold_model, load_run

    run_path = Path(run_dir)
    try:
        run = load_run(run_path)
    except MirrorError as exc:
        raise BundleError(f"cannot export {run_path}: {exc}") from None
    if not run.folds:
        raise BundleError(
            f"run {run_path} has no trained fold model yet (no fold_<k>/best.safetensors); "
            "finish `mirror-train pretrain` first."
        )
    if fold is None:
        fold = 0 if 0 in run.folds else run.folds[0]
    if fold not in run.folds:
        raise BundleError(
            f"fold {fold} of run {run_path} has no trained model; available folds: "
            f"{', '.join(map(str, run.folds))}."
        )
    notes: list[str] = []
    split = run.splits.fold(fold)
    fit_ids = [str(p) for p in list(split.train) + list(split.val)]
    ref_ids = [str(p) for p in split.test]
    if not ref_ids:
        fit_ids = [str(p) for p in split.train]
        ref_ids = [str(p) for p in split.val]
        notes.append(
            "the run has no test patients (no cross-validation): heads were fitted on the "
            "training patients and the inner-validation patients form the reference cohort."
        )
    check_cancel(should_stop, "export")
    report(progress, 0, 3, "loading model")
    fm = load_fold_model(run_path, fold, "cpu")
    report(progress, 1, 3, "embedding patients")
    emb = embed_patients(run_path, fold, device=device, precision="fp32", should_stop=should_stop)
    report(progress, 2, 3, "fitting heads")
    row = {p: i for i, p in enumerate(emb.patient_ids)}
    missing = [p for p in fit_ids + ref_ids if p not in row]
    if missing:
        raise BundleError(
            f"{len(missing)} patients of fold {fold} have no embedding (e.g. {missing[:3]}); the "
            "run's cohort changed since pretraining."
        )
    fit = np.array([row[p] for p in fit_ids], dtype=np.int64)
    ref = np.array([row[p] for p in ref_ids], dtype=np.int64)

    def matrix(kind: str) -> np.ndarray | None:
        if kind == "slide":
            return None if emb.slide is None else np.asarray(emb.slide, np.float64)
        if kind == "rna":
            return None if emb.rna is None else np.asarray(emb.rna, np.float64)
        if emb.slide is None or emb.rna is None:
            return None
        return np.concatenate([emb.slide, emb.rna], axis=1).astype(np.float64)

    subtype = emb.subtype
    labelled = (
        np.array([v is not None and str(v) != "" for v in subtype])
        if subtype is not None
        else np.zeros(len(emb.patient_ids), bool)
    )
    y = np.array([str(v) for v in subtype], dtype=object) if subtype is not None else None
    has_surv = emb.time is not None and emb.event is not None
    if has_surv:
        t_all = np.asarray(emb.time, np.float64)
        e_all = np.asarray(emb.event, np.float64)
        known = np.isfinite(t_all) & np.isfinite(e_all)
    class_names: list[str] = (
        sorted({str(y[i]) for i in fit if labelled[i]}) if y is not None else []
    )

    heads: dict[str, dict[str, Any]] = {}
    risk: dict[str, dict[str, Any]] = {}
    reference: dict[str, dict[str, Any]] = {}
    ref_metrics: dict[str, dict[str, Any]] = {}
    for kind in INPUT_KINDS:
        check_cancel(should_stop, "export")
        X = matrix(kind)
        if X is None:
            continue
        ok = np.all(np.isfinite(X), axis=1)
        kh: dict[str, Any] = {}
        km: dict[str, Any] = {"n": int(np.sum(ok[ref]))}
        tr = fit[ok[fit] & labelled[fit]]
        te = ref[ok[ref] & labelled[ref]]
        if y is not None and np.unique(y[tr]).size >= 2:
            probe = LinearProbe(C="cv", seed=seed).fit(X[tr], y[tr])
            kh["subtype"] = probe
            if te.size:
                m = classification_metrics(
                    y[te], probe.predict_proba(X[te]), probe.classes_.tolist()
                )
                km.update({k: m.get(k) for k in ("auroc_macro", "accuracy", "f1_macro")})
        if has_surv:
            tr_s = fit[ok[fit] & known[fit]]
            te_s = ref[ok[ref] & known[ref]]
            try:
                cox = CoxHead(penalizer="cv", seed=seed).fit(X[tr_s], t_all[tr_s], e_all[tr_s])
            except MirrorError as exc:
                notes.append(f"no survival head for input {kind!r}: {exc}")
                cox = None
            if cox is not None:
                kh["survival"] = cox
                cutoff = choose_risk_cutoff(cox.predict_risk(X[tr_s]))
                risk[kind] = {
                    "cutoff": cutoff,
                    "method": "median risk of the training patients",
                    "groups": ["low", "high"],
                    "direction": "higher = worse prognosis",
                }
                if te_s.size:
                    r = cox.predict_risk(X[te_s])
                    g = risk_groups(r, cutoff)
                    curves = {
                        grp: kaplan_meier(t_all[te_s][g == grp], e_all[te_s][g == grp]).to_dict()
                        | {
                            "n": int(np.sum(g == grp)),
                            "n_events": int(np.sum(e_all[te_s][g == grp])),
                        }
                        for grp in ("low", "high")
                        if np.any(g == grp)
                    }
                    lr = logrank_test(t_all[te_s], e_all[te_s], g)
                    # anonymous on purpose: a shared bundle must not carry patient barcodes
                    reference[kind] = {
                        "risk": np.asarray(r, np.float64),
                        "time": t_all[te_s],
                        "event": e_all[te_s].astype(np.int64),
                        "group": g.tolist(),
                        "km": curves,
                        "logrank_p": None if not np.isfinite(lr.p_value) else lr.p_value,
                    }
                    km["c_index"] = c_index(t_all[te_s], e_all[te_s], r)
        if kh:
            heads[kind] = kh
            ref_metrics[kind] = km
    if not heads:
        raise BundleError(
            f"run {run_path} fold {fold}: no head could be fitted (the cohort has no subtype "
            "labels with two classes and no survival data); a bundle needs at least one."
        )
    metrics = _find_metrics(run_path, metrics_path)
    if metrics:
        metrics["headline"] = headline_metrics(metrics)
    else:
        notes.append(
            "no metrics.json from `mirror-train evaluate` was found: the bundle carries only this "
            "fold's reference-cohort numbers (run evaluate first for cross-validated metrics)."
        )
    metrics["reference_fold"] = {"fold": fold, **ref_metrics}

    pat = emb.patient_ids
    counts: dict[str, int] = {}
    if y is not None:
        for i in fit:
            if labelled[i]:
                counts[str(y[i])] = counts.get(str(y[i]), 0) + 1
    data = run.config.get("data", {}) or {}
    n_slides = None
    try:
        from .cohort import read_cohort

        if data.get("cohort"):
            n_slides = len(read_cohort(data["cohort"]))
    except MirrorError:
        n_slides = None
    enc = fm.encoder
    attrs = {**_feature_attrs(data.get("features_dir")), **dict(enc.get("attrs") or {})}
    spec = _encoder_spec(enc)
    training = {
        "run": str(run_path.resolve()),
        "fold": int(fold),
        "n_patients": len(pat),
        "n_slides": n_slides,
        "n_fit_patients": int(fit.size),
        "n_reference_patients": int(ref.size),
        "subtype_counts": dict(sorted(counts.items())),
        "feature_encoder": spec.get("name"),
        "best_epoch": fm.best_epoch,
        "best_val_loss": fm.best_val_loss,
        "training_config": run.config.get("training", {}),
        "preset": run.preset,
    }
    target_mpp = enc.get("target_mpp") or attrs.get("target_mpp")
    tile_px = enc.get("tile_px") or attrs.get("tile_px") or attrs.get("patch_size")
    if target_mpp is None or tile_px is None:
        raise BundleError(
            f"run {run_path}: the feature files do not record their tiling (target_mpp "
            f"{target_mpp}, tile_px {tile_px}); re-extract them with `mirror-train extract`."
        )
    tiling = {"target_mpp": float(target_mpp), "tile_px": int(tile_px)}
    if attrs.get("tissue_threshold") is not None:
        tiling["tissue_threshold"] = float(attrs["tissue_threshold"])
    doc = build_document(
        config=fm.model_config,
        preset=run.preset or getattr(fm.model_config, "name", "custom"),
        patch_encoder=spec,
        target_mpp=tiling["target_mpp"],
        tile_px=tiling["tile_px"],
        class_names=class_names,
        heads=heads,
        genes=fm.genes,
        preprocessing=_anonymous_preprocessing(fm.preprocessing_dict) if fm.genes else None,
        risk=risk,
        reference_cohort=reference,
        metrics=metrics,
        training=training,
        source={"run": str(run_path.resolve()), "fold": int(fold), "notes": notes},
        n_parameters=int(sum(p.numel() for p in fm.model.parameters())),
    )
    doc["tiling"].update(tiling)
    state = {k: v.detach().cpu() for k, v in fm.model.state_dict().items()}
    path = save_bundle(doc, out, state)
    report(progress, 3, 3, "bundle written")
    bundle = load_bundle(path)
    return ExportResult(
        path=path, fold=int(fold), bundle=bundle, reference_metrics=ref_metrics, notes=notes
    )
