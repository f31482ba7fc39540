"""Private runs of ``sdfa train``: CLI, metrics.csv / summary.json, resume, bad settings."""

from __future__ import annotations

import csv
import dataclasses
import importlib.util
import json
import math
import re
import shlex
from pathlib import Path

import pytest
import torch

from sdfa.app.build import build_model
from sdfa.app.cli import main
from sdfa.app.config import config_from_dict
from sdfa.app.run import build_trainer, train
from sdfa.data import DATASETS, ImageData, load_dataset
from sdfa.data.core import TensorSplit
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
        ({"privacy_noise": "random"}, "privacy_noise must be one of secret, secure, seeded"),
        ({"accountant": "gdp"}, "'gdp' can underestimate the privacy spent"),
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


def test_secure_noise_without_torchcsprng_is_refused_before_training(tmp_path):
    if importlib.util.find_spec("torchcsprng") is not None:
        pytest.skip("torchcsprng is installed here")
    with pytest.raises(ValueError, match="'secure' .* needs torchcsprng"):
        small(tmp_path, privacy_noise="secure")


def test_gdp_may_report_without_a_target(tmp_path):
    with pytest.warns(UserWarning, match="GDP accounting is experimental"):  # Opacus's, kept
        summary = train(small(tmp_path, epsilon=None, noise_multiplier=1.0, accountant="gdp",
                              epochs=1))
    assert summary["accountant"] == "gdp" and summary["epsilon"] > 0


def weights(run_dir):
    state = torch.load(run_dir / "final.pt", weights_only=True)
    return torch.cat([v.flatten().double() for k, v in state.items() if "feedback" not in k])


def test_two_private_runs_with_the_same_config_and_seed_differ(tmp_path):
    """The noise and the sampling are secret: not a function of the seed, never written."""
    summaries = [train(small(tmp_path, name, epochs=2)) for name in ("a", "b")]
    assert all(s["private"] and s["privacy_noise"] == "secret" for s in summaries)
    assert not torch.equal(weights(tmp_path / "a"), weights(tmp_path / "b"))
    checkpoint = torch.load(tmp_path / "a" / "last.pt", weights_only=True)
    assert set(checkpoint["callbacks"]["privacy"]) == {"engine"}  # accountant and thresholds
    assert set(checkpoint["callbacks"]["privacy"]["engine"]) <= {"accountant", "feedback_bounds"}


def test_resumed_secret_run_keeps_its_accounting(tmp_path):
    """A resumed private run continues the accountant's history (same epsilon, same steps as an
    uninterrupted run) with fresh secret noise, so its weights are not those of the
    uninterrupted run (nothing secret was in the checkpoint to continue from)."""
    values = {"privacy": "dp-noisy-projection", "epsilon": None, "noise_multiplier": 1.0}
    straight = train(small(tmp_path, "straight", **values))
    config = small(tmp_path, "resumed", **values)
    with pytest.raises(KeyboardInterrupt):
        train(config, callbacks=[StopAfter(2)])  # the checkpoint of epoch 1 survives
    checkpoint = torch.load(tmp_path / "resumed" / "last.pt", weights_only=True)
    assert checkpoint["epoch"] == 1
    assert checkpoint["callbacks"]["privacy"]["engine"]["accountant"]["history"]
    resumed = train(config, resume=True)
    assert resumed["epsilon"] == straight["epsilon"]
    assert resumed["privacy_steps"] == straight["privacy_steps"]
    assert not torch.equal(weights(tmp_path / "straight"), weights(tmp_path / "resumed"))


def fake_data(name, shape, classes=10, n=64):
    """A data set with the shape and value range of ``name``'s real files."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, *shape), generator=generator, dtype=torch.uint8)
    labels = torch.randint(0, classes, (n,), generator=generator)
    split = TensorSplit(images, labels)
    return ImageData(name, split, split, classes, shape, (0.3,) * shape[0], (0.2,) * shape[0])


BUILT_IN = [(name, spec.image_shape or (3, 32, 32), spec.num_classes or 10)  # folder: 32 px
            for name, spec in sorted(DATASETS.items())]


@pytest.mark.parametrize("method", ["dp-dfa", "dp-noisy-projection", "dp-sgd"])
@pytest.mark.parametrize("name, shape, classes", BUILT_IN, ids=[b[0] for b in BUILT_IN])
def test_every_method_runs_on_every_built_in_data_set_with_its_defaults(tmp_path, method, name,
                                                                         shape, classes):
    """No clipping option given: the defaults of sdfa train (max_input_norm from the input
    size, max_grad_norm 1) make a private step, and the input bound holds for every input."""
    config = small(tmp_path, privacy=method, rule="bp" if method == "dp-sgd" else "dfa",
                   privacy_options={}, epochs=1)
    data = fake_data(name, shape, classes)
    callback = PrivacyCallback(config)
    trainer = build_trainer(config, data, build_model(config, data), tmp_path,
                            callbacks=[callback])
    callback.on_train_start(trainer)
    trainer.step(next(iter(trainer.train_loader)))
    assert callback.engine.steps == 1
    if method == "dp-sgd":
        assert callback.options == {"max_grad_norm": 1.0}
    else:
        bound = callback.options["max_input_norm"]
        assert bound == pytest.approx(math.prod(shape) ** 0.5)
        extremes = torch.stack([torch.zeros(shape, dtype=torch.uint8),
                                torch.full(shape, 255, dtype=torch.uint8)])
        x, _ = trainer.task.prepare((extremes, torch.zeros(2, dtype=torch.long)), "cpu",
                                    train=False)
        assert x.flatten(1).norm(dim=1).max().item() == pytest.approx(bound, rel=1e-5)


def readme_privacy_commands() -> list[str]:
    """The shell commands of the README's "Differential privacy" section, as written."""
    text = (Path(__file__).parent.parent / "README.md").read_text()
    section = text.split("\n## Differential privacy\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```(?:bash|sh)?\n(.*?)```", section, flags=re.S)
    commands = []
    for line in "\n".join(blocks).replace("\\\n", " ").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            commands.append(line)
    return commands


def test_readme_privacy_section_has_commands():
    commands = readme_privacy_commands()
    assert commands and all(c.startswith("sdfa ") for c in commands)
    assert "sdfa train --privacy dp-dfa --epsilon 2 --delta 1e-5" in commands  # issue 15


@pytest.mark.parametrize("command", readme_privacy_commands())
def test_readme_privacy_command_runs_as_written(tmp_path, monkeypatch, command):
    monkeypatch.chdir(tmp_path)  # runs/ and reproduce/ land here
    assert main(shlex.split(command)[1:]) == 0
    (summary,) = tmp_path.glob("runs/*/summary.json")
    assert json.loads(summary.read_text())["private"] is True
