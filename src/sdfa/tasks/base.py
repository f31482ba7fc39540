"""The task interface of the training core."""

from __future__ import annotations

import torch


class Task:
    """What is learned from a data set, independent of how a step runs.

    ``metrics`` returns sums over a batch (so they add up over batches and over processes);
    ``summarize`` turns the summed figures of a split into its reported metrics. ``loss`` is the
    training loss, a mean over the batch: its gradient with respect to the model output is the
    error that DFA projects to the hidden layers.
    """

    name = "task"
    #: the metric that decides "best" in summaries (higher is better), if any
    headline: str | None = None
    #: the keys of :meth:`metrics` (summed over processes in a fixed order)
    sum_keys: tuple[str, ...] = ("loss_sum", "count")
    #: the dtype of the model input (None: floating point; token ids: torch.long)
    input_dtype: torch.dtype | None = None

    def __init__(self, data):
        self.data = data

    @property
    def input_shape(self) -> tuple[int, ...]:
        """The shape of one model input (no batch), for sizing and pricing the model."""
        return tuple(self.data.input_shape)

    def example_input(self, device) -> torch.Tensor:
        """One zero input of batch size 1, for sizing and pricing the model."""
        return torch.zeros(1, *self.input_shape, device=device, dtype=self.input_dtype)

    def prepare(self, batch, device: torch.device, *, train: bool):
        """A stored batch -> (model input, targets) on ``device``."""
        inputs, targets = batch
        return inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True)

    def batch_size(self, targets) -> int:
        """The number of samples the batch's loss averages over."""
        return len(targets)

    def loss(self, outputs: torch.Tensor, targets) -> torch.Tensor:
        raise NotImplementedError

    def metrics(self, outputs: torch.Tensor, targets, loss: float | None = None) -> dict:
        """Sums over the batch; always ``loss_sum`` and ``count``. ``loss``: the batch's mean
        training loss when it is already known (a training step), so it is not computed again."""
        raise NotImplementedError

    def summarize(self, sums: dict[str, float]) -> dict[str, float]:
        """``{"loss": mean loss, ...}`` of a split from its summed ``metrics``."""
        count = max(sums.get("count", 0), 1)  # Poisson sampling may make an epoch empty
        return {"loss": sums.get("loss_sum", 0.0) / count}

    def state_dict(self) -> dict:
        """Random state that a checkpoint must keep (e.g. of the augmentation)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
