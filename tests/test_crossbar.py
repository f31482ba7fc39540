"""The RRAM crossbar model: levels, differential pair, variation, faults, read noise, ADC, seeds."""

import pytest
import torch
from torch import nn

import sdfa
from sdfa.hardware import Crossbar, CrossbarLinear, CrossbarOptions, on_crossbar, quantize_signed

D = torch.float64


def test_ideal_crossbar_equals_the_product():
    w = torch.randn(7, 4, dtype=D, generator=torch.Generator().manual_seed(0))
    x = torch.randn(5, 7, dtype=D, generator=torch.Generator().manual_seed(1))
    ideal = Crossbar(w, bits=None, adc_bits=None)
    assert torch.allclose(ideal(x), x @ w, atol=1e-12)
    # enough bits: within the rounding of 16-bit cells and a 24-bit ADC
    fine = Crossbar(w, bits=16, adc_bits=24)
    assert torch.allclose(fine(x), x @ w, atol=1e-3 * (x @ w).abs().max().item())


def test_levels_and_differential_pair_by_hand():
    w = torch.tensor([[0.5, -1.0], [0.25, 0.0]], dtype=D)
    c = Crossbar(w, bits=2, g_min=1.0, g_max=4.0, adc_bits=None)  # 4 levels: 0, 1/3, 2/3, 1
    # |w| / w_max = [[.5, 1], [.25, 0]] -> round(3 m) / 3 = [[2/3, 1], [1/3, 0]]; span 3 uS
    assert torch.allclose(c.g_pos, torch.tensor([[3.0, 1.0], [2.0, 1.0]], dtype=D))
    assert torch.allclose(c.g_neg, torch.tensor([[1.0, 4.0], [1.0, 1.0]], dtype=D))
    assert torch.allclose(
        c.effective_weight(), torch.tensor([[2 / 3, -1.0], [1 / 3, 0.0]], dtype=D)
    )
    x = torch.tensor([[1.0, 2.0]], dtype=D)
    assert torch.allclose(c(x), torch.tensor([[4 / 3, -1.0]], dtype=D))


def test_quantize_signed_formula():
    x = torch.tensor([0.3, -0.7, 1.2, 0.0], dtype=D)
    # 3 bits: 3 steps per side of [-1, 1]; round(0.9)=1, round(-2.1)=-2, clipped 1.2 -> 1
    assert torch.allclose(
        quantize_signed(x, 1.0, 3), torch.tensor([1 / 3, -2 / 3, 1.0, 0.0], dtype=D)
    )
    assert torch.equal(quantize_signed(x, 1.0, None), x)


def test_adc_quantises_the_column_output():
    w = torch.tensor([[1.0, -0.4, 0.2]], dtype=D)
    c = Crossbar(w, bits=None, adc_bits=2, adc_range=1.0)  # levels -1, 0, 1
    assert torch.allclose(c(torch.ones(1, 1, dtype=D)), torch.tensor([[1.0, 0.0, 0.0]], dtype=D))
    # per-read full scale: the largest |output| of the batch maps to the top level
    c = Crossbar(w, bits=None, adc_bits=3)  # 3 steps per side
    y = c(torch.tensor([[2.0]], dtype=D))
    assert torch.allclose(y, torch.tensor([[2.0, -2 / 3, 2 / 3]], dtype=D))


def test_input_dac_quantises_each_row():
    w = torch.eye(3, dtype=D)
    c = Crossbar(w, bits=None, adc_bits=None, input_bits=2)  # levels -fs, 0, fs per row
    x = torch.tensor([[0.4, -1.0, 0.6]], dtype=D)
    assert torch.allclose(c(x), torch.tensor([[0.0, -1.0, 1.0]], dtype=D))


def test_read_noise_has_the_per_cell_variance():
    w = torch.tensor([[0.5, -1.0], [1.0, 0.25]], dtype=D)
    c = Crossbar(w, bits=None, adc_bits=None, read_noise=0.05, seed=3)
    x = torch.tensor([[1.0, -2.0]], dtype=D).repeat(40000, 1)
    y = c(x)
    # per cell g (1 + 0.05 n): var_j = 0.05^2 sum_i x_i^2 (g+_ij^2 + g-_ij^2) (weight units)
    var = 0.05**2 * (x[:1] ** 2) @ (c.g_pos**2 + c.g_neg**2) * c.scale**2
    assert torch.allclose(y.mean(0), (x[:1] @ w)[0], atol=4 * var.sqrt().max().item() / 200)
    assert torch.allclose(y.var(0), var[0], rtol=0.05)
    # fresh noise per read, reproducible from the seed
    again = Crossbar(w, bits=None, adc_bits=None, read_noise=0.05, seed=3)
    assert torch.equal(again(x), y) and not torch.equal(y[0], y[1])


def test_programming_variation_is_log_normal_and_fixed():
    w = torch.ones(300, 300, dtype=D)
    c = Crossbar(w, bits=None, adc_bits=None, variation=0.2, seed=1)
    ratio = torch.log(c.g_pos / 40.0)  # target: every positive cell at g_max
    assert abs(ratio.mean().item()) < 0.005 and abs(ratio.std().item() - 0.2) < 0.005
    x = torch.randn(3, 300, dtype=D)
    assert torch.equal(c(x), c(x))  # no read noise: the same device reads the same


def test_stuck_faults_hit_their_fraction():
    w = torch.randn(200, 150, dtype=D, generator=torch.Generator().manual_seed(0))
    c = Crossbar(w, bits=4, adc_bits=None, stuck_on=0.02, stuck_off=0.05, variation=0.1, seed=2)
    on, off = c.stuck_mask()
    cells = torch.stack([c.g_pos, c.g_neg])
    assert abs(on.double().mean().item() - 0.02) < 0.003
    assert abs(off.double().mean().item() - 0.05) < 0.004
    assert (cells[on] == 40.0).all() and (cells[off] == 1.0).all()
    # the same cells stay stuck when the array is re-written
    c.program(-w)
    assert torch.equal(c.stuck_mask()[0], on)


def test_seeds_reproduce_the_device():
    w = torch.randn(20, 10, dtype=D, generator=torch.Generator().manual_seed(0))
    opts = dict(variation=0.3, stuck_on=0.1, stuck_off=0.1)
    a, b, other = (
        Crossbar(w, seed=5, **opts),
        Crossbar(w, seed=5, **opts),
        Crossbar(w, seed=6, **opts),
    )
    assert torch.equal(a.g_pos, b.g_pos) and torch.equal(a.g_neg, b.g_neg)
    assert not torch.equal(a.g_pos, other.g_pos)
    # the programmed device survives a state_dict round trip
    fresh = Crossbar(torch.zeros(20, 10, dtype=D), seed=9)
    fresh.load_state_dict(a.state_dict())
    assert torch.equal(fresh.effective_weight(), a.effective_weight())


def test_bad_options_are_refused_clearly():
    w = torch.ones(2, 2)
    with pytest.raises(ValueError, match="unknown crossbar option"):
        Crossbar(w, bitz=3)
    with pytest.raises(ValueError, match="bits"):
        Crossbar(w, bits=0)
    with pytest.raises(ValueError, match="stuck_on"):
        CrossbarOptions(stuck_on=0.7, stuck_off=0.5)
    with pytest.raises(ValueError, match="g_min < g_max"):
        Crossbar(w, g_min=5.0, g_max=1.0)
    with pytest.raises(ValueError, match="2-D"):
        Crossbar(torch.ones(3))


def test_crossbar_linear_forward_gradient_and_reprogramming():
    torch.manual_seed(0)
    lin = nn.Linear(6, 3).double()
    xl = CrossbarLinear.from_linear(lin, bits=None, adc_bits=None)
    assert xl.weight is lin.weight
    x = torch.randn(4, 6, dtype=D, requires_grad=True)
    assert torch.allclose(xl(x), lin(x), atol=1e-12)
    # straight-through: the gradients of the ideal product
    xl(x).pow(2).sum().backward()
    gx, gw = x.grad.clone(), lin.weight.grad.clone()
    x.grad = None
    lin.weight.grad = None
    lin(x).pow(2).sum().backward()
    assert torch.allclose(gx, x.grad) and torch.allclose(gw, lin.weight.grad)
    # after an optimizer step the array is re-written with the new weight
    torch.optim.SGD(lin.parameters(), lr=0.1).step()
    xl(x)
    assert torch.allclose(xl.crossbar.effective_weight(), lin.weight.detach().t(), atol=1e-12)


def test_dfa_trains_a_model_on_crossbars():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 8, generator=gen)
    y = (x[:, 0] > 0).long()
    net = on_crossbar(nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 2)), bits=6)
    assert all(isinstance(m, CrossbarLinear) for m in (net[0], net[2]))
    model = sdfa.convert(net, "dfa")
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    first = None
    for _ in range(60):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        first = first if first is not None else loss.item()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first
    with pytest.raises(ValueError, match="no nn.Linear named"):
        on_crossbar(nn.Sequential(nn.Linear(2, 2)), names=["fc"])
