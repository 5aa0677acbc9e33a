"""Patch encoders behind one registry.

>>> enc = create_patch_encoder("stain-texture")        # embedded, no weights
>>> enc = create_patch_encoder("uni", weights="uni.safetensors")   # doctest: +SKIP
>>> enc = create_patch_encoder("timm:vit_base_patch16_224", weights="model.safetensors")  # doctest: +SKIP
>>> enc = create_patch_encoder("torchscript:/models/enc.pt", input_px=224)  # doctest: +SKIP

Every encoder is an ``nn.Module`` taking ``[B, 3, H, W]`` float RGB in **[0, 1]**
(H = W = ``enc.spec.input_px``) and returning ``[B, enc.spec.dim]``. Normalisation is done
**inside** the module (``enc.spec.mean`` / ``enc.spec.std`` say which); callers never normalise.

Names
-----
``stain-texture``
    Weight-free H&E colour/texture baseline (see :mod:`.stain_texture`).
``uni``, ``uni2-h``, ``phikon``, ``virchow``, ``virchow2``, ``vit_<size>_patch<p>_<px>``
    Our own ViT (:mod:`.vit`) with timm-compatible state-dict keys; pathology weights are
    loaded from a local ``weights=`` file (safetensors preferred; ``.bin``/``.pth`` via
    ``torch.load(weights_only=True)``). Phikon's Hugging Face layout is remapped.
``timm:<model_name>``
    timm's model when timm is importable (local weights file or its hub cache), otherwise our
    ViT when the name is a ViT we implement.
``torchscript:<path>``
    A TorchScript archive (``torch.jit.load``; runs the archive's TorchScript code — not a
    Python pickle — so only use files you trust); give ``input_px``, ``mean``, ``std``.

Random weights are only used with ``allow_random=True`` (benchmarks); otherwise a ViT without
``weights=`` is an error, because its features would be meaningless.

Adding an encoder: subclass :class:`PatchEncoder` (implement ``embed``; the base class's
``forward`` normalises and resizes) in its own file and register a factory
``factory(name, options: EncoderOptions)`` with :func:`register_patch_encoder` (the registry is :mod:`._registry`, as timm's
``register_model``); import the file below so it registers.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch

from .._device import resolve_device
from ..errors import ConfigError

# importing the encoder modules registers them
from . import stain_texture as _stain_texture  # noqa: F401
from . import torchscript as _torchscript  # noqa: F401
from . import vit as _vit  # noqa: F401
from ._registry import EncoderOptions, find_factory, list_patch_encoders, register_patch_encoder
from ._spec import IMAGENET_MEAN, IMAGENET_STD, PatchEncoder, PatchEncoderSpec

__all__ = [
    "EncoderOptions",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "PatchEncoder",
    "PatchEncoderSpec",
    "create_patch_encoder",
    "encoder_from_spec",
    "list_patch_encoders",
    "register_patch_encoder",
]

DEFAULT_PATCH_ENCODER = "stain-texture"


def create_patch_encoder(
    name: str = DEFAULT_PATCH_ENCODER,
    weights: str | os.PathLike[str] | None = None,
    device: str | torch.device = "cpu",
    *,
    allow_random: bool = False,
    input_px: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> PatchEncoder:
    """Build a patch encoder by name, in eval mode, on ``device``.

    Parameters
    ----------
    name : str
        See the module docstring / :func:`list_patch_encoders`.
    weights : path-like, optional
        Local weights file for ViT / timm encoders (safetensors, or ``.bin``/``.pth`` state
        dicts loaded with ``weights_only=True``).
    device : str or torch.device
        ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:N"``.
    allow_random : bool
        Allow a ViT without weights (random init; benchmarks only).
    input_px, mean, std : optional
        Override the input size and normalisation (required for TorchScript models that do
        not use 224 px / ImageNet statistics).

    Returns
    -------
    PatchEncoder
        ``nn.Module`` with ``.spec`` (:class:`PatchEncoderSpec`).
    """
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"patch encoder name must be a non-empty string, got {name!r}.")
    name = name.strip()
    dev = resolve_device(device)
    found = find_factory(name)
    if found is None:
        maybe_path = Path(name)
        hint = ""
        if maybe_path.suffix in (".pt", ".pth", ".ts") and maybe_path.exists():
            hint = f" For a TorchScript file use 'torchscript:{name}'."
        raise ConfigError(
            f"unknown patch encoder {name!r}. Known: {', '.join(list_patch_encoders())}.{hint}"
        )
    factory, arg = found
    options = EncoderOptions(weights, allow_random, input_px, mean, std)
    enc = factory(arg, options)
    return enc.to(dev).eval()


def encoder_from_spec(
    spec: PatchEncoderSpec | dict,
    weights: str | os.PathLike[str] | None = None,
    device: str | torch.device = "cpu",
    *,
    allow_random: bool = False,
) -> PatchEncoder:
    """Rebuild the encoder a feature file or model bundle records.

    Parameters
    ----------
    spec : PatchEncoderSpec or dict
        As stored (``FeatureFile.encoder_spec``, a bundle's patch-encoder spec).
    weights : path-like, optional
        The weights file (ViT/timm) or the TorchScript file (``torchscript:`` encoders,
        whose spec records only the file name). When the spec records a SHA-256, the file
        must match it.
    device : str or torch.device
    allow_random : bool
        Accept a spec of a random-init ViT (benchmarks).

    Raises
    ------
    ConfigError
        Missing weights, or weights other than those the spec was made with.
    """
    if isinstance(spec, dict):
        spec = PatchEncoderSpec.from_dict(spec)
    name = spec.name
    if spec.kind == "torchscript":
        if weights is None:
            raise ConfigError(
                f"the features were made by the TorchScript encoder {spec.weights_file!r}; "
                "give its file (weights=... / --weights FILE)."
            )
        name = f"torchscript:{weights}"
        weights = None
    kw: dict = {"input_px": spec.input_px, "mean": spec.mean, "std": spec.std}
    enc = create_patch_encoder(
        name, weights=weights, device=device, allow_random=allow_random, **kw
    )
    if spec.weights_sha256 and enc.spec.weights_sha256 != spec.weights_sha256:
        raise ConfigError(
            f"the weights given for {spec.name!r} differ from those the model was made with "
            f"(sha256 {str(enc.spec.weights_sha256)[:12]}… vs {spec.weights_sha256[:12]}…); "
            "use the same weights file."
        )
    if enc.spec.dim != spec.dim:
        raise ConfigError(
            f"encoder {spec.name!r} now gives {enc.spec.dim}-d features but the spec says {spec.dim}."
        )
    return enc
