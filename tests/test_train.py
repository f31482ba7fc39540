"""The training tool: CLI smoke runs, run-directory contents, resume after SIGKILL, NaN stop,
zero initialization, the transfer protocol, and the plot."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

import sdfa
from sdfa.app.build import build_model
from sdfa.app.cli import main
from sdfa.app.config import TrainConfig, config_from_dict, load_toml
from sdfa.app.plot import plot_runs
from sdfa.app.run import build_trainer, train
from sdfa.data import load_dataset
from sdfa.training import Callback, TrainingDiverged

SRC = Path(sdfa.__file__).resolve().parents[1]
# Small, fast runs: 256 digits, one thread, no TensorBoard unless a test wants it.
FAST = ["--quiet", "--set", "train_samples=256", "--set", "threads=1"]
SUMMARY_KEYS = {
    "rule",
    "dataset",
    "model",
    "epochs",
    "test_accuracy",
    "test_loss",
    "train_seconds",
    "params",
}


def small(tmp_path, name="run", **values) -> TrainConfig:
    base = {
        "out": str(tmp_path / name),
        "epochs": 2,
        "train_samples": 256,
        "threads": 1,
        "progress": False,
        "tensorboard": False,
    }
    return config_from_dict({**base, **values})


def test_cli_smoke_run(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["--out", str(out), "--epochs", "2", "--rule", "dfa", "--k", "1", *FAST]
    assert main(["train", *args]) == 0
    printed = capsys.readouterr().out
    assert "dfa:k=1 on digits (mlp): test accuracy" in printed and str(out) in printed

    summary = json.loads((out / "summary.json").read_text())
    assert SUMMARY_KEYS <= set(summary)
    assert (summary["rule"], summary["k"], summary["epochs"]) == ("dfa", 1, 2)
    assert summary["params"] == 64 * 100 + 100 + 100 * 100 + 100 + 100 * 10 + 10
    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert float(rows[-1]["test_accuracy"]) == summary["test_accuracy"]
    if importlib.util.find_spec("tensorboard"):
        assert (out / "tensorboard").is_dir() and any((out / "tensorboard").iterdir())

    # the saved config rebuilds the model; final.pt holds its state_dict and its accuracy
    config = config_from_dict(load_toml(out / "config.toml"))
    assert (config.rule, config.k, config.train_samples) == ("dfa", 1, 256)
    data = load_dataset("digits")
    model = build_model(config, data)
    model.load_state_dict(torch.load(out / "final.pt", weights_only=True))
    trainer = build_trainer(config, data, model, out)
    expected = {"loss": summary["test_loss"], "accuracy": summary["test_accuracy"]}
    assert trainer.evaluate() == pytest.approx(expected)


def test_config_file_flags_and_set_precedence(tmp_path):
    config_file = tmp_path / "run.toml"
    config_file.write_text(
        'rule = "bp"\nlr = 0.5\nepochs = 9\nbatch_size = 16\n[model_options]\nhidden = [7]\n'
    )
    out = tmp_path / "run"
    args = [
        "train",
        "--config",
        str(config_file),
        "--lr",
        "0.01",
        "--epochs",
        "1",
        "--set",
        "epochs=2",
        "--out",
        str(out),
        *FAST,
    ]
    assert main(args) == 0
    saved = config_from_dict(load_toml(out / "config.toml"))
    assert (saved.rule, saved.lr, saved.epochs, saved.batch_size) == ("bp", 0.01, 2, 16)
    assert saved.model_options == {"hidden": [7]}
    assert json.loads((out / "summary.json").read_text())["params"] == 64 * 7 + 7 + 7 * 10 + 10


@pytest.mark.parametrize(
    "args, message",
    [
        (["--set", "lrr=1"], "unknown config key 'lrr' (did you mean 'lr'?)"),
        (["--set", "epochs=1.5"], "epochs must be an integer; got 1.5"),
        (["--rule", "nope"], "unknown rule 'nope'"),
        (["--model", "nope"], "unknown model 'nope'"),
        (["--rule", "bp", "--k", "1"], "unknown option(s) k for rule(s) bp"),
        (["--set", "model_options.width=3"], "model 'mlp': bad model options"),
        (["--transfer"], "the transfer protocol needs a model made of 'features' and 'classifier'"),
        (["--set", "lr=1e39"], "lr must be a number in [0, 3.4e+38]"),
    ],
)
def test_cli_errors_are_one_clear_line(tmp_path, capsys, args, message):
    assert main(["train", "--out", str(tmp_path / "run"), *args, *FAST]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()  # nothing is created for a run that cannot start


def test_fresh_run_refuses_a_used_directory_and_resume_checks_settings(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert main(["train", "--out", out, "--epochs", "1", *FAST]) == 0
    assert main(["train", "--out", out, "--epochs", "1", *FAST]) == 2
    assert "already exists and is not empty: pass --resume" in capsys.readouterr().err
    assert main(["train", "--resume", "--quiet"]) == 2
    assert "--resume needs --out RUN_DIR" in capsys.readouterr().err
    assert main(["train", "--out", out, "--resume", "--lr", "0.5", *FAST]) == 2
    assert "these settings differ: lr: saved 0.001, now 0.5" in capsys.readouterr().err
    # a finished run resumes to the same summary; runtime keys may change
    assert main(["train", "--out", out, "--resume", "--quiet", "--device", "cpu"]) == 0


def test_resume_after_sigkill_gives_identical_weights(tmp_path):
    """Kill a run with SIGKILL while it trains, resume it: the final weights equal, bit for bit,
    those of a run that was never interrupted (dropout, augmentation and sparse DFA included),
    and measuring the alignment on every third step of the killed run changes nothing."""
    args = [
        "--epochs",
        "8",
        "--rule",
        "dfa",
        "--k",
        "1",
        "--model",
        "crafton-mnist-fc",
        "--set",
        "model_options.dropout=0.1",
        "--set",
        "augment=true",
        "--set",
        "tensorboard=false",
        "--quiet",
        "--set",
        "threads=1",
        "--set",
        "train_samples=512",
    ]
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    assert main(["train", "--out", str(reference), *args]) == 0

    env = {**os.environ, "PYTHONPATH": str(SRC) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    command = ["train", "--out", str(killed), *args, "--log-alignment", "3"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "sdfa", *command], env=env, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 120
    while not (killed / "last.pt").exists() and proc.poll() is None:
        assert time.monotonic() < deadline, "no checkpoint after 120 s"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()
    assert not (killed / "summary.json").exists()
    epochs_done = torch.load(killed / "last.pt", weights_only=False)["epoch"]
    assert 1 <= epochs_done < 8

    assert main(["train", "--out", str(killed), "--resume", "--quiet"]) == 0
    expected = torch.load(reference / "final.pt", weights_only=True)
    resumed = torch.load(killed / "final.pt", weights_only=True)
    assert expected.keys() == resumed.keys()
    for key, value in expected.items():  # tensors, and the sparse feedback's extra state
        assert torch.equal(value, resumed[key]) if torch.is_tensor(value) else value == resumed[key]
    with open(killed / "metrics.csv") as f:
        assert [int(r["epoch"]) for r in csv.DictReader(f)] == list(range(1, 9))
    with open(killed / "alignment.csv") as f:  # each measured step once: 16 steps per epoch
        assert [int(r["step"]) for r in csv.DictReader(f)] == list(range(1, 8 * 16 + 1, 3))


class PoisonWeights(Callback):
    """Sets the weights to NaN after step ``step`` (a run of 256 samples has 8 steps an epoch)."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, trainer, inputs, labels, loss):
        if trainer.global_step == self.step:
            with torch.no_grad():
                next(trainer.model.parameters()).fill_(float("nan"))


@pytest.mark.parametrize(
    "step, where",
    [
        (11, r"at epoch 2, step 12"),  # the next step's loss is nan
        (16, r"on the test split after epoch 2"),  # the last step of epoch 2: no step follows
    ],
)
def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, step, where):
    config = small(tmp_path, epochs=4)
    with pytest.raises(
        TrainingDiverged,
        match=rf"the loss became nan {where}: training stopped; the last good checkpoint, "
        r".*last\.pt, holds epoch 1",
    ):
        train(config, callbacks=[PoisonWeights(step)])
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=False)
    assert state["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert not (tmp_path / "run" / "summary.json").exists()


def test_cli_divergence_exit_code(tmp_path, capsys):
    args = [
        "train",
        "--out",
        str(tmp_path / "run"),
        "--rule",
        "bp",
        "--optimizer",
        "sgd",
        "--lr",
        "1e30",
        "--set",
        "model_options.activation=relu",
        *FAST,
    ]
    assert main(args) == 3
    err = capsys.readouterr().err
    assert err.startswith("sdfa train: stopped: the loss became nan") and "Traceback" not in err


def test_zero_init_follows_the_papers(tmp_path):
    data = load_dataset("digits")

    def weights(**values):
        model = build_model(small(tmp_path, **values), data)
        return [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]

    assert all(w.abs().sum() == 0 for w in weights(rule="dfa"))  # tanh + DFA: zero
    assert all(w.abs().sum() > 0 for w in weights(rule="bp"))
    assert all(w.abs().sum() > 0 for w in weights(rule="dfa", model_options={"activation": "relu"}))
    assert all(w.abs().sum() > 0 for w in weights(rule="dfa", zero_init=False))
    assert all(w.abs().sum() > 0 for w in weights(rule="bp", zero_init=True))  # DFA layers only


def test_transfer_protocol(tmp_path):
    config = small(
        tmp_path,
        model="crafton-mnist-conv",
        transfer=True,
        epochs=1,
        pretrain_epochs=1,
        rule="dfa",
        k=1,
        train_samples=128,
    )
    summary = train(config)
    run = tmp_path / "run"
    pretrain = json.loads((run / "pretrain" / "summary.json").read_text())
    assert pretrain["rule"] == "bp"
    assert summary["pretrain"]["test_accuracy"] == pretrain["test_accuracy"]
    assert summary["trainable_params"] < summary["params"]
    before = torch.load(run / "pretrain" / "final.pt", weights_only=True)
    after = torch.load(run / "final.pt", weights_only=True)
    features = [k for k in before if k.startswith("features.")]
    assert features and all(torch.equal(before[k], after[k]) for k in features)
    assert not torch.equal(before["classifier.1.weight"], after["classifier.1.weight"])
    assert "classifier.1.dfa_feedback.index" in after  # the new classifier learned with sparse DFA


def test_plot_writes_a_png(tmp_path, capsys):
    runs = []
    for rule, seed in (("bp", 0), ("dfa", 0), ("dfa", 1)):
        config = small(tmp_path, name=f"{rule}{seed}", rule=rule, seed=seed)
        train(config)
        runs.append(str(tmp_path / f"{rule}{seed}"))
    path = plot_runs(runs, tmp_path / "curves.png", title="digits")
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size[0] > 600
    assert main(["plot", runs[0]]) == 0
    assert Path(capsys.readouterr().out.strip()) == Path(runs[0]) / "curves.png"
    assert main(["plot", str(tmp_path)]) == 2
    assert "metrics.csv not found" in capsys.readouterr().err


def test_batch_manhattan_option_steps_with_the_sign():
    from sdfa.app.build import optimizer_factory
    from sdfa.app.config import TrainConfig

    w = torch.nn.Parameter(torch.zeros(3))
    config = TrainConfig(optimizer="sgd", momentum=0.0, lr=0.5, batch_manhattan=True)
    opt = optimizer_factory(config)([w])
    w.grad = torch.tensor([2.0, -0.1, 0.0])
    opt.step()
    assert torch.equal(w.detach(), torch.tensor([-0.5, 0.5, 0.0]))


@pytest.mark.parametrize("hidden, expected", [([100], 1), ([2000, 2000], None)])
def test_small_cpu_runs_use_one_thread_unless_threads_is_set(tmp_path, hidden, expected):
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        config = small(tmp_path, epochs=1, train_samples=64, threads=None,
                       model_options={"hidden": hidden})
        train(config)
        assert torch.get_num_threads() == (expected or 2)
        torch.set_num_threads(2)
        train(small(tmp_path, "set", epochs=1, train_samples=64, threads=2))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_cli_corrupt_image_found_by_a_loader_worker_is_one_line(tmp_path, capsys):
    for split in ("train", "val"):
        for label, value in (("a", 0), ("b", 200)):
            folder = tmp_path / "data" / split / label
            folder.mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (8, 8), (value, value, value)).save(folder / f"{i}.png")
    (tmp_path / "data" / "train" / "b" / "2.png").write_bytes(b"\x89PNG not really a png")
    args = ["train", "--dataset", "folder", "--data-dir", str(tmp_path / "data"),
            "--out", str(tmp_path / "run"), "--epochs", "1", "--quiet",
            "--set", "image_size=8", "--set", "workers=1", "--set", "threads=1"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "2.png: cannot decode image" in err
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
