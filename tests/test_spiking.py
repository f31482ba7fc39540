"""Spiking presets: LIF dynamics, input coding, DFA at every step and once per sample."""

import pytest
import torch
import torch.nn.functional as F

import sdfa
from sdfa.models import build_model
from sdfa.spiking import encode

snntorch = pytest.importorskip("snntorch")

from sdfa.spiking.models import LIF  # noqa: E402


def test_lif_follows_its_difference_equation():
    torch.manual_seed(0)
    current = torch.randn(3, 12, 5) * 0.8 + 0.4
    beta, theta = 0.8, 0.7
    out = LIF(beta, theta)(current)
    u = torch.zeros(3, 5)
    s = torch.zeros(3, 5)
    ref = []
    for t in range(12):  # U[t] = beta U[t-1] + I[t] - theta S[t-1]; S[t] = H(U[t] - theta)
        u = beta * u + current[:, t] - theta * s
        s = (u > theta).float()
        ref.append(s)
    ref = torch.stack(ref, 1)
    assert ref.sum() > 5 and (1 - ref).sum() > 5  # the case exercises spikes and silence
    assert torch.equal(out, ref)
    mem = LIF(beta, theta, output="membrane")(current)  # no reset: a leaky integrator
    u, ref = torch.zeros(3, 5), []
    for t in range(12):
        u = beta * u + current[:, t]
        ref.append(u)
    torch.testing.assert_close(mem, torch.stack(ref, 1))


def test_codings():
    x = torch.tensor([[0.0, 0.25, 1.0]])
    lat = encode(x, 5, "latency")
    assert lat.shape == (1, 5, 3)
    assert lat[0, :, 0].sum() == 0 and lat[0, 3, 1] == 1 and lat[0, 0, 2] == 1
    assert lat.sum() == 2
    gen = torch.Generator().manual_seed(0)
    rate = encode(x.expand(2000, 3), 4, "rate", generator=gen)
    assert rate[..., 0].sum() == 0 and rate[..., 2].all()
    assert abs(rate[..., 1].mean().item() - 0.25) < 0.02
    series = torch.arange(12.0).view(1, 1, 6, 2)  # (batch, channels, T, features)
    assert torch.equal(encode(series, 0, "series")[0, :, 1], torch.arange(1.0, 12.0, 2))
    with pytest.raises(ValueError, match="unknown coding"):
        encode(x, 3, "phase")


def _tiny(readout="membrane"):
    torch.manual_seed(1)
    model = build_model("snn-mlp", (4,), 2, hidden=(3,), steps=6, coding="current",
                        readout=readout, beta=0.7, threshold=0.3)
    return model


@pytest.mark.parametrize("mode", [True, "sum"])
@pytest.mark.parametrize("readout", ["membrane", "count"])
def test_dfa_on_an_snn_sends_e_B_at_every_step(mode, readout):
    """The hidden weights get the gradient of sum_t <s_t, e_t B> (mode True) or
    sum_t <s_t, (sum_t' e_t') B> (mode "sum") through the LIF's surrogate, where e_t = dL/dy_t
    at the output layer's input current; the output layer gets its true gradient."""
    base = _tiny(readout)
    model = sdfa.convert(base, "dfa", per_position=mode)
    x = torch.randn(5, 4) * 2
    target = torch.tensor([0, 1, 1, 0, 1])
    F.cross_entropy(model(x), target).backward()
    B = sdfa.feedback_matrices(model)["1"]
    assert B.shape == (2, 3)

    # the reference, built by hand from the plain model: the hidden spikes and e_t
    ref = _tiny(readout)
    ref.load_state_dict(base.state_dict())
    cur = ref[0](x)
    spikes = ref[2](ref[1](cur))
    y = ref[3](spikes.detach())
    y.retain_grad()
    F.cross_entropy(ref[5](ref[4](y)), target).backward()
    e = y.grad  # (batch, T, C)
    torch.testing.assert_close(ref[3].weight.grad, model[3].weight.grad)  # output: exact
    if mode == "sum":
        e = e.sum(1, keepdim=True).expand_as(e)
    signal = e @ B  # (batch, T, hidden): e_t B at every step
    assert signal.abs().sum() > 0
    (spikes * signal).sum().backward()
    torch.testing.assert_close(model[1].weight.grad, ref[1].weight.grad)
    torch.testing.assert_close(model[1].bias.grad, ref[1].bias.grad)
    assert model[1].weight.grad.abs().sum() > 0


def test_snn_presets_train_with_layerwise_rules_and_refuse_bad_options():
    x = torch.rand(4, 1, 8, 8)
    for name in ("snn-mlp", "snn-conv"):
        model = sdfa.convert(build_model(name, (1, 8, 8), 3, steps=3), "fa")
        model(x).sum().backward()
        assert all(p.grad is not None for p in model.parameters())
    with pytest.raises(ValueError, match="readout"):
        build_model("snn-mlp", (1, 8, 8), 3, readout="rate")
    with pytest.raises(ValueError, match="per_position must be"):
        sdfa.convert(build_model("snn-mlp", (1, 8, 8), 3), "dfa", per_position="mean")


def test_adaptation_step_costs_by_hand():
    """snn-mlp 6-64-64-4 over 100 steps: forward = update = (6*64 + 64*64 + 64*4) * 100 MACs;
    BP's error is W2^T and W3^T at every step, DFA's e B for both hidden layers."""
    from sdfa.spiking.adaptation import step_costs

    cost = step_costs((1, 100, 6), 4)
    forward = (6 * 64 + 64 * 64 + 64 * 4) * 100
    assert cost["step_macs"]["bp"] == 2 * forward + (64 * 64 + 64 * 4) * 100
    assert cost["step_macs"]["dfa"] == 2 * forward + 2 * (4 * 64) * 100
    assert cost["energy_uj"]["dfa"] < cost["energy_uj"]["bp"]


def test_adaptation_runs_on_the_crossbar():
    from sdfa.spiking import adaptation

    torch.manual_seed(0)
    x, y = torch.randn(6, 1, 10, 6), torch.tensor([0, 1, 2, 3, 0, 1])
    base = build_model("snn-mlp", (1, 10, 6), 4, hidden=(8,), coding="series", steps=10)
    for rule in ("bp", "dfa"):
        before, after = adaptation.adapt(base, rule, (x, y), (x, y), passes=1)
        assert 0 <= before <= 1 and 0 <= after <= 1
