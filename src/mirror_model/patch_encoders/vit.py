"""A Vision Transformer whose state-dict keys match timm's ``VisionTransformer``.

So timm-format weights of pathology foundation models load from a local file without timm:
``patch_embed.proj``, ``cls_token``, ``reg_token``, ``pos_embed``, ``blocks.N.norm1``,
``blocks.N.attn.qkv``, ``blocks.N.attn.proj``, ``blocks.N.ls1.gamma``, ``blocks.N.norm2``,
``blocks.N.mlp.fc1``/``fc2``, ``blocks.N.ls2.gamma``, ``norm`` (``head.*`` is ignored).
Hugging Face ``ViTModel`` checkpoints (Phikon) are remapped to these keys on load.

Named configurations (architecture as published by the model authors; weights are the
user's own local files — nothing is downloaded):

============  =====================================================  =========  ======
name          architecture                                           output     dim
============  =====================================================  =========  ======
uni           ViT-L/16, LayerScale 1e-5                               CLS        1024
uni2-h        ViT-H/14-like 1536 wide, 24 blocks, SwiGLU, 8 registers CLS        1536
phikon        ViT-B/16 (Hugging Face layout, LayerNorm eps 1e-12)     CLS        768
virchow       ViT-H/14, SwiGLU, LayerScale 1e-5                       CLS ‖ mean 2560
virchow2      as virchow + 4 register tokens                          CLS ‖ mean 2560
============  =====================================================  =========  ======

plus generic ``vit_{tiny,small,base,large,huge,giant}_patch{14,16}_{224,...}`` (CLS output).
All take 224 px input with ImageNet normalisation unless ``mean``/``std``/``input_px`` are given;
position embeddings are resampled (bicubic) when the input grid differs from the checkpoint's.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .._io import load_tensors
from ..errors import ConfigError
from ._registry import EncoderOptions, register_patch_encoder
from ._spec import IMAGENET_MEAN, IMAGENET_STD, PatchEncoder, PatchEncoderSpec

__all__ = [
    "NAMED_VITS",
    "VIT_ARCHS",
    "ViTConfig",
    "VisionTransformer",
    "ViTPatchEncoder",
    "create_timm_encoder",
    "create_vit_encoder",
    "load_state_dict_file",
    "remap_hf_vit_state_dict",
    "vit_config",
]

# size -> (embed_dim, depth, num_heads, mlp_ratio), as timm defines them
_SIZES = {
    "tiny": (192, 12, 3, 4.0),
    "small": (384, 12, 6, 4.0),
    "base": (768, 12, 12, 4.0),
    "large": (1024, 24, 16, 4.0),
    "huge": (1280, 32, 16, 4.0),
    "giant": (1408, 40, 16, 48 / 11),
}
_ARCH_RE = re.compile(r"^vit_(tiny|small|base|large|huge|giant)_patch(\d+)_(\d+)$")


@dataclass(frozen=True)
class ViTConfig:
    """Architecture of a :class:`VisionTransformer` (timm's argument names)."""

    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    patch_size: int = 16
    img_size: int = 224
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    init_values: float | None = None  # LayerScale (ls1/ls2.gamma) when set
    reg_tokens: int = 0
    no_embed_class: bool = False  # pos_embed excludes the prefix tokens (timm no_embed_class)
    mlp_layer: str = "mlp"  # "mlp" (GELU) or "swiglu_packed" (timm SwiGLUPacked, SiLU gate)
    pool: str = "token"  # "token" (CLS), "avg" (mean patch tokens) or "token+avg" (concatenated)
    layer_norm_eps: float = 1e-6
    checkpoint_layout: str = "timm"  # "timm" or "hf" (Hugging Face ViTModel keys)

    @property
    def out_dim(self) -> int:
        return self.embed_dim * (2 if self.pool == "token+avg" else 1)


def vit_config(arch: str) -> ViTConfig:
    """Config of a generic ``vit_<size>_patch<p>_<px>`` architecture name."""
    m = _ARCH_RE.match(arch)
    if not m:
        raise ConfigError(
            f"not a ViT architecture name: {arch!r} (expected e.g. vit_base_patch16_224)."
        )
    size, patch, px = m.group(1), int(m.group(2)), int(m.group(3))
    dim, depth, heads, ratio = _SIZES[size]
    if px % patch:
        raise ConfigError(f"{arch}: input size {px} is not a multiple of the patch size {patch}.")
    return ViTConfig(
        embed_dim=dim, depth=depth, num_heads=heads, patch_size=patch, img_size=px, mlp_ratio=ratio
    )


VIT_ARCHS: tuple[str, ...] = tuple(
    f"vit_{s}_patch{p}_224" for s in ("tiny", "small", "base", "large", "huge") for p in (16, 14)
) + ("vit_giant_patch14_224",)

_VIRCHOW = replace(
    vit_config("vit_huge_patch14_224"),
    mlp_ratio=5.3375,
    init_values=1e-5,
    mlp_layer="swiglu_packed",
    pool="token+avg",
)

NAMED_VITS: dict[str, ViTConfig] = {
    "uni": replace(vit_config("vit_large_patch16_224"), init_values=1e-5),
    "uni2-h": ViTConfig(
        embed_dim=1536,
        depth=24,
        num_heads=24,
        patch_size=14,
        img_size=224,
        mlp_ratio=2.66667 * 2,
        init_values=1e-5,
        reg_tokens=8,
        no_embed_class=True,
        mlp_layer="swiglu_packed",
    ),
    "phikon": replace(
        vit_config("vit_base_patch16_224"), layer_norm_eps=1e-12, checkpoint_layout="hf"
    ),
    "virchow": _VIRCHOW,
    "virchow2": replace(_VIRCHOW, reg_tokens=4),  # Virchow2 = Virchow + 4 register tokens
}


# --------------------------------------------------------------------------- modules


class _Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden // 2 if kind == "swiglu_packed" else hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc1(x)
        if self.kind == "swiglu_packed":
            x1, x2 = x.chunk(2, dim=-1)
            x = F.silu(x1) * x2  # timm GluMlp(gate_last=False): act(x1) * x2
        else:
            x = F.gelu(x)
        return self.fc2(x)


class _LayerScale(nn.Module):
    def __init__(self, dim: int, init_values: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(init_values * torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class _Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool) -> None:
        super().__init__()
        if dim % num_heads:
            raise ConfigError(f"ViT width {dim} is not divisible by {num_heads} heads.")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = (
            self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        )
        x = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class _Block(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        d = cfg.embed_dim
        self.norm1 = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.attn = _Attention(d, cfg.num_heads, cfg.qkv_bias)
        self.ls1 = _LayerScale(d, cfg.init_values) if cfg.init_values else nn.Identity()
        self.norm2 = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.mlp = _Mlp(d, int(d * cfg.mlp_ratio), cfg.mlp_layer)
        self.ls2 = _LayerScale(d, cfg.init_values) if cfg.init_values else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class _PatchEmbed(nn.Module):
    def __init__(self, patch: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class VisionTransformer(nn.Module):
    """timm-compatible ViT trunk returning the pooled embedding ``[B, cfg.out_dim]``.

    Input: normalised images ``[B, 3, H, W]`` with H, W multiples of the patch size.
    """

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.embed_dim
        self.patch_embed = _PatchEmbed(cfg.patch_size, d)
        self.grid = cfg.img_size // cfg.patch_size
        self.num_prefix = 1 + cfg.reg_tokens
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.reg_token = nn.Parameter(torch.zeros(1, cfg.reg_tokens, d)) if cfg.reg_tokens else None
        embed_len = self.grid**2 + (0 if cfg.no_embed_class else self.num_prefix)
        self.pos_embed = nn.Parameter(torch.randn(1, embed_len, d) * 0.02)
        self.blocks = nn.Sequential(*[_Block(cfg) for _ in range(cfg.depth)])
        self.norm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.reg_token is not None:
            nn.init.normal_(self.reg_token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def _pos_embed(self, x: torch.Tensor, gh: int, gw: int) -> torch.Tensor:
        b = x.shape[0]
        pos = self.pos_embed
        n_pre_pos = 0 if self.cfg.no_embed_class else self.num_prefix
        if (gh, gw) != (self.grid, self.grid):
            pos = resample_pos_embed(pos, (gh, gw), n_pre_pos)
        prefix = [self.cls_token.expand(b, -1, -1)]
        if self.reg_token is not None:
            prefix.append(self.reg_token.expand(b, -1, -1))
        if self.cfg.no_embed_class:
            x = x + pos
            return torch.cat(prefix + [x], 1)
        return torch.cat(prefix + [x], 1) + pos

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """All output tokens after the final norm: ``[B, prefix + patches, D]``."""
        x = self.patch_embed(x)
        gh, gw = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)
        x = self._pos_embed(x, gh, gw)
        x = self.blocks(x)
        return self.norm(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.forward_tokens(x)
        cls, patches = t[:, 0], t[:, self.num_prefix :]
        if self.cfg.pool == "token":
            return cls
        if self.cfg.pool == "avg":
            return patches.mean(1)
        return torch.cat([cls, patches.mean(1)], -1)


def resample_pos_embed(
    pos: torch.Tensor, new_grid: tuple[int, int], num_prefix: int
) -> torch.Tensor:
    """Bicubically resample absolute position embeddings to a new patch grid (timm's method)."""
    prefix, grid_pos = pos[:, :num_prefix], pos[:, num_prefix:]
    n = grid_pos.shape[1]
    old = int(math.isqrt(n))
    if old * old != n:
        raise ConfigError(
            f"position embedding of {n} patch tokens is not a square grid; cannot resample it."
        )
    d = grid_pos.shape[-1]
    g = grid_pos.reshape(1, old, old, d).permute(0, 3, 1, 2).float()
    g = F.interpolate(g, size=new_grid, mode="bicubic", antialias=True, align_corners=False)
    g = g.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], d).to(pos.dtype)
    return torch.cat([prefix, g], 1)


# --------------------------------------------------------------------------- weights


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def load_state_dict_file(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Load a state dict from safetensors, or ``.bin``/``.pth``/``.pt`` with ``weights_only=True``.

    Nested ``{"state_dict": ...}`` / ``{"model": ...}`` checkpoints are unwrapped. Nothing but
    tensors is ever unpickled.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"weights file not found: {p}")
    if p.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        try:
            return dict(load_file(str(p), device="cpu"))
        except Exception as exc:
            raise ConfigError(f"{p}: not a readable safetensors file ({exc}).") from None
    obj = load_tensors(
        p, ConfigError, "checkpoint",
        "Convert it to safetensors, or save only the state dict.",
    )  # fmt: skip
    for key in ("state_dict", "model", "teacher", "module"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ConfigError(
            f"{p}: expected a state dict (name -> tensor), found {type(obj).__name__}."
        )
    return dict(obj)


def remap_hf_vit_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map Hugging Face ``ViTModel`` keys (Phikon) to timm ``VisionTransformer`` keys."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[int, dict[str, dict[str, torch.Tensor]]] = {}
    for k, v in sd.items():
        k = re.sub(r"^(vit|model|backbone)\.", "", k)
        if k.startswith("pooler.") or k.startswith("classifier."):
            continue
        if k == "embeddings.cls_token":
            out["cls_token"] = v
        elif k == "embeddings.position_embeddings":
            out["pos_embed"] = v
        elif k.startswith("embeddings.patch_embeddings.projection."):
            out["patch_embed.proj." + k.rsplit(".", 1)[1]] = v
        elif k.startswith("embeddings.mask_token"):
            continue
        elif k.startswith("layernorm."):
            out["norm." + k.rsplit(".", 1)[1]] = v
        else:
            m = re.match(r"^encoder\.layer\.(\d+)\.(.+)\.(weight|bias)$", k)
            if not m:
                out[k] = v  # unknown key: reported by the strict load
                continue
            i, mod, kind = int(m.group(1)), m.group(2), m.group(3)
            b = f"blocks.{i}."
            if mod in (
                "attention.attention.query",
                "attention.attention.key",
                "attention.attention.value",
            ):
                qkv.setdefault(i, {}).setdefault(kind, {})[mod.rsplit(".", 1)[1]] = v
            elif mod == "attention.output.dense":
                out[b + "attn.proj." + kind] = v
            elif mod == "layernorm_before":
                out[b + "norm1." + kind] = v
            elif mod == "layernorm_after":
                out[b + "norm2." + kind] = v
            elif mod == "intermediate.dense":
                out[b + "mlp.fc1." + kind] = v
            elif mod == "output.dense":
                out[b + "mlp.fc2." + kind] = v
            else:
                out[k] = v
    for i, kinds in qkv.items():
        for kind, parts in kinds.items():
            if set(parts) != {"query", "key", "value"}:
                raise ConfigError(
                    f"Hugging Face checkpoint: layer {i} lacks one of query/key/value {kind}."
                )
            out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat(
                [parts["query"], parts["key"], parts["value"]], 0
            )
    return out


def _clean_timm_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in sd.items():
        k = (
            re.sub(r"^(module|model|backbone|encoder|trunk)\.", "", k)
            if not k.startswith("encoder.layer.")
            else k
        )
        if k.startswith(("head.", "fc_norm.", "head_drop.")) or k == "mask_token":
            continue
        out[k] = v
    return out


def load_vit_weights(model: VisionTransformer, path: str | os.PathLike[str]) -> None:
    """Load timm- or Hugging-Face-layout weights into ``model`` (strict; clear errors)."""
    sd = load_state_dict_file(path)
    if any(k.startswith(("embeddings.", "encoder.layer.", "vit.embeddings.")) for k in sd):
        sd = remap_hf_vit_state_dict(sd)
    sd = _clean_timm_state_dict(sd)
    pos = sd.get("pos_embed")
    if pos is not None and pos.shape != model.pos_embed.shape:
        n_pre = 0 if model.cfg.no_embed_class else model.num_prefix
        if pos.ndim == 3 and pos.shape[-1] == model.pos_embed.shape[-1]:
            sd["pos_embed"] = resample_pos_embed(pos, (model.grid, model.grid), n_pre)
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    wrong = sorted(k for k in set(own) & set(sd) if own[k].shape != sd[k].shape)
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} (e.g. {', '.join(unexpected[:3])})")
        if wrong:
            k = wrong[0]
            parts.append(
                f"{len(wrong)} with other shapes (e.g. {k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)})"
            )
        raise ConfigError(
            f"{path}: these weights do not fit the chosen architecture — {'; '.join(parts)}. "
            "Check that --encoder names the model these weights belong to."
        )
    model.load_state_dict(sd, strict=True)


# --------------------------------------------------------------------------- encoders


class ViTPatchEncoder(PatchEncoder):
    """:class:`VisionTransformer` behind the base class's normalisation and resize."""

    def __init__(self, vit: nn.Module, spec: PatchEncoderSpec) -> None:
        super().__init__(spec)
        self.vit = vit

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.vit(x)


def _random_or_error(name: str, allow_random: bool) -> None:
    if not allow_random:
        raise ConfigError(
            f"patch encoder {name!r} needs its pretrained weights: pass a local file with weights=... "
            f"(--weights FILE; safetensors preferred, timm or Hugging Face key layout). Random weights are "
            "only for benchmarks (allow_random=True / --allow-random-weights)."
        )


def create_vit_encoder(
    name: str, options: EncoderOptions | None = None, *, registry_name: str | None = None
) -> ViTPatchEncoder:
    """Our ViT for a named model (``uni``, ``phikon`` ...) or a ``vit_*`` architecture."""
    o = options or EncoderOptions()
    weights = o.weights
    key = name.lower()
    cfg = NAMED_VITS[key] if key in NAMED_VITS else vit_config(key)
    if o.input_px is not None:
        if int(o.input_px) % cfg.patch_size:
            raise ConfigError(
                f"input_px {o.input_px} is not a multiple of the patch size {cfg.patch_size} of {name}."
            )
    # check the cheap things before building a model of up to ~700M parameters
    if weights is None:
        _random_or_error(registry_name or name, o.allow_random)
    elif not Path(weights).expanduser().is_file():
        raise ConfigError(f"weights file not found: {Path(weights).expanduser()}")
    vit = VisionTransformer(cfg)
    sha = None
    if weights is not None:
        weights = Path(weights).expanduser()
        load_vit_weights(vit, weights)
        sha = _sha256(weights)
    spec = PatchEncoderSpec(
        name=registry_name or key,
        input_px=int(o.input_px or cfg.img_size),
        mean=tuple(float(v) for v in (o.mean or IMAGENET_MEAN)),  # type: ignore[arg-type]
        std=tuple(float(v) for v in (o.std or IMAGENET_STD)),  # type: ignore[arg-type]
        dim=cfg.out_dim,
        kind="vit",
        architecture=key
        if key not in NAMED_VITS
        else f"{key} (ViT {cfg.embed_dim}x{cfg.depth}, patch {cfg.patch_size})",
        weights_sha256=sha,
        weights_file=Path(weights).name if weights is not None else None,
        pretrained=weights is not None,
        description="timm-compatible ViT"
        + ("" if weights is not None else " with RANDOM weights (benchmark only)"),
    )
    _check_spec(spec)
    return ViTPatchEncoder(vit, spec)


def _check_spec(spec: PatchEncoderSpec) -> None:
    if len(spec.mean) != 3 or len(spec.std) != 3 or any(s <= 0 for s in spec.std):
        raise ConfigError(
            f"mean/std must be 3 numbers each with std > 0; got mean={spec.mean}, std={spec.std}."
        )


class _TimmEncoder(PatchEncoder):
    """A timm model behind the base class's normalisation and resize."""

    def __init__(self, model: nn.Module, spec: PatchEncoderSpec) -> None:
        super().__init__(spec)
        self.model = model

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        y = self.model(x)
        return y.flatten(1) if y.ndim > 2 else y


def create_timm_encoder(model_name: str, options: EncoderOptions | None = None) -> PatchEncoder:
    """``timm:<model_name>``: timm's model when timm imports, else our ViT for ``vit_*`` names.

    With timm, ``options.weights`` is a local file (``pretrained_cfg_overlay=dict(file=...)``);
    without weights the model is fetched from timm's hub cache (needs it cached or network)
    unless ``options.allow_random``.
    """
    o = options or EncoderOptions()
    weights = o.weights
    registry_name = f"timm:{model_name}"
    try:
        import timm
    except Exception:  # not installed, or it fails to import beside this torch
        timm = None
    if timm is None:
        if _ARCH_RE.match(model_name.lower()):
            return create_vit_encoder(model_name, o, registry_name=registry_name)
        raise ConfigError(
            f"{registry_name}: timm is not installed (or does not import beside this torch), and "
            f"{model_name!r} is not one of our built-in ViTs ({', '.join(VIT_ARCHS)}, {', '.join(NAMED_VITS)}). "
            "Install timm (pip install timm) or choose a built-in name."
        )
    kw: dict[str, object] = {"num_classes": 0}
    if weights is not None:
        kw["pretrained"] = True
        kw["pretrained_cfg_overlay"] = {"file": str(Path(weights).expanduser())}
        if not Path(weights).expanduser().is_file():
            raise ConfigError(f"weights file not found: {weights}")
    elif o.allow_random:
        kw["pretrained"] = False
    else:
        kw["pretrained"] = True
    try:
        model = timm.create_model(model_name, **kw)
    except Exception as exc:
        hint = (
            ""
            if weights is not None
            else " (no --weights given, so timm tried its hub; pass a local file instead)"
        )
        raise ConfigError(
            f"{registry_name}: timm could not create the model: {exc}{hint}"
        ) from None
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    size = int(o.input_px or (cfg.get("input_size") or (3, 224, 224))[-1])
    model.eval()
    with torch.no_grad():
        dim = int(model(torch.zeros(1, 3, size, size)).flatten(1).shape[1])
    spec = PatchEncoderSpec(
        name=registry_name,
        input_px=size,
        mean=tuple(float(v) for v in (o.mean or cfg.get("mean") or IMAGENET_MEAN)),  # type: ignore[arg-type]
        std=tuple(float(v) for v in (o.std or cfg.get("std") or IMAGENET_STD)),  # type: ignore[arg-type]
        dim=dim,
        kind="timm",
        architecture=model_name,
        weights_sha256=_sha256(Path(weights).expanduser()) if weights is not None else None,
        weights_file=Path(weights).name if weights is not None else None,
        pretrained=kw["pretrained"] is True,
        description="timm model",
    )
    _check_spec(spec)
    return _TimmEncoder(model, spec)


# --------------------------------------------------------------------------- registry
for _name in (*NAMED_VITS, *VIT_ARCHS):
    register_patch_encoder(_name)(create_vit_encoder)
register_patch_encoder("timm:", prefix=True, listed_as="timm:<model_name>")(create_timm_encoder)
