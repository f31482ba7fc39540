"""The cost model: hand-counted MACs and data movement, and agreement with FlopCounterMode."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import sdfa
from sdfa.app.cli import main
from sdfa.costs import RULE_COSTS, costs, paper_comparisons, parse_rule, report
from sdfa.data import input_shape, load_dataset


def tiny_mlp():
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 2))


def table(report):
    """{layer: (neurons, forward, error, update, movement)} plus the totals under "total"."""
    rows = {c.name: (c.neurons, c.forward, c.error, c.update, c.movement) for c in report.layers}
    t = report.total
    rows["total"] = (t.neurons, t.forward, t.error, t.update, t.movement)
    return rows


def test_every_rule_has_a_cost_entry():
    missing = sorted(set(sdfa.RULES) - set(RULE_COSTS))
    assert not missing, f"add entries to sdfa.costs.RULE_COSTS for {missing}"


# Tiny MLP 3-5-4-2. Forward MACs 15, 20, 8; the weight update repeats them.
# BP / FA: layer 0's error is delta_2 @ W_2 (20 MACs; each of its 5 neurons reads 4 deltas and
# 4 weights: 40 values), layer 2's is delta_4 @ W_4 (8 MACs, 4 neurons x (2 + 2) = 16 values).
# DFA: e @ B_l with C = 2: 2 x 5 = 10 and 2 x 4 = 8 MACs; each neuron reads 2 errors + 2 weights.
# Sparse k=1: one error and one weight per neuron. Rank 1: e U (C r = 2 MACs, reads 2 + 2) then
# r N MACs with r + r reads per neuron.
HAND_COUNTS = {
    ("bp", ()): {"0": (5, 15, 20, 15, 40), "2": (4, 20, 8, 20, 16), "4": (2, 8, 0, 8, 0),
                 "total": (9, 43, 28, 43, 56)},
    ("dfa", ()): {"0": (5, 15, 10, 15, 20), "2": (4, 20, 8, 20, 16), "4": (2, 8, 0, 8, 0),
                  "total": (9, 43, 18, 43, 36)},
    ("dfa", (("k", 1),)): {"0": (5, 15, 5, 15, 10), "2": (4, 20, 4, 20, 8), "4": (2, 8, 0, 8, 0),
                           "total": (9, 43, 9, 43, 18)},
    ("dfa", (("k", 2),)): {"0": (5, 15, 10, 15, 20), "2": (4, 20, 8, 20, 16),
                           "4": (2, 8, 0, 8, 0), "total": (9, 43, 18, 43, 36)},
    ("dfa", (("rank", 1),)): {"0": (5, 15, 7, 15, 14), "2": (4, 20, 6, 20, 12),
                              "4": (2, 8, 0, 8, 0), "total": (9, 43, 13, 43, 26)},
}
for name in ("fa", "usf", "frsf", "brsf", "kp"):  # layer-wise rules send delta @ B: like bp
    HAND_COUNTS[(name, ())] = HAND_COUNTS[("bp", ())]
# Weight mirror sends delta @ B like the others; learning B is per-step work (see below).
HAND_COUNTS[("wm", ())] = HAND_COUNTS[("bp", ())]


@pytest.mark.parametrize("rule, options", sorted(HAND_COUNTS), ids=str)
def test_hand_counted_mlp(rule, options):
    if rule not in sdfa.RULES:
        pytest.skip(f"rule {rule!r} is not in this build")
    report = costs(tiny_mlp(), rule, (3,), **dict(options))
    assert table(report) == HAND_COUNTS[(rule, options)]
    _, forward, error, update, _ = HAND_COUNTS[(rule, options)]["total"]
    assert report.macs == forward + error + update
    # Sparse feedback is a gather, not a matrix product.
    expected_gather = 9 * dict(options).get("k", 0)
    assert report.total.gather == expected_gather


def test_feedback_kept_per_step():
    # usf recomputes scale * sign(W) of the layers that send an error down (5x4 and 4x2) each step.
    assert costs(tiny_mlp(), "usf", (3,)).total.feedback_per_step == 20 + 8
    # refresh=N rebuilds B every N steps: 1/N of it per step (rounded up per layer)
    assert costs(tiny_mlp(), "frsf", (3,), refresh=4).total.feedback_per_step == 5 + 2
    assert costs(tiny_mlp(), "usf", (3,), refresh=3).total.feedback_per_step == 7 + 3
    assert costs(tiny_mlp(), "fa", (3,)).total.feedback_per_step == 0
    assert costs(tiny_mlp(), "dfa", (3,)).total.feedback_per_step == 0
    # wm: a mirror step per step for the layers that send an error down, 2 x samples x weights
    assert costs(tiny_mlp(), "wm", (3,), samples=10).total.feedback_macs_per_step == 2 * 10 * 28
    assert costs(tiny_mlp(), "usf", (3,)).total.feedback_macs_per_step == 0


def test_hand_counted_conv_padding_and_stride():
    # 1x1 conv on 1x5x5, then a 3x3 conv with stride 2 and padding 1 (output 3x3), then FC 9-2.
    net = nn.Sequential(nn.Conv2d(1, 1, 1), nn.Conv2d(1, 1, 3, stride=2, padding=1), nn.Flatten(),
                        nn.Linear(9, 2))
    rows = table(costs(net, "bp", (1, 5, 5)))
    # Forward: 25 x 1; 9 outputs x 9 taps = 81 (padding taps included, as executed); 9 x 2 = 18.
    # Layer 0's error: the strided conv's input gradient, 81 MACs. Its real connections: along
    # each axis the 3 outputs see 2, 3 and 2 of the 5 inputs, so 7 x 7 = 49 pairs, each bringing
    # one delta and one weight: 98 values for 25 neurons.
    assert rows["0"] == (25, 25, 81, 25, 98)
    assert rows["1"] == (9, 81, 18, 81, 36)
    assert rows["3"] == (2, 18, 0, 18, 0)


def test_hand_counted_conv_dfa():
    net = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Tanh(), nn.Conv2d(2, 1, 3, padding=1),
                        nn.Flatten(), nn.Linear(9, 2))
    rows = table(costs(net, "dfa", (1, 3, 3)))
    # Forward: 18 outputs x 9 = 162; 9 outputs x 2 channels x 9 = 162; 18. With C = 2 every
    # block-output value reads 2 errors and 2 feedback weights.
    assert rows["0"] == (18, 162, 36, 162, 72)
    assert rows["2"] == (9, 162, 18, 162, 36)
    assert rows["4"] == (2, 18, 0, 18, 0)
    bp = table(costs(net, "bp", (1, 3, 3)))
    # Under bp, layer 0 reads through conv 2: 1 x 2 x 7 x 7 connections (3 inputs per axis).
    assert bp["0"] == (18, 162, 162, 162, 2 * 2 * 49)


def conv_net():
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(4, 6, 3, stride=2, padding=1, bias=False), nn.Tanh(), nn.Flatten(),
        nn.Linear(24, 7), nn.Dropout(0.1), nn.Tanh(), nn.Linear(7, 5),
    )


def parts_net():
    features = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                             nn.Conv2d(4, 6, 3, stride=2, padding=1), nn.Tanh(), nn.Flatten())
    classifier = nn.Sequential(nn.Linear(24, 7), nn.Tanh(), nn.Linear(7, 5))
    return nn.Sequential(OrderedDict(features=features, classifier=classifier))


GRAPH_ONLY = {"dfa-gnn"}  # needs graph layers; priced by sdfa.graph.costs (tests/test_graph.py)
CASES = [(conv_net, name, {}) for name in sorted(sdfa.RULES)
         if name not in GRAPH_ONLY and not sdfa.RULES[name].model_specific] + [
    (conv_net, "dfa", {"k": 1}),
    (conv_net, "dfa", {"k": 2}),
    (conv_net, "dfa", {"rank": 2}),
    (parts_net, {"features": "fa", "classifier": ("dfa", {"k": 1})}, {}),
    (parts_net, {"features": "frozen", "classifier": "dfa"}, {}),
    (parts_net, {"features": "bp", "classifier": "dfa"}, {}),
    (parts_net, {"features": "usf", "classifier.2": "fa"}, {}),
]


@pytest.mark.parametrize(
    "build, rule, options", CASES, ids=[f"{b.__name__}-{r}-{o}" for b, r, o in CASES]
)
def test_matches_flop_counter(build, rule, options):
    """The counted matrix-product MACs equal what FlopCounterMode measures on a real step."""
    torch.manual_seed(0)
    model = build()
    x, y = torch.randn(8, 2, 8, 8), torch.randint(0, 5, (8,))
    converted = sdfa.convert(model, rule, **options)
    converted(x)  # feedback matrices are created at the first forward pass
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(converted(x), y).backward()
    measured = counter.get_total_flops() / 2  # FlopCounterMode counts 2 FLOPs per MAC
    report = costs(model, rule, (2, 8, 8), **options)
    per_step = report.total.feedback_macs_per_step  # weight mirror: does not grow with the batch
    assert measured == pytest.approx(8 * report.total.matmul_macs + per_step, rel=0.01)
    if options.get("k"):
        assert report.total.gather > 0  # the gathers are the only work it does not see


def test_converted_model_is_priced_as_converted_and_left_alone():
    torch.manual_seed(0)
    model = sdfa.convert(conv_net(), "dfa", k=1)
    model.train()
    model[1].eval()  # a frozen BatchNorm stays in eval mode
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = costs(model, None, (2, 8, 8))
    assert report.total.as_dict() | {"rule": ""} == (
        costs(conv_net(), "dfa", (2, 8, 8), k=1).total.as_dict() | {"rule": ""}
    )
    assert report.rule == "dfa"
    # Not even the feedback matrices are created: the model was never run.
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert model.training and not model[1].training


def test_costs_does_not_touch_the_model():
    model = tiny_mlp()
    weights = [p.clone() for p in model.parameters()]
    costs(model, "fa", (3,))
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters(), strict=True))
    with pytest.raises(ValueError, match="not converted"):
        sdfa.rules_of(model)


def test_paper_architecture_figures():
    """CIFAR-10 FC 3072-1000-1000-1000-10, counted by hand.

    Forward = update = 3,072,000 + 1,000,000 + 1,000,000 + 10,000 = 5,082,000 MACs. BP's error
    products are the input gradients of layers 2-4: 2,010,000; DFA's are C N = 10 x 3000.
    Data movement: BP 1000 x 2000 + 1000 x 2000 + 1000 x 20; DFA 3000 x 20; k=1: 3000 x 2.
    """
    rows = paper_comparisons(["bp", "dfa", "dfa:k=1"])["CIFAR-10 FC 3072-1000-1000-1000-10"].rows()
    assert [r["step_macs"] for r in rows] == [12_174_000, 10_194_000, 10_167_000]
    assert [r["movement"] for r in rows] == [4_020_000, 60_000, 6_000]
    assert rows[2]["movement_ratio"] == 670
    assert rows[1]["backward_ratio"] == pytest.approx(7_092_000 / 5_112_000)


def test_parse_rule():
    assert parse_rule("bp") == ("bp", {})
    assert parse_rule("dfa:k=1,init=sign") == ("dfa", {"k": 1, "init": "sign"})
    with pytest.raises(ValueError, match="dfa:k=1"):
        parse_rule("dfa:k")


def test_bad_input():
    with pytest.raises(ValueError, match="input_shape"):
        costs(tiny_mlp(), "bp", (0,))
    with pytest.raises(ValueError, match="one input of shape"):
        costs(tiny_mlp(), "bp", (7,))
    with pytest.raises(ValueError, match="give a rule"):
        costs(tiny_mlp(), None, (3,))
    with pytest.raises(ValueError, match="rule=None"):
        costs(sdfa.convert(tiny_mlp(), "fa"), "fa", (3,))
    with pytest.raises(ValueError, match="unknown rule"):
        costs(tiny_mlp(), "nope", (3,))


def test_cli_model_preset(capsys):
    argv = ["costs", "--model", "mlp", "--input-shape", "1,8,8", "--model-option", "hidden=[16]",
            "--rule", "bp", "--rule", "dfa:k=1"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "e B (k=1)" in out and "bp/rule" in out
    # 64-16-10: bp error 16 neurons x (10 deltas + 10 weights); k=1: 16 x 2.
    totals = [line.split() for line in out.splitlines() if line.startswith("total")]
    assert totals[0][-2:] == ["320", "20.0"] and totals[1][-2:] == ["32", "2.0"]
    assert "10.00x" in out


def test_cli_paper_report_markdown(capsys):
    assert main(["costs", "--markdown"]) == 0
    out = capsys.readouterr().out
    assert out.count("| CIFAR-10 FC 3072-1000-1000-1000-10 |") == 4
    assert "| ImageNet VGG head 25088-4096-4096-1000 | dfa k=1 |" in out


def test_cli_errors(capsys):
    assert main(["costs", "--model", "mlp"]) == 2
    assert "shape of one input sample" in capsys.readouterr().err
    assert main(["costs", "--model", "mlp", "--input-shape", "1,8,8", "--rule", "dfa:k=99"]) == 2
    assert "k must be" in capsys.readouterr().err
    argv = ["costs", "--model", "mlp", "--input-shape", "1,8,8", "--model-option", "bogus=3"]
    assert main(argv) == 2
    assert "model 'mlp': bad model options" in capsys.readouterr().err


def test_dataset_sizes_the_preset_as_training_does():
    assert input_shape("digits") == load_dataset("digits").input_shape == (1, 8, 8)
    assert input_shape("mnist", image_size=32) == (1, 32, 32)
    assert input_shape("folder") == (3, 224, 224)
    by_dataset = report("crafton-cifar-fc", ["bp", "dfa:k=1"], dataset="cifar100")
    assert by_dataset == report("crafton-cifar-fc", ["bp", "dfa:k=1"], input_shape=(3, 32, 32),
                                num_classes=100)
    assert "100,000" in by_dataset  # the output layer: 1000 x 100 MACs
    with pytest.raises(ValueError, match="no fixed number of classes: give num_classes"):
        report("mlp", dataset="folder")
    assert report("mlp", dataset="folder", num_classes=5) == report(
        "mlp", input_shape=(3, 224, 224), num_classes=5)
    with pytest.raises(ValueError, match="unknown data set 'nope'"):
        report("mlp", dataset="nope")


def test_cli_dataset(capsys):
    assert main(["costs", "--model", "mlp", "--dataset", "digits", "--rule", "dfa"]) == 0
    by_dataset = capsys.readouterr().out
    assert main(["costs", "--model", "mlp", "--input-shape", "1,8,8", "--rule", "dfa"]) == 0
    assert by_dataset == capsys.readouterr().out
    assert main(["costs", "--dataset", "digits"]) == 2
    assert "needs a model preset" in capsys.readouterr().err
