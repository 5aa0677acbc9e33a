"""What the widget runs in its worker thread, without Qt: inputs, bundle cache, prediction.

Keeping this free of Qt lets tests and scripts run exactly what the Run button runs.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from mirror_model.errors import ConfigError

__all__ = [
    "RunRequest",
    "RunResult",
    "clear_bundle_cache",
    "get_bundle",
    "list_samples",
    "modality_kind",
    "modality_sentence",
    "run_prediction",
    "suggest_sample",
]


@dataclass(frozen=True)
class RunRequest:
    """The inputs of one run, as plain values captured on the GUI thread.

    Attributes
    ----------
    bundle_path : str or None
        A ``.mirror`` bundle; None = the embedded demo bundle.
    slide_path : str or None
        The slide to tile and encode (None for an expression-only run).
    features_path : str or None
        Precomputed patch features (``.h5``) used instead of extracting from the slide.
    expression_path : str or None
        Expression table (None for a slide-only run).
    sample_id : str or None
        The patient's row in the expression table.
    device : {"auto", "cpu", "cuda"}
    mpp : float or None
        µm per level-0 pixel override for slides without resolution metadata.
    """

    bundle_path: str | None = None
    slide_path: str | None = None
    features_path: str | None = None
    expression_path: str | None = None
    sample_id: str | None = None
    device: str = "auto"
    mpp: float | None = None

    def validate(self) -> RunRequest:
        """Raise :class:`ConfigError` when the inputs cannot make a prediction."""
        if not (self.slide_path or self.features_path or self.expression_path):
            raise ConfigError(
                "Nothing to run on: open a slide (or pick a precomputed feature file) and/or pick an "
                "expression file."
            )
        if self.expression_path and not self.sample_id:
            raise ConfigError(
                f"Pick the patient's row (sample id) of the expression file {Path(self.expression_path).name}."
            )
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"device must be auto, cpu or cuda; got {self.device!r}.")
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class RunResult:
    """A finished run: the prediction, the bundle it came from, and how long it took."""

    request: RunRequest
    prediction: Any
    bundle: Any
    seconds: float


_bundle_cache: dict[tuple[str, int, int], Any] = {}
_bundle_lock = threading.Lock()


def clear_bundle_cache() -> None:
    with _bundle_lock:
        _bundle_cache.clear()


def get_bundle(path: str | os.PathLike[str] | None = None) -> Any:
    """Load a bundle once per (path, size, mtime); later runs reuse the loaded model.

    Raises
    ------
    mirror_model.errors.BundleError
        The bundle is missing, corrupt, truncated or of a newer format.
    """
    from mirror_model.bundle import default_bundle_path, load_bundle
    from mirror_model.errors import BundleError

    p = Path(path) if path else default_bundle_path()
    try:
        st = p.stat()
    except OSError:
        raise BundleError(
            f"Model bundle {p} does not exist; pick a .mirror file (or leave the field empty for the "
            "embedded demo bundle)."
        ) from None
    key = (str(p.resolve()), int(st.st_size), int(st.st_mtime_ns))
    with _bundle_lock:
        if key in _bundle_cache:
            return _bundle_cache[key]
    bundle = load_bundle(p)
    with _bundle_lock:
        _bundle_cache[key] = bundle
    return bundle


def run_prediction(request: RunRequest, progress: Any = None, should_stop: Any = None) -> RunResult:
    """Load the bundle (cached) and call :func:`mirror_model.inference.predict`.

    ``progress(done, total, stage)`` and ``should_stop()`` follow :mod:`mirror_model._progress`;
    a stop request raises :class:`mirror_model.errors.Cancelled`.
    """
    from mirror_model._progress import check_cancel
    from mirror_model.inference import predict

    request.validate()
    t0 = time.perf_counter()
    if progress is not None:
        progress(0, 1, "loading model bundle")
    bundle = get_bundle(request.bundle_path)
    check_cancel(should_stop, "the MIRROR run")
    pred = predict(
        bundle,
        slide_path=request.slide_path,
        features_path=request.features_path,
        expression_path=request.expression_path,
        sample_id=request.sample_id,
        device=request.device,
        mpp=request.mpp,
        progress=progress,
        should_stop=should_stop,
    )
    check_cancel(should_stop, "the MIRROR run")
    return RunResult(request=request, prediction=pred, bundle=bundle, seconds=time.perf_counter() - t0)


def modality_kind(modalities: Sequence[str]) -> str:
    """``"both"``, ``"slide"`` or ``"rna"`` — the bundle's input kind for these modalities."""
    m = set(modalities)
    if {"slide", "rna"} <= m:
        return "both"
    return "slide" if "slide" in m else "rna"


def modality_sentence(modalities: Sequence[str]) -> str:
    """Plain words for the panel: which inputs the prediction used."""
    kind = modality_kind(modalities)
    return {
        "both": "Slide + expression (both modalities)",
        "slide": "Slide only (no expression data used)",
        "rna": "Expression only (no slide used; no heatmap)",
    }[kind]


def list_samples(expression_path: str | os.PathLike[str]) -> list[str]:
    """Sample ids of an expression table (either orientation), in file order.

    Raises
    ------
    mirror_model.errors.ExpressionError
        The table cannot be read.
    """
    from mirror_model.expression import read_expression

    return [str(s) for s in read_expression(expression_path).sample_ids]


def suggest_sample(sample_ids: Sequence[str], slide_name: str | None) -> str | None:
    """The sample id that belongs to the slide, or None when there is no unambiguous match.

    First :func:`mirror_model.inference.match_sample` (the rules ``predict`` itself uses: one
    row; id equal to the file stem; TCGA patient barcode; id as a prefix of the file name);
    then, for names like ``scan_P17_HE.svs``, the longest id contained in the slide's file name
    (case-insensitive) when no other id of that length is.
    """
    if not slide_name or not sample_ids:
        return None
    from mirror_model.inference import match_sample, slide_stem

    ids = [str(s) for s in sample_ids]
    hit = match_sample(ids, slide_name)
    if hit is not None:
        return hit
    low = slide_stem(slide_name).lower()
    contained = [s for s in ids if s and s.lower() in low]
    if contained:
        best = max(len(s) for s in contained)
        top = [s for s in contained if len(s) == best]
        if len(top) == 1:
            return top[0]
    return None
