"""Private runs of ``sdfa train``: CLI, metrics.csv / summary.json, resume, bad settings."""

from __future__ import annotations

import csv
import dataclasses
import json
import re

import pytest
import torch

from sdfa.app.build import build_model
from sdfa.app.cli import main
from sdfa.app.config import config_from_dict
from sdfa.app.run import build_trainer, train
from sdfa.data import load_dataset
from sdfa.privacy.training import PrivacyCallback
from sdfa.training import Callback

FAST = ["--quiet", "--set", "train_samples=256", "--set", "threads=1", "--set",
        "tensorboard=false"]


def small(tmp_path, name="run", **values):
    base = {"out": str(tmp_path / name), "epochs": 3, "train_samples": 256, "threads": 1,
            "progress": False, "tensorboard": False, "batch_size": 64, "lr": 0.01,
            "privacy": "dp-dfa", "epsilon": 4.0, "privacy_options": {"max_input_norm": 8.0}}
    return config_from_dict({**base, **values})


@pytest.mark.parametrize(
    "args",
    [
        ["--privacy", "dp-dfa", "--set", "privacy_options.max_input_norm=8.0"],
        ["--privacy", "dp-noisy-projection", "--set", "privacy_options.max_input_norm=8.0"],
        ["--privacy", "dp-sgd", "--rule", "bp", "--set", "privacy_options.max_grad_norm=1.0"],
    ],
)
def test_cli_private_run_logs_epsilon(tmp_path, capsys, args):
    out = tmp_path / "run"
    command = ["train", "--out", str(out), "--epochs", "2", "--epsilon", "2", "--delta", "1e-5",
               *args, *FAST]
    assert main(command) == 0
    printed = capsys.readouterr().out
    assert re.search(rf"{args[1]}: epsilon (1\.9\d\d|2\.000) at delta 1e-05", printed)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["privacy"] == args[1] and summary["delta"] == 1e-5
    assert 1.9 < summary["epsilon"] <= 2.0 and summary["privacy_steps"] > 0
    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    epsilons = [float(r["epsilon"]) for r in rows]
    assert epsilons == sorted(epsilons) and epsilons[-1] == summary["epsilon"]
    assert all(float(r["delta"]) == 1e-5 for r in rows)


@pytest.mark.parametrize(
    "values, message",
    [
        ({"rule": "bp"}, "privacy 'dp-dfa' trains with rule 'dfa'"),
        ({"privacy": "dp-sgd"}, "privacy 'dp-sgd' trains with rule 'bp'"),
        ({"privacy": "dp-best"}, "privacy must be one of dp-sgd, dp-dfa, dp-noisy-projection"),
        ({"epsilon": None}, "needs epsilon .* or noise_multiplier"),
        ({"epsilon": -1.0}, "epsilon must be a number > 0"),
        ({"delta": 1.0}, r"delta must be in \(0, 1\)"),
        ({"accountant": "moments"}, "accountant must be one of rdp, prv, gdp"),
        ({"privacy_options": {"max_grad_norm": 1.0}}, "does not take option.*max_grad_norm"),
        ({"privacy_options": {"max_input_norm": 0.0}}, "max_input_norm must be a number > 0"),
        ({"privacy": None}, "epsilon / noise_multiplier need a privacy method"),
        ({"model": "crafton-cifar-conv", "transfer": True}, "cannot be combined with privacy"),
        ({"nproc": 2}, "private training runs in one process"),
        ({"log_alignment": 10}, "log_alignment .* cannot be combined with privacy"),
    ],
)
def test_bad_private_settings_are_refused_before_training(tmp_path, values, message):
    with pytest.raises(ValueError, match=message):
        small(tmp_path, **values)


def test_budget_too_small_for_the_epochs_is_refused_at_the_start(tmp_path):
    config = small(tmp_path, epochs=20, noise_multiplier=3.0, epsilon=2.0)  # ~6 epochs fit
    with pytest.raises(ValueError, match=r"allows \d+ steps .* lower epochs or add noise"):
        train(config)


class StopAfter(Callback):
    name = "stop"

    def __init__(self, epoch):
        self.epoch = epoch

    def on_epoch_end(self, trainer, row):
        if row["epoch"] == self.epoch:
            raise KeyboardInterrupt


def test_resumed_private_run_equals_an_uninterrupted_one(tmp_path, privacy="dp-noisy-projection"):
    """In the reproducible (debugging, not private) mode, the accountant, the adaptive
    thresholds, the Poisson sampling and the noise continue from the checkpoint: same weights,
    same epsilon. (Secret noise: test_resumed_secret_run_keeps_its_accounting.)"""
    noise = {"privacy": privacy, "epsilon": None, "noise_multiplier": 1.0,  # no calibration
             "privacy_noise": "seeded"}
    straight = train(small(tmp_path, "straight", **noise))
    config = small(tmp_path, "resumed", **noise)
    with pytest.raises(KeyboardInterrupt):
        train(config, callbacks=[StopAfter(2)])  # the checkpoint of epoch 1 survives
    resumed = train(config, resume=True)
    assert resumed["epsilon"] == straight["epsilon"]
    assert resumed["privacy_steps"] == straight["privacy_steps"]
    a = torch.load(tmp_path / "straight" / "final.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "final.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_empty_poisson_batch_is_a_noise_only_step(tmp_path):
    config = small(tmp_path, epsilon=None, noise_multiplier=1.0)
    data = load_dataset("digits", train_samples=256)
    trainer = build_trainer(config, data, build_model(config, data), tmp_path,
                            callbacks=[PrivacyCallback(config)])
    trainer.callbacks[0].on_train_start(trainer)
    images, labels = data.train.images[:0], data.train.labels[:0]
    before = [p.detach().clone() for p in trainer.model.parameters()]
    sums = trainer.step((images, labels))
    assert (sums["loss_sum"], sums["correct"]) == (0.0, 0)
    assert any(not torch.equal(p, q) for p, q in zip(before, trainer.model.parameters()))


def test_private_inputs_do_not_depend_on_training_statistics(tmp_path):
    """The usual normalization uses the training split's mean and std, released without noise;
    a private run maps [0, value_range] to [-1, 1] whatever those statistics are."""
    config = small(tmp_path)
    data = load_dataset("digits", train_samples=256)
    images = data.train.images[:8]
    inputs = []
    for mean, std in ((0.1, 0.2), (0.4, 0.3)):
        shifted = dataclasses.replace(data, mean=(mean,), std=(std,))
        trainer = build_trainer(config, shifted, build_model(config, shifted), tmp_path,
                                callbacks=[PrivacyCallback(config)])
        trainer.callbacks[0].on_train_start(trainer)
        batch = (images, data.train.labels[:8])
        inputs.append(trainer.task.prepare(batch, trainer.device, train=True)[0])
    torch.testing.assert_close(inputs[0], inputs[1])
    torch.testing.assert_close(inputs[0], images.float() / 8 - 1)  # digits: values 0..16


def test_reproduce_sweep_tabulates_and_plots_against_epsilon(tmp_path):
    """A tiny private set through ``sdfa reproduce``: the accuracy-against-epsilon table (one
    row per method, non-private runs as references) and its plot."""
    from sdfa.app.reproduce import Experiment, ExperimentSet, reproduce

    tiny = {"dataset": "digits", "model": "mlp", "epochs": 1, "train_samples": 128,
            "threads": 1, "tensorboard": False, "batch_size": 32}
    private = {**tiny, "privacy": "dp-dfa", "privacy_options": {"max_input_norm": 8.0}}
    chosen = ExperimentSet(
        "tiny-dp", "A tiny private set", "accuracy",
        [Experiment("digits MLP", f"DP-DFA, epsilon={e:g}", {**private, "epsilon": e},
                    series="DP-DFA", seeds=(0, 1)) for e in (2.0, 8.0)]
        + [Experiment("digits MLP", "DFA, non-private", {**tiny, "rule": "dfa"})],
        source="made up", sweep="epsilon",
    )
    text = reproduce(chosen, out=tmp_path, progress=False).read_text()
    assert "## digits MLP: test accuracy (%) against epsilon" in text
    assert "| | epsilon = 2 | epsilon = 8 |" in text
    assert re.search(r"\| DP-DFA \| [\d.]+ ± [\d.]+ \| [\d.]+ ± [\d.]+ \|", text)
    assert re.search(r"\| DFA, non-private \(epsilon = inf\) \| [\d.]+ \| [\d.]+ \|", text)
    assert "![digits MLP](sweep-digits-mlp.png)" in text
    assert (tmp_path / "sweep-digits-mlp.png").stat().st_size > 1000
    summary = json.loads((tmp_path / "digits-mlp" / "dp-dfa-epsilon-8" / "seed1" /
                          "summary.json").read_text())
    assert summary["privacy"] == "dp-dfa" and summary["epsilon"] <= 8.0


@pytest.mark.parametrize("privacy, rule, options", [
    ("dp-dfa", "dfa", {"max_input_norm": 8.0}),
    ("dp-sgd", "bp", {"max_grad_norm": 1.0}),
])
def test_signal_fraction_is_within_the_sensitivity(privacy, rule, options):
    """The --signal measurement of docs/privacy.md: each example's update stays within the
    sensitivity that calibrates the noise, in the real training pipeline."""
    from sdfa.app.lee2020 import SignalFraction, fit

    signal = SignalFraction(samples=20)
    values = {"dataset": "digits", "model": "mlp", "rule": rule, "privacy": privacy,
              "noise_multiplier": 1.0, "privacy_options": options, "epochs": 2,
              "train_samples": 128, "batch_size": 32}
    fit(values, load_dataset("digits", train_samples=128), callbacks=[signal])
    assert len(signal.fractions) == 2 and all(0 < f <= 1 for f in signal.fractions)
