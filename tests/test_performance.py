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
    original = cls.feedback_parts  # what the backward pass (and feedback()) calls
    def logged(self, layer, out=None):
        calls.append(layer)
        return original(self, layer, out)

    monkeypatch.setattr(cls, "feedback_parts", logged)
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


def test_sign_feedback_is_built_in_the_backward_pass_into_one_reused_tensor():
    # A fresh sign(W) per step cost a W-sized allocation (page faults) and was held from the
    # forward to the backward pass; the layer now reuses one scratch tensor.
    torch.manual_seed(0)
    model = sdfa.convert(nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double(), "usf")
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1, 2])
    out = model(x)
    assert "_feedback_scratch" not in vars(model[2])  # the forward pass builds and holds nothing
    F.cross_entropy(out, y).backward()
    w2 = model[2].weight.detach().clone()
    scratch = model[2]._feedback_scratch
    # it holds sign(W): the amplitude h scales the (smaller) input gradient instead
    torch.testing.assert_close(scratch, w2.sign())

    with torch.no_grad():
        model[2].weight.mul_(-2)  # a step that flips every sign
    F.cross_entropy(model(x), y).backward()
    assert model[2]._feedback_scratch is scratch
    torch.testing.assert_close(scratch, -w2.sign())
    assert "_feedback_scratch" not in vars(model[0])  # the first layer never needs it
    assert sdfa.feedback_matrices(model)["2"].data_ptr() != scratch.data_ptr()

    # W changed in place between forward and backward: autograd refuses, as it does for BP,
    # instead of building the feedback from the new W.
    out = model(x)
    with torch.no_grad():
        model[2].weight.add_(1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        F.cross_entropy(out, y).backward()
