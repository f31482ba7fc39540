"""The adversary of issue 15 against a released private run.

It knows every training example but one (the target), the published configuration and seed
(config.toml, summary.json), and the released weights. It replays the training on D and on D
minus the target and decides that the target was used if the replay on D lands on the released
weights. With the noise drawn from the seed this decides membership with certainty; with the
default secret noise no replay comes near the released weights, and both are equally far.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from pathlib import Path

import pytest
import torch

from sdfa.app.build import build_model, callbacks_for, seed_everything
from sdfa.app.config import config_from_dict
from sdfa.app.run import build_trainer
from sdfa.data import load_dataset
from sdfa.data.core import TensorSplit

# 257 and 256 examples make the same 4 Poisson batches of 64 expected: the sample rate, and so
# the calibrated noise, do not reveal the target by themselves.
D = load_dataset("digits", train_samples=257)
WITHOUT_TARGET = dataclasses.replace(D, train=TensorSplit(D.train.images[1:], D.train.labels[1:]))


def released(values: dict, data) -> tuple[torch.Tensor, dict]:
    """The weights and the summary.json of one run of ``values`` on ``data`` (the Trainer that
    ``sdfa train`` runs)."""
    with tempfile.TemporaryDirectory() as out:
        config = config_from_dict({**values, "out": out, "progress": False,
                                   "tensorboard": False, "threads": 1})
        seed_everything(config.seed)
        trainer = build_trainer(config, data, build_model(config, data), Path(out),
                                callbacks_for(config))
        summary = trainer.fit()
    return torch.cat([p.detach().flatten() for p in trainer.model.parameters()]), summary


def config(method: str, noise: str) -> dict:
    return {"privacy": method, "rule": "bp" if method == "dp-sgd" else "dfa",
            "noise_multiplier": 1.0, "epochs": 1, "batch_size": 64, "lr": 0.01, "seed": 0,
            "privacy_noise": noise}


@pytest.mark.parametrize("method", ["dp-dfa", "dp-sgd"])
def test_replay_attack_fails_against_secret_noise(method):
    published = config(method, "secret")
    weights, summary = released(published, D)
    assert summary["private"] is True and summary["privacy_noise"] == "secret"
    replays = {
        "D": released(published, D)[0],
        "D minus the target": released(published, WITHOUT_TARGET)[0],
        # the audit's replay: noise and sampling from the published seed
        "D, seeded": released({**published, "privacy_noise": "seeded"}, D)[0],
    }
    distances = {name: (w - weights).norm().item() for name, w in replays.items()}
    scale = weights.norm().item()
    assert all(d > 0.3 * scale for d in distances.values()), distances  # none comes near
    inside, outside = distances["D"], distances["D minus the target"]
    assert abs(inside - outside) < 0.05 * inside, distances  # and nothing tells them apart


@pytest.mark.parametrize("method", ["dp-dfa", "dp-sgd"])
def test_replay_attack_succeeds_against_seeded_noise_which_says_so(method, capsys):
    """The attack is real (so the test above can fail): against the reproducible debugging mode
    the replay on D is the released model exactly, the one without the target is not; such a
    run says "NOT private" on screen and in summary.json."""
    published = config(method, "seeded")
    weights, summary = released(published, D)
    assert summary["private"] is False and summary["privacy_noise"] == "seeded"
    assert "this run is NOT private" in capsys.readouterr().err
    inside = (released(published, D)[0] - weights).norm().item()
    outside = (released(published, WITHOUT_TARGET)[0] - weights).norm().item()
    assert inside == 0.0 and outside > 0.05


def test_summary_json_of_a_seeded_cli_run_says_not_private(tmp_path, capsys):
    from sdfa.app.cli import main

    out = tmp_path / "run"
    assert main(["train", "--privacy", "dp-dfa", "--epsilon", "4", "--epochs", "1", "--out",
                 str(out), "--quiet", "--set", "privacy_noise=seeded", "--set",
                 "train_samples=128", "--set", "tensorboard=false"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["private"] is False and summary["privacy_noise"] == "seeded"
    assert "NOT private" in capsys.readouterr().err
