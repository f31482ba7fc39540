"""The benchmark's plumbing: output format, MAC bounds, memory measure, targets (no timings)."""

import json

import pytest
import torch

from sdfa.app import bench, cli
from sdfa.models.mlp import mlp


def test_smoke_run_writes_table_and_json(tmp_path, capsys):
    path = tmp_path / "bench.json"
    argv = ["bench", "--workloads", "tiny", "--quick", "--rounds", "2", "--threads", "1"]
    assert cli.main([*argv, "--rules", "bp", "dfa", "dfa-k1", "--json", str(path)]) == 0
    printed = capsys.readouterr().out
    assert "x autograd" in printed and "MAC bound" in printed and "Targets" in printed
    report = json.loads(path.read_text())
    assert report["meta"]["threads"] == 1 and "load_average_start" in report["meta"]
    rows = {r["contender"]: r for r in report["results"]}
    assert list(rows) == ["autograd", "bp", "dfa", "dfa:k=1"]  # dfa-k1: the old spelling
    for r in rows.values():
        assert r["workload"] == "tiny" and len(r["step_seconds"]) == 2
        assert r["samples_per_s"] > 0 and r["peak_memory_bytes"] > 0
        assert r["fraction_of_bound"] == pytest.approx(r["ratio_to_autograd"] / r["mac_bound"])
    assert rows["autograd"]["ratio_to_autograd"] == 1.0
    # MLP 64-32-32-10, per sample: forward and weight gradients 3,392 MACs each; BP sends the
    # error back through W2 and W3 (1,344), DFA projects e to both hidden layers (640), k=1
    # gathers one entry of e per hidden neuron (64, counted as MACs by the cost model).
    assert rows["bp"]["mac_bound"] == 1.0
    assert rows["dfa"]["mac_bound"] == pytest.approx((2 * 3392 + 1344) / (2 * 3392 + 640))
    assert rows["dfa:k=1"]["mac_bound"] == pytest.approx((2 * 3392 + 1344) / (2 * 3392 + 64))
    assert {t["target"] for t in report["targets"]} >= {"sdfa bp speed / autograd"}


def test_biotorch_contenders_run_when_installed(capsys):
    pytest.importorskip("biotorch")
    report = bench.run(
        ["tiny"], ["biotorch-dfa", "biotorch-usf", "dfa"], rounds=1, warmup=1, round_time=0.001
    )
    rows = {r["contender"]: r for r in report["results"]}
    assert rows["biotorch-dfa"]["mac_bound"] == rows["dfa"]["mac_bound"]
    assert any(t["target"] == "sdfa DFA speed / biotorch DFA" for t in report["targets"])


def test_peak_memory_counts_gradients_and_activations():
    torch.manual_seed(0)
    model = mlp((100,), 10, hidden=(200,))
    x, y = torch.randn(50, 100), torch.randint(0, 10, (50,))
    peak = bench.peak_step_memory(bench.TrainingStep(model, False, x, y), torch.device("cpu"))
    grads = sum(p.numel() for p in model.parameters()) * 4
    activations = 50 * 200 * 4  # the hidden layer's output, kept for the backward pass
    assert grads + activations <= peak <= 4 * (grads + activations)


def test_contender_names():
    assert bench.parse_contender("dfa-k3") == bench.Contender("dfa:k=3", "sdfa", "dfa", {"k": 3})
    assert bench.parse_contender("dfa:k=3") == bench.parse_contender("dfa-k3")
    assert bench.parse_contender("dfa-r2").options == {"rank": 2}
    assert bench.parse_contender("biotorch-usf").library == "biotorch"
    assert bench.parse_contender("autograd").library == "torch"
    for bad in ("dfa-k0", "biotorch-kp", "sgd"):
        with pytest.raises(ValueError, match="unknown contender"):
            bench.parse_contender(bad)


def test_workload_groups_and_errors():
    names = [w.name for w in bench.resolve_workloads(["main", "mlp", "depth-8"])]
    assert names == ["mlp", "cifar-fc", "depth-8"]
    everything = [w.name for w in bench.resolve_workloads(["all"])]
    assert len(everything) == len(set(everything)) and "tiny" not in everything
    with pytest.raises(ValueError, match="unknown workload 'huge'"):
        bench.resolve_workloads(["huge"])
    with pytest.raises(ValueError, match="rounds"):
        bench.run(["tiny"], rounds=0)
    with pytest.raises(ValueError, match="round_time"):
        bench.run(["tiny"], round_time=0)


@pytest.mark.parametrize("flag", ["--rounds", "--warmup", "--round-time"])
def test_cli_refuses_zero_instead_of_taking_the_default(flag, capsys):
    assert cli.main(["bench", "--workloads", "tiny", "--rules", "bp", flag, "0"]) == 2
    assert "must be" in capsys.readouterr().err


def row(workload, contender, ratio, bound=1.0, memory=100):
    parsed = bench.parse_contender(contender)
    return {
        "workload": workload,
        "contender": contender,
        "library": parsed.library,
        "rule": parsed.rule,
        "ratio_to_autograd": ratio,
        "mac_bound": bound,
        "fraction_of_bound": ratio / bound,
        "peak_memory_bytes": memory,
    }


def test_targets_are_judged_from_the_figures():
    results = [
        row("mlp", "autograd", 1.0),
        row("mlp", "bp", 0.98),
        row("mlp", "fa", 0.85),
        row("mlp", "dfa", 1.22, bound=1.27, memory=90),  # mlp is the depth-2 point too
        row("mlp", "dfa:k=1", 1.25, bound=1.3),
        row("mlp", "biotorch-dfa", 0.9),
        row("mlp", "biotorch-usf", 0.7),  # not sdfa's: no target
        row("mlp", "usf", 0.96),
        row("mlp", "frsf", 0.94),
        row("mlp", "frsf:refresh=10", 0.99),
        *(
            row(w, c, r)
            for w, r in (("depth-4", 1.3), ("depth-8", 1.25))
            for c in ("autograd", "dfa")
        ),
    ]
    checks = {(c["target"], c["workload"]): c["met"] for c in bench.check_targets(results)}
    assert checks[("dense DFA speed-up / MAC bound", "mlp")] is True
    assert checks[("DFA k=1 speed / dense DFA speed", "mlp")] is True
    assert checks[("sdfa bp speed / autograd", "mlp")] is True
    assert checks[("sdfa fa speed / autograd", "mlp")] is False
    assert checks[("sdfa DFA speed / biotorch DFA", "mlp")] is True
    assert checks[("sdfa usf speed / autograd", "mlp")] is True
    assert checks[("sdfa frsf speed / autograd", "mlp")] is False
    assert checks[("sdfa frsf:refresh=10 speed / autograd", "mlp")] is True
    assert not any("biotorch-usf" in target for target, _ in checks)
    assert checks[("DFA peak memory / autograd", "mlp")] is True
    assert checks[("DFA speed-up grows with depth (2, 4, 8)", "depth")] is False


def test_head_targets_and_spreads():
    results = [
        row("alexnet-head", "autograd", 1.0),
        {**row("alexnet-head", "dfa", 1.10, bound=1.10), "feedback_bytes": 4 * 8192 * 1000},
        {**row("alexnet-head", "dfa:k=1", 1.14, bound=1.18), "feedback_bytes": 12 * 8192},
    ]
    checks = {(c["target"], c["workload"]): c for c in bench.check_targets(results)}
    speed = checks[("DFA k=1 speed / dense DFA speed", "alexnet-head")]
    assert speed["goal"] == ">= 1.05" and speed["met"] is False  # 1.036: not the paper's gain
    memory = checks[("DFA k=1 feedback memory / dense", "alexnet-head")]
    assert memory["value"] == pytest.approx(12 / 4000) and memory["met"] is True
    assert bench._spread(1.0, 2.0, 1.5, rounds=3) is None  # too few rounds: no spread
    assert bench._spread(1.0, 2.0, 1.5, rounds=5) == pytest.approx(2 / 3)
    text = bench.format_table([{**row("mlp", "dfa", 1.0), "samples_per_s": 10.0, "spread": None,
                                "peak_memory_bytes": 0}])
    assert " - " in text.splitlines()[-1]


def test_feedback_bytes_counts_the_sparse_storage():
    import sdfa

    model = sdfa.convert(torch.nn.Sequential(torch.nn.Linear(4, 50), torch.nn.Tanh(),
                                             torch.nn.Linear(50, 10)), "dfa", k=1)
    dense = sdfa.convert(torch.nn.Sequential(torch.nn.Linear(4, 50), torch.nn.Tanh(),
                                             torch.nn.Linear(50, 10)), "dfa")
    assert bench.feedback_bytes(dense) == 10 * 50 * 4
    assert bench.feedback_bytes(model) == 50 * (8 + 4)  # int64 index + float32 value per neuron
