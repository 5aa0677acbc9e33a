"""ModelConfig: validation, JSON round trip, presets (design §1.2–§1.7, §1.10)."""

from __future__ import annotations

import json
import math

import pytest

from mirror_model.config import LOSS_NAMES, PRESETS, ModelConfig, get_preset, list_presets
from mirror_model.errors import ConfigError, MirrorError


@pytest.mark.parametrize("name", list_presets())
def test_every_preset_round_trips_through_json(name):
    cfg = get_preset(name)
    text = cfg.to_json()
    back = ModelConfig.from_json(text)
    assert back == cfg
    assert ModelConfig.from_dict(json.loads(text)) == cfg
    assert json.loads(back.to_json()) == json.loads(text)
    # tuples survive as tuples (hashable, comparable)
    assert isinstance(back.ppeg_kernels, tuple) and isinstance(back.style_hidden_dims, tuple)


def test_preset_names():
    assert set(list_presets()) == {
        "mirror",
        "tangle",
        "mirror-no-retention",
        "mirror-no-clustering",
        "mirror-align-only",
    }
    assert list_presets() == list(PRESETS)


def test_mirror_preset_is_the_authors_released_configuration():
    c = get_preset("mirror")
    assert (c.embed_dim, c.slide_heads, c.landmarks, c.pinv_iterations) == (768, 8, 384, 6)
    assert c.nystrom_conv_kernel == 33 and c.ppeg_kernels == (7, 5, 3)
    assert (c.rna_heads, c.rna_depth, c.rna_mlp_ratio, c.rna_dropout) == (12, 2, 4.0, 0.1)
    assert c.n_prototypes == 3000 and c.style_hidden_dims == (512, 256) and c.latent_dim == 128
    assert c.loss_weights == {
        "align": 0.5,
        "ret_slide": 0.15,
        "ret_rna": 0.15,
        "style": 0.1,
        "cluster": 0.1,
    }
    assert c.slide_mask_ratio == c.rna_mask_ratio == 0.75
    assert c.retention_stop_gradient is False
    assert math.isclose(math.exp(c.logit_scale_init), 1 / 0.07) and c.logit_scale_max == 100.0
    assert (c.slide_encoder, c.rna_encoder) == ("transmil", "mirror")
    assert c.active_losses == LOSS_NAMES


def test_ablation_and_tangle_presets_switch_terms_off():
    assert get_preset("mirror-no-retention").active_losses == ("align", "style", "cluster")
    assert get_preset("mirror-no-clustering").active_losses == ("align", "ret_slide", "ret_rna")
    assert get_preset("mirror-align-only").active_losses == ("align",)
    t = get_preset("tangle")
    assert (t.slide_encoder, t.rna_encoder, t.active_losses) == ("abmil", "mlp", ("align",))
    assert not t.use_style_module
    # everything else of the ablations is the mirror architecture
    a = get_preset("mirror-no-clustering").to_dict()
    m = get_preset("mirror").to_dict()
    diff = {k for k in m if m[k] != a[k]}
    assert diff == {"name", "weight_style", "weight_cluster"}


def test_replace_and_overrides_validate():
    c = get_preset("mirror", patch_dim=64, n_genes=300, embed_dim=128)
    assert (c.patch_dim, c.n_genes, c.embed_dim, c.landmarks) == (64, 300, 128, 64)
    # a narrower preset keeps valid head counts, stated explicitly in the config
    assert (c.slide_heads, c.rna_heads) == (8, 8)
    assert get_preset("mirror", embed_dim=96).rna_heads == 12
    assert get_preset("mirror", embed_dim=40, rna_heads=4).slide_heads == 8
    assert get_preset("mirror").replace(embed_dim=128).rna_heads == 8
    with pytest.raises(ConfigError, match="rna_heads"):
        ModelConfig(embed_dim=128)  # the constructor never adjusts
    with pytest.raises(ConfigError, match="rna_heads"):
        get_preset("mirror").replace(embed_dim=128, rna_heads=12)  # explicit values are kept
    assert c.replace(slide_landmarks=10).landmarks == 10
    assert get_preset(c) is c


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"embed_dim": 0}, "embed_dim"),
        ({"embed_dim": 12.5}, "embed_dim"),
        ({"patch_dim": True}, "patch_dim"),
        ({"slide_encoder": "clam"}, "slide_encoder"),
        ({"rna_encoder": "cnn"}, "rna_encoder"),
        ({"slide_mask_ratio": 0.0}, "slide_mask_ratio"),
        ({"rna_mask_ratio": 1.5}, "rna_mask_ratio"),
        ({"slide_dropout": 1.0}, "slide_dropout"),
        ({"ppeg_kernels": (7, 4)}, "ppeg_kernels"),
        ({"ppeg_kernels": ()}, "ppeg_kernels"),
        ({"nystrom_conv_kernel": 32}, "nystrom_conv_kernel"),
        ({"n_prototypes": 1}, "n_prototypes"),
        ({"weight_style": -0.1}, "weight_style"),
        ({"weight_align": float("nan")}, "weight_align"),
        ({"embed_dim": 100, "slide_heads": 8}, "slide_heads"),  # 100 is not divisible by 8
        ({"logit_scale_max": 10.0}, "logit_scale_init"),  # exp(init) = 14.3 > 10
        ({"retention_stop_gradient": "yes"}, "retention_stop_gradient"),
        ({"nystrom_exact_when_short": 1}, "nystrom_exact_when_short"),
        ({"heatmap_layer": "middle"}, "heatmap_layer"),
        ({"style_hidden_dims": ()}, "style_hidden_dims"),
    ],
)
def test_invalid_values_name_the_field(changes, field):
    with pytest.raises(ConfigError, match=field) as info:
        get_preset("mirror").replace(**changes)
    assert isinstance(info.value, MirrorError)


def test_all_zero_weights_rejected():
    zero = {f"weight_{n}": 0.0 for n in LOSS_NAMES}
    with pytest.raises(ConfigError, match="all loss weights are 0"):
        ModelConfig(**zero)


def test_unknown_fields_and_presets_get_suggestions():
    with pytest.raises(ConfigError, match="did you mean 'embed_dim'"):
        get_preset("mirror").replace(embed_dims=5)
    with pytest.raises(ConfigError, match="did you mean 'n_genes'"):
        ModelConfig.from_dict({"n_gene": 5})
    with pytest.raises(ConfigError, match="(?i)did you mean 'mirror'"):
        get_preset("mirorr")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.from_json("{not json")
    with pytest.raises(ConfigError, match="JSON object"):
        ModelConfig.from_dict([1, 2])  # type: ignore[arg-type]


def test_config_is_frozen_and_hashable():
    c = get_preset("mirror")
    with pytest.raises(AttributeError):
        c.embed_dim = 5  # type: ignore[misc]
    assert hash(c) == hash(ModelConfig.from_json(c.to_json()))
