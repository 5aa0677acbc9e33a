"""Where a bundle's model comes from and what it is for (the document's ``provenance`` part).

Every prediction shows it: the plugin at the top of its results (with a warning banner for
models trained on synthetic data), ``predict``'s JSON report, GeoJSON and the plugin's CSV.
Bundles written before this part existed get what their document implies (the embedded demo
is recognised by the demo section of its metrics).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from ..errors import BundleError

__all__ = ["PROVENANCE_FIELDS", "SYNTHETIC_INTENDED_USE", "SYNTHETIC_WARNING", "ModelProvenance"]

#: Intended use of every model trained on synthetic data (the demo's).
SYNTHETIC_INTENDED_USE = (
    "Demonstration and software testing only: trained on synthetic data, not for patient material."
)
#: The warning every prediction of a synthetic-data model carries (panel banner, reports).
SYNTHETIC_WARNING = (
    "This model was trained on synthetic data: its subtype, risk and maps mean nothing for real "
    "tissue. Not for patient material."
)
#: Keys of the document's ``provenance`` part and their types.
PROVENANCE_FIELDS: dict[str, tuple[type, ...]] = {
    "name": (str,),
    "training_data": (str,),
    "intended_use": (str,),
    "synthetic": (bool,),
    "survival_time_unit": (str, type(None)),
}


@dataclass(frozen=True)
class ModelProvenance:
    """A model's name, training data, date and intended use.

    Attributes
    ----------
    name : str
        Display name of the model.
    created : str
        When the bundle was written (UTC, ISO 8601).
    training_data : str
        What the model was trained on, in words (cohort, patients, slides); never a path.
    intended_use : str
        What the model may be used for ("" when the bundle does not say).
    synthetic : bool
        Trained on synthetic data: its outputs mean nothing for real tissue.
    survival_time_unit : str or None
        Unit of the reference cohort's survival times (e.g. ``"months"``; None = not recorded).
    package_version : str
        napari-mirror version that wrote the bundle.
    """

    name: str
    created: str
    training_data: str
    intended_use: str
    synthetic: bool
    survival_time_unit: str | None
    package_version: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def warning(self) -> str | None:
        """What a user must be told before reading any output of this model (None: nothing)."""
        if self.synthetic:
            return SYNTHETIC_WARNING
        if not self.intended_use:
            return "The model bundle does not state its intended use: ask whoever trained it."
        return None

    @staticmethod
    def check(part: Mapping[str, Any], where: str = "bundle provenance") -> dict[str, Any]:
        """Validate a ``provenance`` part (as :func:`~mirror_model.bundle.build_document`
        stores it); returns it as a plain dict."""
        unknown = set(part) - set(PROVENANCE_FIELDS)
        if unknown:
            raise BundleError(
                f"{where}: unknown field(s) {sorted(unknown)}; known: {', '.join(PROVENANCE_FIELDS)}."
            )
        for key, value in part.items():
            if not isinstance(value, PROVENANCE_FIELDS[key]):
                want = " or ".join("null" if t is type(None) else t.__name__ for t in PROVENANCE_FIELDS[key])
                raise BundleError(f"{where}: {key} must be {want}; got {value!r}.")
        return dict(part)

    @classmethod
    def from_document(cls, doc: Mapping[str, Any], default_name: str) -> ModelProvenance:
        """The provenance a bundle document records, or (older bundles) what it implies."""
        part = dict(doc.get("provenance") or {})
        metrics = doc.get("metrics") or {}
        # Before provenance was recorded, only the demo wrote a "demo" section of metrics.
        synthetic = bool(part.get("synthetic", isinstance(metrics, Mapping) and "demo" in metrics))
        training = doc.get("training") or {}
        return cls(
            name=str(part.get("name") or default_name),
            created=str(doc.get("created", "")),
            training_data=str(part.get("training_data") or describe_training(training, synthetic)),
            intended_use=str(
                part.get("intended_use") or (SYNTHETIC_INTENDED_USE if synthetic else "")
            ),
            synthetic=synthetic,
            survival_time_unit=part.get("survival_time_unit", "months" if synthetic else None),
            package_version=str(doc.get("package_version", "")),
        )


def describe_training(training: Mapping[str, Any], synthetic: bool = False) -> str:
    """Training data in words from the document's ``training`` summary (no paths)."""
    n_p, n_s = training.get("n_patients"), training.get("n_slides")
    counts = training.get("subtype_counts") or {}
    words = []
    if n_p is not None:
        words.append(f"{n_p} patients" + (f", {n_s} slides" if n_s else ""))
    if counts:
        words.append("subtypes " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    text = "; ".join(words) or "not described in the bundle"
    return ("synthetic cohort: " + text) if synthetic else text
