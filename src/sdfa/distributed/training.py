"""``sdfa train`` on several processes: ``--nproc N`` (or torchrun) with ``--parallel data|layer``.

:func:`sdfa.train.train` calls :func:`launch` to start the processes, :func:`join` in each of
them, and builds its trainer with :func:`trainer_class`. Every rank reads the same data in the
same order, and the run directory holds what a single-process run writes (rank 0 writes it): the
checkpoints are in the single-process layout, so a run may be resumed with another number of
processes, or none.

* ``data``: each rank trains on its share of every batch, DDP averages the gradients; the
  batch's loss and accuracy are summed over the ranks at every step (two numbers).
* ``layer``: :class:`~sdfa.distributed.LayerParallel`; the last rank broadcasts the batch's loss
  and accuracy at every step (two numbers), and the test metrics after each evaluation.

In both, every rank sees the same loss, so a diverging run stops on every rank at the same step.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..train import MetricsLog, Trainer, TrainingDiverged, build_optimizer, build_scheduler
from .comm import Comm
from .data_parallel import data_parallel
from .launch import ProcessFailure, is_main_process, launched, setup, spawn
from .pipeline import LayerParallel


def launch(train, config, *, resume: bool, callbacks=()) -> dict:
    """Run ``train(config)`` on ``config.nproc`` new processes; return the run's summary.

    ``config.out`` must name the run directory (the caller resolves it first).
    """
    if config.threads is None:  # share the cores instead of oversubscribing them
        threads = max(1, (os.cpu_count() or 1) // config.nproc)
        config = dataclasses.replace(config, threads=threads)
    try:
        spawn(_run, config.nproc, (train, config, resume, tuple(callbacks)),
              timeout=config.peer_timeout)
    except ProcessFailure as error:
        raise ProcessFailure(
            f"{error}\nThe last checkpoint is kept: continue with "
            f"'sdfa train --out {config.out} --resume'"
        ) from None
    return json.loads((Path(config.out) / "summary.json").read_text())


def _run(train, config, resume, callbacks):
    train(config, resume=resume, callbacks=callbacks)


def join(timeout: float) -> bool:
    """In a process started by torchrun or :func:`launch`, join the group; True if distributed.

    ``timeout``: seconds any communication may wait for a peer (``peer_timeout``).
    """
    if launched() and not dist.is_initialized():
        setup(timeout=timeout)
    return dist.is_initialized()


def agree(decide):
    """``decide()`` on rank 0, returned on every rank (a ValueError there is raised everywhere)."""
    box = [None]
    if dist.get_rank() == 0:
        try:
            box[0] = (decide(), None)
        except ValueError as error:
            box[0] = (None, str(error))
    with Comm().guard("agreeing on the run directory"):
        dist.broadcast_object_list(box, src=0)
    value, error = box[0]
    if error is not None:
        raise ValueError(error)
    return value


def barrier(what: str) -> None:
    with Comm().guard(what):
        dist.barrier()


def trainer_class(config) -> type[Trainer]:
    return {"data": DataParallelTrainer, "layer": LayerParallelTrainer}[config.parallel]


class _SilentLog(MetricsLog):
    """The metrics log of the ranks that do not write the run directory."""

    def start(self, history):
        pass

    def epoch(self, history):
        pass

    def scalar(self, tag, value, step):
        pass

    def close(self):
        pass


class _DistributedTrainer(Trainer):
    """Rank 0 writes the run directory and prints; the other ranks are silent."""

    def __init__(self, config, data, model, run_dir, **kwargs):
        self.comm = Comm()
        self.writes = is_main_process()
        if not self.writes:
            config = dataclasses.replace(config, progress=False)
        super().__init__(config, data, model, run_dir, **kwargs)
        if not self.writes:
            self.log = _SilentLog(run_dir, tensorboard=False)

    def _finish_step(self, x, y, loss: float, hits: float) -> tuple[float, int]:
        if not torch.isfinite(torch.tensor(loss)):
            raise TrainingDiverged(self._divergence_message(loss))
        for cb in self.callbacks:
            cb.on_before_optimizer_step(self, x, y, torch.tensor(loss))
        self.optimizer.step()
        self.global_step += 1
        for cb in self.callbacks:
            cb.on_step_end(self, x, y, torch.tensor(loss))
        return loss, round(hits)


class DataParallelTrainer(_DistributedTrainer):
    """Each rank takes every world_size-th sample of a batch; DDP averages the gradients."""

    def __init__(self, config, data, model, run_dir, **kwargs):
        super().__init__(config, data, model, run_dir, **kwargs)
        self.replica = data_parallel(self.model)

    def step(self, images, labels):
        x, y = self.prepare(images, labels)  # the whole batch: same augmentation draws as 1 rank
        for cb in self.callbacks:
            cb.on_step_start(self, x, y)
        share = slice(self.comm.rank, None, self.comm.world_size)
        self.optimizer.zero_grad(set_to_none=True)
        logits = self.replica(x[share])
        loss = F.cross_entropy(logits, y[share])
        with self.comm.guard("data-parallel step", only_backend_errors=True):
            loss.backward()
            # the batch's mean loss and correct count, summed over the shares
            stats = torch.stack([
                loss.detach().double() * (len(logits) / len(y)),
                (logits.argmax(1) == y[share]).sum().double(),
            ])
            dist.all_reduce(stats)
        return self._finish_step(x, y, stats[0].item(), stats[1].item())


class LayerParallelTrainer(_DistributedTrainer):
    """The model's layers split over the ranks (:class:`LayerParallel`)."""

    def __init__(self, config, data, model, run_dir, **kwargs):
        super().__init__(config, data, model, run_dir, **kwargs)
        example = torch.zeros(1, *data.input_shape, device=self.device)
        self.stage = LayerParallel(
            self.model, example_input=example, micro_batches=config.micro_batches, comm=self.comm
        )
        params = list(self.stage.parameters())
        # A rank of frozen layers only (transfer protocol) keeps a placeholder optimizer, so the
        # learning rate schedule and the checkpoint format stay those of the other ranks.
        self.stage_optimizer = build_optimizer(params, config) if params else None
        self.optimizer = self.stage_optimizer or build_optimizer(
            [torch.zeros(1, requires_grad=True)], config
        )
        self.scheduler = build_scheduler(self.optimizer, config)

    def step(self, images, labels):
        x, y = self.prepare(images, labels)
        for cb in self.callbacks:
            cb.on_step_start(self, x, y)
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.stage.forward_backward(x, y)
        stats = torch.zeros(2, dtype=torch.float64, device=self.device)
        if self.stage.is_last:
            stats[0], stats[1] = loss, (self.stage.output.argmax(1) == y).sum()
        self.comm.broadcast(stats, self.comm.world_size - 1, "metrics")
        return self._finish_step(x, y, stats[0].item(), stats[1].item())

    def _predict(self, x):
        return self.stage.predict(x)  # the outputs exist on the last stage only

    def _shared(self, loss, accuracy):
        stats = torch.tensor([loss, accuracy], dtype=torch.float64, device=self.device)
        self.comm.broadcast(stats, self.comm.world_size - 1, "metrics")
        return stats[0].item(), stats[1].item()

    def model_state_dict(self) -> dict | None:
        return self.stage.state_dict()

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["optimizer"] = self.stage.optimizer_state_dict(self.stage_optimizer)
        return state

    def load_state_dict(self, state: dict) -> None:
        local = (
            self.stage.local_optimizer_state(state["optimizer"]) if self.stage_optimizer
            else self.optimizer.state_dict()
        )
        super().load_state_dict({**state, "optimizer": local})
