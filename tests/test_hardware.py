"""DFA feedback backends on simulated devices: the optical processor (OPU) and the RRAM crossbar."""

import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sdfa
from sdfa.hardware import OpticalFeedback, OpticalOptions, bitplanes, ternarize

D = torch.float64
IDEAL_OPU = {"encoding": "bitplanes", "input_bits": 24, "camera_bits": None}


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 16), nn.Tanh(), nn.Linear(16, 4)
    ).double()


def opu(options=None, classes=3, neurons=5, seed=0):
    return OpticalFeedback.create(
        classes,
        neurons,
        target_std=0.2,
        options=OpticalOptions.from_dict(options),
        gen=torch.Generator().manual_seed(seed),
        seed=seed,
        dtype=D,
        device="cpu",
    )


def test_ternarisation_formula():
    e = torch.tensor([[0.06, -0.01, -0.2], [0.04, 0.051, -0.05]], dtype=D)
    # B = 2 rows, tau = 0.1: threshold 0.05; strict inequalities
    assert torch.equal(ternarize(e, 0.1), torch.tensor([[1, 0, -1], [0, 1, 0]], dtype=D))


def test_bitplanes_reconstruct_the_error():
    e = torch.tensor([[0.3, -0.7, 0.0, 0.04]], dtype=D)
    pos, neg, step = bitplanes(e, 3)  # step = 0.7 / 7 = 0.1; levels 3, 7, 0, round(0.4)=0
    weights = torch.tensor([1.0, 2.0, 4.0], dtype=D)[:, None, None]
    assert torch.allclose(
        step * ((pos - neg) * weights).sum(0), torch.tensor([[0.3, -0.7, 0, 0]], dtype=D)
    )
    assert set(pos.unique().tolist()) <= {0.0, 1.0} and (pos * neg == 0).all()


def test_intensity_is_the_squared_modulus_of_x_r():
    f = opu()
    x = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]], dtype=D)
    r = torch.complex(f.r_real[:3], f.r_imag[:3])
    by_hand = (x[:, :, None] * r[None]).sum(1).abs() ** 2
    assert torch.allclose(f.intensity(x, with_anchor=False), by_hand)
    anchor = torch.complex(f.r_real[3:], f.r_imag[3:]).sum(0)  # anchor: 3 pixels, all on
    assert torch.allclose(
        f.intensity(x, with_anchor=True), ((x.to(r.dtype) @ r) + anchor).abs() ** 2
    )


def test_recovery_is_linear_in_x():
    f = opu({"camera_bits": None})
    x = torch.tensor([[1.0, 0.0, 1.0], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0]], dtype=D)
    r = torch.complex(f.r_real[:3], f.r_imag[:3])
    c = torch.complex(f.r_real[3:], f.r_imag[3:]).sum(0)
    # (|xR + c|^2 - |xR|^2 - |c|^2) / 2 = Re((xR) conj(c)) = x M, M = Re(R conj(c))
    m = (r * c.conj()).real
    assert torch.allclose(f.measure_linear(x), x @ m, atol=1e-12)
    assert torch.allclose(f.dense(), m * f.gain)
    big = opu({"camera_bits": None}, classes=50, neurons=4000)
    assert abs(big.dense().std().item() - 0.2) < 1e-6  # rescaled to the exact backend's std


def test_ideal_opu_equals_exact_dfa_with_its_matrix():
    f = opu(IDEAL_OPU)
    e = torch.randn(6, 3, dtype=D, generator=torch.Generator().manual_seed(1)) / 6
    ref = e @ f.dense()
    assert torch.allclose(f.project(e), ref, atol=1e-6 * ref.abs().max().item())
    # ternary encoding, ideal camera: the formula exactly
    t = opu({"encoding": "ternary", "camera_bits": None})
    assert torch.allclose(t.project(e), ternarize(e, 0.1) @ t.dense() / 6, atol=1e-12)


def test_frames_per_projection():
    e = torch.randn(5, 3, dtype=D)
    f = opu({"encoding": "ternary"})
    f.project(e)
    assert f.frames == 4 * 5 + 1  # ternary: 2 binary inputs x 2 frames per row, + the anchor
    f = opu({"encoding": "bitplanes", "input_bits": 4})
    f.project(e)
    assert f.frames == 4 * 4 * 5 + 1


def test_camera_quantisation_and_shot_noise():
    f = opu({"camera_bits": 2})  # levels 0, 1/3, 2/3, 1 of full scale
    i = torch.tensor([[0.2, 0.5, 1.3]], dtype=D)
    assert torch.allclose(
        f.camera(i, torch.tensor(1.0, dtype=D)), torch.tensor([[1 / 3, 2 / 3, 1.0]], dtype=D)
    )
    noisy = opu({"camera_bits": None, "photons": 100.0})
    half = torch.full((20000, 1), 0.5, dtype=D)
    out = noisy.camera(half, torch.tensor(1.0, dtype=D))
    # Poisson(50) photo-electrons / 100: mean 0.5, variance 50 / 100^2
    assert abs(out.mean().item() - 0.5) < 0.003 and abs(out.var().item() / 0.005 - 1) < 0.05


def test_seeds_reproduce_the_opu_and_its_noise():
    opts = {"photons": 1000.0, "noise": 0.01}
    e = torch.randn(4, 3, dtype=D, generator=torch.Generator().manual_seed(2)) / 4
    a, b, c = opu(opts, seed=5), opu(opts, seed=5), opu(opts, seed=6)
    assert torch.equal(a.r_real, b.r_real) and not torch.equal(a.r_real, c.r_real)
    assert torch.equal(a.project(e), b.project(e))
    assert not torch.equal(a.project(e), a.project(e))  # fresh noise at every measurement


def test_ideal_crossbar_is_exact_dfa():
    exact = sdfa.feedback_matrices(sdfa.convert(mlp(), "dfa", seed=3))
    for k in (None, 1):
        ideal = sdfa.convert(
            mlp(),
            "dfa",
            seed=3,
            k=k,
            feedback="crossbar",
            feedback_options={"bits": None, "adc_bits": None},
        )
        reference = sdfa.feedback_matrices(sdfa.convert(mlp(), "dfa", seed=3, k=k))
        for name, b in sdfa.feedback_matrices(ideal).items():
            assert torch.allclose(b, reference[name], atol=1e-12)
    assert exact.keys() == reference.keys()
    # and the gradients of a step are those of exact DFA
    x, y = torch.randn(10, 8, dtype=D), torch.randint(0, 4, (10,))
    grads = []
    for backend in ("exact", "crossbar"):
        model = sdfa.convert(
            mlp(),
            "dfa",
            seed=3,
            feedback=backend,
            feedback_options={"bits": None, "adc_bits": None} if backend != "exact" else None,
        )
        F.cross_entropy(model(x), y).backward()
        grads.append([p.grad for p in model.parameters()])
    for a, b in zip(*grads, strict=True):
        assert torch.allclose(a, b, atol=1e-12)


def test_ideal_opu_backend_trains_like_exact_dfa_with_the_opu_matrix():
    x, y = torch.randn(10, 8, dtype=D), torch.randint(0, 4, (10,))
    model = sdfa.convert(mlp(), "dfa", feedback="optical", feedback_options=IDEAL_OPU)
    F.cross_entropy(model(x), y).backward()
    # the hidden layer's gradient is the one exact DFA computes with the OPU's effective matrix
    b = model[2].dfa_feedback.dense()
    out = model(x).detach().requires_grad_()
    (e,) = torch.autograd.grad(F.cross_entropy(out, y), out)
    h2 = torch.tanh(model[2](torch.tanh(model[0](x))))
    delta = (e @ b) * (1 - h2**2)
    assert torch.allclose(model[2].weight.grad, delta.t() @ torch.tanh(model[0](x)), atol=1e-6)


@pytest.mark.parametrize(
    "backend,options",
    [("optical", {}), ("crossbar", {"variation": 0.1, "read_noise": 0.02, "stuck_off": 0.01})],
)
def test_dfa_learns_on_each_backend(backend, options):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(128, 8, generator=gen, dtype=D)
    y = (x[:, 0] + x[:, 1] > 0).long() + 2 * (x[:, 2] > 0).long()
    model = sdfa.convert(mlp(), "dfa", feedback=backend, feedback_options=options)
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(80):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
    assert (model(x).argmax(1) == y).double().mean() > 0.8


def test_devices_survive_save_and_load():
    for backend in ("optical", "crossbar"):
        # boundaries: the devices are made at the first forward pass, so loading creates them
        model = sdfa.convert(mlp(), "dfa", seed=1, feedback=backend, boundaries=["1", "3"])
        model(torch.randn(2, 8, dtype=D))
        buf = io.BytesIO()
        torch.save(model.state_dict(), buf)
        buf.seek(0)
        fresh = sdfa.convert(mlp(), "dfa", seed=9, feedback=backend, boundaries=["1", "3"])
        fresh.load_state_dict(torch.load(buf, weights_only=False))
        loaded = sdfa.feedback_matrices(fresh)
        for name, b in sdfa.feedback_matrices(model).items():
            assert torch.allclose(loaded[name], b)
        e = torch.randn(3, 4, dtype=D)
        if backend == "crossbar":  # no read noise by default: the same device reads the same
            assert torch.equal(fresh[1].dfa_feedback.project(e), model[1].dfa_feedback.project(e))


def test_invalid_combinations_are_refused_clearly():
    with pytest.raises(
        ValueError, match="unknown feedback backend 'opitcal'.*did you mean 'optical'"
    ):
        sdfa.convert(mlp(), "dfa", feedback="opitcal")
    with pytest.raises(ValueError, match="OPU's own dense random matrix: k="):
        sdfa.convert(mlp(), "dfa", k=1, feedback="optical")
    with pytest.raises(ValueError, match="dense array; dilation="):
        sdfa.convert(mlp(), "dfa", dilation=2, feedback="crossbar")
    with pytest.raises(ValueError, match="'exact' takes no feedback_options"):
        sdfa.convert(mlp(), "dfa", feedback_options={"bits": 4})
    with pytest.raises(ValueError, match="unknown optical option"):
        sdfa.convert(mlp(), "dfa", feedback="optical", feedback_options={"bits": 4})
    with pytest.raises(ValueError, match="unknown optical encoding"):
        OpticalOptions(encoding="holographic")


def test_config_keys_reach_convert_and_privacy_is_refused():
    from sdfa.app.build import rule_options
    from sdfa.app.config import TrainConfig, validate

    config = TrainConfig(feedback="crossbar", feedback_options={"bits": 3})
    assert rule_options(config) == {"feedback": "crossbar", "feedback_options": {"bits": 3}}
    assert "feedback" not in rule_options(TrainConfig())  # other rules keep working
    with pytest.raises(ValueError, match="device's own noise on e @ B is not accounted"):
        validate(TrainConfig(privacy="dp-noisy-projection", feedback="optical"))


def test_energy_by_hand_on_a_tiny_network():
    from sdfa.hardware.energy import Figures, estimate

    net = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    e = estimate(net, (4,), figures=Figures())
    # forward 12 + 6 MACs, update the same; BP's error 3 x 2 = e @ B's 2 x 3; movement 6 + 6
    digital = ((18 + 6 + 18) * 4.6 + 12 * 5.0) * 1e-12
    assert e.bp == pytest.approx(digital) and e.dfa == pytest.approx(digital)
    rest = 36 * 4.6e-12
    assert e.dfa_crossbar == pytest.approx(rest + 2 * 6 * 1e-15 + 3 * 2e-12)
    assert e.dfa_opu == pytest.approx(rest + 16 * 30 * 5e-4)
    # full use: 16 frames of (2 error + 2 anchor pixels) x 3 outputs at 30 W / 1.5e15 op/s
    assert e.dfa_opu_full_use == pytest.approx(rest + 16 * 4 * 3 * 30 / 1.5e15)
    assert e.projection_macs == 6


def test_the_hardware_set_builds_valid_configs_and_finds_the_lost_point():
    from sdfa.app.config import config_from_dict
    from sdfa.app.reproduce import SETS, _one_point_lost

    chosen = SETS["hardware"]
    for exp in chosen.experiments:
        config_from_dict(exp.config)  # every key and value type-checks
        if exp.series:
            assert exp.x is not None and exp.config["feedback"] in ("optical", "crossbar")
    series = {"noise": {0.01: [97.0], 0.1: [96.9], 0.3: [90.0]}, "bits": {1: [80.0], 4: [97.0]}}
    lines = _one_point_lost(series, {"noise": "up", "bits": "down"}, {"DFA": [97.8]}, "DFA")
    assert lines == [
        "- noise: loses one point against DFA (97.80%) at 0.3",
        "- bits: loses one point against DFA (97.80%) at 1",
    ]


@pytest.mark.parametrize("backend", ["optical", "crossbar"])
def test_per_position_feedback_on_a_device(backend):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    model = sdfa.convert(net, "dfa", per_position=True, feedback=backend)
    x = torch.randn(2, 7, 5, dtype=D)  # (batch, positions, features)
    F.cross_entropy(model(x).flatten(0, 1), torch.randint(0, 3, (14,))).backward()
    assert sdfa.feedback_matrices(model)["0"].shape == (3, 8)
    assert model[0].weight.grad.abs().sum() > 0


def test_costs_energy_on_the_command_line(capsys):
    from sdfa.app.cli import main

    assert main(["costs", "--energy", "--markdown"]) == 0
    out = capsys.readouterr().out
    assert "| MNIST FC 784-400-10 | 2.980 | 2.980 |" in out and "ASSUMED" in out
    assert main(["costs", "--energy", "--model", "mlp"]) == 2
    assert "--energy prices the networks of Crafton et al." in capsys.readouterr().err
