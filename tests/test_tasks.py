"""The training core takes any task: a regression task with no accuracy trains, evaluates,
checkpoints and summarizes through the same Trainer as classification."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import sdfa
from sdfa.tasks import Task
from sdfa.training import Callback, Trainer


class Regression(Task):
    """y = x @ w: mean squared error, no accuracy."""

    name = "regression"

    def loss(self, outputs, targets):
        return F.mse_loss(outputs, targets)

    def metrics(self, outputs, targets, loss=None):
        loss = F.mse_loss(outputs, targets).item() if loss is None else loss
        return {"loss_sum": loss * len(targets), "count": len(targets)}


class Data:
    input_shape = (4,)


def batches(n, seed):
    gen = torch.Generator().manual_seed(seed)
    w = torch.arange(1.0, 5.0)[:, None]
    xs = [torch.randn(16, 4, generator=gen) for _ in range(n)]
    return [(x, x @ w) for x in xs]


class Steps(Callback):
    name = "steps"

    def __init__(self):
        self.seen = 0

    def on_step_end(self, trainer, inputs, targets, loss):
        self.seen += 1


def test_a_regression_task_trains_through_the_core(tmp_path):
    torch.manual_seed(0)
    model = sdfa.convert(nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1)), "dfa")
    steps = Steps()
    trainer = Trainer(
        Regression(Data()), model, batches(20, 0), batches(4, 1),
        optimizer=lambda params: torch.optim.Adam(params, lr=1e-2), epochs=5,
        run_dir=tmp_path, callbacks=[steps], progress=False, tensorboard=False,
    )
    summary = trainer.fit()
    assert steps.seen == 100 and summary["epochs"] == 5
    assert "test_accuracy" not in summary and "best_test_accuracy" not in summary
    assert summary["test_loss"] < 0.25 * trainer.history[0]["test_loss"]
    saved = torch.load(tmp_path / "last.pt", weights_only=True)
    assert saved["epoch"] == 5 and saved["callbacks"] == {"steps": {}}
