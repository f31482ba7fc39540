"""Mixed precision: every rule trains under torch.autocast (bfloat16), with float32 feedback
matrices and float32 gradients close to those of the float32 step."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sdfa


def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Tanh(), nn.Flatten(),
                         nn.Linear(4 * 6 * 6, 32), nn.Tanh(), nn.Linear(32, 10))


def grads(model, x, y, autocast):
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("rule, options", [
    ("bp", {}), ("dfa", {}), ("dfa", {"k": 1}), ("dfa", {"rank": 2}), ("fa", {}), ("usf", {}),
    ("frsf", {}), ("kp", {}),
])
def test_rules_train_under_bf16_autocast(rule, options):
    model = sdfa.convert(net(), rule, **options)
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 1, 6, 6, generator=gen), torch.randint(0, 10, (16,), generator=gen)
    mixed = grads(model, x, y, autocast=True)  # the first pass: B is made under autocast
    exact = grads(model, x, y, autocast=False)
    for a, b in zip(mixed, exact):
        assert a.dtype == torch.float32
        assert F.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.98
    for matrix in sdfa.feedback_matrices(model).values():
        assert matrix.dtype == torch.float32
