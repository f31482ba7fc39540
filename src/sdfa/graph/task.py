"""Node classification: one graph, full batch, train / validation / test masks.

A training batch is the whole graph with the training mask; the loss (BCE on sigmoid outputs,
the paper's, or cross-entropy) covers the labelled nodes, and the pseudo-error generator and
node filter (``eg``, ``nf``) shape the error at the logits (:func:`sdfa.graph.error_signal`).
An evaluation batch reports the test nodes (``accuracy``, ``loss``) and the validation nodes
(``val_accuracy``, ``val_loss``), so a protocol can test at the best validation epoch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..tasks.base import Task
from . import ops

#: the task's options (``task_options``; ``eg`` ... ``epsilon`` may also come in a rule spec)
ERROR_OPTIONS = ("eg", "nf", "alpha", "T", "epsilon")


@dataclass
class NodeTargets:
    labels: torch.Tensor
    mask: torch.Tensor  # the nodes of the loss and of ``accuracy``
    val_mask: torch.Tensor | None = None

    def __len__(self):
        return int(self.mask.sum())


class NodeClassification(Task):
    """See the module docstring. ``alpha``, ``T``: the spreading factor and steps of the
    pseudo-error generator; ``epsilon``: the node filter's threshold."""

    name = "node-classification"
    headline = "accuracy"
    sum_keys = ("loss_sum", "correct", "count", "val_loss_sum", "val_correct", "val_count")

    def __init__(self, data, *, loss: str = "bce", eg: bool = False, nf: bool = False,
                 alpha: float = 0.1, T: int = 50, epsilon: float = 0.5):
        super().__init__(data)
        if loss not in ops.LOSSES:
            raise ValueError(f"task option loss must be one of {', '.join(ops.LOSSES)}; got "
                             f"{loss!r}")
        if nf and not eg:
            raise ValueError("the node filter (nf=true) needs the pseudo-error generator (eg=true)")
        if not 0 <= alpha <= 1 or not isinstance(T, int) or T < 0:
            raise ValueError(f"the pseudo-error generator needs 0 <= alpha <= 1 and an integer "
                             f"T >= 0; got alpha={alpha!r}, T={T!r}")
        self.loss_name, self.options = loss, dict(eg=eg, nf=nf, alpha=alpha, steps=T,
                                                 epsilon=epsilon)
        self.kept = None  # nodes the last training step learned from

    def prepare(self, batch, device, *, train):
        graph = batch.to(device)
        inputs = type(graph)(x=graph.x, edge_index=graph.edge_index)
        if train:
            return inputs, NodeTargets(graph.y, graph.train_mask)
        return inputs, NodeTargets(graph.y, graph.test_mask, graph.val_mask)

    def batch_size(self, targets):
        return len(targets)

    def loss(self, outputs, targets):
        S = None
        if self.options["eg"]:
            S = self.data.propagation(outputs.device, outputs.dtype)
        loss, info = ops.error_signal(outputs, targets.labels, targets.mask, S,
                                      loss=self.loss_name, **self.options)
        self.kept = info["kept"]
        return loss

    def metrics(self, outputs, targets, loss=None):
        sums = self._split(outputs, targets.labels, targets.mask, loss)
        if targets.val_mask is not None:
            val = self._split(outputs, targets.labels, targets.val_mask)
            sums.update({f"val_{k}": v for k, v in val.items()})
        return sums

    def _split(self, outputs, labels, mask, loss=None):
        count = int(mask.sum())
        if loss is None:
            loss = ops.node_loss(outputs, labels, mask, self.loss_name).item()
        correct = int((outputs[mask].argmax(1) == labels[mask]).sum())
        return {"loss_sum": loss * count, "correct": correct, "count": count}

    def summarize(self, sums):
        out = {"loss": sums.get("loss_sum", 0.0) / max(sums.get("count", 0), 1),
               "accuracy": sums.get("correct", 0) / max(sums.get("count", 0), 1)}
        if sums.get("val_count"):
            out["val_loss"] = sums["val_loss_sum"] / sums["val_count"]
            out["val_accuracy"] = sums["val_correct"] / sums["val_count"]
        return out

    def step_costs(self, model) -> tuple[int, int]:
        """(MACs per labelled training node, feedback MACs per step) of a training step, from
        :func:`sdfa.graph.costs.graph_costs` (the trainer multiplies by the labelled nodes)."""
        from .costs import graph_costs

        report = graph_costs(model, self.data, eg=self.options["eg"],
                             steps=self.options["steps"])
        return report.macs // max(len(self.data.train), 1), 0
