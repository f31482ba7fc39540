"""Strategies: how one training step runs (one process here; several in sdfa.distributed).

The :class:`~sdfa.training.Trainer` owns the loop, the optimizer step, the callbacks and the
checkpoints; a strategy owns only what differs between ways of running a step: which parameters
this process optimizes, how a batch becomes a loss and gradients, where the outputs live, and how
figures and checkpoint parts are shared between processes.
"""

from __future__ import annotations

import torch


class Strategy:
    """One process, the whole model, the whole batch."""

    #: this process writes the run directory and prints (rank 0 of several)
    writes = True

    def setup(self, trainer) -> list[torch.nn.Parameter]:
        """Prepare ``trainer.model``; return the parameters this process optimizes."""
        return [p for p in trainer.model.parameters() if p.requires_grad]

    def forward_backward(self, trainer, inputs, targets) -> tuple[torch.Tensor, dict]:
        """Loss and gradients of one batch: (mean loss, the task's metric sums).

        Raises TrainingDiverged (through ``trainer.check_loss``) before the backward pass when
        the loss is not finite.
        """
        task = trainer.task
        outputs = trainer.model(inputs)
        if task.batch_size(targets) == 0:  # Poisson sampling (private runs): a step of noise
            loss = outputs.sum()
            sums = {key: 0.0 for key in task.sum_keys}
        else:
            loss = task.loss(outputs, targets)
            trainer.check_loss(loss.item())
            sums = task.metrics(outputs.detach(), targets, loss=loss.item())
        loss.backward()
        return loss.detach(), sums

    def predict(self, trainer, inputs) -> torch.Tensor | None:
        """The model's outputs for ``inputs`` (None in a process that does not hold them)."""
        return trainer.model(inputs)

    def share(self, sums: dict) -> dict:
        """Evaluation sums as every process should see them (here: as they are)."""
        return sums

    def model_state_dict(self, trainer) -> dict:
        return trainer.model.state_dict()

    def optimizer_state_dict(self, trainer) -> dict:
        return trainer.optimizer.state_dict()

    def load_optimizer_state_dict(self, trainer, state: dict) -> None:
        trainer.optimizer.load_state_dict(state)

    def barrier(self, what: str) -> None:
        """Wait for every process (nothing to wait for here)."""
