"""Training configuration: one dataclass, validated in one place, YAML/JSON round trip.

Precedence used by ``mirror-train pretrain`` (highest first): explicit command-line flags
(``--epochs`` ...), then ``--set key=value`` overrides, then the ``--config`` YAML file,
then the defaults below (the authors' released configuration, design §1.7).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from .._validation import FieldChecker, coerce, is_number
from ..errors import ConfigError

__all__ = ["TrainConfig", "parse_set_overrides"]

_SCHEDULES = ("constant", "cosine")
_OPTIMIZERS = ("adam", "adamw")
_MULTI_SLIDE = ("pool", "one")
_GENE_SELECTION = ("none", "variance", "rfecv", "survival")
_PRECISIONS = ("auto", "fp32", "bf16")


@dataclass(frozen=True)
class TrainConfig:
    """Everything that controls one pretraining run (not the model architecture).

    Parameters
    ----------
    epochs : int
        Passes over the (inner-)training patients. Authors: 100.
    batch_size : int
        Patients per optimisation step, **global** across all ranks (each of W ranks gets
        ``batch_size / W``). Authors: 16.
    lr : float
        Peak learning rate. Authors: 2e-5 (constant).
    weight_decay : float
        Decoupled for ``adamw``, L2 for ``adam``. Authors: 0.
    schedule : {"constant", "cosine"}
        ``constant`` (authors) or linear warm-up then cosine decay to ``min_lr_ratio * lr``.
    warmup_epochs : float
        Linear warm-up length in epochs (both schedules honour it; 0 = none).
    min_lr_ratio : float
        Final learning rate of the cosine schedule as a fraction of ``lr``.
    optimizer : {"adam", "adamw"}
    betas : tuple of float
    grad_clip : float or None
        Clip the global gradient L2 norm to this value; None or 0 disables clipping.
    tiles_per_slide : int
        Tiles re-sampled per patient at every step (authors: 2048). Bags with fewer tiles
        contribute all their tiles once plus draws with replacement to fill up.
    val_tiles_per_slide : int or None
        Tiles per patient for the validation loss (None = ``tiles_per_slide``). The validation
        sample is drawn with a fixed seed so every epoch sees the same tiles.
    multi_slide : {"pool", "one"}
        Patients with several slides: ``pool`` (default) samples from the union of all their
        slides' tiles; ``one`` picks one slide per step (uniformly, seeded).
    seed : int
        Seeds splits, initialisation, tile sampling and the model's random masks. Authors: 42.
    folds : int
        Outer patient-level folds. ``1`` = no cross-validation (train on all patients with an
        inner hold-out for model selection; for deployment).
    fold : int or None
        Train only this outer fold (0-based); None trains all.
    inner_val_fraction : float
        Share of the outer-training patients held out (stratified) for the validation loss
        that picks the best epoch. The outer test fold is never used in pretraining.
    gene_selection : {"none", "variance", "rfecv", "survival"}
        How genes are chosen on the inner-training patients: keep all, keep the ``n_genes``
        most variable, RFECV supervised by the subtype (design §1.8), or univariate Cox
        screening on the training patients' survival (the ``n_genes`` with the largest
        |score z|).
    n_genes : int or None
        Genes kept by ``variance`` / ``survival`` selection (None = 200) or the cap of
        ``rfecv`` (None = no cap).
    curated_genes : str or None
        A gene-list file (one name per line) whose genes are always kept (united with the
        selection, as the authors do with their curated cancer-gene list).
    stop_gradient : bool or None
        Detach the retention targets (sets the model's ``retention_stop_gradient``; None keeps
        the preset's value — the authors do not stop gradients).
    precision : {"auto", "fp32", "bf16"}
        bf16 autocast or plain fp32; ``auto`` picks bf16 where it is fast. fp16 is never used.
    device : str
        ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (under torchrun each rank uses its LOCAL_RANK GPU).
    num_workers : int
        Background threads that read and assemble the next batch (0 = in the main thread).
    feature_cache : {"memory", "lazy"}
        ``memory`` keeps every slide's features in RAM after the first read; ``lazy`` reads only
        the sampled rows from the h5 file each step, keeping at most ``cache_gb`` of whole slides.
    cache_dtype : {"float32", "bfloat16"}
        Storage type of cached features (bf16 halves the memory; computation is unaffected
        under bf16 autocast).
    cache_gb : float
        Memory budget of the ``lazy`` cache in GiB (0 = no caching).
    checkpoint_every_steps : int
        Also write ``last.ckpt`` every this many optimisation steps (0 = at epoch ends only).
    max_steps : int or None
        Stop (with a resumable checkpoint) after this many optimisation steps in total.
    stop_after_epochs : int or None
        Follow the ``epochs``-long schedule but stop after this many epochs and keep the model
        of the last one (the final model trained on all patients, see
        :func:`mirror_model.train.refit_final`, stops at the epoch the folds validated).
    log_every_steps : int
        Steps between progress/metric updates of the running training loss.
    """

    epochs: int = 100
    batch_size: int = 16
    lr: float = 2e-5
    weight_decay: float = 0.0
    schedule: str = "constant"
    warmup_epochs: float = 0.0
    min_lr_ratio: float = 0.0
    optimizer: str = "adam"
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float | None = None
    tiles_per_slide: int = 2048
    val_tiles_per_slide: int | None = None
    multi_slide: str = "pool"
    seed: int = 42
    folds: int = 5
    fold: int | None = None
    inner_val_fraction: float = 0.15
    gene_selection: str = "none"
    n_genes: int | None = None
    curated_genes: str | None = None
    stop_gradient: bool | None = None
    precision: str = "auto"
    device: str = "auto"
    num_workers: int = 0
    feature_cache: str = "memory"
    cache_dtype: str = "float32"
    cache_gb: float = 8.0
    checkpoint_every_steps: int = 0
    max_steps: int | None = None
    stop_after_epochs: int | None = None
    log_every_steps: int = 1
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first invalid option."""
        c = FieldChecker(self, "TrainConfig")
        for name in ("epochs", "batch_size", "tiles_per_slide", "folds", "log_every_steps"):
            c.integer(name, 1)
        for name in ("val_tiles_per_slide", "n_genes", "max_steps", "stop_after_epochs"):
            c.integer(name, 1, optional=True)
        c.rule(
            "stop_after_epochs",
            self.stop_after_epochs is None or self.stop_after_epochs <= self.epochs,
            f"must be at most epochs = {self.epochs}",
        )
        for name in ("seed", "num_workers", "checkpoint_every_steps"):
            c.integer(name, 0)
        c.number("lr", 0.0, lo_open=True)
        c.number("weight_decay", 0.0)
        c.number("warmup_epochs", 0.0)
        c.number("min_lr_ratio", 0.0, 1.0)
        c.number("inner_val_fraction", 0.0, 0.9, lo_open=True)
        c.number("cache_gb", 0.0)
        c.number("grad_clip", 0.0, optional=True)
        c.integer("fold", 0, optional=True)
        c.rule(
            "fold",
            self.fold is None or self.fold < self.folds,
            f"must be between 0 and folds-1 = {self.folds - 1}",
        )
        c.boolean("stop_gradient", optional=True)
        betas = tuple(self.betas)
        c.rule(
            "betas",
            len(betas) == 2 and all(is_number(b) and 0.0 <= b < 1.0 for b in betas),
            "must be two numbers in [0, 1)",
        )
        c.rule(
            "precision",
            str(self.precision).lower() not in ("fp16", "float16", "half"),
            "fp16 is not supported; use bf16 or fp32",
        )
        for name, allowed in (
            ("schedule", _SCHEDULES),
            ("optimizer", _OPTIMIZERS),
            ("multi_slide", _MULTI_SLIDE),
            ("gene_selection", _GENE_SELECTION),
            ("precision", _PRECISIONS),
            ("feature_cache", ("memory", "lazy")),
            ("cache_dtype", ("float32", "bfloat16")),
        ):
            c.choice(name, allowed)
        dev = str(self.device).lower()
        c.rule(
            "device",
            dev in ("auto", "cpu", "cuda") or dev.startswith("cuda:"),
            "must be auto, cpu, cuda or cuda:N",
        )

    # ------------------------------------------------------------------ round trip
    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/YAML-safe dict of every option (``extra`` omitted when empty)."""
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        d["betas"] = [float(b) for b in self.betas]
        if self.extra:
            d["extra"] = dict(self.extra)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TrainConfig:
        """Build from a dict; unknown keys raise :class:`ConfigError` listing the valid ones."""
        if not isinstance(d, Mapping):
            raise ConfigError(f"training configuration must be a mapping, got {type(d).__name__}.")
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(
                f"unknown training option(s) {', '.join(unknown)}; valid options: "
                f"{', '.join(sorted(names - {'extra'}))}."
            )
        kw = {k: _coerce(cls, k, v) for k, v in d.items()}
        return cls(**kw)

    def replace(self, **changes: Any) -> TrainConfig:
        """A validated copy with ``changes`` applied (values coerced like YAML input)."""
        return self.from_dict({**self.to_dict(), **changes})

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> TrainConfig:
        return cls.from_dict(json.loads(text))

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=True)

    @classmethod
    def from_yaml(cls, text: str) -> TrainConfig:
        import yaml

        return cls.from_dict(yaml.safe_load(text) or {})

    @property
    def last_epoch(self) -> int:
        """Number of epochs actually trained (``stop_after_epochs`` or ``epochs``)."""
        return self.stop_after_epochs or self.epochs

    @property
    def val_tiles(self) -> int:
        return self.val_tiles_per_slide or self.tiles_per_slide


# choice options are case-insensitive on input
_LOWERCASE = (
    "schedule",
    "optimizer",
    "precision",
    "multi_slide",
    "gene_selection",
    "feature_cache",
)


def _coerce(cls: type, name: str, value: Any) -> Any:
    """YAML/CLI text to the option's type (validation follows in :meth:`TrainConfig.validate`)."""
    if name == "extra":
        return dict(value) if isinstance(value, Mapping) else value
    value = coerce(cls, name, value)
    return value.lower() if name in _LOWERCASE and isinstance(value, str) else value


def parse_set_overrides(items: list[str] | None) -> dict[str, Any]:
    """Parse ``--set key=value`` items; values are read as YAML scalars (``1e-4``, ``null``, ``[1,2]``).

    Keys prefixed ``model.`` are model-architecture overrides; others are training options.
    """
    import yaml

    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value (e.g. --set lr=1e-4).")
        key, raw = item.split("=", 1)
        key = key.strip().replace("-", "_")
        if not key:
            raise ConfigError(f"--set {item!r}: empty key.")
        try:
            out[key] = yaml.safe_load(raw)
        except yaml.YAMLError:
            out[key] = raw
    return out
