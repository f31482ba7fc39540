"""Training on several processes: the strategies for :class:`sdfa.training.Trainer`, and the
helpers that start and join the processes (``sdfa train --nproc N`` or torchrun).

Every rank reads the same data in the same order, and the run directory holds what a
single-process run writes (rank 0 writes it): the checkpoints are in the single-process layout,
so a run may be resumed with another number of processes, or none.

* :class:`DataParallel`: each rank trains on its share of every batch, DDP averages the
  gradients; the task's metric sums of the batch are summed over the ranks at every step.
* :class:`LayerParallelStrategy`: :class:`~sdfa.distributed.LayerParallel`; the last rank
  broadcasts the batch's metric sums at every step, and the test sums after each evaluation.

In both, every rank sees the same loss, so a diverging run stops on every rank at the same step.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist

from ..training import Strategy
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


class _Distributed(Strategy):
    """Rank 0 writes the run directory and prints; the other ranks are silent."""

    def __init__(self):
        self.comm = Comm()
        self.writes = is_main_process()

    def barrier(self, what: str) -> None:
        with self.comm.guard(what):
            dist.barrier()

    def setup(self, trainer):
        self.device = trainer.device
        return super().setup(trainer)

    def _sums(self, task, sums: dict | None) -> torch.Tensor:
        values = [0.0] * len(task.sum_keys) if sums is None else [sums[k] for k in task.sum_keys]
        return torch.tensor(values, dtype=torch.float64, device=self.device)

    @staticmethod
    def _unpack(task, stats: torch.Tensor) -> dict:
        return dict(zip(task.sum_keys, stats.tolist()))


class DataParallel(_Distributed):
    """Each rank takes every world_size-th sample of a batch; DDP averages the gradients."""

    def setup(self, trainer):
        params = super().setup(trainer)
        self.replica = data_parallel(trainer.model)
        return params

    def forward_backward(self, trainer, inputs, targets):
        task = trainer.task
        share = slice(self.comm.rank, None, self.comm.world_size)
        with self.comm.guard("data-parallel step", only_backend_errors=True):
            outputs = self.replica(inputs[share])
            loss = task.loss(outputs, targets[share])
            loss.backward()
            sums = task.metrics(outputs.detach(), targets[share], loss=loss.item())
            stats = self._sums(task, sums)
            dist.all_reduce(stats)  # the whole batch's sums, on every rank
        sums = self._unpack(task, stats)
        return torch.tensor(sums["loss_sum"] / max(sums["count"], 1)), sums


class LayerParallelStrategy(_Distributed):
    """The model's layers split over the ranks (:class:`LayerParallel`)."""

    def __init__(self, *, micro_batches: int, example_input: torch.Tensor):
        super().__init__()
        self.micro_batches, self.example_input = micro_batches, example_input

    def setup(self, trainer):
        super().setup(trainer)
        self.stage = LayerParallel(
            trainer.model, example_input=self.example_input.to(trainer.device),
            micro_batches=self.micro_batches, comm=self.comm, loss_fn=trainer.task.loss,
        )
        params = list(self.stage.parameters())
        # A rank of frozen layers only (transfer protocol) keeps a placeholder parameter, so the
        # learning rate schedule and the checkpoint format stay those of the other ranks.
        self.placeholder = not params
        return params or [torch.zeros(1, requires_grad=True)]

    def forward_backward(self, trainer, inputs, targets):
        task = trainer.task
        loss = self.stage.forward_backward(inputs, targets)
        sums = None
        if self.stage.is_last:
            sums = task.metrics(self.stage.output, targets, loss=loss)
        stats = self.comm.broadcast(self._sums(task, sums), self.comm.world_size - 1, "metrics")
        sums = self._unpack(task, stats)
        return torch.tensor(sums["loss_sum"] / max(sums["count"], 1)), sums

    def predict(self, trainer, inputs):
        return self.stage.predict(inputs)  # the outputs exist on the last stage only

    def share(self, sums):
        stats = torch.tensor(list(sums.values()), dtype=torch.float64, device=self.device)
        self.comm.broadcast(stats, self.comm.world_size - 1, "metrics")
        return dict(zip(sums, stats.tolist()))

    def model_state_dict(self, trainer):
        return self.stage.state_dict()

    def optimizer_state_dict(self, trainer):
        return self.stage.optimizer_state_dict(None if self.placeholder else trainer.optimizer)

    def load_optimizer_state_dict(self, trainer, state):
        if not self.placeholder:
            trainer.optimizer.load_state_dict(self.stage.local_optimizer_state(state))

