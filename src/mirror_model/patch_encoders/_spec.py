"""The patch-encoder contract: :class:`PatchEncoderSpec` and the :class:`PatchEncoder` base module.

Every patch encoder is an ``nn.Module`` that takes a float batch ``[B, 3, H, W]`` of RGB in
**[0, 1]** (H = W = ``spec.input_px``) and returns ``[B, spec.dim]`` float features.
**Normalisation happens inside the module** (``(x - spec.mean) / spec.std``), so callers
never normalise; ``spec.mean``/``spec.std`` record what the module applies.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "PatchEncoder", "PatchEncoderSpec"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class PatchEncoderSpec:
    """What a patch encoder is, recorded in feature files and model bundles (JSON-able).

    Attributes
    ----------
    name : str
        Registry name (``"stain-texture"``, ``"uni"``, ``"timm:vit_base_patch16_224"``,
        ``"torchscript:model.pt"`` ...). Feature files from different names do not mix.
    input_px : int
        Side of the square RGB input in pixels.
    mean, std : tuple of 3 floats
        Per-channel normalisation applied **inside** the module to [0, 1] RGB.
    dim : int
        Output feature dimension.
    kind : str
        ``"stain-texture"``, ``"vit"``, ``"timm"`` or ``"torchscript"``.
    architecture : str
        Architecture name (e.g. ``"vit_large_patch16_224"``).
    weights_sha256 : str or None
        SHA-256 of the weights file (None for weight-free or random-init encoders).
    weights_file : str or None
        Base name of the weights file (informative only).
    pretrained : bool
        False for random-init models (benchmarks only; their features carry no meaning).
    version : str
        Version of the encoder's definition (a change means features are not comparable).
    description : str
        One line for humans.
    """

    name: str
    input_px: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    dim: int
    kind: str
    architecture: str = ""
    weights_sha256: str | None = None
    weights_file: str | None = None
    pretrained: bool = True
    version: str = "1"
    description: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    normalization = "inside"  # class constant: the module normalises its [0, 1] input itself

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean"] = [float(v) for v in self.mean]
        d["std"] = [float(v) for v in self.std]
        d["normalization"] = self.normalization
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PatchEncoderSpec:
        try:
            known = {f.name for f in fields(cls)}
            kw = {k: v for k, v in d.items() if k in known}
            kw["mean"] = tuple(float(v) for v in kw["mean"])
            kw["std"] = tuple(float(v) for v in kw["std"])
            kw["input_px"] = int(kw["input_px"])
            kw["dim"] = int(kw["dim"])
            kw["extra"] = dict(kw.get("extra") or {})
            return cls(**kw)
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"invalid patch-encoder spec {d!r}: {exc}") from None

    @classmethod
    def from_json(cls, text: str) -> PatchEncoderSpec:
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as exc:
            raise ConfigError(f"invalid patch-encoder spec JSON: {exc}") from None


class PatchEncoder(nn.Module):
    """Base class: holds ``spec``; ``forward`` normalises [0, 1] input with
    ``spec.mean``/``spec.std``, resizes it to ``spec.input_px`` and calls :meth:`embed`.

    Subclasses implement :meth:`embed` (the network on a normalised, resized batch); an
    encoder with its own preprocessing overrides ``forward``.
    """

    spec: PatchEncoderSpec

    def __init__(self, spec: PatchEncoderSpec) -> None:
        super().__init__()
        self.spec = spec
        self.register_buffer(
            "_mean", torch.tensor(spec.mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False
        )
        self.register_buffer(
            "_std", torch.tensor(spec.std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False
        )

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != 3:
            raise ConfigError(
                f"patch encoder {self.spec.name!r} expects a [B, 3, H, W] batch, got {tuple(x.shape)}."
            )
        return (x - self._mean.to(x.dtype)) / self._std.to(x.dtype)

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised and, when needed, resized to ``spec.input_px`` (bilinear, antialiased)."""
        x = self.normalize(x)
        px = self.spec.input_px
        if x.shape[-2:] != (px, px):
            x = F.interpolate(
                x, size=(px, px), mode="bilinear", antialias=True, align_corners=False
            )
        return x

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Features ``[B, spec.dim]`` of a prepared batch."""
        raise NotImplementedError(f"{type(self).__name__} must implement embed()")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embed(self.prepare(x))

    def set_spec(self, spec: PatchEncoderSpec) -> None:
        self.spec = spec
        self._mean = torch.tensor(spec.mean, dtype=torch.float32, device=self._mean.device).view(
            1, 3, 1, 1
        )
        self._std = torch.tensor(spec.std, dtype=torch.float32, device=self._std.device).view(
            1, 3, 1, 1
        )
