"""ModelConfig: validation, JSON round trip, presets (design §1.2–§1.7, §1.10)."""

from __future__ import annotations

import json
import math

import pytest

from mirror_model.config import LOSS_NAMES, PRESETS, ModelConfig, get_preset, list_presets
from mirror_model.errors import ConfigError


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
        "mirror-authors",
        "mirror-grid",
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
    ("changes", "message"),
    [
        ({"embed_dim": 0}, "ModelConfig.embed_dim = 0 is invalid: must be an integer >= 1."),
        ({"embed_dim": 12.5}, "ModelConfig.embed_dim = 12.5 is invalid: must be an integer >= 1."),
        ({"patch_dim": True}, "ModelConfig.patch_dim = True is invalid: must be an integer >= 1."),
        ({"slide_encoder": "clam"},
         "ModelConfig.slide_encoder = 'clam' is invalid: must be one of transmil, abmil."),
        ({"rna_encoder": "cnn"}, "ModelConfig.rna_encoder = 'cnn' is invalid: must be one of "),
        ({"slide_mask_ratio": 0.0},
         "ModelConfig.slide_mask_ratio = 0.0 is invalid: must be a number in (0, 1]."),
        ({"rna_mask_ratio": 1.5},
         "ModelConfig.rna_mask_ratio = 1.5 is invalid: must be a number in (0, 1]."),
        ({"slide_dropout": 1.0},
         "ModelConfig.slide_dropout = 1.0 is invalid: must be a number in [0, 1)."),
        ({"ppeg_kernels": (7, 4)},
         "ModelConfig.ppeg_kernels = (7, 4) is invalid: must be a non-empty list of odd kernel"),
        ({"ppeg_kernels": ()}, "ModelConfig.ppeg_kernels = () is invalid: must hold at least one"),
        ({"nystrom_conv_kernel": 32},
         "ModelConfig.nystrom_conv_kernel = 32 is invalid: must be odd so the convolution"),
        ({"n_prototypes": 1}, "ModelConfig.n_prototypes = 1 is invalid: must be an integer >= 2."),
        ({"weight_style": -0.1}, "ModelConfig.weight_style = -0.1 is invalid: must be a number "
         ">= 0 (0 switches the term off)."),
        ({"weight_align": float("nan")}, "ModelConfig.weight_align = nan is invalid: must be a"),
        ({"embed_dim": 100, "slide_heads": 8},  # 100 is not divisible by 8
         "ModelConfig.slide_heads = 8 is invalid: must divide embed_dim = 100."),
        ({"logit_scale_max": 10.0},  # exp(init) = 14.3 > 10
         "ModelConfig.logit_scale_init = 2.659260036932778 is invalid: exp(logit_scale_init) "
         "must be <= logit_scale_max = 10.0."),
        ({"retention_stop_gradient": "yes"},
         "ModelConfig.retention_stop_gradient = 'yes' is invalid: must be true or false."),
        ({"slide_attention": "fast"},
         "ModelConfig.slide_attention = 'fast' is invalid: must be one of auto, short, nystrom, "
         "reference."),
        ({"heatmap_layer": "middle"},
         "ModelConfig.heatmap_layer = 'middle' is invalid: must be one of first, last."),
        ({"style_hidden_dims": ()},
         "ModelConfig.style_hidden_dims = () is invalid: must hold at least one value."),
    ],
)  # fmt: skip
def test_invalid_values_get_one_message_naming_field_value_and_rule(changes, message):
    with pytest.raises(ConfigError) as info:
        get_preset("mirror").replace(**changes)
    assert str(info.value).startswith(message), str(info.value)


@pytest.mark.parametrize(("old", "mode"), [(True, "short"), (False, "nystrom")])
def test_configs_with_the_former_exact_when_short_flag_load_with_their_behaviour(old, mode):
    """Saved models keep computing what they were evaluated with: the former boolean
    ``nystrom_exact_when_short`` becomes the attention mode it meant (exact up to m tokens /
    always Nyström); new configs default to "auto"."""
    legacy = {k: v for k, v in get_preset("mirror").to_dict().items() if k != "slide_attention"}
    legacy["nystrom_exact_when_short"] = old
    assert ModelConfig.from_dict(legacy).slide_attention == mode
    assert get_preset("mirror").replace(nystrom_exact_when_short=old).slide_attention == mode
    assert get_preset("mirror").slide_attention == "auto"


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
