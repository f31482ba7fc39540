"""Runs of ``sdfa train``: ``train(config) -> summary``, ``load_run(run_dir)``.

A run directory holds

* ``config.toml``  the resolved configuration (``sdfa train --config RUN/config.toml`` repeats it);
* ``metrics.csv``  one row per epoch (losses, the task's metrics, time and counted MACs per
  step); ``tensorboard/`` the same scalars when TensorBoard is installed;
* ``alignment.csv`` with ``log_alignment=N`` (:mod:`sdfa.alignment_log`);
* ``last.pt``      everything needed to continue, replaced atomically after every epoch;
  ``final.pt`` the model's ``state_dict`` at the end; ``summary.json`` the final figures;
* ``pretrain/``    for the transfer protocol, the BP run whose convolutional layers are reused.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from pathlib import Path

import torch

from ..costs import costs
from ..training import Trainer, load_checkpoint, save_atomic, write_text
from . import build
from .config import (
    SINGLE_PROCESS_ALIGNMENT,
    TrainConfig,
    config_from_dict,
    differences,
    load_toml,
    to_toml,
)
from .rundir import check_fresh, claim, default_path

# Below this many counted MACs per training step a CPU run uses one thread unless `threads` is
# set: on the digits MLP (about 2e6) two threads save 20 % on idle cores but are 20x slower when
# other jobs keep the cores busy.
SMALL_STEP_MACS = 20_000_000


def train(config: TrainConfig, *, resume: bool = False, callbacks=()) -> dict:
    """Run (or, with ``resume``, continue) the training described by ``config``.

    Returns the summary (also written to ``summary.json``).

    Raises:
        ValueError / DataError: a bad configuration or bad data (message says what to fix).
        TrainingDiverged: the loss became NaN, infinite or exploded (the last good checkpoint
            is kept).
    """
    from ..distributed import is_main_process
    from ..distributed import strategies as parallel

    distributed = parallel.join(config.peer_timeout)  # under torchrun or launch()
    if distributed and config.log_alignment:  # under torchrun; validate() refuses nproc > 1
        raise ValueError(SINGLE_PROCESS_ALIGNMENT)
    if config.nproc > 1 and not distributed:  # start the processes; each runs train()
        config = dataclasses.replace(config, out=str(_planned_dir(config, resume)))
        return parallel.launch(train, config, resume=resume, callbacks=callbacks)
    if distributed:
        run_dir = parallel.agree(lambda: _planned_dir(config, resume))
    else:
        run_dir = _planned_dir(config, resume)
    writes = is_main_process()
    if config.threads:
        torch.set_num_threads(config.threads)
    torch.set_flush_denormal(True)  # unstable feedback-alignment runs can crawl on subnormals
    data = build.load_data(config)
    build.seed_everything(config.seed)
    model = build.build_model(config, data)  # before the run directory exists: bad settings fail
    with contextlib.ExitStack() as held:
        # The process that writes the run directory locks it for the run's whole life.
        def take() -> Path:
            lock = claim(run_dir, fresh=not resume, default_name=config.out is None)
            return held.enter_context(lock)

        if distributed:
            run_dir = parallel.agree(take)  # rank 0 takes it; every rank learns the path
        elif writes:
            run_dir = take()
        return _train_in(run_dir, config, data, model, resume, callbacks, distributed, writes)


def _train_in(run_dir, config, data, model, resume, callbacks, distributed, writes) -> dict:
    if writes:
        # written again on resume: an extended run (larger epochs) records its new length
        write_text(run_dir / "config.toml", to_toml(dataclasses.replace(config, out=str(run_dir))))
    pretrain = None
    if config.transfer:
        features, pretrain = _pretrain(config, run_dir, resume)
        build.seed_everything(config.seed)
        model = build.build_model(config, data, features)
    trainer = build_trainer(config, data, model, run_dir, [
        *callbacks, *build.callbacks_for(config)
    ], distributed=distributed)
    small = trainer.sample_macs * config.batch_size < SMALL_STEP_MACS
    if not config.threads and trainer.device.type == "cpu" and small:
        torch.set_num_threads(1)  # a thread team mostly waits on such steps
    checkpoint = run_dir / "last.pt"
    if resume and checkpoint.exists():
        trainer.load_state_dict(load_checkpoint(checkpoint, trainer.device))
    if config.progress and writes:
        sizes = f"{len(data.train)} training / {len(data.test)} test samples"
        print(f"run directory: {run_dir}  ({sizes})")
    summary = describe(config, data, trainer.fit())
    if pretrain is not None:
        summary["pretrain"] = pretrain
    final = trainer.strategy.model_state_dict(trainer)
    if writes:
        save_atomic(final, run_dir / "final.pt")
        write_text(run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    trainer.strategy.barrier("writing the run directory")  # the other ranks may read them next
    return summary


def build_trainer(config: TrainConfig, data, model, run_dir=None, callbacks=(), *,
                  distributed: bool = False) -> Trainer:
    """The :class:`Trainer` of ``config`` for ``model`` on ``data`` (no run directory logic:
    see :func:`train`)."""
    device = build.resolve_device(config.device)
    task = build.task_for(config, data)
    train_loader, test_loader = build.loaders(config, data, device)
    example = task.example_input(device)
    step_costs = getattr(task, "step_costs", None)  # a task that prices its own steps (graphs)
    if step_costs is not None:
        sample_macs, feedback_macs = step_costs(model)
    else:
        # the rule's counted MACs per sample
        report = costs(model, None, task.input_shape, input_dtype=task.input_dtype)
        sample_macs, feedback_macs = report.macs, report.total.feedback_macs_per_step
    return Trainer(
        task, model, train_loader, test_loader,
        optimizer=build.optimizer_factory(config), scheduler=build.scheduler_factory(config),
        epochs=config.epochs, run_dir=run_dir, callbacks=callbacks,
        strategy=build.strategy_for(config, distributed, example),
        frozen=[model.features] if config.transfer else [], device=device,
        progress=config.progress, tensorboard=config.tensorboard,
        sample_macs=sample_macs, feedback_macs=feedback_macs,
    )


def describe(config: TrainConfig, data, summary: dict) -> dict:
    """The trainer's summary with the run's settings (the keys of summary.json)."""
    settings = {
        "rule": config.rule, "k": config.k, "rank": config.rank,
        "rule_options": dict(config.rule_options), "dataset": config.dataset,
        "model": config.model, "transfer": config.transfer,
    }
    run = {
        "train_samples": len(data.train), "test_samples": len(data.test),
        "optimizer": config.optimizer, "lr": config.lr, "batch_size": config.batch_size,
        "seed": config.seed,
    }
    status = {"status": summary.pop("status")}
    return {**status, **settings, **summary, **run}


def load_run(run_dir: str | Path, *, device: str = "cpu"):
    """``(model, config)`` of a finished or interrupted run, with its weights, rule and feedback.

    The model is rebuilt from the run's ``config.toml`` (preset, rule, seed, options) and given
    the weights of ``final.pt``, or of ``last.pt`` for a run that did not finish; it is in eval
    mode on ``device``. The data set's files are needed only to size the model (the images are
    not read for digits; for the other sets the shape and class count are known in advance).

    Raises:
        ValueError: not a run directory, no weights yet, or a damaged or hostile file.
    """
    run_dir = Path(run_dir)
    config = resume_config(run_dir, {"device": device, "progress": False})
    final, last = run_dir / "final.pt", run_dir / "last.pt"
    if final.exists():
        state = load_checkpoint(final, device, what="weights file")
    elif last.exists():
        state = load_checkpoint(last, device)["model"]
    else:
        raise ValueError(f"{run_dir} holds no weights yet (no final.pt or last.pt)")
    data = build.load_data(config)
    model = build.build_model(config, data)
    model.load_state_dict(state)
    return model.to(device).eval(), config


def resume_config(run_dir: str | Path, overrides: dict | None = None) -> TrainConfig:
    """The saved configuration of ``run_dir`` with ``overrides``, which may only change how the
    run executes (device, threads, ...) or extend it (a larger ``epochs``), not what it computes."""
    path = Path(run_dir) / "config.toml"
    if not path.is_file():
        raise ValueError(f"{run_dir} is not a run directory (no config.toml): nothing to resume")
    saved = config_from_dict(load_toml(path))
    config = config_from_dict({**(overrides or {}), "out": str(run_dir)}, base=saved)
    _check_same_run(saved, config, run_dir)
    return config


def _check_same_run(saved: TrainConfig, config: TrainConfig, run_dir) -> None:
    changed = differences(saved, config)
    epochs = changed.pop("epochs", None)
    if changed:
        details = "; ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in changed.items())
        raise ValueError(
            f"--resume continues the run saved in {run_dir}, but these settings differ: "
            f"{details}. Resume with the saved settings, or start a new run with another --out."
        )
    if epochs is not None:
        _check_extension(saved, config, run_dir)


def _check_extension(saved: TrainConfig, config: TrainConfig, run_dir) -> None:
    """A resumed run may train for more epochs than it was started with, if nothing else depends
    on the number of epochs."""
    if config.epochs < saved.epochs:
        raise ValueError(
            f"--resume of {run_dir}: epochs may grow (to extend the run) but not shrink "
            f"(saved {saved.epochs}, now {config.epochs})"
        )
    reason = None
    if config.lr_schedule == "cosine":
        reason = "its cosine learning-rate schedule spans the original epochs"
    elif config.privacy is not None and config.epsilon is not None:
        reason = "its noise was calibrated to spend epsilon in the original epochs"
    elif config.transfer and config.pretrain_epochs is None:
        reason = "its BP pretraining phase ran for the original epochs (set pretrain_epochs)"
    if reason:
        raise ValueError(
            f"--resume of {run_dir} cannot extend it from {saved.epochs} to {config.epochs} "
            f"epochs: {reason}. Start a new run with the new epochs."
        )


def _planned_dir(config: TrainConfig, resume: bool) -> Path:
    """The run directory, checked (a fresh run needs an absent or empty one); creates nothing.

    :func:`~sdfa.app.rundir.claim` checks again under the run's lock."""
    if resume:
        if config.out is None:
            raise ValueError("--resume needs --out RUN_DIR (the run directory to continue)")
        run_dir = Path(config.out)
        _check_same_run(resume_config(run_dir), config, run_dir)
        return run_dir
    if config.out:
        run_dir = Path(config.out)
    else:
        parts = [config.dataset, config.model, config.rule]
        parts += [f"k{config.k}"] if config.k is not None else []
        parts += [f"r{config.rank}"] if config.rank is not None else []
        parts += ["transfer"] if config.transfer else []
        run_dir = default_path([*parts, f"s{config.seed}"], to_toml(config))
    check_fresh(run_dir)
    return run_dir


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
    state = load_checkpoint(pre_dir / "final.pt", what="pretrained weights")
    prefix = "features."
    features = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
    if not features:
        raise ValueError(f"{pre_dir / 'final.pt'} holds no 'features.*' weights")
    if config.progress:
        print(f"transfer protocol, phase 2: fixed features, classifier trained with {config.rule}")
    keys = ("epochs", "test_accuracy", "test_loss", "train_seconds")
    return features, {k: summary[k] for k in keys}
