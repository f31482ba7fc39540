"""``sdfa reproduce``: a small set runs, reports our numbers next to the published ones, lists
what could not run (with the files to download), and reuses finished runs."""

from __future__ import annotations

import json

import pytest

from sdfa.app.cli import main
from sdfa.app.config import config_from_dict
from sdfa.app.reproduce import SETS, Experiment, ExperimentSet, reproduce

TINY = {"dataset": "digits", "model": "mlp", "epochs": 1, "train_samples": 128, "threads": 1,
        "tensorboard": False}


def tiny_set() -> ExperimentSet:
    return ExperimentSet(
        "tiny", "A tiny set", "accuracy",
        [
            Experiment("digits MLP", "BP", {**TINY, "rule": "bp"}, published=97.5),
            Experiment("digits MLP", "DFA k=1", {**TINY, "rule": "dfa", "k": 1}, seeds=(0, 1)),
            Experiment("MNIST MLP", "DFA", {**TINY, "dataset": "mnist"}),
            Experiment("digits other", "missing model", {**TINY, "model": "no-such-model"}),
            Experiment("digits slow", "full only", {**TINY}, skip_quick=True),
        ],
        source="made up for the test", notes="one epoch", quick={"train_samples": 64},
    )


def test_reproduce_tiny_set(tmp_path):
    out = tmp_path / "out"
    data_root = tmp_path / "data"
    results = reproduce(tiny_set(), out=out, quick=True, data_root=data_root, progress=False)
    text = results.read_text()
    assert "| digits MLP | BP |" in text and "| 97.50 |" in text
    assert "| digits MLP | DFA k=1 |" in text and " ± " in text  # two seeds: mean ± sd
    assert "sdfa reproduce tiny --quick" in text and "Quick run" in text
    # what did not run, and why
    assert "- MNIST MLP / DFA:\n  data set 'mnist' was not found in" in text
    assert "train-images-idx3-ubyte.gz" in text and str(data_root / "mnist") in text
    assert "- digits other / missing model:\n  model 'no-such-model' is not in" in text
    assert "- digits slow / full only:\n  left out of --quick" in text
    assert "![digits MLP](curves-digits-mlp.png)" in text
    assert (out / "curves-digits-mlp.png").exists()

    assert json.loads((out / "digits-mlp" / "bp" / "seed0" / "summary.json").read_text())[
        "train_samples"] == 64  # the set's quick reductions apply
    summary = out / "digits-mlp" / "dfa-k-1" / "seed1" / "summary.json"
    stamp = summary.stat().st_mtime_ns
    reproduce(tiny_set(), out=out, quick=True, data_root=data_root, progress=False)
    assert summary.stat().st_mtime_ns == stamp  # finished runs are reused

    changed = tiny_set()
    changed.quick = {"train_samples": 96}  # the protocol changed since those runs finished
    with pytest.raises(ValueError, match=r"bp/seed0 holds a finished run with other settings "
                       r"\(train_samples: saved 64, now 96\): delete it"):
        reproduce(changed, out=out, quick=True, data_root=data_root, progress=False)


def test_error_sets_report_errors(tmp_path):
    error_set = tiny_set()
    error_set.metric = "error"
    error_set.experiments = error_set.experiments[:1]
    text = reproduce(error_set, out=tmp_path, progress=False).read_text()
    assert "top-1 test error (%)" in text


@pytest.mark.parametrize("name", sorted(SETS))
def test_published_sets_are_valid_configs(name):
    chosen = SETS[name]
    assert chosen.experiments and chosen.source
    for exp in chosen.experiments:
        config_from_dict(exp.config)
        config_from_dict({**exp.config, **(chosen.quick if exp.quick is None else exp.quick)})
        percent = (exp.metric or chosen.metric) != "perplexity"  # perplexity: any value > 1
        assert exp.published is None or 0 < exp.published < (100 if percent else 1e6)


def test_cli_lists_sets_and_rejects_unknown(capsys):
    assert main(["reproduce", "--list"]) == 0
    listed = capsys.readouterr().out
    assert all(name in listed for name in ("crafton2019", "moskovitz2018", "biotorch-benchmark"))
    assert main(["reproduce", "nope"]) == 2
    assert "unknown experiment set 'nope'" in capsys.readouterr().err


@pytest.mark.parametrize("name", sorted(SETS))
def test_every_experiment_names_a_registered_model_rule_and_data_set(name):
    from sdfa.data import DATASETS
    from sdfa.graph.data import is_graph
    from sdfa.models import MODELS
    from sdfa.rules import RULES

    for exp in SETS[name].experiments:
        config = config_from_dict(exp.config)  # also validates every key and value
        assert config.model in MODELS, (exp.group, config.model)
        assert config.rule in RULES, (exp.group, config.rule)
        assert config.dataset in DATASETS or is_graph(config.dataset), (exp.group, config.dataset)


def test_bacho2024_report_tabulates_the_runs_alignment(tmp_path):
    from sdfa.app.bacho2024 import alignment_section

    run = tmp_path / "digits-lif" / "fdfa-per-step" / "seed0"
    run.mkdir(parents=True)
    # four logged steps: the table averages the second half (steps 3 and 4) of each layer
    rows = ["step,align/angle/1,align/angle/3", "1,80,0", "2,70,0", "3,10,0", "4,20,0"]
    (run / "alignment.csv").write_text("\n".join(rows) + "\n")
    lines = alignment_section([], tmp_path)
    assert lines[1] == "## Alignment of the hidden updates with the true gradient"
    assert "| digits-lif | fdfa-per-step | 1: 15.0, 3: 0.0 |" in lines[-1].splitlines()
    assert SETS["bacho2024"].report is alignment_section
