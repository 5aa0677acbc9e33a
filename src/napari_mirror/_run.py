"""What the widget runs in its worker thread, without Qt: inputs, bundle cache, prediction.

Keeping this free of Qt lets tests and scripts run exactly what the Run button runs.
"""

from __future__ import annotations

import os
import threading
import time
import traceback
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from mirror_model.errors import ConfigError

__all__ = [
    "INPUT_SENTENCES",
    "JobOutcome",
    "JobProgress",
    "RunJob",
    "RunRequest",
    "RunResult",
    "cancel_all_runs",
    "clear_bundle_cache",
    "get_bundle",
    "input_sentence",
    "list_samples",
    "run_prediction",
    "running_jobs",
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
    nan_policy : {"error", "median", "drop-genes", "zero"}
        Missing expression values (see :func:`mirror_model.expression.read_expression`).
    """

    bundle_path: str | None = None
    slide_path: str | None = None
    features_path: str | None = None
    expression_path: str | None = None
    sample_id: str | None = None
    device: str = "auto"
    mpp: float | None = None
    nan_policy: str = "error"

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
        from mirror_model.expression import NAN_POLICIES

        if self.nan_policy not in NAN_POLICIES:
            raise ConfigError(
                f"missing-value policy must be one of {', '.join(NAN_POLICIES)}; got {self.nan_policy!r}."
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def predict_kwargs(self) -> dict[str, Any]:
        """Every field but ``bundle_path``: each is the keyword of the same name of
        :func:`mirror_model.inference.predict`."""
        kw = self.to_dict()
        del kw["bundle_path"]
        return kw


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

    ``progress(done, total, stage)`` and ``should_stop()`` follow the protocol of
    :func:`mirror_model.inference.predict`; a stop request raises
    :class:`mirror_model.errors.Cancelled`.
    """
    from mirror_model.inference import predict

    request.validate()
    t0 = time.perf_counter()
    if progress is not None:
        progress(0, 1, "loading model bundle")
    bundle = get_bundle(request.bundle_path)
    _check_stop(should_stop)
    pred = predict(bundle, **request.predict_kwargs(), progress=progress, should_stop=should_stop)
    _check_stop(should_stop)
    return RunResult(request=request, prediction=pred, bundle=bundle, seconds=time.perf_counter() - t0)


def _check_stop(should_stop: Any) -> None:
    from mirror_model.errors import Cancelled

    if should_stop is not None and should_stop():
        raise Cancelled("the MIRROR run was cancelled.")


#: What the panel says about the inputs a prediction used, by ``Prediction.input_kind``.
INPUT_SENTENCES = {
    "both": "Slide + expression (both modalities)",
    "slide": "Slide only (no expression data used)",
    "rna": "Expression only (no slide used; no heatmap)",
}


def input_sentence(input_kind: str) -> str:
    """Plain words for the panel: which inputs the prediction used."""
    return INPUT_SENTENCES.get(str(input_kind), str(input_kind))


# ------------------------------------------------------------------------------------ jobs
@dataclass(frozen=True)
class JobProgress:
    """The latest progress report of a :class:`RunJob` (``total`` 0 = unknown)."""

    done: int
    total: int
    stage: str
    seconds: float


@dataclass(frozen=True)
class JobOutcome:
    """How a :class:`RunJob` ended: a result (and what ``prepare`` made of it), or an error.

    ``error`` is never raised across threads, so the panel shows its own message; ``cancelled``
    is True when the job stopped because it was asked to (``error`` is then a ``Cancelled``).
    """

    result: RunResult | None = None
    prepared: Any = None
    error: BaseException | None = None
    traceback: str = ""
    cancelled: bool = False
    seconds: float = 0.0


class RunJob:
    """One run of :func:`run_prediction` on a plain Python thread that never touches Qt.

    Why not a Qt worker: the panel, the viewer and the Qt objects of a worker can be deleted
    while a run is in flight (closing the panel or the viewer, quitting). A worker thread that
    emits signals or calls progress callbacks into those objects then crashes the process
    (segmentation fault, "wrapped C/C++ object ... has been deleted"). Here the thread only
    writes plain Python state under a lock; the panel *polls* it from a timer that it owns, so
    the timer dies with the panel and nothing ever calls into a deleted object. Every job is
    registered until it ends; :func:`cancel_all_runs` cancels and joins them when the
    application quits (and before the interpreter joins its threads at exit).

    Parameters
    ----------
    request : RunRequest
        Inputs, captured on the GUI thread.
    prepare : callable, optional
        ``prepare(result, should_stop) -> Any``, run on the job's thread after the prediction:
        the panel builds its layers and plots there, off the GUI thread.
    """

    def __init__(self, request: RunRequest, prepare: Any = None) -> None:
        self.request = request
        self._prepare = prepare
        self._stop = threading.Event()
        self._done = threading.Event()
        self._lock = threading.Lock()
        self._t0 = time.perf_counter()
        self._progress = JobProgress(0, 0, "starting", 0.0)
        self._outcome: JobOutcome | None = None
        self._thread = threading.Thread(target=self._main, name="mirror-run", daemon=False)

    def start(self) -> RunJob:
        with _jobs_lock:
            _jobs.add(self)
        _install_exit_hook()
        self._t0 = time.perf_counter()
        self._thread.start()
        return self

    # --------------------------------------------------------------- called from any thread
    def cancel(self) -> None:
        """Ask the run to stop at its next check (between tiles batches and stages)."""
        self._stop.set()

    @property
    def cancel_requested(self) -> bool:
        return self._stop.is_set()

    @property
    def finished(self) -> bool:
        return self._done.is_set()

    def progress(self) -> JobProgress:
        with self._lock:
            return self._progress

    def outcome(self) -> JobOutcome | None:
        """The outcome once :attr:`finished`, else None."""
        return self._outcome if self._done.is_set() else None

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the thread to end; True when it has."""
        if self._thread.ident is None:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    # ----------------------------------------------------------------------- the job thread
    def _report(self, done: int, total: int, stage: str) -> None:
        with self._lock:
            self._progress = JobProgress(int(done), int(total), str(stage), time.perf_counter() - self._t0)

    def _main(self) -> None:
        from mirror_model.errors import Cancelled

        outcome: JobOutcome
        try:
            result = run_prediction(self.request, progress=self._report, should_stop=self._stop.is_set)
            prepared = None
            if self._prepare is not None:
                self._report(0, 0, "preparing the display")
                prepared = self._prepare(result, self._stop.is_set)
            _check_stop(self._stop.is_set)
            outcome = JobOutcome(result=result, prepared=prepared, seconds=self._elapsed())
        except Cancelled as exc:
            outcome = JobOutcome(error=exc, cancelled=True, seconds=self._elapsed())
        except BaseException as exc:  # reported to the panel, never raised across threads
            outcome = JobOutcome(
                error=exc,
                traceback=traceback.format_exc(),
                cancelled=self._stop.is_set(),
                seconds=self._elapsed(),
            )
        self._outcome = outcome
        self._done.set()
        with _jobs_lock:
            _jobs.discard(self)

    def _elapsed(self) -> float:
        return time.perf_counter() - self._t0


_jobs: set[RunJob] = set()
_jobs_lock = threading.Lock()
_exit_hook_installed = False


def running_jobs() -> list[RunJob]:
    """Jobs started and not yet ended."""
    with _jobs_lock:
        return list(_jobs)


def cancel_all_runs(timeout_s: float | None = 60.0) -> bool:
    """Cancel every running job and wait up to ``timeout_s`` for their threads to end.

    Returns True when all have ended. Connected to ``QApplication.aboutToQuit`` by the panel and
    run by the interpreter before it joins threads at exit.
    """
    jobs = running_jobs()
    for job in jobs:
        job.cancel()
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    ok = True
    for job in jobs:
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        ok = job.join(left) and ok
    return ok


def _install_exit_hook() -> None:
    # threading._register_atexit runs before the interpreter joins non-daemon threads at exit
    # (atexit runs after, too late to cancel); concurrent.futures relies on it the same way.
    global _exit_hook_installed
    if _exit_hook_installed:
        return
    _exit_hook_installed = True
    register = getattr(threading, "_register_atexit", None)
    if register is not None:
        try:
            register(cancel_all_runs, None)
        except RuntimeError:  # the interpreter is already shutting down
            pass


def list_samples(expression_path: str | os.PathLike[str]) -> list[str]:
    """Sample ids of an expression table (either orientation), in file order.

    Raises
    ------
    mirror_model.errors.ExpressionError
        The table cannot be read.
    """
    from mirror_model.expression import read_expression

    # only the IDs are needed here: missing values are the run's business (its nan_policy)
    return [str(s) for s in read_expression(expression_path, nan_policy="median").sample_ids]


def suggest_sample(sample_ids: Sequence[str], slide_name: str | None) -> str | None:
    """The sample id that belongs to the slide, or None when there is no unambiguous match.

    First :func:`mirror_model.inference.match_sample` (the rules ``predict`` itself uses: one
    row; id equal to the file stem; TCGA patient barcode; id as a prefix of the file name);
    then, for names like ``scan_P17_HE.svs``, the longest id contained in the slide's file name
    (case-insensitive) when no other id of that length is.
    """
    if not slide_name or not sample_ids:
        return None
    from mirror_model.ids import match_sample, slide_stem

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
