"""Image classification: cross-entropy on class labels, accuracy."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..data import prepare_batch
from .base import Task


class Classification(Task):
    """Batches of stored images (:class:`sdfa.data.ImageData`) and their class labels.

    Training batches are augmented when ``augment`` (default: the data set's usual augmentation)
    from a generator seeded with ``seed``, kept in checkpoints.
    """

    name = "classification"
    headline = "accuracy"
    sum_keys = ("loss_sum", "correct", "count")

    def __init__(self, data, *, augment: bool | None = None, seed: int = 0):
        super().__init__(data)
        self.augment = data.augment if augment is None else augment
        self.generator = torch.Generator().manual_seed(seed)

    def prepare(self, batch, device, *, train):
        images, labels = batch
        x = prepare_batch(
            images.to(device, non_blocking=True), self.data,
            augment=self.augment and train, generator=self.generator,
        )
        return x, labels.to(device, non_blocking=True)

    def loss(self, outputs, targets):
        return F.cross_entropy(outputs, targets)

    def metrics(self, outputs, targets, loss=None):
        if loss is None:
            loss_sum = F.cross_entropy(outputs, targets, reduction="sum").item()
        else:
            loss_sum = loss * len(targets)
        return {
            "loss_sum": loss_sum,
            "correct": int((outputs.argmax(1) == targets).sum()),
            "count": len(targets),
        }

    def summarize(self, sums):
        return {**super().summarize(sums),
                "accuracy": sums.get("correct", 0) / max(sums.get("count", 0), 1)}

    def state_dict(self):
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state):
        if "generator" in state:
            self.generator.set_state(state["generator"])
