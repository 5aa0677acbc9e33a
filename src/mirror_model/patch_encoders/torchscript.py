"""``torchscript:<path>``: a patch encoder exported by the user with ``torch.jit.save``.

Loading uses :func:`torch.jit.load`, which reads TorchScript code and tensors from the archive
and runs them in the TorchScript interpreter; it does not unpickle arbitrary Python objects.
The archive's code still runs, so only use files you trust.

The scripted module must map a normalised float batch ``[B, 3, input_px, input_px]`` to
``[B, D]`` (a ``[B, T, D]`` token output is rejected: export the pooled embedding). The user
gives ``input_px`` (default 224) and the normalisation ``mean``/``std`` (default ImageNet);
``D`` is measured by one forward pass.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from ..errors import ConfigError
from ._registry import EncoderOptions, register_patch_encoder
from ._spec import IMAGENET_MEAN, IMAGENET_STD, PatchEncoder, PatchEncoderSpec

__all__ = ["TorchScriptEncoder", "load_torchscript_encoder"]


class TorchScriptEncoder(PatchEncoder):
    """The scripted module behind the base class's normalisation and resize."""

    def __init__(self, module: torch.jit.ScriptModule, spec: PatchEncoderSpec) -> None:
        super().__init__(spec)
        self.module = module

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)


@register_patch_encoder("torchscript:", prefix=True, listed_as="torchscript:<path>")
def _create(path: str, options: EncoderOptions) -> TorchScriptEncoder:
    return load_torchscript_encoder(
        path, input_px=options.input_px, mean=options.mean, std=options.std
    )


def load_torchscript_encoder(
    path: str | os.PathLike[str],
    *,
    input_px: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> TorchScriptEncoder:
    """Load ``path`` with :func:`torch.jit.load` and wrap it as a :class:`PatchEncoder`."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"TorchScript model not found: {p}")
    px = int(input_px or 224)
    if px < 8:
        raise ConfigError(f"input_px must be at least 8, got {px}.")
    mean_t = tuple(float(v) for v in (mean or IMAGENET_MEAN))
    std_t = tuple(float(v) for v in (std or IMAGENET_STD))
    if len(mean_t) != 3 or len(std_t) != 3 or any(s <= 0 for s in std_t):
        raise ConfigError(
            f"mean/std must be 3 numbers each with std > 0; got mean={mean_t}, std={std_t}."
        )
    try:
        module = torch.jit.load(str(p), map_location="cpu")
    except Exception as exc:
        raise ConfigError(
            f"{p}: not a TorchScript archive ({str(exc).splitlines()[0] if str(exc) else exc}). "
            "Export the model with torch.jit.script(model) or torch.jit.trace(...) and torch.jit.save."
        ) from None
    module.eval()
    try:
        with torch.no_grad():
            y = module(torch.zeros(2, 3, px, px))
    except Exception as exc:
        raise ConfigError(
            f"{p}: the model fails on a [2, 3, {px}, {px}] input ({exc}); check --input-px."
        ) from None
    if not isinstance(y, torch.Tensor) or y.ndim != 2 or y.shape[0] != 2:
        shape = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
        raise ConfigError(
            f"{p}: the model must return a [B, D] tensor of features, it returned {shape}."
        )
    h = hashlib.sha256()
    with open(p, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    spec = PatchEncoderSpec(
        name=f"torchscript:{p.name}",
        input_px=px,
        mean=mean_t,  # type: ignore[arg-type]
        std=std_t,  # type: ignore[arg-type]
        dim=int(y.shape[1]),
        kind="torchscript",
        architecture=p.name,
        weights_sha256=h.hexdigest(),
        weights_file=p.name,
        description="user TorchScript model",
    )
    return TorchScriptEncoder(module, spec)
