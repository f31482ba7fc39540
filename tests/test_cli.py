"""One vocabulary on the command line (rule specs, shared flags, no abbreviations, did-you-mean),
``sdfa models NAME``, ``--list-keys``, ``sdfa.load_run`` / ``sdfa eval`` and extending a run."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import same_state

import sdfa
from sdfa.app.cli import main
from sdfa.app.config import FIELDS, KEY_HELP, config_from_dict, load_toml
from sdfa.specs import format_rule_spec, parse_rule_spec

FAST = ["--quiet", "--set", "train_samples=256", "--set", "threads=1", "--set", "tensorboard=false"]


def test_rule_specs_parse_and_format_back():
    assert parse_rule_spec("dfa") == ("dfa", {})
    assert parse_rule_spec("dfa:k=1") == ("dfa", {"k": 1})
    assert parse_rule_spec("usf:scale=1.0") == ("usf", {"scale": 1.0})
    name, options = parse_rule_spec('dfa:rank=4,init=sign,boundaries=["a","b"]')
    assert (name, options) == ("dfa", {"rank": 4, "init": "sign", "boundaries": ["a", "b"]})
    assert parse_rule_spec(format_rule_spec(name, options)) == (name, options)
    for bad in ("", "dfa:k", "dfa:=1", "dfa:k=1,k=2"):
        with pytest.raises(ValueError, match="rule"):
            parse_rule_spec(bad)


def test_config_reads_a_rule_spec_into_its_keys():
    config = config_from_dict({"rule": 'dfa:k=1,init="sign"'})
    assert (config.rule, config.k, config.rank, config.rule_options) == (
        "dfa", 1, None, {"init": "sign"})
    assert config_from_dict({"rule": "dfa:rank=2"}).rank == 2
    assert config_from_dict({"rule": "dfa:k=1", "k": 1}).k == 1
    with pytest.raises(ValueError, match="sets k=1 but k=2 is given too"):
        config_from_dict({"rule": "dfa:k=1", "k": 2})


def test_train_takes_the_spec_and_the_shorthand_alike(tmp_path):
    for name, rule in (("spec", ["--rule", "dfa:k=1"]), ("short", ["--rule", "dfa", "--k", "1"])):
        assert main(["train", "--out", str(tmp_path / name), "--epochs", "1", *rule, *FAST]) == 0
    a, b = (torch.load(tmp_path / n / "final.pt", weights_only=True) for n in ("spec", "short"))
    assert same_state(a, b)
    saved = load_toml(tmp_path / "spec" / "config.toml")
    assert (saved["rule"], saved["k"]) == ("dfa", 1)


def test_the_summary_and_the_report_name_every_rule_option(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "--out", str(out), "--epochs", "1", "--rule", "usf:refresh=3", *FAST]
    assert main(argv) == 0
    assert "usf:refresh=3 on digits" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["rule"], summary["rule_options"]) == ("usf", {"refresh": 3})


@pytest.mark.parametrize("argv, usage, hint", [
    (["train", "--epoch", "3"], "usage: sdfa train", "--epoch (did you mean --epochs?)"),
    (["train", "--learning-rate", "1"], "usage: sdfa train", "--learning-rate"),
    (["costs", "--rules", "bp"], "usage: sdfa costs", "--rules (did you mean --rule?)"),
    (["reproduce", "crafton2019", "--seedz", "2"], "usage: sdfa reproduce", "did you mean --seed"),
])
def test_unknown_or_abbreviated_flags_get_the_commands_usage_and_a_suggestion(
        capsys, argv, usage, hint):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(usage) and hint in err


def test_costs_and_bench_take_specs_and_the_shorthands(capsys):
    common = ["costs", "--model", "mlp", "--dataset", "digits"]
    assert main([*common, "--rule", "dfa:k=1"]) == 0
    spec = capsys.readouterr().out
    assert main([*common, "--rule", "dfa", "--k", "1"]) == 0
    assert capsys.readouterr().out == spec
    assert main([*common, "--rule", "bp", "--k", "1"]) == 2
    assert "--k applies to no rule given (bp)" in capsys.readouterr().err
    assert main([*common, "--rule", "bp", "--set", "model_options.hidden=[7]"]) == 0
    assert main([*common, "--rule", "bp", "--model-option", "hidden=[7]"]) == 0
    first, second = capsys.readouterr().out.split("mlp, rule bp: costs per sample")[1:]
    assert first == second and "448" in first  # both spellings price the 64-7-10 model
    assert main([*common, "--rule", "bp", "--set", "lr=1"]) == 2
    assert "takes model_options.KEY=VALUE" in capsys.readouterr().err

    from sdfa.app.cli import _with_shorthands

    assert _with_shorthands(["dfa", "bp", "dfa:k=2"], 1, None) == ["dfa:k=1", "bp", "dfa:k=2"]


def test_models_lists_a_presets_options_and_wrong_options_name_them(capsys):
    assert main(["models"]) == 0
    assert "crafton-mnist-fc" in capsys.readouterr().out
    assert main(["models", "crafton-mnist-fc"]) == 0
    out = capsys.readouterr().out
    assert "hidden" in out and "(400,)" in out and "dropout" in out
    assert main(["models", "crafton-mnsit-fc"]) == 2
    assert "did you mean 'crafton-mnist-fc'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="takes no option width; its options: hidden="):
        sdfa.models.build_model("mlp", (1, 8, 8), 10, width=3)


def test_every_config_key_has_a_description(capsys):
    assert set(KEY_HELP) == set(FIELDS)
    assert main(["train", "--list-keys"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(FIELDS)
    assert any(line.startswith("lr ") and "learning rate" in line for line in lines)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("finished") / "run"
    assert main(["train", "--out", str(out), "--epochs", "2", "--rule", "dfa:k=1", *FAST]) == 0
    return out


def test_load_run_rebuilds_the_model_with_its_weights_rule_and_feedback(finished_run, capsys):
    model, config = sdfa.load_run(finished_run)
    assert (config.rule, config.k, config.epochs) == ("dfa", 1, 2)
    assert sdfa.rules_of(model) and set(sdfa.rules_of(model).values()) == {"dfa"}
    final = torch.load(finished_run / "final.pt", weights_only=True)
    assert same_state(model.state_dict(), final)
    summary = json.loads((finished_run / "summary.json").read_text())
    assert main(["eval", str(finished_run)]) == 0
    out = capsys.readouterr().out
    assert f"test accuracy {summary['test_accuracy']:.2%}" in out
    assert f"test loss {summary['test_loss']:.4f}" in out


def test_eval_of_an_interrupted_run_uses_last_pt_and_bad_dirs_are_one_line(
        finished_run, tmp_path, capsys):
    interrupted = tmp_path / "interrupted"
    interrupted.mkdir()
    (interrupted / "config.toml").write_text((finished_run / "config.toml").read_text())
    (interrupted / "last.pt").write_bytes((finished_run / "last.pt").read_bytes())
    model, _ = sdfa.load_run(interrupted)
    last = torch.load(interrupted / "last.pt", weights_only=True)["model"]
    assert same_state(model.state_dict(), last)
    assert main(["eval", str(tmp_path)]) == 2
    assert "is not a run directory" in capsys.readouterr().err
    (interrupted / "last.pt").unlink()
    assert main(["eval", str(interrupted)]) == 2
    assert "holds no weights yet" in capsys.readouterr().err


def test_resume_extends_a_finished_run_to_the_weights_of_a_longer_one(tmp_path, capsys):
    straight, extended = str(tmp_path / "straight"), str(tmp_path / "extended")
    assert main(["train", "--out", straight, "--epochs", "3", *FAST]) == 0
    assert main(["train", "--out", extended, "--epochs", "2", *FAST]) == 0
    assert main(["train", "--out", extended, "--resume", "--epochs", "3", "--quiet"]) == 0
    a, b = (torch.load(f"{d}/final.pt", weights_only=True) for d in (straight, extended))
    assert same_state(a, b)
    assert json.loads((tmp_path / "extended" / "summary.json").read_text())["epochs"] == 3
    assert load_toml(tmp_path / "extended" / "config.toml")["epochs"] == 3
    capsys.readouterr()
    assert main(["train", "--out", extended, "--resume", "--epochs", "2", "--quiet"]) == 2
    assert "epochs may grow (to extend the run) but not shrink" in capsys.readouterr().err


def test_a_cosine_schedule_cannot_be_extended(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert main(["train", "--out", out, "--epochs", "1", "--set", "lr_schedule=cosine",
                 *FAST]) == 0
    assert main(["train", "--out", out, "--resume", "--epochs", "2", "--quiet"]) == 2
    assert "cosine learning-rate schedule spans the original epochs" in capsys.readouterr().err


def test_reproduce_takes_data_dir_and_a_list_of_seeds(tmp_path, monkeypatch):
    from sdfa.app import reproduce as module

    seen = {}

    def fake(name, **kwargs):
        seen.update(kwargs)
        path = tmp_path / "results.md"
        path.write_text("ok")
        return path

    monkeypatch.setattr(module, "reproduce", fake)
    assert main(["reproduce", "crafton2019", "--data-dir", "D", "--seed", "3", "4"]) == 0
    assert (seen["data_root"], seen["seeds"]) == ("D", [3, 4])
    assert main(["reproduce", "crafton2019", "--data-root", "E", "--seeds", "2"]) == 0
    assert (seen["data_root"], seen["seeds"]) == ("E", 2)


def test_rules_lists_every_rule_with_its_summary_paper_and_options(capsys):
    assert main(["rules"]) == 0
    out = capsys.readouterr().out
    width = max(map(len, sdfa.RULES)) + 1
    for name, rule in sdfa.RULES.items():
        line = next(x for x in out.splitlines() if x.startswith(f"{name} "))
        assert line[width - 1] == " " and line[width] != " "  # one column for every name
        assert line[width:].split()[0] == rule.__doc__.split()[0]
        assert f"paper: {rule.paper}; options:" in out
    # the whole first paragraph, not a first line cut mid-sentence
    assert "the SFDFA code's DFA baseline)." in out
