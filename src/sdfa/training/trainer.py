"""The training loop: epochs of steps, evaluation, checkpoints, callbacks. It imports no feature.

What is learned comes from a :class:`~sdfa.tasks.Task`, how a step runs from a
:class:`~sdfa.training.Strategy`, and everything else (privacy, alignment logging, several
processes) plugs in as a :class:`~sdfa.training.Callback` or a strategy.

The order of the training data is a function of (seed, epoch) (:class:`EpochBatches`) and every
random state is saved with the epoch in ``last.pt``, so a run killed at any moment and resumed
ends with the same weights as one that was never interrupted.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from .._version import __version__
from .callbacks import CallbackList
from .checkpoint import save_atomic
from .logging import MetricsLog
from .strategy import Strategy

CHECKPOINT_FORMAT = 2
#: a training loss this many times its value at the first step ends the run as diverged
DIVERGENCE_FACTOR = 1000.0


class TrainingDiverged(RuntimeError):
    """The loss became NaN, infinite or exploded; the last good checkpoint is kept."""


class Trainer:
    """One run: a task, a model, its data loaders, and the loop over epochs.

    Args:
        task: what is learned (:mod:`sdfa.tasks`): batches, loss, metrics.
        model: the (converted) model, moved to ``device``.
        train_loader, test_loader: iterables of stored batches.
        optimizer: ``optimizer(params) -> torch.optim.Optimizer``, called once on the
            parameters the strategy says this process trains.
        scheduler: ``scheduler(optimizer) -> LRScheduler`` stepped once per epoch (optional).
        epochs: train up to this many epochs.
        run_dir: where ``last.pt`` and the logs go (None: nothing is written).
        callbacks, strategy: plug-ins (see :class:`Callback`, :class:`Strategy`).
        frozen: modules kept in eval mode (fixed BatchNorm statistics, no dropout).
        sample_macs, feedback_macs: counted MACs per sample of a training step and per step of
            learning the feedback (:func:`sdfa.costs`), for metrics.csv's compute columns.
        divergence_factor: stop when the training loss exceeds this multiple of its first
            value (0: only NaN and infinity stop the run).
    """

    def __init__(
        self,
        task,
        model: nn.Module,
        train_loader: Iterable,
        test_loader: Iterable,
        *,
        optimizer: Callable,
        scheduler: Callable | None = None,
        epochs: int,
        run_dir: str | Path | None = None,
        callbacks=(),
        strategy: Strategy | None = None,
        frozen: Iterable[nn.Module] = (),
        device: torch.device | str = "cpu",
        progress: bool = True,
        tensorboard: bool = True,
        sample_macs: int | None = None,
        feedback_macs: int = 0,
        divergence_factor: float = DIVERGENCE_FACTOR,
    ):
        self.task = task
        self.device = torch.device(device)
        self.model = model.to(self.device)
        self.train_loader, self.test_loader = train_loader, test_loader
        self.epochs = epochs
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.callbacks = CallbackList(callbacks)
        self.strategy = strategy or Strategy()
        self.writes = self.strategy.writes and self.run_dir is not None
        self.progress = progress and self.strategy.writes
        self.frozen = list(frozen)
        self.sample_macs, self.feedback_macs = sample_macs, feedback_macs
        self.divergence_factor = divergence_factor
        params = list(self.strategy.setup(self))
        if not params:
            raise ValueError("the model has no trainable parameter (is every part frozen?)")
        self.optimizer = optimizer(params)
        self.scheduler = scheduler(self.optimizer) if scheduler is not None else None
        self.log = MetricsLog(self.run_dir or Path("."), tensorboard, enabled=self.writes)
        self.epoch = 0  # completed epochs
        self.global_step = 0
        self.first_loss: float | None = None  # the reference for divergence
        self.history: list[dict] = []

    # -- checkpoints

    def state_dict(self) -> dict:
        """Everything needed to continue the run, as plain data (``torch.load(weights_only)``)."""
        numpy_state = np.random.get_state()
        return {
            "format": CHECKPOINT_FORMAT,
            "epoch": self.epoch,
            "global_step": self.global_step,
            "first_loss": self.first_loss,
            "history": self.history,
            "model": self.strategy.model_state_dict(self),
            "optimizer": self.strategy.optimizer_state_dict(self),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else {},
            "task": self.task.state_dict(),
            "rng": {
                "python": random.getstate(),
                "numpy": (numpy_state[0], torch.from_numpy(numpy_state[1].astype(np.int64)),
                          *numpy_state[2:]),
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            },
            "callbacks": self.callbacks.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(
                f"unsupported checkpoint format {state.get('format')!r} (this sdfa writes "
                f"{CHECKPOINT_FORMAT}): start a new run"
            )
        self.model.load_state_dict(state["model"])
        self.strategy.load_optimizer_state_dict(self, state["optimizer"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.task.load_state_dict(state["task"])
        rng = state["rng"]
        random.setstate(rng["python"])
        kind, keys, *rest = rng["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        self.callbacks.load_state_dict(state["callbacks"])
        self.epoch, self.global_step = state["epoch"], state["global_step"]
        self.first_loss = state["first_loss"]
        self.history = list(state["history"])

    # -- the loop

    def fit(self) -> dict:
        """Train up to ``epochs`` (from where a loaded checkpoint left off); return the summary."""
        self.log.start(self.history)
        self.callbacks.fire("on_train_start", self)
        try:
            while self.epoch < self.epochs:
                row = self.run_epoch(self.epoch + 1)
                self.check_loss(row["test_loss"], f"on the test split after epoch {self.epoch + 1}")
                self.epoch += 1
                self.callbacks.fire("on_epoch_end", self, row)
                self.history.append(row)
                self.log.epoch(self.history)
                state = self.state_dict()  # on every process: gathering it may take all of them
                if self.writes:
                    save_atomic(state, self.run_dir / "last.pt")
                self._report(row)
        finally:
            self.log.close()
        summary = self.summary()
        self.callbacks.fire("on_train_end", self, summary)
        return summary

    def run_epoch(self, epoch: int) -> dict:
        """Train one epoch, then evaluate; returns the epoch's row of metrics."""
        self.model.train()
        for module in self.frozen:
            module.eval()
        sampler = getattr(self.train_loader, "batch_sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        lr = self.optimizer.param_groups[0]["lr"]
        sums: dict[str, float] = {}
        steps = 0
        bar = tqdm(self.train_loader, desc=f"epoch {epoch}/{self.epochs}", leave=False,
                   disable=not self.progress, dynamic_ncols=True)
        start = time.perf_counter()
        for batch in bar:
            _add(sums, self.step(batch))
            steps += 1
            if self.global_step % 10 == 0 and sums.get("count"):
                bar.set_postfix(dict(_label(k, v) for k, v in self.task.summarize(sums).items()))
        train_seconds = time.perf_counter() - start
        bar.close()
        if self.scheduler is not None:
            self.scheduler.step()
        start = time.perf_counter()
        test = self.evaluate()
        row = {"epoch": epoch, "step": self.global_step, "lr": lr}
        row.update({f"train_{k}": v for k, v in self.task.summarize(sums).items()})
        row.update({f"test_{k}": v for k, v in test.items()})
        row.update(epoch_seconds=train_seconds, eval_seconds=time.perf_counter() - start,
                   step_seconds=train_seconds / max(steps, 1))
        if self.sample_macs is not None:
            spent = self.sample_macs * int(sums.get("count", 0)) + self.feedback_macs * steps
            row["step_macs"] = spent // max(steps, 1)  # mean over the epoch's steps
            row["cumulative_macs"] = spent + (
                self.history[-1]["cumulative_macs"] if self.history else 0
            )
        return row

    def step(self, batch) -> dict:
        """One optimization step on a stored batch; returns the task's metric sums."""
        inputs, targets = self.task.prepare(batch, self.device, train=True)
        self.callbacks.fire("on_step_start", self, inputs, targets)
        self.optimizer.zero_grad(set_to_none=True)
        loss, sums = self.strategy.forward_backward(self, inputs, targets)
        if sums.get("count"):
            self.check_loss(sums["loss_sum"] / sums["count"])
        self.callbacks.fire("on_before_optimizer_step", self, inputs, targets, loss)
        self.optimizer.step()
        self.global_step += 1
        self.callbacks.fire("on_step_end", self, inputs, targets, loss)
        return sums

    @torch.no_grad()
    def evaluate(self, loader: Iterable | None = None) -> dict[str, float]:
        """The task's metrics on ``loader`` (default: the test split), in eval mode."""
        self.model.eval()
        sums: dict[str, float] = {}
        for batch in self.test_loader if loader is None else loader:
            inputs, targets = self.task.prepare(batch, self.device, train=False)
            outputs = self.strategy.predict(self, inputs)
            if outputs is not None and self.task.batch_size(targets):
                _add(sums, self.task.metrics(outputs, targets))
        sums = self.strategy.share({k: sums.get(k, 0.0) for k in self.task.sum_keys})
        if not sums.get("count"):
            raise ValueError("the evaluation split is empty: there is nothing to measure")
        return self.task.summarize(sums)

    def check_loss(self, value: float, where: str = "") -> None:
        """Raise TrainingDiverged for a NaN or infinite loss, or one that has exploded."""
        if self.first_loss is None and not where and math.isfinite(value):
            self.first_loss = value
        reference = self.first_loss
        exploded = (
            self.divergence_factor and reference is not None and math.isfinite(value)
            and value > self.divergence_factor * max(abs(reference), 1e-3)
        )
        if math.isfinite(value) and not exploded:
            return
        where = where or f"at epoch {self.epoch + 1}, step {self.global_step + 1}"
        what = f"became {value}" if not exploded else (
            f"grew to {value:.4g}, over {self.divergence_factor:g}x its value at the first step "
            f"({reference:.4g})"
        )
        if self.run_dir is not None and self.epoch:
            kept = f"the last good checkpoint, {self.run_dir / 'last.pt'}, holds epoch {self.epoch}"
        else:
            kept = "no epoch had completed, so there is no checkpoint"
        lr = self.optimizer.param_groups[0]["lr"]
        raise TrainingDiverged(
            f"the loss {what} {where}: training stopped; {kept}. Try a smaller learning rate "
            f"(lr={lr:g})."
        )

    def summary(self) -> dict:
        """The run's final figures (``summary.json`` adds the run's settings)."""
        last = self.history[-1]
        summary = {"status": "complete", "epochs": self.epoch}
        for split in ("test", "train"):
            summary.update({k: v for k, v in last.items() if k.startswith(f"{split}_")})
        headline = self.task.headline
        if headline is not None:
            summary[f"best_test_{headline}"] = max(row[f"test_{headline}"] for row in self.history)
        summary["train_seconds"] = sum(row["epoch_seconds"] for row in self.history)
        if "step_macs" in last:
            summary.update(step_macs=last["step_macs"], train_macs=last["cumulative_macs"])
        summary.update(
            params=sum(p.numel() for p in self.model.parameters()),
            trainable_params=sum(p.numel() for p in self.model.parameters() if p.requires_grad),
            device=str(self.device),
            run_dir=str(self.run_dir) if self.run_dir is not None else None,
            sdfa_version=__version__,
            torch_version=torch.__version__,
        )
        return summary

    def _report(self, row: dict) -> None:
        if not self.progress:
            return
        parts = []
        for split in ("train", "test"):
            figures = " ".join(
                " ".join(_label(k[len(split) + 1:], v)) for k, v in row.items()
                if k.startswith(f"{split}_")
            )
            parts.append(f"{split} {figures}")
        tqdm.write(f"epoch {row['epoch']:>3}/{self.epochs}  {'  '.join(parts)}  "
                   f"({row['epoch_seconds']:.1f} s)")


def _add(total: dict, sums: dict) -> None:
    for key, value in sums.items():
        total[key] = total.get(key, 0) + value


def _label(key: str, value: float) -> tuple[str, str]:
    """(``loss``, ``0.1234``) / (``acc``, ``97.50%``) for progress lines."""
    if key == "accuracy":
        return "acc", f"{value:.2%}"
    return key, f"{value:.4f}"
