"""Model registry: build MIRROR-family models from presets or configs.

>>> from mirror_model.models import create_model
>>> model = create_model("mirror", patch_dim=64, n_genes=300, embed_dim=128)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from ..config import ModelConfig, get_preset, list_presets
from ..errors import ConfigError
from .abmil import GatedABMILEncoder
from .mirror import (
    MirrorModel,
    MirrorOutput,
    RetentionResult,
    RNARetention,
    SlideEncoding,
    SlideRetention,
    StyleClustering,
    StyleResult,
)
from .rna_mirror import MirrorRNAEncoder
from .rna_mlp import MlpRNAEncoder
from .transmil import TransMILEncoder

__all__ = [
    "INFERENCE_PREFIXES",
    "KEY_RENAMES",
    "GatedABMILEncoder",
    "MirrorModel",
    "MirrorOutput",
    "MirrorRNAEncoder",
    "MlpRNAEncoder",
    "RNARetention",
    "RetentionResult",
    "SlideEncoding",
    "SlideRetention",
    "StyleClustering",
    "StyleResult",
    "TransMILEncoder",
    "checkpoint_filter_fn",
    "create_model",
    "create_rna_encoder",
    "create_slide_encoder",
    "get_preset",
    "inference_state_dict",
    "list_presets",
]

_SLIDE_ENCODERS: dict[str, type[nn.Module]] = {
    "transmil": TransMILEncoder,
    "abmil": GatedABMILEncoder,
}
_RNA_ENCODERS: dict[str, type[nn.Module]] = {
    "mirror": MirrorRNAEncoder,
    "mlp": MlpRNAEncoder,
}

#: Old → new state-dict key prefixes, applied by :func:`checkpoint_filter_fn` (empty while no
#: parameter has been renamed since format 1; add entries here when renaming a module).
KEY_RENAMES: dict[str, str] = {}

#: State-dict prefixes of the modules inference uses (a ``.mirror`` bundle stores only these;
#: alignment heads, retention decoders and style prototypes stay in the run folder).
INFERENCE_PREFIXES: tuple[str, ...] = ("slide_encoder.", "rna_encoder.")


def inference_state_dict(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The entries of a full :class:`MirrorModel` state dict that inference needs."""
    return {k: v for k, v in state_dict.items() if k.startswith(INFERENCE_PREFIXES)}


def _resolve(
    preset_or_config: str | ModelConfig | Mapping[str, Any], overrides: dict[str, Any]
) -> ModelConfig:
    if isinstance(preset_or_config, ModelConfig):
        cfg = preset_or_config
    elif isinstance(preset_or_config, Mapping):
        cfg = ModelConfig.from_dict(dict(preset_or_config))
    elif isinstance(preset_or_config, str):
        return get_preset(preset_or_config, **overrides)
    else:
        raise ConfigError(
            "create_model expects a preset name, a ModelConfig or a config dict; "
            f"got {type(preset_or_config).__name__}."
        )
    return cfg.replace(**overrides) if overrides else cfg


def create_model(
    preset_or_config: str | ModelConfig | Mapping[str, Any] = "mirror",
    *,
    training_parts: bool = True,
    **overrides: Any,
) -> MirrorModel:
    """Build a :class:`MirrorModel` from a preset name, a config (or its dict), plus overrides.

    Example: ``create_model("mirror", patch_dim=1024, n_genes=5000)``;
    ``training_parts=False`` builds the inference model (the encoders only).
    """
    return MirrorModel(_resolve(preset_or_config, overrides), training_parts=training_parts)


def create_slide_encoder(config: ModelConfig | str, **overrides: Any) -> nn.Module:
    """Slide encoder named by ``config.slide_encoder`` (``transmil`` or ``abmil``)."""
    cfg = _resolve(config, overrides)
    return _SLIDE_ENCODERS[cfg.slide_encoder](cfg)


def create_rna_encoder(config: ModelConfig | str, **overrides: Any) -> nn.Module:
    """RNA encoder named by ``config.rna_encoder`` (``mirror`` or ``mlp``)."""
    cfg = _resolve(config, overrides)
    return _RNA_ENCODERS[cfg.rna_encoder](cfg)


def checkpoint_filter_fn(
    state_dict: Mapping[str, Tensor], model: nn.Module | None = None
) -> dict[str, Tensor]:
    """Remap state-dict keys of older checkpoints to the current module names.

    Strips a DistributedDataParallel / ``torch.compile`` prefix (``module.``, ``_orig_mod.``) and
    applies :data:`KEY_RENAMES`. When ``model`` is an inference model
    (``MirrorModel(training_parts=False)``), the pretraining-only entries of a full checkpoint
    (heads, decoders, prototypes: everything outside :data:`INFERENCE_PREFIXES`) are dropped, so
    bundles written before they were left out still load.
    """
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        new = key
        stripped = True
        while stripped:
            stripped = False
            for prefix in ("module.", "_orig_mod."):
                if new.startswith(prefix):
                    new, stripped = new[len(prefix) :], True
        for old, repl in KEY_RENAMES.items():
            if new.startswith(old):
                new = repl + new[len(old) :]
                break
        out[new] = value
    if model is not None and getattr(model, "training_parts", True) is False:
        out = inference_state_dict(out)
    return out
