"""Patch encoders: the embedded stain-texture baseline, timm-compatible ViT, TorchScript."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _slides import E_VEC, H_VEC, nuclei_texture, stain_rgb, stroma_texture
from safetensors.torch import save_file
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from mirror_model.errors import ConfigError
from mirror_model.patch_encoders import (
    PatchEncoderSpec,
    create_patch_encoder,
    list_patch_encoders,
)
from mirror_model.patch_encoders.vit import (
    NAMED_VITS,
    VisionTransformer,
    ViTConfig,
    load_vit_weights,
    vit_config,
)


@pytest.fixture(scope="module")
def stain() -> torch.nn.Module:
    return create_patch_encoder("stain-texture")


def _batch(images: list[np.ndarray]) -> torch.Tensor:
    return torch.tensor(np.stack(images), dtype=torch.float32).permute(0, 3, 1, 2)


def _probe_accuracy(x: np.ndarray, y: np.ndarray) -> float:
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000))
    return float(cross_val_score(probe, x, y, cv=5).mean())


# --------------------------------------------------------------------------- registry


def test_registry_names_and_unknown() -> None:
    names = list_patch_encoders()
    for n in (
        "stain-texture",
        "uni",
        "phikon",
        "virchow",
        "virchow2",
        "uni2-h",
        "vit_small_patch16_224",
        "timm:<model_name>",
        "torchscript:<path>",
    ):
        assert n in names
    with pytest.raises(
        ConfigError, match=r"unknown patch encoder 'resnet9000'.*Known: stain-texture"
    ):
        create_patch_encoder("resnet9000")
    with pytest.raises(ConfigError, match="no weights"):
        create_patch_encoder("stain-texture", weights="x.safetensors")
    with pytest.raises(ConfigError, match="fixed input"):
        create_patch_encoder("stain-texture", input_px=224)


# --------------------------------------------------------------------------- stain-texture


def test_stain_texture_spec(stain: torch.nn.Module) -> None:
    spec = stain.spec
    assert spec.name == "stain-texture" and spec.kind == "stain-texture"
    assert spec.input_px == 64 and spec.dim == 132
    assert spec.mean == (0.0, 0.0, 0.0) and spec.std == (1.0, 1.0, 1.0)
    assert PatchEncoderSpec.from_json(spec.to_json()) == spec
    assert spec.to_dict()["normalization"] == "inside"


def test_stain_texture_output_finite_deterministic_batch_independent(
    stain: torch.nn.Module,
) -> None:
    rng = np.random.default_rng(0)
    imgs = [
        nuclei_texture(rng),
        stroma_texture(rng),
        np.ones((64, 64, 3)),
        np.zeros((64, 64, 3)),
        rng.uniform(0, 1, (64, 64, 3)),
    ]
    x = _batch(imgs)
    with torch.no_grad():
        y = stain(x)
        assert y.shape == (5, 132) and y.dtype == torch.float32
        assert torch.isfinite(y).all()
        assert torch.equal(stain(x), y)  # deterministic
        single = torch.cat([stain(x[i : i + 1]) for i in range(5)])
    torch.testing.assert_close(single, y, atol=1e-5, rtol=1e-5)  # no batch interaction


def test_stain_texture_dihedral_invariance(stain: torch.nn.Module) -> None:
    rng = np.random.default_rng(3)
    x = _batch([stroma_texture(rng) for _ in range(3)])
    with torch.no_grad():
        y = stain(x)
        for t in (torch.rot90(x, 1, (2, 3)), x.flip(3), x.flip(2), x.transpose(2, 3)):
            torch.testing.assert_close(stain(t), y, atol=1e-4, rtol=1e-4)


def test_stain_texture_colour_deconvolution_closed_form(stain: torch.nn.Module) -> None:
    # a flat image of pure haematoxylin at concentration 0.5 (Beer-Lambert) -> H = 0.5, E = R = 0
    h = np.full((64, 64), 0.5)
    x = _batch([stain_rgb(h, np.zeros_like(h))])
    with torch.no_grad():
        y = stain(x)[0]
    assert y[0].item() == pytest.approx(math.asinh(10 * 0.5), abs=1e-3)  # mean H
    assert y[1].item() == pytest.approx(0.0, abs=1e-3)  # mean E
    assert y[2].item() == pytest.approx(0.0, abs=1e-3)  # mean residual
    od = 0.5 * H_VEC  # mean OD of R, G, B
    np.testing.assert_allclose(y[3:6].numpy(), np.arcsinh(10 * od), atol=1e-3)
    # the same with eosin
    x = _batch([stain_rgb(np.zeros_like(h), np.full((64, 64), 0.3))])
    with torch.no_grad():
        y = stain(x)[0]
    assert y[1].item() == pytest.approx(math.asinh(3.0), abs=1e-3)
    assert y[0].item() == pytest.approx(0.0, abs=1e-3)
    np.testing.assert_allclose(y[3:6].numpy(), np.arcsinh(10 * 0.3 * E_VEC), atol=1e-3)


def test_stain_texture_separates_nuclei_from_stroma(stain: torch.nn.Module) -> None:
    rng = np.random.default_rng(0)
    x = _batch([nuclei_texture(rng) for _ in range(40)] + [stroma_texture(rng) for _ in range(40)])
    y = np.r_[np.zeros(40), np.ones(40)]
    with torch.no_grad():
        feats = stain(x).numpy()
    assert _probe_accuracy(feats, y) >= 0.95  # chance is 0.5


def _blobs(rng: np.random.Generator, elongated: bool, px: int = 64) -> np.ndarray:
    """Same stain amounts, same blob area; only the blob shape differs."""
    yy, xx = np.mgrid[0:px, 0:px].astype(np.float64)
    h = np.full((px, px), 0.08)
    e = np.full((px, px), 0.3) + 0.05 * rng.standard_normal((px, px))
    s1, s2 = (4.0, 1.0) if elongated else (2.0, 2.0)
    for _ in range(20):
        cy, cx = rng.uniform(0, px, 2)
        th = rng.uniform(0, np.pi)
        u = (xx - cx) * np.cos(th) + (yy - cy) * np.sin(th)
        v = -(xx - cx) * np.sin(th) + (yy - cy) * np.cos(th)
        h += 0.6 * np.exp(-(u**2) / (2 * s1 * s1) - v**2 / (2 * s2 * s2))
    return stain_rgb(h, e)


def test_stain_texture_sees_texture_not_only_colour(stain: torch.nn.Module) -> None:
    rng = np.random.default_rng(1)
    x = _batch([_blobs(rng, False) for _ in range(40)] + [_blobs(rng, True) for _ in range(40)])
    y = np.r_[np.zeros(40), np.ones(40)]
    with torch.no_grad():
        feats = stain(x).numpy()
    assert _probe_accuracy(feats[:, :6], y) <= 0.8  # mean stain amounts barely differ ...
    assert _probe_accuracy(feats, y) >= 0.95  # ... the texture features separate the classes


def test_stain_texture_ignores_bf16_autocast_and_resizes(stain: torch.nn.Module) -> None:
    rng = np.random.default_rng(2)
    x = _batch([nuclei_texture(rng, 128) for _ in range(2)])
    with torch.no_grad():
        ref = stain(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = stain(x)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref)
    with torch.no_grad():
        small = stain(
            F.interpolate(x, size=(64, 64), mode="bilinear", antialias=True, align_corners=False)
        )
    torch.testing.assert_close(small, ref)


# --------------------------------------------------------------------------- ViT


def _timm_keys(depth: int) -> set[str]:
    keys = {
        "cls_token",
        "pos_embed",
        "patch_embed.proj.weight",
        "patch_embed.proj.bias",
        "norm.weight",
        "norm.bias",
    }
    for i in range(depth):
        for part in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"):
            keys |= {f"blocks.{i}.{part}.weight", f"blocks.{i}.{part}.bias"}
    return keys


def test_vit_keys_match_timm_naming() -> None:
    vit = VisionTransformer(vit_config("vit_small_patch16_224"))
    sd = vit.state_dict()
    assert set(sd) == _timm_keys(12)
    assert sd["pos_embed"].shape == (1, 197, 384)
    assert sd["blocks.0.attn.qkv.weight"].shape == (1152, 384)
    assert sd["blocks.0.mlp.fc1.weight"].shape == (1536, 384)
    assert sd["patch_embed.proj.weight"].shape == (384, 3, 16, 16)


def test_vit_layerscale_registers_swiglu_keys() -> None:
    cfg = ViTConfig(
        embed_dim=64,
        depth=2,
        num_heads=4,
        patch_size=16,
        init_values=1e-5,
        reg_tokens=4,
        mlp_layer="swiglu_packed",
        pool="token+avg",
    )
    vit = VisionTransformer(cfg)
    sd = vit.state_dict()
    assert sd["reg_token"].shape == (1, 4, 64)
    assert sd["pos_embed"].shape == (1, 196 + 5, 64)
    assert sd["blocks.1.ls1.gamma"].shape == (64,) and "blocks.1.ls2.gamma" in sd
    assert sd["blocks.0.mlp.fc1.weight"].shape == (256, 64) and sd[
        "blocks.0.mlp.fc2.weight"
    ].shape == (64, 128)
    assert vit(torch.rand(2, 3, 224, 224)).shape == (2, 128)
    cfg2 = ViTConfig(embed_dim=64, depth=1, num_heads=4, reg_tokens=8, no_embed_class=True)
    assert VisionTransformer(cfg2).state_dict()["pos_embed"].shape == (1, 196, 64)


def test_named_vit_dimensions() -> None:
    dims = {k: v.out_dim for k, v in NAMED_VITS.items()}
    assert dims == {"uni": 1024, "uni2-h": 1536, "phikon": 768, "virchow": 2560, "virchow2": 2560}
    assert NAMED_VITS["uni"].init_values == 1e-5 and NAMED_VITS["uni"].patch_size == 16
    assert NAMED_VITS["virchow2"].reg_tokens == 4 and NAMED_VITS["uni2-h"].reg_tokens == 8


def test_vit_needs_weights_unless_random_allowed() -> None:
    with pytest.raises(ConfigError, match=r"'uni' needs its pretrained weights.*--weights"):
        create_patch_encoder("uni")
    enc = create_patch_encoder("vit_tiny_patch16_224", allow_random=True)
    assert enc.spec.pretrained is False and enc.spec.dim == 192 and enc.spec.input_px == 224
    assert "RANDOM" in enc.spec.description
    with torch.no_grad():
        assert enc(torch.rand(2, 3, 224, 224)).shape == (2, 192)


def _reference_vit(
    sd: dict[str, torch.Tensor], x: torch.Tensor, heads: int, eps: float = 1e-6
) -> torch.Tensor:
    """Textbook pre-norm ViT forward from a timm-layout state dict (CLS output)."""
    x = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=16)
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([sd["cls_token"].expand(x.shape[0], -1, -1), x], 1) + sd["pos_embed"]
    d = x.shape[-1]
    i = 0
    while f"blocks.{i}.norm1.weight" in sd:
        p = f"blocks.{i}."
        h = F.layer_norm(x, (d,), sd[p + "norm1.weight"], sd[p + "norm1.bias"], eps)
        q, k, v = F.linear(h, sd[p + "attn.qkv.weight"], sd[p + "attn.qkv.bias"]).chunk(3, -1)
        split = lambda t: t.reshape(t.shape[0], t.shape[1], heads, d // heads).transpose(1, 2)  # noqa: E731
        q, k, v = split(q), split(k), split(v)
        a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // heads), -1) @ v
        a = a.transpose(1, 2).reshape(x.shape)
        x = x + F.linear(a, sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"])
        h = F.layer_norm(x, (d,), sd[p + "norm2.weight"], sd[p + "norm2.bias"], eps)
        h = F.linear(
            F.gelu(F.linear(h, sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"])),
            sd[p + "mlp.fc2.weight"],
            sd[p + "mlp.fc2.bias"],
        )
        x = x + h
        i += 1
    x = F.layer_norm(x, (d,), sd["norm.weight"], sd["norm.bias"], eps)
    return x[:, 0]


def _random_timm_state_dict(cfg: ViTConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = {k: v.shape for k, v in VisionTransformer(cfg).state_dict().items()}
    sd = {k: torch.randn(s, generator=g) * 0.05 for k, s in shapes.items()}
    for k in sd:
        if "norm" in k and k.endswith("weight"):
            sd[k] = 1 + sd[k]
    return sd


def test_vit_loads_timm_layout_safetensors(tmp_path: Path) -> None:
    cfg = vit_config("vit_tiny_patch16_224")
    sd = _random_timm_state_dict(cfg)
    sd_file = dict(sd)
    sd_file["head.weight"] = torch.zeros(1000, 192)  # a timm classifier head is ignored
    sd_file["head.bias"] = torch.zeros(1000)
    path = tmp_path / "vit_tiny.safetensors"
    save_file(sd_file, str(path))
    enc = create_patch_encoder("vit_tiny_patch16_224", weights=path)
    assert enc.spec.pretrained and enc.spec.weights_file == "vit_tiny.safetensors"
    assert len(enc.spec.weights_sha256) == 64
    x = torch.rand(2, 3, 224, 224)
    with torch.no_grad():
        got = enc(x)
        mean = torch.tensor(enc.spec.mean).view(1, 3, 1, 1)
        std = torch.tensor(enc.spec.std).view(1, 3, 1, 1)
        want = _reference_vit(sd, (x - mean) / std, heads=3)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    # timm: prefix gives the same model under its own name
    enc2 = create_patch_encoder("timm:vit_tiny_patch16_224", weights=path)
    assert enc2.spec.name == "timm:vit_tiny_patch16_224"
    with torch.no_grad():
        torch.testing.assert_close(enc2(x), got)
    # another input size: position embeddings are resampled, output still [B, D]
    enc3 = create_patch_encoder("vit_tiny_patch16_224", weights=path, input_px=256)
    with torch.no_grad():
        assert enc3(torch.rand(1, 3, 256, 256)).shape == (1, 192)


def _to_hf(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm keys -> Hugging Face ViTModel keys (as Phikon ships them)."""
    out = {
        "vit.embeddings.cls_token": sd["cls_token"],
        "vit.embeddings.position_embeddings": sd["pos_embed"],
        "vit.embeddings.patch_embeddings.projection.weight": sd["patch_embed.proj.weight"],
        "vit.embeddings.patch_embeddings.projection.bias": sd["patch_embed.proj.bias"],
        "vit.layernorm.weight": sd["norm.weight"],
        "vit.layernorm.bias": sd["norm.bias"],
        "vit.pooler.dense.weight": torch.zeros(4, 4),
    }
    i = 0
    while f"blocks.{i}.norm1.weight" in sd:
        p, q = f"blocks.{i}.", f"vit.encoder.layer.{i}."
        for kind in ("weight", "bias"):
            qw, kw, vw = sd[p + "attn.qkv." + kind].chunk(3, 0)
            out[q + "attention.attention.query." + kind] = qw
            out[q + "attention.attention.key." + kind] = kw
            out[q + "attention.attention.value." + kind] = vw
            out[q + "attention.output.dense." + kind] = sd[p + "attn.proj." + kind]
            out[q + "layernorm_before." + kind] = sd[p + "norm1." + kind]
            out[q + "layernorm_after." + kind] = sd[p + "norm2." + kind]
            out[q + "intermediate.dense." + kind] = sd[p + "mlp.fc1." + kind]
            out[q + "output.dense." + kind] = sd[p + "mlp.fc2." + kind]
        i += 1
    return out


def test_vit_loads_hugging_face_layout(tmp_path: Path) -> None:
    cfg = vit_config("vit_tiny_patch16_224")
    sd = _random_timm_state_dict(cfg, seed=1)
    path = tmp_path / "hf.safetensors"
    save_file(_to_hf(sd), str(path))
    vit = VisionTransformer(cfg)
    load_vit_weights(vit, path)
    x = torch.rand(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(vit(x), _reference_vit(sd, x, heads=3), atol=1e-4, rtol=1e-4)


def test_vit_weights_errors(tmp_path: Path) -> None:
    sd = _random_timm_state_dict(vit_config("vit_tiny_patch16_224"))
    path = tmp_path / "tiny.safetensors"
    save_file(sd, str(path))
    with pytest.raises(
        ConfigError, match=r"tiny\.safetensors: these weights do not fit.*--encoder"
    ):
        create_patch_encoder("vit_tiny_patch14_224", weights=path)
    with pytest.raises(ConfigError, match="weights file not found"):
        create_patch_encoder("uni", weights=tmp_path / "missing.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"garbage")
    with pytest.raises(ConfigError, match=r"bad\.safetensors: not a readable safetensors"):
        create_patch_encoder("vit_tiny_patch16_224", weights=bad)
    # .pth with a state dict loads (weights_only); one holding a Python object is refused
    pth = tmp_path / "ok.pth"
    torch.save({"state_dict": sd}, pth)
    assert create_patch_encoder("vit_tiny_patch16_224", weights=pth).spec.pretrained
    evil = tmp_path / "evil.pth"
    torch.save({"state_dict": sd, "obj": _Payload()}, evil)
    with pytest.raises(ConfigError, match=r"evil\.pth: refused"):
        create_patch_encoder("vit_tiny_patch16_224", weights=evil)


class _Payload:
    """A custom Python object: torch.load(weights_only=True) must refuse to build it."""


# --------------------------------------------------------------------------- TorchScript


class _TinyNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).mean((2, 3))


def test_torchscript_encoder(tmp_path: Path) -> None:
    net = _TinyNet().eval()
    path = tmp_path / "enc.pt"
    torch.jit.script(net).save(str(path))
    enc = create_patch_encoder(
        f"torchscript:{path}", input_px=32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)
    )
    assert enc.spec.name == "torchscript:enc.pt" and enc.spec.dim == 8 and enc.spec.input_px == 32
    assert enc.spec.kind == "torchscript" and len(enc.spec.weights_sha256) == 64
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(enc(x), net((x - 0.5) / 0.25))


def test_torchscript_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="TorchScript model not found"):
        create_patch_encoder(f"torchscript:{tmp_path / 'none.pt'}")
    plain = tmp_path / "plain.pt"
    torch.save({"w": torch.zeros(2)}, plain)  # a state dict, not a TorchScript archive
    with pytest.raises(ConfigError, match=r"plain\.pt: not a TorchScript archive"):
        create_patch_encoder(f"torchscript:{plain}")

    class Tokens(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.flatten(2).transpose(1, 2)  # [B, T, 3]: not pooled

    tok = tmp_path / "tokens.pt"
    torch.jit.script(Tokens()).save(str(tok))
    with pytest.raises(ConfigError, match=r"must return a \[B, D\] tensor"):
        create_patch_encoder(f"torchscript:{tok}", input_px=16)
    with pytest.raises(ConfigError, match="std > 0"):
        create_patch_encoder(f"torchscript:{tok}", std=(0, 1, 1))


def test_encoder_from_spec(tmp_path: Path) -> None:
    from mirror_model.patch_encoders import encoder_from_spec

    st = create_patch_encoder("stain-texture")
    again = encoder_from_spec(st.spec.to_dict())
    assert again.spec == st.spec
    # a ViT spec needs the same weights file back
    cfg = vit_config("vit_tiny_patch16_224")
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_file(_random_timm_state_dict(cfg, seed=0), str(a))
    save_file(_random_timm_state_dict(cfg, seed=1), str(b))
    spec = create_patch_encoder("vit_tiny_patch16_224", weights=a).spec
    assert encoder_from_spec(spec, weights=a).spec.weights_sha256 == spec.weights_sha256
    with pytest.raises(ConfigError, match="differ from those the model was made with"):
        encoder_from_spec(spec, weights=b)
    with pytest.raises(ConfigError, match="needs its pretrained weights"):
        encoder_from_spec(spec)
    # TorchScript specs record only the file name: the file must be given
    ts = tmp_path / "enc.pt"
    torch.jit.script(_TinyNet().eval()).save(str(ts))
    tspec = create_patch_encoder(f"torchscript:{ts}", input_px=32).spec
    with pytest.raises(ConfigError, match="give its file"):
        encoder_from_spec(tspec)
    assert encoder_from_spec(tspec, weights=ts).spec == tspec


def test_registry_builds_a_registered_encoder_and_the_base_class_prepares_input():
    import torch

    from mirror_model.patch_encoders import (
        EncoderOptions,
        PatchEncoder,
        PatchEncoderSpec,
        _registry,
        register_patch_encoder,
    )

    seen = {}

    class MeanColour(PatchEncoder):
        def embed(self, x):
            seen["shape"] = tuple(x.shape)
            return x.mean(dim=(2, 3))

    @register_patch_encoder("test-mean-colour")
    def _make(name, options):
        seen["options"] = options
        spec = PatchEncoderSpec(name=name, input_px=options.input_px or 8, mean=(0.5,) * 3,
                                std=(0.25,) * 3, dim=3, kind="test")  # fmt: skip
        return MeanColour(spec)

    try:
        assert "test-mean-colour" in list_patch_encoders()
        enc = create_patch_encoder("TEST-mean-colour", input_px=4)
        y = enc(torch.full((2, 3, 16, 16), 0.75))  # [0, 1] RGB, resized to 4 px, normalised
        assert seen["shape"] == (2, 3, 4, 4)
        assert seen["options"] == EncoderOptions(input_px=4)
        torch.testing.assert_close(y, torch.ones(2, 3))  # (0.75 - 0.5) / 0.25
        with pytest.raises(ValueError, match="registered twice"):
            register_patch_encoder("test-mean-colour")(_make)
    finally:
        del _registry._EXACT["test-mean-colour"]
        _registry._LISTED.remove("test-mean-colour")
