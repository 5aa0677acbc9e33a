"""The :class:`Bundle` view over a loaded bundle, and :func:`load_bundle` / :func:`save_bundle`.

The bytes and their checks are :mod:`._format`'s; this module turns the checked document and
weights into the parts inference uses (torch model, expression preprocessing, heads) and
builds each once, so a broken bundle is refused at load time rather than at prediction time.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .._kinds import INPUT_KINDS
from ..errors import BundleError
from ._format import read_bundle_file, short_list, write_bundle_file
from ._provenance import ModelProvenance


def default_bundle_path() -> Path:
    """The demo bundle shipped inside the package (``mirror_model/data/demo.mirror``).

    It is built by ``mirror-train demo --install`` from a synthetic cohort (see
    ``mirror_model/data/README.md``); it is meant for trying the tools, not for patients.
    """
    return Path(__file__).resolve().parent.parent / "data" / "demo.mirror"


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
    def target_mpp(self) -> float | None:
        """Resolution of the tiles, µm per pixel (None: an expression-only model)."""
        v = self.document["tiling"].get("target_mpp")
        return None if v is None else float(v)

    @property
    def tile_px(self) -> int | None:
        """Tile edge in pixels at :attr:`target_mpp` (None: an expression-only model)."""
        v = self.document["tiling"].get("tile_px")
        return None if v is None else int(v)

    @property
    def expression_only(self) -> bool:
        """True for a model pretrained without slides: it predicts from expression only."""
        return bool(self.patch_encoder.get("expression_only"))

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

    @property
    def provenance(self) -> ModelProvenance:
        """Name, training data, date and intended use of the model (what every prediction
        shows; for bundles written before they were recorded, what the document implies)."""
        if "provenance" not in self._cache:
            self._cache["provenance"] = ModelProvenance.from_document(self.document, self.name)
        return self._cache["provenance"]

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
            from ..config import ModelConfig

            try:
                self._cache["config"] = ModelConfig.from_dict(self.config_dict)
            except Exception as exc:  # ConfigError or a malformed dict
                raise BundleError(
                    f"{self._where()}: the model configuration in the bundle is invalid ({exc})."
                ) from None
        return self._cache["config"]

    @property
    def model(self) -> Any:
        """The inference model (the encoders; on CPU, eval mode) with the bundle's weights."""
        if "model" not in self._cache:
            self._cache["model"] = self._build_model()
        return self._cache["model"]

    def _build_model(self) -> Any:
        import torch

        from ..models import create_model

        try:
            model = create_model(self.config, training_parts=False)
        except BundleError:
            raise
        except Exception as exc:
            raise BundleError(
                f"{self._where()}: cannot build the model {self.preset!r} from the bundle's "
                f"configuration ({exc})."
            ) from None
        from ..models import checkpoint_filter_fn

        # older bundles hold the whole pretraining model: keep the encoders
        state = checkpoint_filter_fn(
            {k: torch.from_numpy(np.array(v)) for k, v in self.model_state.items()}, model
        )
        expected = model.state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        if missing or unexpected:
            parts = []
            if missing:
                parts.append(f"missing weights {short_list(missing)}")
            if unexpected:
                parts.append(f"unexpected weights {short_list(unexpected)}")
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
                f"{short_list(bad)}; re-export the bundle."
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
                from ..genes import Preprocessing

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
                        from ..evaluation.probes import LinearProbe as cls
                    elif task == "survival":
                        from ..evaluation.survival import CoxHead as cls
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
        ModelProvenance.check(self.document.get("provenance") or {}, f"{self._where()}: provenance")
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
            "  patch encoder none: an expression-only model (pretrained without slides)"
            if self.expression_only
            else f"  patch encoder {self.patch_encoder_name} "
            f"(dim {self.patch_encoder.get('dim', '?')}), "
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
                f"  trained on    {t.get('n_patients', '?')} patients, "
                + (
                    "no slides (expression only)"
                    if self.expression_only or t.get("n_slides") == 0
                    else f"{t.get('n_slides', '?')} slides"
                )
                + (f" ({', '.join(f'{k}: {v}' for k, v in counts.items())})" if counts else "")
                + (f"; fold {t['fold']}" if "fold" in t else "")
            )
        headline = _headline_text(self.metrics)
        if headline:
            lines.append(f"  validation    {headline}")
        prov = self.provenance
        lines.append(f"  training data {prov.training_data}")
        lines.append(f"  intended use  {prov.intended_use or '(not stated)'}")
        return "\n".join(lines)

    def _where(self) -> str:
        return f"model bundle {self.path}" if self.path is not None else "model bundle"


def _listify(obj: Any) -> Any:
    """Numpy arrays back to the plain lists a ``to_dict`` produced (for ``from_dict``)."""
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, dict):
        return {k: _listify(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_listify(v) for v in obj]
    return obj


def _headline_text(metrics: Mapping[str, Any]) -> str:
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


def headline_metrics(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """Best-input summary of an evaluate ``metrics.json`` tree: subtype macro AUROC of the
    linear probe and Cox C-index, each ``{"mean", "sd", "input"}`` (None where absent).
    The best input is the first of ``both``, ``slide``, ``rna`` that has a value."""
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
    return write_bundle_file(document, model_state, target, as_folder=as_folder)


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
    contents = read_bundle_file(p, where)
    bundle = Bundle(
        document=contents.document,
        model_state=contents.model_state,
        path=p,
        sha256=contents.sha256,
    )
    if validate:
        bundle.validate()
    return bundle
