"""FDFA: forward-mode perturbations teach B the true output-to-hidden Jacobian."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sdfa
from sdfa.dfa import dfa_config


def _linear(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 6), nn.Linear(6, 4), nn.Linear(4, 3)).double()


def test_fdfa_feedback_converges_to_the_jacobian_of_a_linear_net():
    model = sdfa.convert(_linear(), "fdfa", feedback_lr=0.03)
    B = sdfa.feedback_matrices(model)
    assert all(b.abs().sum() == 0 for b in B.values())  # B starts at zero (as the FDFA code)
    gen = torch.Generator().manual_seed(1)
    for lr, steps in ((0.03, 200), (0.003, 200), (0.0005, 200)):
        dfa_config(model).feedback_lr = lr
        for _ in range(steps):
            model(torch.randn(256, 5, generator=gen, dtype=torch.float64))  # B learns forward
    W1, W2 = model[1].weight.detach(), model[2].weight.detach()
    B = sdfa.feedback_matrices(model)
    for label, jacobian in (("0", W2 @ W1), ("1", W2)):  # dy/dh_0 = W2 W1, dy/dh_1 = W2
        assert (B[label] - jacobian).norm() / jacobian.norm() < 0.05
    # a random DFA matrix is nowhere near it
    random = sdfa.feedback_matrices(sdfa.convert(_linear(), "dfa"))["1"]
    assert (random - W2).norm() / W2.norm() > 0.5


def test_fdfa_update_is_one_adam_step_on_b_minus_d_u():
    """One forward pass: d = J u (linear net), grad_B = B - mean(d u^T), Adam's first step
    moves every entry by lr * sign(-grad) (bias-corrected moments)."""
    model = sdfa.convert(nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)).double(), "fdfa",
                         feedback_lr=0.1, seed=3)
    state = dfa_config(model).generator.get_state()
    x = torch.randn(8, 3, dtype=torch.float64)
    model(x)
    u = torch.randn(8, 4, generator=torch.Generator().set_state(state), dtype=torch.float64)
    d = u @ model[1].weight.detach().t()
    grad = torch.zeros(2, 4, dtype=torch.float64) - d.t() @ u / 8
    expected = -0.1 * grad / (grad.abs() + 1e-8)
    torch.testing.assert_close(sdfa.feedback_matrices(model)["0"], expected)


def test_fdfa_trains_and_keeps_its_state():
    torch.manual_seed(0)
    model = sdfa.convert(nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)), "fdfa",
                         feedback_lr=0.01)
    x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
    for _ in range(3):
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
    assert model[0].weight.grad.abs().sum() > 0  # the hidden layer learns from e B
    B = sdfa.feedback_matrices(model)["0"].clone()
    with torch.no_grad():
        model(x)  # evaluation does not touch B
    model.eval()(x)
    assert torch.equal(sdfa.feedback_matrices(model)["0"], B)
    copy = sdfa.convert(nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)), "fdfa",
                         feedback_lr=0.01)
    copy.load_state_dict(model.state_dict())
    assert torch.equal(sdfa.feedback_matrices(copy)["0"], B)
    # the perturbation generator's state comes along: the next step draws the same u in both
    # (a resumed run continues exactly as an uninterrupted one)
    for net in (model, copy):
        net.train().zero_grad()
        F.cross_entropy(net(x), y).backward()
    assert torch.equal(sdfa.feedback_matrices(copy)["0"], sdfa.feedback_matrices(model)["0"])
    assert torch.equal(copy[0].weight.grad, model[0].weight.grad)
    fresh = sdfa.convert(nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)), "fdfa",
                         feedback_lr=0.01)
    fresh.load_state_dict({k: v for k, v in model.state_dict().items()
                           if "sdfa_perturbations" not in k}, strict=False)
    F.cross_entropy(fresh(x), y).backward()  # the seed's first u, not the trained run's next u
    assert not torch.equal(sdfa.feedback_matrices(fresh)["0"], sdfa.feedback_matrices(model)["0"])
    with pytest.raises(ValueError, match="feedback_lr"):
        sdfa.convert(nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 3)), "fdfa", feedback_lr=0)
    with pytest.raises(ValueError, match="unknown option"):
        sdfa.convert(nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 3)), "fdfa", k=1)


def test_fdfa_on_a_spiking_net_per_step():
    pytest.importorskip("snntorch")
    import torch.autograd.forward_ad as fwAD

    from sdfa.models import build_model
    from sdfa.spiking.models import FastSigmoidSpike

    # two hidden LIF layers: the tangent of the first goes through the second's spike function
    model = sdfa.convert(build_model("snn-mlp", (6,), 2, hidden=(5, 4), steps=4,
                                     coding="current"), "fdfa", per_position=True,
                         feedback_lr=0.05)
    F.cross_entropy(model(torch.rand(3, 6) * 3), torch.tensor([0, 1, 1])).backward()
    assert all(b.abs().sum() > 0 for b in sdfa.feedback_matrices(model).values())
    x, t = torch.tensor([-0.5, 0.0, 0.3]), torch.tensor([1.0, 2.0, -1.0])
    with fwAD.dual_level():
        out = fwAD.unpack_dual(FastSigmoidSpike.apply(fwAD.make_dual(x, t), 25.0))
    assert torch.equal(out.primal, torch.tensor([0.0, 0.0, 1.0]))
    torch.testing.assert_close(out.tangent, t / (25 * x.abs() + 1) ** 2)


def test_data_parallel_refuses_fdfa():
    from sdfa.distributed.data_parallel import data_parallel

    model = sdfa.convert(nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 3)), "fdfa")
    with pytest.raises(ValueError, match="one process"):
        data_parallel(model)
