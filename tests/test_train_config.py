"""TrainConfig validation / round trip and CLI option precedence."""

from __future__ import annotations

import argparse

import pytest

from mirror_model.errors import ConfigError
from mirror_model.train.config import TrainConfig, parse_set_overrides


def test_defaults_are_the_authors_configuration():
    c = TrainConfig()
    assert (c.epochs, c.batch_size, c.lr, c.weight_decay, c.schedule, c.optimizer) == (
        100,
        16,
        2e-5,
        0.0,
        "constant",
        "adam",
    )
    assert (c.tiles_per_slide, c.seed, c.folds) == (2048, 42, 5)


def test_yaml_and_json_round_trip():
    c = TrainConfig(epochs=3, lr=1e-4, schedule="cosine", betas=(0.8, 0.99), fold=2, grad_clip=1.0)
    assert TrainConfig.from_yaml(c.to_yaml()) == c
    assert TrainConfig.from_json(c.to_json()) == c


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"epochs": 0}, "TrainConfig.epochs = 0 is invalid: must be an integer >= 1."),
        ({"epochs": "many"}, "TrainConfig.epochs = 'many' is invalid: must be an integer >= 1."),
        ({"lr": -1.0}, "TrainConfig.lr = -1.0 is invalid: must be a number > 0."),
        ({"schedule": "step"},
         "TrainConfig.schedule = 'step' is invalid: must be one of constant, cosine."),
        ({"precision": "fp16"},
         "TrainConfig.precision = 'fp16' is invalid: fp16 is not supported; use bf16 or fp32."),
        ({"fold": 5}, "TrainConfig.fold = 5 is invalid: must be between 0 and folds-1 = 4."),
        ({"optimizer": "sgd"}, "TrainConfig.optimizer = 'sgd' is invalid: must be one of adam, "),
        ({"inner_val_fraction": 0.0},
         "TrainConfig.inner_val_fraction = 0.0 is invalid: must be a number in (0, 0.9]."),
        ({"grad_clip": -1}, "TrainConfig.grad_clip = -1.0 is invalid: must be a number >= 0 or null."),
        ({"betas": "0.9,1.5"}, "TrainConfig.betas = (0.9, 1.5) is invalid: must be two numbers"),
        ({"device": "tpu"}, "TrainConfig.device = 'tpu' is invalid: must be auto, cpu, cuda or cuda:N."),
    ],
)  # fmt: skip
def test_invalid_values_get_one_message_naming_option_value_and_rule(changes, message):
    with pytest.raises(ConfigError) as info:
        TrainConfig.from_dict(changes)
    assert str(info.value).startswith(message), str(info.value)


def test_unknown_key_lists_valid_options():
    with pytest.raises(ConfigError, match="unknown training option.*learning_rate.*valid options"):
        TrainConfig.from_dict({"learning_rate": 1})


def test_yaml_strings_are_coerced():
    # PyYAML reads "1e-4" as a string; it must still be accepted as a float
    c = TrainConfig.from_dict({"lr": "1e-4", "epochs": "3", "fold": "null"})
    assert c.lr == 1e-4 and c.epochs == 3 and c.fold is None
    assert parse_set_overrides(["lr=1e-4", "model.embed_dim=64", "grad-clip=null"]) == {
        "lr": "1e-4",
        "model.embed_dim": 64,
        "grad_clip": None,
    }


def _args(tmp_path, argv):
    from mirror_model._cli import pretrain as cmd

    p = argparse.ArgumentParser()
    cmd.configure(p)
    base = [
        "--cohort",
        "c.csv",
        "--expression",
        "e.csv",
        "--features",
        "f",
        "--out",
        str(tmp_path / "r"),
    ]
    return cmd.resolve_options(p.parse_args(base + argv))


def test_cli_precedence_flags_over_set_over_yaml(tmp_path):
    y = tmp_path / "cfg.yaml"
    y.write_text(
        "preset: tangle\nepochs: 7\nlr: 1e-3\nbatch_size: 4\nmodel:\n  embed_dim: 32\n"
        "training:\n  seed: 5\n"
    )
    preset, cfg, model = _args(tmp_path, ["--config", str(y)])
    assert (preset, cfg.epochs, cfg.lr, cfg.batch_size, cfg.seed, model) == (
        "tangle",
        7,
        1e-3,
        4,
        5,
        {"embed_dim": 32},
    )
    preset, cfg, model = _args(
        tmp_path,
        [
            "--config",
            str(y),
            "--set",
            "epochs=9",
            "--set",
            "lr=5e-4",
            "--set",
            "model.embed_dim=48",
            "--epochs",
            "2",
            "--preset",
            "mirror",
        ],
    )
    assert preset == "mirror"
    assert cfg.epochs == 2  # flag beats --set and YAML
    assert cfg.lr == 5e-4  # --set beats YAML
    assert cfg.batch_size == 4  # YAML beats default
    assert model == {"embed_dim": 48}


def test_cli_bad_yaml_is_a_clear_error(tmp_path):
    y = tmp_path / "bad.yaml"
    y.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="bad.yaml.*mapping"):
        _args(tmp_path, ["--config", str(y)])
