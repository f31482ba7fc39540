"""Training with --log-alignment, the per-epoch time and MAC columns, and their plots."""

from __future__ import annotations

import csv
import math

import pytest
import torch
from conftest import same_state
from PIL import Image

from sdfa.alignment_log import AlignmentLog
from sdfa.app.cli import main
from sdfa.app.config import config_from_dict
from sdfa.app.plot import plot_runs
from sdfa.app.run import train
from sdfa.rules import RULES, LayerwiseRule

METRICS = ("angle", "sign", "norm_ratio", "feedback_angle")


def small(tmp_path, name, **values):
    """2 epochs of 8 steps (256 digits, batch 32), one thread."""
    base = {"out": str(tmp_path / name), "epochs": 2, "train_samples": 256, "threads": 1,
            "progress": False, "tensorboard": False}
    return config_from_dict({**base, **values})


def read_rows(path):
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


def final_weights(run_dir):
    return torch.load(run_dir / "final.pt", weights_only=True)


@pytest.mark.parametrize("rule, k", [(rule, None) for rule in sorted(RULES)
                                     if not RULES[rule].model_specific] + [("dfa", 1)])
def test_logging_alignment_does_not_change_the_weights(tmp_path, rule, k):
    """Measured at every step, with dropout: the same weights, bit for bit, as without."""
    options = {"rule": rule, "k": k, "model_options": {"dropout": 0.3}}
    plain = train(small(tmp_path, "plain", **options))
    logged = train(small(tmp_path, "logged", log_alignment=1, **options))
    expected, measured = final_weights(tmp_path / "plain"), final_weights(tmp_path / "logged")
    assert expected.keys() == measured.keys()
    for key, value in expected.items():  # tensors, and extra states (dicts, maybe of tensors)
        assert same_state(value, measured[key]), key
    assert logged["train_loss"] == plain["train_loss"]
    assert logged["test_accuracy"] == plain["test_accuracy"]

    columns, rows = read_rows(tmp_path / "logged" / "alignment.csv")
    assert [int(r["step"]) for r in rows] == list(range(1, 17))
    assert [int(r["epoch"]) for r in rows] == [1] * 8 + [2] * 8
    layers = ("1", "4", "7")  # Flatten, then (Linear, Tanh, Dropout) x 2, Linear
    if rule == "shallow":  # only the output layer learns: the frozen ones have no update
        assert columns == ["step", "epoch"] + [f"align/{m}/7" for m in METRICS
                                               if m != "feedback_angle"]
        assert all(float(r["align/angle/7"]) == 0 for r in rows)  # its true gradient
        return
    assert columns == ["step", "epoch"] + [
        f"align/{m}/{layer}" for layer in layers for m in METRICS
        if m != "feedback_angle" or (issubclass(RULES[rule], LayerwiseRule) and layer != "1")
    ]
    # The output layer receives the true error under every rule; the hidden layers do not (their
    # true gradient is 0, so the angle nan, while DFA's zero-initialized weights are 0).
    output = [float(r[f"align/angle/{layers[2]}"]) for r in rows]
    if rule == "ssa":  # its orthogonality and sparsity terms are part of every layer's update
        assert all(0 < a < 45 for a in output)
    else:
        assert output == [0] * 16
    hidden = [float(r[f"align/angle/{layers[1]}"]) for r in rows]
    if rule == "bp":
        assert hidden == [0] * 16
    else:
        assert all(a > 1 or math.isnan(a) for a in hidden) and not math.isnan(hidden[-1])
    metrics_columns, epochs = read_rows(tmp_path / "logged" / "metrics.csv")
    assert "alignment_seconds" in metrics_columns and float(epochs[0]["alignment_seconds"]) > 0


def test_alignment_every_n_steps_to_csv_and_tensorboard(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = small(tmp_path, "run", rule="fa", log_alignment=3, tensorboard=True)
    train(config)
    _, rows = read_rows(tmp_path / "run" / "alignment.csv")
    assert [int(r["step"]) for r in rows] == [1, 4, 7, 10, 13, 16]
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    angles = events.Scalars("align/angle/1")
    assert [e.step for e in angles] == [1, 4, 7, 10, 13, 16]
    assert [e.value for e in angles] == pytest.approx([float(r["align/angle/1"]) for r in rows])
    assert [e.step for e in events.Scalars("test_accuracy")] == [8, 16]  # x axis: the step


def test_a_resumed_run_drops_the_rows_logged_after_its_checkpoint(tmp_path):
    """What a run killed after its checkpoint at step 8 wrote: rows 10 and 13, the last cut
    short. Resuming keeps the rows up to step 8 and goes on from there."""
    config = small(tmp_path, "run", rule="fa", log_alignment=3)
    train(config)
    path = tmp_path / "run" / "alignment.csv"
    text = path.read_text()
    header, *lines = text.splitlines()
    cut = [header, *lines[:3], lines[3], lines[4][:9]]  # steps 1, 4, 7 | 10 and half of 13
    path.write_text("\n".join(cut))
    log = AlignmentLog(3)

    class Resumed:  # what on_train_start reads from the trainer
        run_dir, global_step = tmp_path / "run", 8

    log.on_train_start(Resumed)
    assert path.read_text() == "\n".join([header, *lines[:3]]) + "\n"
    Resumed.global_step = 0  # resumed before the first checkpoint: nothing is kept
    log.on_train_start(Resumed)
    assert not path.exists() and log.columns is None


def test_metrics_record_time_and_counted_macs_per_step(tmp_path):
    train(small(tmp_path, "run", rule="dfa"))
    columns, rows = read_rows(tmp_path / "run" / "metrics.csv")
    assert {"train_loss", "train_accuracy", "test_loss", "test_accuracy", "step_seconds",
            "step_macs", "cumulative_macs"} <= set(columns)
    # 64-100-100-10 under DFA, per sample: forward 6,400 + 10,000 + 1,000 and the same again
    # for the weight updates; the two hidden layers get e B_l from the 10 classes: 2 x 1,000.
    per_sample = 2 * 17_400 + 2 * 1_000
    assert [int(r["step_macs"]) for r in rows] == [32 * per_sample] * 2
    assert [int(r["cumulative_macs"]) for r in rows] == [8 * 32 * per_sample, 16 * 32 * per_sample]
    for row in rows:
        assert float(row["step_seconds"]) == pytest.approx(float(row["epoch_seconds"]) / 8)


def test_plot_accuracy_against_macs_and_alignment(tmp_path, capsys):
    runs = []
    for name, values in (("fa", {"rule": "fa", "log_alignment": 2}),
                         ("dfa", {"rule": "dfa", "log_alignment": 2}), ("bp", {"rule": "bp"})):
        train(small(tmp_path, name, **values))
        runs.append(tmp_path / name)
    with_alignment = plot_runs(runs, tmp_path / "all.png", x="macs")
    without = plot_runs(runs[2:], tmp_path / "bp.png", x="macs")
    with Image.open(with_alignment) as image, Image.open(without) as plain:
        assert image.format == plain.format == "PNG"
        assert image.size[1] > 1.5 * plain.size[1]  # the row of alignment panels
    assert main(["plot", *map(str, runs), "--x", "macs", "-o", str(tmp_path / "cli.png")]) == 0
    assert (tmp_path / "cli.png").stat().st_size > 0
    # The other measures of the alignment row: same layout, other curves.
    drawn = {with_alignment.read_bytes()}
    for measure in ("sign", "norm_ratio"):
        out = tmp_path / f"{measure}.png"
        assert main(["plot", *map(str, runs), "--x", "macs", "--alignment", measure,
                     "-o", str(out)]) == 0
        with Image.open(out) as image:
            assert image.size[1] > 1.5 * plain.size[1]
        drawn.add(out.read_bytes())
    assert len(drawn) == 3
    with pytest.raises(ValueError, match="alignment must be one of angle, sign, norm_ratio"):
        plot_runs(runs, tmp_path / "x.png", alignment="cosine")

    metrics = runs[2] / "metrics.csv"  # a run from before MACs were recorded
    columns, rows = read_rows(metrics)
    with open(metrics, "w", newline="") as f:
        writer = csv.DictWriter(f, [c for c in columns if c != "cumulative_macs"],
                                extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    assert main(["plot", str(runs[2]), "--x", "macs"]) == 2
    assert "has no cumulative_macs column" in capsys.readouterr().err
    assert main(["plot", str(runs[2])]) == 0


def test_bad_log_alignment(tmp_path, capsys):
    assert main(["train", "--out", str(tmp_path / "run"), "--log-alignment", "-1"]) == 2
    assert "log_alignment must be >= 0; got -1" in capsys.readouterr().err
    args = ["train", "--out", str(tmp_path / "run"), "--log-alignment", "5", "--nproc", "2"]
    assert main(args) == 2
    assert "log_alignment needs a single process" in capsys.readouterr().err
    with pytest.raises(ValueError, match="log_alignment must be a number of steps >= 1"):
        AlignmentLog(0)
