"""TrainConfig: TOML files, --set overrides with type checking, and the saved config."""

from __future__ import annotations

import pytest

from sdfa.app.config import (
    FIELDS,
    TrainConfig,
    config_from_dict,
    differences,
    load_toml,
    parse_override,
    to_toml,
)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("lr=3e-4", ("lr", 3e-4)),
        ("epochs = 5", ("epochs", 5)),
        ("rule=dfa", ("rule", "dfa")),  # not TOML: a bare string
        ('rule="bp"', ("rule", "bp")),
        ("augment=true", ("augment", True)),
        ("lr_milestones=[50, 75]", ("lr_milestones", [50, 75])),
        ("model_options.hidden=[200,200]", ("model_options.hidden", [200, 200])),
        ("data_dir=/data/mnist", ("data_dir", "/data/mnist")),
        ("rule_options={init = 'sign'}", ("rule_options", {"init": "sign"})),
    ],
)
def test_parse_override(text, expected):
    assert parse_override(text) == expected


@pytest.mark.parametrize("text", ["lr", "=3", ""])
def test_parse_override_needs_key_and_value(text):
    with pytest.raises(ValueError, match="--set expects KEY=VALUE"):
        parse_override(text)


def test_overrides_are_typed_and_merged():
    config = config_from_dict({"lr": 1, "k": 1, "model_options.hidden": [5], "zero_init": False})
    assert config.lr == 1.0 and isinstance(config.lr, float)
    assert (config.k, config.model_options, config.zero_init) == (1, {"hidden": [5]}, False)
    again = config_from_dict({"model_options.activation": "relu"}, base=config)
    assert again.model_options == {"hidden": [5], "activation": "relu"}
    assert config_from_dict({"k": None}, base=config).k is None


@pytest.mark.parametrize(
    "values, message",
    [
        ({"lrr": 1}, "unknown config key 'lrr' (did you mean 'lr'?)"),
        ({"epochs": 2.5}, "epochs must be an integer; got 2.5"),
        ({"epochs": True}, "epochs must be an integer; got True"),
        ({"k": "one"}, "k must be an integer or unset; got 'one'"),
        ({"lr_milestones": [1.5]}, "lr_milestones must be a list of int"),
        ({"augment": "yes"}, "augment must be true/false or unset"),
        ({"lr.value": 1}, "'lr' is not a table"),
        ({"optimizer": "lbfgs"}, "optimizer must be one of adam, adamw, sgd, rmsprop"),
        ({"lr_schedule": "multistep"}, "needs lr_milestones"),
        ({"epochs": 0}, "epochs must be > 0"),
        ({"k": 0}, "k must be > 0"),
        ({"lr": float("nan")}, "lr must be > 0; got nan"),
        ({"lr": float("inf")}, "lr must be a number in [0, 3.4e+38]; got inf"),
        ({"device": "tpu"}, "device must be auto, cpu, cuda"),
    ],
)
def test_bad_values_are_rejected(values, message):
    with pytest.raises(ValueError) as info:
        config_from_dict(values)
    assert message in str(info.value)


def test_toml_round_trip(tmp_path):
    config = config_from_dict({
        "out": 'runs/a "quoted" \\ name', "lr": 1e-8, "k": 3, "lr_milestones": [2, 4],
        "lr_schedule": "multistep", "model_options.hidden": [10, 20], "augment": True,
        "rule_options": {"init": "sign", "scale": 0.5},
    })
    path = tmp_path / "config.toml"
    path.write_text(to_toml(config))
    assert config_from_dict(load_toml(path)) == config
    assert "rank" not in path.read_text()  # None is left out


def test_load_toml_errors(tmp_path):
    with pytest.raises(ValueError, match="config file .* not found"):
        load_toml(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("lr = = 3\n")
    with pytest.raises(ValueError, match=r"bad\.toml is not valid TOML"):
        load_toml(bad)


def test_differences_ignore_runtime_keys():
    a, b = TrainConfig(), config_from_dict({"device": "cpu", "threads": 2, "lr": 0.5})
    assert differences(a, b) == {"lr": (1e-3, 0.5)}
    assert "seed" in FIELDS and "progress" in FIELDS
