"""Model configuration: one frozen dataclass, validated in one place, plus named presets.

:class:`ModelConfig` holds the *architecture and loss* description of a model, nothing about
training (optimiser, learning rate, epochs and tile sampling belong to the trainer). It
round-trips through JSON (``to_dict``/``from_dict``/``to_json``/``from_json``) so that a model
bundle can rebuild the exact network, and every invalid value raises
:class:`~mirror_model.errors.ConfigError` naming the field.

Presets (``get_preset(name)``):

``mirror``, ``mirror-authors``
    The authors' released configuration (design §1.2–§1.7): TransMIL slide encoder with width
    D = 768, 8 heads, D/2 Nyström landmarks, 6 Moore–Penrose iterations, value-conv kernel 33,
    PPEG kernels 7/5/3; transformer RNA encoder with 12 heads, 2 blocks, MLP ratio 4,
    dropout 0.1; K = 3000 prototypes; loss weights 0.5 / 0.15 / 0.15 / 0.1 / 0.1; mask ratio 0.75.
    ``mirror-authors`` is pinned to it (tests); ``mirror`` is the default.
``mirror-grid``
    ``mirror`` with the measured deviations :data:`MIRROR_GRID_DEVIATIONS` — PPEG over the
    tiles' real lattice cells (``ppeg_layout="grid"``, so the encoder needs each tile's
    position) and no value convolution over the token order (``nystrom_conv_kernel=0``); the
    README's recommendation for small cohorts.
``tangle``
    The TANGLE baseline (design §1.10): gated-attention ABMIL slide encoder, MLP expression
    encoder, symmetric InfoNCE only.
``mirror-no-retention``, ``mirror-no-clustering``, ``mirror-align-only``
    Ablations of ``mirror`` with the named loss terms switched off (their modules are not built,
    so every parameter of every preset receives a gradient).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
from dataclasses import dataclass
from typing import Any

from ._validation import FieldChecker, is_int, is_number
from .errors import ConfigError

__all__ = [
    "HEATMAP_LAYERS",
    "LOSS_NAMES",
    "MIRROR_GRID_DEVIATIONS",
    "PRESETS",
    "SLIDE_ATTENTION_MODES",
    "ModelConfig",
    "get_preset",
    "list_presets",
]

#: Names of the loss terms, in the order of the total loss (design §1.7).
LOSS_NAMES: tuple[str, ...] = ("align", "ret_slide", "ret_rna", "style", "cluster")

_SLIDE_ENCODERS = ("transmil", "abmil")
#: ``ModelConfig.slide_input_norm`` values.
SLIDE_INPUT_NORMS: tuple[str, ...] = ("none", "standardize")
#: ``ModelConfig.ppeg_layout`` values.
PPEG_LAYOUTS: tuple[str, ...] = ("sequence", "grid", "off")
#: ``ModelConfig.slide_readout`` values.
SLIDE_READOUTS: tuple[str, ...] = ("cls", "cls+mean", "mean")
_RNA_ENCODERS = ("mirror", "mlp")
#: ``ModelConfig.slide_attention`` values (== mirror_model.layers.nystrom.ATTENTION_MODES).
SLIDE_ATTENTION_MODES: tuple[str, ...] = ("auto", "short", "nystrom", "reference")
#: Renamed fields of older configs: old name -> function(value) -> {new name: value}.
_LEGACY_FIELDS = {
    "nystrom_exact_when_short": lambda v: {"slide_attention": "short" if v else "nystrom"},
}
#: TransMIL layers whose CLS attention row can be the heatmap (``ModelConfig.heatmap_layer``).
HEATMAP_LAYERS: tuple[str, ...] = ("first", "last")


@dataclass(frozen=True)
class ModelConfig:
    """Architecture and loss configuration of a MIRROR-family model.

    All widths are numbers of features; all ratios are fractions in (0, 1].

    Parameters
    ----------
    name
        Free-text name (the preset it came from, by default).
    patch_dim
        D_p, the width of the frozen patch features (e.g. 768 for Phikon, 1024 for UNI).
    n_genes
        G, the number of genes of the expression input, in the order stored with the model.
    embed_dim
        D, the width of both modality embeddings.
    slide_encoder
        ``"transmil"`` (MIRROR) or ``"abmil"`` (gated attention, TANGLE).
    rna_encoder
        ``"mirror"`` (transformer over feature chunks) or ``"mlp"`` (TANGLE).
    slide_heads, slide_landmarks, pinv_iterations, nystrom_conv_kernel, ppeg_kernels, slide_dropout
        TransMIL settings. ``slide_landmarks = 0`` means D/2 (the authors' choice);
        ``nystrom_conv_kernel = 0`` disables the depthwise value convolution.
    slide_attention
        How the TransMIL (and slide retention decoder) layers attend: ``"auto"`` (default) gives
        each sample exact softmax attention when that costs fewer FLOPs than Nyström (up to
        3,099 tokens at D = 768, m = 384: the authors' 2,048-tile bags) and Nyström above (whole
        slides at inference); ``"short"`` exact only up to ``landmarks`` tokens (where Nyström
        converges to it); ``"nystrom"`` always Nyström (padding masked); ``"reference"`` the
        authors' behaviour, always Nyström with zero padding that takes part in the softmax.
        See :mod:`mirror_model.layers.nystrom`. Configs written with the former boolean
        ``nystrom_exact_when_short`` load as ``"short"`` (true) / ``"nystrom"`` (false), so a
        saved model computes what it was evaluated with.
    heatmap_layer
        Which TransMIL layer's CLS attention row is the per-tile heatmap: ``"first"`` (default;
        its keys are the tiles themselves) or ``"last"`` (the authors' choice, whose keys are
        tiles already mixed with their neighbours by the value convolution and PPEG). See
        :mod:`mirror_model.models.transmil`.
    ppeg_layout
        Where PPEG finds a token's neighbours: ``"sequence"`` (the authors': the tokens laid
        row-major on a square in input order, so neighbours are unrelated tiles when the order
        is random), ``"grid"`` (the tiles' real cells on the slide's tile lattice, from the
        stored coordinates: each tile is mixed with the tiles around it; the encoder then also
        orders the tiles by position, so it is invariant to the input order) or ``"off"``.
    slide_readout
        The TransMIL slide embedding: ``"cls"`` (the authors': the CLS output), ``"mean"`` (the
        mean of the real tiles' output tokens) or ``"cls+mean"`` (their sum), then the final
        LayerNorm.
    slide_input_norm
        ``"none"`` (the authors') or ``"standardize"``: every tile-feature dimension is
        standardised with statistics accumulated over the training tiles and stored with the
        weights (:class:`~mirror_model.layers.FeatureStandardizer`); both slide encoders.
    abmil_attention_dim, abmil_dropout
        Gated ABMIL settings (hidden width of the attention branch; dropout after the input
        projection).
    rna_heads, rna_depth, rna_mlp_ratio, rna_dropout
        Transformer RNA encoder (and RNA retention decoder block) settings.
    rna_mlp_hidden_dims
        Hidden widths of the MLP expression encoder.
    logit_scale_init, logit_scale_max
        Initial value of the learnable log logit scale t (s = exp(t)) and the maximum of s.
    align_normalize_after_head
        The authors L2-normalise *before* the alignment head and not after (``False``, faithful);
        ``True`` also normalises the head outputs (standard CLIP cosine logits).
    slide_mask_ratio, rna_mask_ratio
        Fraction of slide tokens / RNA embedding coordinates replaced by the mask token in the
        retention branch (the realised count per sample is ``n - int(n * (1 - ratio))``).
    retention_stop_gradient
        Detach the retention targets (the authors do not: ``False``).
    slide_decoder_depth, rna_decoder_depth
        Number of decoder layers of the retention branches.
    style_hidden_dims, latent_dim, n_prototypes
        Style-clustering MLP widths (D→512→256), latent width (128) and prototype count K.
    weight_align, weight_ret_slide, weight_ret_rna, weight_style, weight_cluster
        Loss weights; a weight of 0 switches the term off and its modules are not built.
    """

    name: str = "mirror"
    patch_dim: int = 768
    n_genes: int = 1000
    embed_dim: int = 768
    slide_encoder: str = "transmil"
    rna_encoder: str = "mirror"
    # TransMIL (design §1.2)
    slide_heads: int = 8
    slide_landmarks: int = 0
    pinv_iterations: int = 6
    nystrom_conv_kernel: int = 33
    ppeg_kernels: tuple[int, ...] = (7, 5, 3)
    slide_dropout: float = 0.1
    slide_attention: str = "auto"
    heatmap_layer: str = "first"
    ppeg_layout: str = "sequence"
    slide_readout: str = "cls"
    slide_input_norm: str = "none"
    # gated ABMIL (design §1.10)
    abmil_attention_dim: int = 256
    abmil_dropout: float = 0.1
    # transformer RNA encoder (design §1.3)
    rna_heads: int = 12
    rna_depth: int = 2
    rna_mlp_ratio: float = 4.0
    rna_dropout: float = 0.1
    # MLP RNA encoder (TANGLE)
    rna_mlp_hidden_dims: tuple[int, ...] = (1024, 1024)
    # alignment (design §1.4)
    logit_scale_init: float = math.log(1.0 / 0.07)
    logit_scale_max: float = 100.0
    align_normalize_after_head: bool = False
    # retention (design §1.5)
    slide_mask_ratio: float = 0.75
    rna_mask_ratio: float = 0.75
    retention_stop_gradient: bool = False
    slide_decoder_depth: int = 1
    rna_decoder_depth: int = 1
    # style clustering (design §1.6)
    style_hidden_dims: tuple[int, ...] = (512, 256)
    latent_dim: int = 128
    n_prototypes: int = 3000
    # loss weights (design §1.7)
    weight_align: float = 0.5
    weight_ret_slide: float = 0.15
    weight_ret_rna: float = 0.15
    weight_style: float = 0.1
    weight_cluster: float = 0.1

    # ------------------------------------------------------------------ validation
    def __post_init__(self) -> None:
        # JSON gives lists; store tuples so the config stays hashable and comparable.
        for name in ("ppeg_kernels", "rna_mlp_hidden_dims", "style_hidden_dims"):
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))
        _validate(self)

    # ------------------------------------------------------------------ derived
    @property
    def landmarks(self) -> int:
        """Number of Nyström landmarks actually used (``slide_landmarks`` or D/2)."""
        return self.slide_landmarks if self.slide_landmarks > 0 else max(1, self.embed_dim // 2)

    @property
    def loss_weights(self) -> dict[str, float]:
        """``{loss name: weight}`` for every term, including switched-off ones (weight 0)."""
        return {n: float(getattr(self, f"weight_{n}")) for n in LOSS_NAMES}

    @property
    def active_losses(self) -> tuple[str, ...]:
        """Names of the loss terms with a positive weight, in :data:`LOSS_NAMES` order."""
        return tuple(n for n, w in self.loss_weights.items() if w > 0)

    @property
    def use_style_module(self) -> bool:
        """Whether the style-clustering module is built (style or cluster loss active)."""
        return self.weight_style > 0 or self.weight_cluster > 0

    # ------------------------------------------------------------------ (de)serialisation
    def replace(self, **changes: Any) -> ModelConfig:
        """Return a validated copy with ``changes`` applied (unknown names raise ConfigError).

        When ``embed_dim`` changes and a head count (``slide_heads``, ``rna_heads``) that is not
        itself given no longer divides it, that head count becomes the largest divisor of the
        new ``embed_dim`` not above its current value (e.g. ``embed_dim=128`` turns the preset's
        12 RNA heads into 8); the returned config states the value used. The constructor never
        adjusts anything.
        """
        changes = _translate_legacy(changes)
        _check_names(changes, "ModelConfig.replace")
        width = changes.get("embed_dim")
        if is_int(width) and width > 0:
            for heads_field in ("slide_heads", "rna_heads"):
                heads = getattr(self, heads_field)
                if heads_field not in changes and is_int(heads) and heads > 0 and width % heads:
                    changes[heads_field] = max(h for h in range(1, heads + 1) if width % h == 0)
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-compatible dict (tuples become lists)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Build from :meth:`to_dict` output; unknown keys raise ConfigError naming them."""
        if not isinstance(data, dict):
            raise ConfigError(f"model config must be a JSON object; got {type(data).__name__}.")
        data = _translate_legacy(data)
        _check_names(data, "model config")
        return cls(**data)

    def to_json(self, indent: int | None = 2) -> str:
        """JSON text of :meth:`to_dict` (keys in field order)."""
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_json(cls, text: str) -> ModelConfig:
        """Inverse of :meth:`to_json`."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"model config is not valid JSON: {exc}") from None
        return cls.from_dict(data)


# ---------------------------------------------------------------------- validation helpers
_FIELD_NAMES = frozenset(f.name for f in dataclasses.fields(ModelConfig))


def _translate_legacy(data: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``data`` with renamed fields of older configs under their current names."""
    data = dict(data)
    for old, translate in _LEGACY_FIELDS.items():
        if old in data:
            for new, value in translate(data.pop(old)).items():
                data.setdefault(new, value)
    return data


def _check_names(data: dict[str, Any], where: str) -> None:
    unknown = [k for k in data if k not in _FIELD_NAMES]
    if unknown:
        hints = []
        for k in unknown:
            close = difflib.get_close_matches(str(k), sorted(_FIELD_NAMES), n=1)
            hints.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ConfigError(
            f"{where}: unknown field(s) {', '.join(hints)}. "
            f"Valid fields: {', '.join(sorted(_FIELD_NAMES))}."
        )


def _validate(c: ModelConfig) -> None:
    v = FieldChecker(c, "ModelConfig")
    v.rule("name", isinstance(c.name, str), "must be a string")
    positive_ints = (
        "patch_dim", "n_genes", "embed_dim", "slide_heads", "pinv_iterations", "abmil_attention_dim",
        "rna_heads", "rna_depth", "slide_decoder_depth", "rna_decoder_depth", "latent_dim",
    )  # fmt: skip
    for name in positive_ints:
        v.integer(name, 1)
    for name in ("slide_landmarks", "nystrom_conv_kernel"):
        v.integer(name, 0, note="0 = default / off")
    v.rule(
        "nystrom_conv_kernel",
        not c.nystrom_conv_kernel or c.nystrom_conv_kernel % 2 == 1,
        "must be odd so the convolution keeps the sequence length",
    )
    v.integer("n_prototypes", 2)
    v.choice("slide_encoder", _SLIDE_ENCODERS)
    v.choice("heatmap_layer", HEATMAP_LAYERS)
    v.choice("slide_attention", SLIDE_ATTENTION_MODES)
    v.choice("ppeg_layout", PPEG_LAYOUTS)
    v.choice("slide_readout", SLIDE_READOUTS)
    v.choice("slide_input_norm", SLIDE_INPUT_NORMS)
    v.choice("rna_encoder", _RNA_ENCODERS)
    v.int_sequence("ppeg_kernels", non_empty=True)
    v.rule(
        "ppeg_kernels",
        all(k % 2 == 1 for k in c.ppeg_kernels),
        "must be a non-empty list of odd kernel sizes (e.g. [7, 5, 3])",
    )
    v.int_sequence("rna_mlp_hidden_dims")
    v.int_sequence("style_hidden_dims", non_empty=True)
    for name in ("slide_dropout", "abmil_dropout", "rna_dropout"):
        v.number(name, 0.0, 1.0, hi_open=True)
    for name in ("slide_mask_ratio", "rna_mask_ratio"):
        v.number(name, 0.0, 1.0, lo_open=True)
    v.number("rna_mlp_ratio", 0.0, lo_open=True)
    v.number("logit_scale_max", 0.0, lo_open=True, note="the cap on s = exp(t)")
    v.rule(
        "logit_scale_init",
        is_number(c.logit_scale_init)
        and math.exp(min(c.logit_scale_init, 700)) <= c.logit_scale_max,
        f"exp(logit_scale_init) must be <= logit_scale_max = {c.logit_scale_max}",
    )
    for name in (
        "align_normalize_after_head",
        "retention_stop_gradient",
    ):
        v.boolean(name)
    for n in LOSS_NAMES:
        v.number(f"weight_{n}", 0.0, note="0 switches the term off")
    if not c.active_losses:
        raise ConfigError(
            "ModelConfig: all loss weights are 0, nothing would be trained; "
            "set at least one of " + ", ".join(f"weight_{n}" for n in LOSS_NAMES) + " > 0."
        )
    divides = f"must divide embed_dim = {c.embed_dim}"
    v.rule(
        "slide_heads", c.slide_encoder != "transmil" or c.embed_dim % c.slide_heads == 0, divides
    )
    v.rule(
        "slide_heads",
        c.weight_ret_slide <= 0 or c.embed_dim % c.slide_heads == 0,
        divides + " (slide retention decoder)",
    )
    v.rule(
        "rna_heads",
        not (c.rna_encoder == "mirror" or c.weight_ret_rna > 0) or c.embed_dim % c.rna_heads == 0,
        divides,
    )


# ---------------------------------------------------------------------- presets
#: Preset ``mirror-grid``'s deviations from the authors' configuration (``mirror``), measured on
#: development cohorts (README, "Does pretraining pay?"): PPEG on the tiles' real lattice cells
#: instead of a square fold of the (random) token order, and no depthwise value convolution over
#: that order. On four development cohorts (5 folds each) slide-only subtype AUROC, 10-shot AUROC
#: and Cox C-index were >= the authors' on 4/4, 3/4 (-0.002 on the fourth) and 4/4 cohorts; the
#: lattice alone, with the value convolution kept, lost on all four (10-shot, C-index).
MIRROR_GRID_DEVIATIONS: dict[str, Any] = {"ppeg_layout": "grid", "nystrom_conv_kernel": 0}
_MIRROR = ModelConfig(name="mirror")

PRESETS: dict[str, ModelConfig] = {
    "mirror": _MIRROR,
    "mirror-authors": _MIRROR.replace(name="mirror-authors"),
    "mirror-grid": _MIRROR.replace(name="mirror-grid", **MIRROR_GRID_DEVIATIONS),
    "tangle": ModelConfig(
        name="tangle",
        slide_encoder="abmil",
        rna_encoder="mlp",
        weight_align=1.0,
        weight_ret_slide=0.0,
        weight_ret_rna=0.0,
        weight_style=0.0,
        weight_cluster=0.0,
    ),
    "mirror-no-retention": _MIRROR.replace(
        name="mirror-no-retention", weight_ret_slide=0.0, weight_ret_rna=0.0
    ),
    "mirror-no-clustering": _MIRROR.replace(
        name="mirror-no-clustering", weight_style=0.0, weight_cluster=0.0
    ),
    "mirror-align-only": _MIRROR.replace(
        name="mirror-align-only",
        weight_ret_slide=0.0,
        weight_ret_rna=0.0,
        weight_style=0.0,
        weight_cluster=0.0,
    ),
}


def list_presets() -> list[str]:
    """Names of the built-in presets."""
    return list(PRESETS)


def get_preset(name: str | ModelConfig, **overrides: Any) -> ModelConfig:
    """Return preset ``name`` (a :class:`ModelConfig`), with optional field ``overrides``.

    Overrides go through :meth:`ModelConfig.replace` (which keeps head counts valid when only
    ``embed_dim`` is changed, e.g. ``embed_dim=128`` gives ``rna_heads=8``).
    """
    if isinstance(name, ModelConfig):
        cfg = name
    else:
        try:
            cfg = PRESETS[str(name)]
        except KeyError:
            close = difflib.get_close_matches(str(name), list(PRESETS), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(
                f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}.{hint}"
            ) from None
    if not overrides:
        return cfg
    return cfg.replace(**overrides)
