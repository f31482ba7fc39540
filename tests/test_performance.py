"""Work the engine must not do (checked by counting, not timing)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sdfa
from sdfa import feedback as fb


@pytest.mark.parametrize("rule", ["usf", "fa"])
def test_layerwise_feedback_is_skipped_where_nothing_reads_it(rule, monkeypatch):
    torch.manual_seed(0)
    model = sdfa.convert(
        nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double(), rule, seed=2
    )
    calls = []
    cls = type(model[0].rule)
    original = cls.feedback
    monkeypatch.setattr(
        cls, "feedback", lambda self, layer: calls.append(layer) or original(self, layer)
    )
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1, 2])
    out = model(x)
    F.cross_entropy(out, y).backward()
    # The first layer's input needs no gradient: its feedback is never computed.
    assert calls == [model[2]]

    # The gradients are the rule's formula all the same.
    w1, w2 = model[0].weight.detach(), model[2].weight.detach()
    h = torch.tanh(x @ w1.T + model[0].bias.detach())
    e = (torch.softmax(out.detach(), 1) - F.one_hot(y, 3)) / len(y)
    b2 = w2.sign() * w2.square().mean().sqrt() if rule == "usf" else model[2].feedback
    delta1 = (e @ b2) * (1 - h**2)
    torch.testing.assert_close(model[2].weight.grad, e.T @ h)
    torch.testing.assert_close(model[0].weight.grad, delta1.T @ x)
    torch.testing.assert_close(model[0].bias.grad, delta1.sum(0))


@pytest.mark.parametrize("k", [1, 3])
def test_sparse_projection_keeps_the_block_layout(k):
    # A transposed (N, batch) result slowed every op after it below the dense product's speed.
    f = fb.make_feedback(10, 50, seed=0, name="h", k=k, dtype=torch.float64)
    e = torch.randn(7, 10, dtype=torch.float64)
    out = f.project(e)
    assert out.is_contiguous() and out.shape == (7, 50)
    torch.testing.assert_close(out, e @ f.dense())
