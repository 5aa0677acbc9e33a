"""Device and precision choice in one place.

fp16 is never used on CPU: it is ~700x slower than bf16 on our CPUs (design §4).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Literal

import torch

from .errors import ConfigError

__all__ = ["Precision", "autocast", "resolve_device", "resolve_precision"]

Precision = Literal["auto", "fp32", "bf16"]


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """Map ``"auto" | "cpu" | "cuda" | "cuda:N"`` to a :class:`torch.device`.

    ``"auto"`` picks CUDA when available, else CPU. Asking for CUDA on a machine
    without it raises :class:`ConfigError` rather than failing deep inside torch.
    """
    if isinstance(device, torch.device):
        return device
    name = str(device).strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(
                f"device={device!r} was requested but this machine has no CUDA GPU "
                "(or torch was installed without CUDA); use --device cpu or auto."
            )
        return torch.device(name)
    if name == "cpu":
        return torch.device("cpu")
    raise ConfigError(f"device must be one of auto, cpu, cuda, cuda:N; got {device!r}.")


def resolve_precision(precision: Precision | str, device: torch.device) -> str:
    """Return ``"fp32"`` or ``"bf16"``.

    ``"auto"`` means bf16 on CUDA devices that support it and on CPUs with native
    bf16 matmul (AVX512-BF16 / AMX), fp32 otherwise.
    """
    p = str(precision).lower()
    if p in ("fp16", "float16", "half"):
        raise ConfigError("fp16 is not supported (it is extremely slow on CPU); use bf16 or fp32.")
    if p not in ("auto", "fp32", "bf16"):
        raise ConfigError(f"precision must be auto, fp32 or bf16; got {precision!r}.")
    if p != "auto":
        return p
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if _cpu_has_fast_bf16() else "fp32"


def _cpu_has_fast_bf16() -> bool:
    try:
        caps = torch.backends.cpu.get_cpu_capability()  # e.g. "AVX512", "AVX512_BF16"?
    except Exception:  # pragma: no cover - very old torch
        caps = ""
    if "AMX" in caps or "BF16" in caps:
        return True
    try:
        with open("/proc/cpuinfo") as fh:
            flags = fh.read()
        return "avx512_bf16" in flags or "amx_bf16" in flags
    except OSError:  # pragma: no cover - non-Linux
        return False


@contextlib.contextmanager
def autocast(device: torch.device, precision: str) -> Iterator[None]:
    """bf16 autocast on CPU or CUDA when ``precision == "bf16"``; a no-op for fp32."""
    if precision == "bf16":
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
            yield
    else:
        yield
