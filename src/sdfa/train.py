"""Training runs: ``train(config) -> summary``.

A run directory holds

* ``config.toml``  the resolved configuration (``sdfa train --config RUN/config.toml`` repeats it);
* ``metrics.csv``  one row per epoch (losses, accuracies, time and counted MACs per step);
  ``tensorboard/`` the same scalars when TensorBoard is installed;
* ``alignment.csv`` with ``log_alignment=N``: the alignment of the rule's updates with the true
  gradient, every N steps (:mod:`sdfa.alignment_log`);
* ``last.pt``      everything needed to continue (model, optimizer, scheduler, RNG states, epoch,
  history), replaced atomically after every epoch; ``final.pt`` the model's ``state_dict`` at
  the end; ``summary.json`` the final figures;
* ``pretrain/``    for the transfer protocol, the BP run whose convolutional layers are reused.

The order of the training data is a function of (seed, epoch) and every random state is saved
with the epoch, so a run killed at any moment and resumed ends with the same weights as one that
was never interrupted.

Later features plug in at four places: :class:`Callback` (hooks at the start, after every
step, after every epoch and at the end, with state kept in checkpoints), :func:`build_optimizer`,
:func:`build_loaders` and :meth:`Trainer.step`.
"""

from __future__ import annotations

import csv
import dataclasses
import importlib.util
import io
import json
import math
import os
import random
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Sampler
from tqdm import tqdm

from . import __version__
from .config import (
    SINGLE_PROCESS_ALIGNMENT,
    TrainConfig,
    config_from_dict,
    differences,
    load_toml,
    to_toml,
)
from .convert import convert, rules_of
from .costs import costs
from .data import ImageData, load_dataset, prepare_batch
from .models import build_model as build_preset
from .optim import batch_manhattan

CHECKPOINT_FORMAT = 1


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


class Callback:
    """Hooks into a run; override what you need. ``name`` keys the state kept in checkpoints.

    A callback may replace ``trainer.model``, ``trainer.optimizer`` or ``trainer.train_loader``
    in :meth:`on_train_start` (e.g. to wrap them), add columns to an epoch's row in
    :meth:`on_epoch_end` (they reach metrics.csv and TensorBoard) and keys to the summary in
    :meth:`on_train_end`.
    """

    name = "callback"

    def on_train_start(self, trainer: Trainer) -> None:
        pass

    def on_step_start(self, trainer: Trainer, inputs, labels) -> None:
        """Before the forward pass (``inputs`` prepared and on the device)."""

    def on_before_optimizer_step(self, trainer: Trainer, inputs, labels, loss) -> None:
        """After ``backward()``, before ``optimizer.step()``: the rule's update is in ``.grad``."""

    def on_step_end(self, trainer: Trainer, inputs, labels, loss: torch.Tensor) -> None:
        pass

    def on_epoch_end(self, trainer: Trainer, row: dict) -> None:
        pass

    def on_train_end(self, trainer: Trainer, summary: dict) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


# -- building blocks -------------------------------------------------------------------------


class EpochBatches(Sampler):
    """Batches of indices whose order depends only on (seed, epoch): resumable by epoch alone."""

    def __init__(self, size: int, batch_size: int, *, seed: int = 0, shuffle: bool = False):
        self.size, self.batch_size, self.seed, self.shuffle = size, batch_size, seed, shuffle
        self.epoch = 0
        # Training drops the last incomplete batch (a batch of one breaks BatchNorm), unless the
        # whole split is smaller than a batch.
        self.drop_last = shuffle and size >= batch_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        if self.shuffle:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.size, generator=gen).tolist()
        else:
            order = list(range(self.size))
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            yield order[start : start + self.batch_size]

    def __len__(self):
        full, rest = divmod(self.size, self.batch_size)
        return full + (1 if rest and not self.drop_last else 0)


def keep_batch(batch):
    """collate_fn for splits that return whole batches (``__getitems__``)."""
    return batch


def build_loaders(data: ImageData, config: TrainConfig, device: torch.device):
    """(train loader, test loader): DataLoaders over :class:`EpochBatches`."""

    def loader(split, batch_size, shuffle):
        return DataLoader(
            split,
            batch_sampler=EpochBatches(len(split), batch_size, seed=config.seed, shuffle=shuffle),
            collate_fn=keep_batch,
            num_workers=config.workers,
            pin_memory=device.type == "cuda",
            generator=torch.Generator(),  # keeps DataLoader from drawing on the global RNG
        )

    train_loader = loader(data.train, config.batch_size, True)
    return train_loader, loader(data.test, config.eval_batch_size, False)


def build_optimizer(params, config: TrainConfig) -> torch.optim.Optimizer:
    params = list(params)
    if not params:
        raise ValueError("the model has no trainable parameter (is every part frozen?)")
    name, lr, wd = config.optimizer, config.lr, config.weight_decay
    if name == "adam":
        optimizer = torch.optim.Adam(params, lr=lr, eps=config.eps, weight_decay=wd)
    elif name == "adamw":
        optimizer = torch.optim.AdamW(params, lr=lr, eps=config.eps, weight_decay=wd)
    elif name == "rmsprop":
        optimizer = torch.optim.RMSprop(params, lr=lr, eps=config.eps, weight_decay=wd)
    else:
        optimizer = torch.optim.SGD(params, lr=lr, momentum=config.momentum, weight_decay=wd)
    return batch_manhattan(optimizer) if config.batch_manhattan else optimizer


def build_scheduler(optimizer, config: TrainConfig):
    """A learning-rate schedule stepped once per epoch."""
    if config.lr_schedule == "multistep":
        milestones, gamma = config.lr_milestones, config.lr_gamma
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, gamma)
    if config.lr_schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs)
    return torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)


def build_model(config: TrainConfig, data: ImageData, features: dict | None = None) -> nn.Module:
    """The preset, converted to ``config.rule``. For the transfer protocol the ``features`` part
    stays fixed (with the weights ``features``, when given) while ``classifier`` learns."""
    try:
        model = build_preset(
            config.model, data.input_shape, data.num_classes, **config.model_options
        )
    except TypeError as error:
        raise ValueError(f"model {config.model!r}: bad model_options ({error})") from None
    options = dict(config.rule_options)
    options.update({k: v for k, v in (("k", config.k), ("rank", config.rank)) if v is not None})
    rule = config.rule
    if config.transfer:
        _check_transferable(model, config.model)
        rule = {"features": "frozen", "classifier": config.rule}
    if features is not None:
        model.features.load_state_dict(features)
    model = convert(model, rule, seed=config.seed, inplace=True, **options)
    zero_init = _saturating(model) if config.zero_init is None else config.zero_init
    if zero_init:
        _zero_dfa_layers(model)
    return model


def _check_transferable(model: nn.Module, name: str) -> None:
    children = dict(model.named_children())
    if "features" not in children or "classifier" not in children:
        raise ValueError(
            f"the transfer protocol needs a model made of 'features' and 'classifier' parts; "
            f"{name!r} has {', '.join(children) or 'no children'}. Use a convolutional preset "
            "such as crafton-cifar-conv."
        )


def _saturating(model: nn.Module) -> bool:
    """True when every activation module is tanh or sigmoid (so zero weights can learn)."""
    kinds = {type(m) for m in model.modules() if type(m).__module__ == nn.Tanh.__module__}
    return bool(kinds) and kinds <= {nn.Tanh, nn.Sigmoid}


def _zero_dfa_layers(model: nn.Module) -> None:
    """Zero the weights and biases of the layers trained by DFA (as Nokland and Crafton do)."""
    with torch.no_grad():
        for name, rule in rules_of(model).items():
            if rule == "dfa":
                for p in model.get_submodule(name).parameters(recurse=False):
                    p.zero_()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available")
    return device


def save_atomic(obj, path: Path) -> None:
    """torch.save through a temporary file and os.replace: a reader never sees half a file."""
    _write_atomic(path, lambda f: torch.save(obj, f))


def _write_atomic(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_text(path: Path, text: str) -> None:
    _write_atomic(path, lambda f: f.write(text.encode()))


# -- logging ---------------------------------------------------------------------------------


class MetricsLog:
    """metrics.csv (rewritten from the full history, so a resumed run has no duplicate rows)
    and, when TensorBoard is installed, the same scalars under ``tensorboard/``.

    TensorBoard's x axis is the training step for every scalar (an epoch's row at its last
    step), so callbacks' per-step figures share it, and a resumed run purges exactly what the
    killed one logged after its checkpoint.
    """

    def __init__(self, run_dir: Path, tensorboard: bool):
        self.csv_path = run_dir / "metrics.csv"
        self.tb_dir = run_dir / "tensorboard"
        self.use_tensorboard = tensorboard and importlib.util.find_spec("tensorboard") is not None
        self.writer = None

    def start(self, history: list[dict]) -> None:
        self.write_csv(history)
        if self.use_tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops events a killed run logged after its last checkpoint.
            last_step = history[-1]["step"] if history else 0
            self.writer = SummaryWriter(str(self.tb_dir), purge_step=last_step + 1)

    def epoch(self, history: list[dict]) -> None:
        self.write_csv(history)
        row = history[-1]
        for key, value in row.items():
            if key != "step" and isinstance(value, (int, float)):
                self.scalar(key, value, row["step"])
        if self.writer is not None:
            self.writer.flush()

    def scalar(self, tag: str, value: float, step: int) -> None:
        """Log one scalar to TensorBoard (no-op without it); ``step``: the training step."""
        if self.writer is not None:
            self.writer.add_scalar(tag, value, step)

    def write_csv(self, history: list[dict]) -> None:
        columns = list(dict.fromkeys(k for row in history for k in row)) or ["epoch"]
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(history)
        _write_text(self.csv_path, text.getvalue())

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


# -- the training loop -----------------------------------------------------------------------


class Trainer:
    """One run: the model, its optimizer and data, and the loop over epochs."""

    writes = True  # this process writes the run directory (not so on ranks other than 0)
    loss_fn = staticmethod(F.cross_entropy)  # the training loss (mean over the batch)

    def __init__(
        self,
        config: TrainConfig,
        data: ImageData,
        model: nn.Module,
        run_dir: Path,
        *,
        callbacks=(),
        frozen: list[nn.Module] = (),
    ):
        self.config, self.data, self.run_dir = config, data, run_dir
        self.device = resolve_device(config.device)
        self.model = model.to(self.device)
        self.frozen = list(frozen)  # kept in eval mode: fixed BatchNorm statistics, no dropout
        self.optimizer = build_optimizer((p for p in model.parameters() if p.requires_grad), config)
        self.scheduler = build_scheduler(self.optimizer, config)
        self.train_loader, self.test_loader = build_loaders(data, config, self.device)
        self.augment = data.augment if config.augment is None else config.augment
        self.augment_rng = torch.Generator().manual_seed(config.seed)
        self.callbacks = list(callbacks)
        self.log = MetricsLog(run_dir, config.tensorboard)
        # The rule's counted MACs of one training step per sample (sdfa.costs), for plots of
        # accuracy against compute.
        report = costs(self.model, None, data.input_shape)
        self.sample_macs = report.macs
        self.feedback_macs = report.total.feedback_macs_per_step  # learning B (wm), per step
        self.epoch = 0  # completed epochs
        self.global_step = 0
        self.history: list[dict] = []

    # -- checkpoints

    def state_dict(self) -> dict:
        return {
            "format": CHECKPOINT_FORMAT,
            "epoch": self.epoch,
            "global_step": self.global_step,
            "history": self.history,
            "config": dataclasses.asdict(self.config),
            "model": self.model_state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": {
                "python": random.getstate(),
                "numpy": np.random.get_state(),
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                "augment": self.augment_rng.get_state(),
            },
            "callbacks": {cb.name: cb.state_dict() for cb in self.callbacks},
        }

    def model_state_dict(self) -> dict:
        return self.model.state_dict()

    def load_state_dict(self, state: dict) -> None:
        if state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"unsupported checkpoint format {state.get('format')!r}")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        rng = state["rng"]
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        self.augment_rng.set_state(rng["augment"])
        for cb in self.callbacks:
            cb.load_state_dict(state["callbacks"].get(cb.name, {}))
        self.epoch, self.global_step = state["epoch"], state["global_step"]
        self.history = list(state["history"])

    # -- the loop

    def fit(self) -> dict:
        """Train up to ``config.epochs`` (from where a loaded checkpoint left off)."""
        self.log.start(self.history)
        for cb in self.callbacks:
            cb.on_train_start(self)
        try:
            while self.epoch < self.config.epochs:
                row = self.run_epoch(self.epoch + 1)
                if not math.isfinite(row["test_loss"]):  # the epoch's last steps broke the model
                    where = f"on the test split after epoch {self.epoch + 1}"
                    raise TrainingDiverged(self._divergence_message(row["test_loss"], where))
                self.epoch += 1
                for cb in self.callbacks:
                    cb.on_epoch_end(self, row)
                self.history.append(row)
                self.log.epoch(self.history)
                state = self.state_dict()  # on every rank: gathering it may take all of them
                if self.writes:
                    save_atomic(state, self.run_dir / "last.pt")
                self._report(row)
        finally:
            self.log.close()
        summary = self.summary()
        for cb in self.callbacks:
            cb.on_train_end(self, summary)
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
        loss_sum, correct, seen, steps = 0.0, 0, 0, 0
        bar = tqdm(
            self.train_loader, desc=f"epoch {epoch}/{self.config.epochs}", leave=False,
            disable=not self.config.progress, dynamic_ncols=True,
        )
        start = time.perf_counter()
        for images, labels in bar:
            loss, hits = self.step(images, labels)
            loss_sum += loss * len(labels)
            correct += hits
            seen += len(labels)
            steps += 1
            if self.global_step % 10 == 0 and seen:
                bar.set_postfix(loss=f"{loss_sum / seen:.4f}", acc=f"{correct / seen:.2%}")
        train_seconds = time.perf_counter() - start
        bar.close()
        self.scheduler.step()
        start = time.perf_counter()
        test_loss, test_accuracy = self.evaluate()
        return {
            "epoch": epoch,
            "step": self.global_step,
            "lr": lr,
            "train_loss": loss_sum / max(seen, 1),  # Poisson sampling: batches may be empty
            "train_accuracy": correct / max(seen, 1),
            "test_loss": test_loss,
            "test_accuracy": test_accuracy,
            "epoch_seconds": train_seconds,
            "eval_seconds": time.perf_counter() - start,
            "step_seconds": train_seconds / steps,
            # mean over the epoch's steps
            "step_macs": (self.sample_macs * seen + self.feedback_macs * steps) // steps,
            "cumulative_macs": self.sample_macs * seen + self.feedback_macs * steps + (
                self.history[-1]["cumulative_macs"] if self.history else 0
            ),
        }

    def prepare(self, images, labels, *, augment: bool | None = None):
        """(model input, labels) on the device; training batches are augmented if configured."""
        x = prepare_batch(
            images.to(self.device, non_blocking=True), self.data,
            augment=self.augment if augment is None else augment, generator=self.augment_rng,
        )
        return x, labels.to(self.device, non_blocking=True)

    def step(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[float, int]:
        """One optimization step on a batch of stored images; returns (mean loss, correct)."""
        x, y = self.prepare(images, labels)
        for cb in self.callbacks:
            cb.on_step_start(self, x, y)
        logits = self.model(x)
        # Poisson sampling (private runs) can draw an empty batch: its step is noise alone.
        loss = self.loss_fn(logits, y) if len(y) else logits.sum()
        if not torch.isfinite(loss):
            raise TrainingDiverged(self._divergence_message(loss.item()))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for cb in self.callbacks:
            cb.on_before_optimizer_step(self, x, y, loss)
        self.optimizer.step()
        self.global_step += 1
        for cb in self.callbacks:
            cb.on_step_end(self, x, y, loss)
        return loss.item(), int((logits.argmax(1) == y).sum())

    @torch.no_grad()
    def evaluate(self, loader=None) -> tuple[float, float]:
        """(mean loss, accuracy) on ``loader`` (default: the test split), in eval mode."""
        self.model.eval()
        loss_sum, correct, seen = 0.0, 0, 0
        for images, labels in loader or self.test_loader:
            x, y = self.prepare(images, labels, augment=False)
            logits = self._predict(x)
            if logits is not None:
                loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
                correct += int((logits.argmax(1) == y).sum())
            seen += len(y)
        return self._shared(loss_sum / seen, correct / seen)

    def _predict(self, x: torch.Tensor) -> torch.Tensor | None:
        """The model's outputs for ``x`` (None in a process that does not hold them)."""
        return self.model(x)

    def _shared(self, loss: float, accuracy: float) -> tuple[float, float]:
        """Evaluation results as every process should see them (here: as they are)."""
        return loss, accuracy

    def summary(self) -> dict:
        last = self.history[-1]
        config = self.config
        return {
            "status": "complete",
            "rule": config.rule,
            "k": config.k,
            "rank": config.rank,
            "dataset": config.dataset,
            "model": config.model,
            "transfer": config.transfer,
            "epochs": self.epoch,
            "test_accuracy": last["test_accuracy"],
            "test_loss": last["test_loss"],
            "train_accuracy": last["train_accuracy"],
            "train_loss": last["train_loss"],
            "best_test_accuracy": max(row["test_accuracy"] for row in self.history),
            "train_seconds": sum(row["epoch_seconds"] for row in self.history),
            "step_macs": last["step_macs"],
            "train_macs": last["cumulative_macs"],
            "params": sum(p.numel() for p in self.model.parameters()),
            "trainable_params": sum(p.numel() for p in self.model.parameters() if p.requires_grad),
            "train_samples": len(self.data.train),
            "test_samples": len(self.data.test),
            "optimizer": config.optimizer,
            "lr": config.lr,
            "batch_size": config.batch_size,
            "seed": config.seed,
            "device": str(self.device),
            "run_dir": str(self.run_dir),
            "sdfa_version": __version__,
            "torch_version": torch.__version__,
        }

    def _report(self, row: dict) -> None:
        if self.config.progress:
            tqdm.write(
                f"epoch {row['epoch']:>3}/{self.config.epochs}  "
                f"train loss {row['train_loss']:.4f} acc {row['train_accuracy']:.2%}  "
                f"test loss {row['test_loss']:.4f} acc {row['test_accuracy']:.2%}  "
                f"({row['epoch_seconds']:.1f} s)"
            )

    def _divergence_message(self, value: float, where: str = "") -> str:
        where = where or f"at epoch {self.epoch + 1}, step {self.global_step + 1}"
        checkpoint = self.run_dir / "last.pt"
        kept = (
            f"the last good checkpoint, {checkpoint}, holds epoch {self.epoch}"
            if self.epoch else "no epoch had completed, so there is no checkpoint"
        )
        return (
            f"the loss became {value} {where}: "
            f"training stopped; {kept}. Try a smaller learning rate (lr={self.config.lr})."
        )


# -- runs ------------------------------------------------------------------------------------


# Below this many counted MACs per training step a CPU run uses one thread unless `threads` is
# set: on the digits MLP (about 2e6) two threads save 20 % on idle cores but are 20x slower when
# other jobs keep the cores busy.
SMALL_STEP_MACS = 20_000_000


def train(config: TrainConfig, *, resume: bool = False, callbacks=()) -> dict:
    """Run (or, with ``resume``, continue) the training described by ``config``.

    Returns the summary (also written to ``summary.json``).

    Raises:
        ValueError / DataError: a bad configuration or bad data (message says what to fix).
        TrainingDiverged: the loss became NaN or infinite (the last good checkpoint is kept).
    """
    from .distributed import is_main_process
    from .distributed import training as parallel

    # under torchrun, or in a process started by launch()
    distributed = parallel.join(config.peer_timeout)
    if distributed and config.log_alignment:  # under torchrun; validate() refuses nproc > 1
        raise ValueError(SINGLE_PROCESS_ALIGNMENT)
    if config.nproc > 1 and not distributed:  # start the processes; each runs train()
        config = dataclasses.replace(config, out=str(_run_dir(config, resume)))
        return parallel.launch(train, config, resume=resume, callbacks=callbacks)
    if distributed:
        run_dir = parallel.agree(lambda: _run_dir(config, resume))
    else:
        run_dir = _run_dir(config, resume)
    trainer_class = parallel.trainer_class(config) if distributed else Trainer
    writes = is_main_process()
    if config.threads:
        torch.set_num_threads(config.threads)
    torch.set_flush_denormal(True)  # unstable feedback-alignment runs can crawl on subnormals
    data = load_dataset(
        config.dataset, config.data_dir, download=config.download, image_size=config.image_size,
        train_samples=config.train_samples, test_samples=config.test_samples,
    )
    seed_everything(config.seed)
    model = build_model(config, data)  # before the run directory exists: bad settings fail here
    if not resume and writes:
        run_dir.mkdir(parents=True, exist_ok=True)
        _write_text(run_dir / "config.toml", to_toml(dataclasses.replace(config, out=str(run_dir))))
    pretrain = None
    if config.transfer:
        features, pretrain = _pretrain(config, run_dir, resume)
        seed_everything(config.seed)
        model = build_model(config, data, features)
    frozen = [model.features] if config.transfer else []
    if config.log_alignment:
        from .alignment_log import AlignmentLog  # it builds on Callback, defined here

        callbacks = [*callbacks, AlignmentLog(config.log_alignment)]
    if config.privacy is not None:
        from .privacy.training import PrivacyCallback

        callbacks = [*callbacks, PrivacyCallback(config)]
    trainer = trainer_class(config, data, model, run_dir, callbacks=callbacks, frozen=frozen)
    small = trainer.sample_macs * config.batch_size < SMALL_STEP_MACS
    if not config.threads and trainer.device.type == "cpu" and small:
        torch.set_num_threads(1)  # a thread team mostly waits on such steps
    checkpoint = run_dir / "last.pt"
    if resume and checkpoint.exists():
        state = torch.load(checkpoint, map_location=trainer.device, weights_only=False)
        trainer.load_state_dict(state)
    if config.progress and writes:
        sizes = f"{len(data.train)} training / {len(data.test)} test samples"
        print(f"run directory: {run_dir}  ({sizes})")
    summary = trainer.fit()
    if pretrain is not None:
        summary["pretrain"] = pretrain
    final = trainer.model_state_dict()
    if writes:
        save_atomic(final, run_dir / "final.pt")
        _write_text(run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    if distributed:  # the other ranks may read these files next (transfer protocol)
        parallel.barrier("writing the run directory")
    return summary


def resume_config(run_dir: str | Path, overrides: dict | None = None) -> TrainConfig:
    """The saved configuration of ``run_dir`` with ``overrides``, which may only change how the
    run executes (device, threads, ...), not what it computes."""
    path = Path(run_dir) / "config.toml"
    if not path.exists():
        raise ValueError(f"{run_dir} is not a run directory (no config.toml): nothing to resume")
    saved = config_from_dict(load_toml(path))
    config = config_from_dict({**(overrides or {}), "out": str(run_dir)}, base=saved)
    _check_same_run(saved, config, run_dir)
    return config


def _check_same_run(saved: TrainConfig, config: TrainConfig, run_dir) -> None:
    changed = differences(saved, config)
    if changed:
        details = "; ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in changed.items())
        raise ValueError(
            f"--resume continues the run saved in {run_dir}, but these settings differ: "
            f"{details}. Resume with the saved settings, or start a new run with another --out."
        )


def _run_dir(config: TrainConfig, resume: bool) -> Path:
    """The run directory, checked (a fresh run needs an absent or empty one); creates nothing."""
    if resume:
        if config.out is None:
            raise ValueError("--resume needs --out RUN_DIR (the run directory to continue)")
        run_dir = Path(config.out)
        _check_same_run(resume_config(run_dir), config, run_dir)
        for stale in run_dir.glob(".*.tmp"):  # left by a process killed while writing
            stale.unlink()
        return run_dir
    run_dir = Path(config.out) if config.out else _default_run_dir(config)
    if run_dir.exists() and any(run_dir.iterdir()):
        raise ValueError(
            f"{run_dir} already exists and is not empty: pass --resume to continue that run, "
            "or choose another --out"
        )
    return run_dir


def _default_run_dir(config: TrainConfig) -> Path:
    parts = [config.dataset, config.model, config.rule]
    parts += [f"k{config.k}"] if config.k is not None else []
    parts += [f"r{config.rank}"] if config.rank is not None else []
    parts += ["transfer"] if config.transfer else []
    parts += [f"s{config.seed}", datetime.now().strftime("%Y%m%d-%H%M%S")]
    base = Path("runs") / "-".join(parts)
    candidate, n = base, 1
    while candidate.exists():
        n += 1
        candidate = base.with_name(f"{base.name}-{n}")
    return candidate


def _pretrain(config: TrainConfig, run_dir: Path, resume: bool) -> tuple[dict, dict]:
    """Phase one of the transfer protocol: train the whole network with BP (in ``pretrain/``).

    Returns (the state_dict of its ``features``, a short summary of the phase).
    """
    pre_dir = run_dir / "pretrain"
    pre_config = dataclasses.replace(
        config, transfer=False, rule="bp", k=None, rank=None, rule_options={}, zero_init=None,
        epochs=config.pretrain_epochs or config.epochs, lr=config.pretrain_lr or config.lr,
        out=str(pre_dir), log_alignment=0,  # BP's updates are the gradient: nothing to measure
    )
    summary_path = pre_dir / "summary.json"
    if summary_path.exists():
        summary = json.loads(summary_path.read_text())
    else:
        if config.progress:
            print(f"transfer protocol, phase 1: training every layer with BP in {pre_dir}")
        summary = train(pre_config, resume=resume and (pre_dir / "config.toml").exists())
    state = torch.load(pre_dir / "final.pt", map_location="cpu", weights_only=True)
    prefix = "features."
    features = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
    if not features:
        raise ValueError(f"{pre_dir / 'final.pt'} holds no 'features.*' weights")
    if config.progress:
        print(f"transfer protocol, phase 2: fixed features, classifier trained with {config.rule}")
    keys = ("epochs", "test_accuracy", "test_loss", "train_seconds")
    return features, {k: summary[k] for k in keys}
