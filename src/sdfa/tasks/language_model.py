"""Next-token prediction: cross-entropy at every position, perplexity."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .base import Task


class LanguageModel(Task):
    """Windows of token ids (:class:`sdfa.data.text.TextData`) and the same windows shifted by one.

    The model maps (batch, seq_len) ids to (batch, seq_len, vocabulary) logits; the loss is the
    mean cross-entropy over every token of the batch. A sample is one window, so ``count`` (and
    the MACs per sample of the cost model) counts windows; every window has the same length, so
    the mean of the windows' mean token losses is the mean token loss, and the perplexity is its
    exponential.
    """

    name = "language-model"
    headline = None  # perplexity: lower is better, and "best" in summaries means the highest
    input_dtype = torch.long

    def __init__(self, data, *, augment: bool | None = None, seed: int = 0):
        super().__init__(data)

    def loss(self, outputs, targets):
        return F.cross_entropy(outputs.flatten(0, -2), targets.flatten())

    def metrics(self, outputs, targets, loss=None):
        if loss is None:
            total = F.cross_entropy(outputs.flatten(0, -2), targets.flatten(), reduction="sum")
            loss = total.item() / max(targets.numel(), 1)
        return {"loss_sum": loss * len(targets), "count": len(targets)}

    def summarize(self, sums):
        summary = super().summarize(sums)
        return {**summary, "perplexity": math.exp(min(summary["loss"], 700.0))}
