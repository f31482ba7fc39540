"""sdfa.privacy: sensitivity bounds, noise scale, accounting, exactness, budgets, bad input."""

import importlib.machinery
import importlib.util
import math
import sys
import types
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import sdfa
from sdfa.privacy import PrivacyBudgetExhausted, PrivacyEngine, bounds, mechanism
from sdfa.privacy import engine as engine_module
from sdfa.privacy.probe import check_examples_independent
from sdfa.privacy.randomness import _next_init_word, secret_generator

DT = torch.float64


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: threads only add contention on the shared CI cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

ACTIVATIONS = {
    "tanh": (nn.Tanh, 1.0),  # (module, element-wise output bound or None)
    "sigmoid": (nn.Sigmoid, 1.0),
    "hardtanh": (lambda: nn.Hardtanh(-2.0, 2.0), 2.0),
    "relu": (nn.ReLU, None),
    "leaky": (lambda: nn.LeakyReLU(0.3), None),
    "gelu": (nn.GELU, None),
}


def mlp(sizes, act, dropout=0.0, seed=0):
    torch.manual_seed(seed)
    layers = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(ACTIVATIONS[act][0]())
            if dropout:
                layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers).to(DT)


def loader(x, y, batch_size):
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


def private(model, x, y, batch_size=4, noise=0.0, method="dp-dfa", poisson=False, **options):
    engine = PrivacyEngine()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model, opt, data = engine.make_private(
        module=model, optimizer=opt, data_loader=loader(x, y, batch_size), method=method,
        noise_multiplier=noise, poisson_sampling=poisson, **options,
    )
    return engine, model, opt, data


def layer_grads(model):
    """{layer name: concatenated (weight, bias) gradient} for every Linear / Conv2d."""
    return {
        name: torch.cat([p.grad.flatten() for p in m.parameters(recurse=False)])
        for name, m in model.named_modules()
        if isinstance(m, (nn.Linear, nn.Conv2d))
    }


# -- sensitivity -----------------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 12), min_size=3, max_size=5),
    act=st.sampled_from(sorted(ACTIVATIONS)),
    dropout=st.sampled_from([0.0, 0.5]),
    input_scale=st.floats(1e-3, 1e3),
    error_norm=st.floats(0.05, 5.0),
    input_norm=st.floats(0.1, 10.0),
    activation_norm=st.floats(0.1, 10.0) | st.none(),
    seed=st.integers(0, 10**6),
)
def test_dp_dfa_per_example_update_is_within_sensitivity(
    sizes, act, dropout, input_scale, error_norm, input_norm, activation_norm, seed
):
    """Each example's update of each layer stays within that layer's stated sensitivity, and
    the hidden layers' feedback stays within C_e ||B||_2 J_l before any clipping: the bound
    comes from the analysis, not from the guard clip."""
    if ACTIVATIONS[act][1] is None and activation_norm is None:
        activation_norm = 1.0  # unbounded activations need an activation clip
    model = sdfa.convert(mlp(sizes, act, dropout, seed), "dfa", seed=seed)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(6, sizes[0], generator=gen, dtype=DT) * input_scale
    y = torch.randint(0, sizes[-1], (6,), generator=gen)
    options = {"max_error_norm": error_norm, "max_input_norm": input_norm}
    if activation_norm is not None:
        options["max_activation_norm"] = activation_norm
    engine, model, opt, _ = private(model, x, y, loss_reduction="sum", **options)

    total = None
    for i in range(len(x)):
        opt.zero_grad()
        F.cross_entropy(model(x[i : i + 1]), y[i : i + 1], reduction="sum").backward()
        grads = layer_grads(model)
        sensitivity = engine.mechanism.sensitivities()
        for name, g in grads.items():
            assert g.norm() <= sensitivity[name] * (1 + 1e-9), (name, g.norm(), sensitivity)
        for layer in engine.mechanism.layers.values():
            if not layer.is_output:
                assert layer.norms[-1].max() <= layer.feedback_bound * (1 + 1e-9)
        total = grads if total is None else {n: total[n] + g for n, g in grads.items()}

    if not dropout:  # the batch update is the sum of the per-example updates: no mixing
        opt.zero_grad()
        F.cross_entropy(model(x), y, reduction="sum").backward()
        for name, g in layer_grads(model).items():
            torch.testing.assert_close(g, total[name])


def conv_net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.Tanh(),
        nn.MaxPool2d(3, stride=2),  # overlapping windows
        nn.Conv2d(4, 5, 3, stride=2),
        nn.ReLU(),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(5, 3),
    ).to(DT)


@pytest.mark.parametrize("scale", [0.1, 10.0, 1000.0])
def test_dp_dfa_conv_per_example_update_is_within_sensitivity(scale):
    model = sdfa.convert(conv_net(), "dfa", seed=3)
    x = torch.randn(5, 2, 11, 11, dtype=DT) * scale
    y = torch.randint(0, 3, (5,))
    engine, model, opt, _ = private(
        model, x, y, max_error_norm=0.7, max_input_norm=2.0, max_activation_norm=1.5,
        loss_reduction="sum",
    )
    for i in range(len(x)):
        opt.zero_grad()
        F.cross_entropy(model(x[i : i + 1]), y[i : i + 1], reduction="sum").backward()
        sensitivity = engine.mechanism.sensitivities()
        for name, g in layer_grads(model).items():
            assert g.norm() <= sensitivity[name] * (1 + 1e-9)
        for layer in engine.mechanism.layers.values():
            if not layer.is_output:
                assert layer.norms[-1].max() <= layer.feedback_bound * (1 + 1e-9)


def test_sensitivity_formula_mlp_and_conv():
    """The stated sensitivities, recomputed by hand from B, the clips and the layer shapes."""
    model = sdfa.convert(mlp((5, 7, 6, 3), "tanh"), "dfa", seed=2)
    x, y = torch.randn(4, 5, dtype=DT), torch.randint(0, 3, (4,))
    engine, model, opt, _ = private(model, x, y, max_error_norm=0.5, max_input_norm=2.0)
    F.cross_entropy(model(x), y).backward()
    spectral = {n: torch.linalg.matrix_norm(b, ord=2).item()
                for n, b in sdfa.feedback_matrices(model).items()}
    expected = {
        "0": 0.5 * spectral["0"] * math.sqrt(2.0**2 + 1),  # input clipped to 2
        "2": 0.5 * spectral["2"] * math.sqrt(7 + 1),  # |tanh| <= 1 over 7 units
        "4": 0.5 * math.sqrt(6 + 1),  # output layer: the clipped error itself
    }
    assert engine.mechanism.sensitivities() == pytest.approx(expected, rel=1e-12)

    model = sdfa.convert(conv_net(), "dfa", seed=3)
    x, y = torch.randn(2, 2, 11, 11, dtype=DT), torch.randint(0, 3, (2,))
    engine, model, opt, _ = private(
        model, x, y, max_error_norm=0.7, max_input_norm=2.0, max_activation_norm=1.5
    )
    F.cross_entropy(model(x), y).backward()
    spectral = {n: torch.linalg.matrix_norm(b, ord=2).item()
                for n, b in sdfa.feedback_matrices(model).items()}
    assert bounds.window_overlap(3, 2, 1) == 4 and bounds.window_overlap(3, 1, 1) == 9
    expected = {
        # conv 3x3 stride 1 (overlap 9), 11x11 outputs; tanh then 3x3/2 max pool (J <= sqrt 4)
        "0": 0.7 * spectral["0"] * 2 * math.sqrt(9 * 2.0**2 + 121),
        # conv 3x3 stride 2 (overlap 4), 2x2 outputs; input: |tanh| <= 1 over 4*5*5 values,
        # clipped to 1.5; then relu and 2x2 average pool (J <= sqrt(1/4))
        "3": 0.7 * spectral["3"] * 0.5 * math.sqrt(4 * 1.5**2 + 4),
        # output layer: relu outputs are unbounded, so the activation clip 1.5 holds
        "7": 0.7 * math.sqrt(1.5**2 + 1),
    }
    assert engine.mechanism.sensitivities() == pytest.approx(expected, rel=1e-12)


ELEMENTWISE = [
    nn.Tanh(), nn.Sigmoid(), nn.Softsign(), nn.Hardsigmoid(), nn.Hardtanh(-2.0, 0.5),
    nn.ReLU6(), nn.ReLU(), nn.LeakyReLU(0.3), nn.LeakyReLU(2.0), nn.ELU(0.5), nn.ELU(2.0),
    nn.GELU(), nn.GELU("tanh"), nn.SiLU(), nn.Identity(),
]


@pytest.mark.parametrize("module", ELEMENTWISE, ids=repr)
def test_elementwise_bounds_hold_and_are_attained(module):
    x = torch.linspace(-8, 8, 160_001, dtype=DT, requires_grad=True)
    y = module(x)
    (slope,) = torch.autograd.grad(y.sum(), x)
    bound = bounds.jacobian_bound(module)
    assert 0.99 * bound <= slope.abs().max() <= bound * (1 + 1e-12)
    for s in (0.5, 3.0, 8.0):
        inside = x.abs() <= s
        assert y[inside].abs().max() <= bounds.magnitude_after(module, s) * (1 + 1e-12)
    assert y.abs().max() >= 0.85 * bounds.magnitude_after(module, 8.0)
    unbounded = bounds.magnitude_after(module, math.inf)
    assert math.isinf(unbounded) == (y.abs().max() > 7)


def jacobian_norm(module, x):
    jac = torch.autograd.functional.jacobian(module, x).reshape(module(x).numel(), x.numel())
    return torch.linalg.matrix_norm(jac, ord=2).item()


@pytest.mark.parametrize(
    "module, spike",
    [
        (nn.MaxPool2d(3, stride=2), (2, 2)),  # (2, 2) is in 4 windows
        (nn.MaxPool2d(2), (2, 2)),
        (nn.MaxPool2d(3, stride=1, padding=1), (3, 3)),
        (nn.AvgPool2d(2), None),
        (nn.AvgPool2d(3, stride=1, padding=1), None),
        (nn.AvgPool2d(3, stride=2), None),
    ],
    ids=repr,
)
def test_pooling_jacobian_bounds_hold_and_are_attained(module, spike):
    torch.manual_seed(0)
    bound = bounds.jacobian_bound(module)
    observed = [jacobian_norm(module, torch.randn(1, 1, 7, 7, dtype=DT)) for _ in range(5)]
    if spike is not None:
        x = torch.randn(1, 1, 7, 7, dtype=DT)
        x[0, 0, spike[0], spike[1]] = 100.0
        observed.append(jacobian_norm(module, x))
    assert max(observed) <= bound * (1 + 1e-9)
    # the bound is attained, except at the borders of a padded or strided average
    assert max(observed) >= (0.99 if spike is not None or module.kernel_size == 2 else 0.6) * bound


def test_dropout_bounds():
    module = nn.Dropout(0.25)
    assert bounds.jacobian_bound(module) == pytest.approx(4 / 3)
    assert bounds.magnitude_after(module, 3.0) == pytest.approx(4.0)
    x = torch.ones(1000, dtype=DT, requires_grad=True)
    (slope,) = torch.autograd.grad(module(x).sum(), x)
    assert slope.max().item() == pytest.approx(4 / 3)
    assert bounds.jacobian_bound(nn.AlphaDropout(0.1)) is None
    assert bounds.jacobian_bound(nn.Softmax(1)) is None


@pytest.mark.parametrize("stride, attained", [(1, 0.8), (2, 0.65)])
def test_update_bound_is_nearly_attained(stride, attained):
    """D sqrt(m A^2 + P) is nearly attained by a constant input and a constant delta (exactly
    with stride 1 and no borders; with stride 2 an average element is in 2.25 windows, not 4)."""
    conv = nn.Conv2d(2, 3, 3, stride=stride, padding=1).to(DT)
    x = torch.ones(1, 2, 12, 12, dtype=DT)
    out = conv(x)
    delta = torch.ones_like(out) / out.numel() ** 0.5  # ||delta|| = 1
    out.backward(delta)
    actual = torch.cat([conv.weight.grad.flatten(), conv.bias.grad]).norm().item()
    overlap = bounds.window_overlap(3, stride, 1)
    stated = bounds.layer_sensitivity(1.0, x.norm().item(), overlap, out[0, 0].numel(), True)
    assert attained * stated <= actual <= stated

    linear = nn.Linear(5, 4).to(DT)
    h, delta = torch.randn(1, 5, dtype=DT), torch.randn(1, 4, dtype=DT)
    linear(h).backward(delta)
    actual = torch.cat([linear.weight.grad.flatten(), linear.bias.grad]).norm().item()
    stated = bounds.layer_sensitivity(delta.norm().item(), h.norm().item(), 1, 1, True)
    assert actual == pytest.approx(stated, rel=1e-12)  # Linear: exact


# -- noise ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["dp-dfa", "dp-noisy-projection"])
def test_noise_std_is_noise_multiplier_times_sensitivity(method):
    torch.manual_seed(0)
    model = sdfa.convert(mlp((30, 200, 100, 10), "tanh"), "dfa", seed=0)
    x, y = torch.randn(16, 30, dtype=DT), torch.randint(0, 10, (16,))
    engine, model, opt, _ = private(
        model, x, y, batch_size=16, noise=2.0, method=method, max_input_norm=3.0,
        noise_generator=torch.Generator().manual_seed(1),
    )
    F.cross_entropy(model(x), y).backward()
    clean = [p.grad.clone() for p in model.parameters()]
    sensitivity = engine.mechanism.sensitivity()
    opt.pre_step()  # noise and averaging, without the update
    expected_noise = 2.0 if method == "dp-dfa" else 2.0 / math.sqrt(1 - 0.1)
    assert opt.noise_multiplier == pytest.approx(expected_noise)
    assert opt.max_grad_norm == sensitivity
    noise = torch.cat([(p.grad * 16 - g).flatten() for p, g in zip(model.parameters(), clean)])
    assert noise.numel() > 25_000
    assert noise.std().item() == pytest.approx(expected_noise * sensitivity, rel=0.03)
    assert abs(noise.mean().item()) < 0.03 * expected_noise * sensitivity


def test_adaptive_split_keeps_the_accounted_multiplier():
    """z^-2 = z_u^-2 + layers / (2 sigma_b)^2: the update and the counts share one budget."""
    model = sdfa.convert(mlp((4, 6, 5, 3), "tanh"), "dfa")
    x, y = torch.randn(8, 4, dtype=DT), torch.randint(0, 3, (8,))
    engine, model, opt, _ = private(
        model, x, y, noise=1.3, method="dp-noisy-projection", max_input_norm=1.0,
        adaptive_share=0.25,
    )
    count = engine.mechanism.count_noise
    assert engine.noise_multiplier == 1.3
    assert opt.noise_multiplier**-2 + 3 / (2 * count) ** 2 == pytest.approx(1.3**-2)
    assert opt.noise_multiplier**-2 == pytest.approx(0.75 * 1.3**-2)


def test_adaptive_clipping_tracks_the_quantile():
    """With a near-noiseless count and a frozen model, the output layer's threshold converges
    to the target quantile of the per-example error norms."""
    model = sdfa.convert(mlp((4, 6, 3), "tanh"), "dfa", seed=0)
    torch.manual_seed(1)
    x, y = torch.randn(64, 4, dtype=DT), torch.randint(0, 3, (64,))
    engine = PrivacyEngine()
    model, opt, data = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
        data_loader=loader(x, y, 64), method="dp-noisy-projection", noise_multiplier=1e-4,
        poisson_sampling=False, max_input_norm=10.0, target_quantile=0.3, max_feedback_norm=5.0,
    )
    for _ in range(150):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    with torch.no_grad():
        errors = (model(x).softmax(1) - F.one_hot(y, 3)).norm(dim=1)
    threshold = engine.mechanism.layers["2"].feedback_bound
    assert (errors <= threshold).double().mean().item() == pytest.approx(0.3, abs=0.05)


# -- exactness -----------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["dp-dfa", "dp-noisy-projection"])
def test_noise_off_and_no_clipping_is_plain_dfa_exactly(method):
    sizes, seed = (6, 9, 7, 4), 5
    x, y = torch.randn(32, 6, dtype=DT), torch.randint(0, 4, (32,))
    plain = sdfa.convert(mlp(sizes, "tanh"), "dfa", seed=seed)
    opt_plain = torch.optim.Adam(plain.parameters(), lr=0.01)
    norms = {"max_input_norm": math.inf}
    norms["max_error_norm" if method == "dp-dfa" else "max_feedback_norm"] = math.inf
    engine = PrivacyEngine()
    model = sdfa.convert(mlp(sizes, "tanh"), "dfa", seed=seed)
    model, opt, data = engine.make_private(
        module=model, optimizer=torch.optim.Adam(model.parameters(), lr=0.01),
        data_loader=loader(x, y, 8), method=method, noise_multiplier=0.0,
        poisson_sampling=False, **norms,
    )
    for xb, yb in data:
        for m, o in ((plain, opt_plain), (model, opt)):
            o.zero_grad()
            F.cross_entropy(m(xb), yb).backward()
            o.step()
    for p, q in zip(plain.parameters(), model.parameters()):
        assert torch.equal(p, q)
    assert engine.steps == 4 and engine.get_epsilon(1e-5) == math.inf


# -- accounting and budgets ----------------------------------------------------------------------


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
@pytest.mark.parametrize("method", ["dp-dfa", "dp-sgd"])
def test_accounting_matches_opacus(accountant, method):
    torch.manual_seed(0)
    model = mlp((5, 8, 3), "tanh")
    options = {"max_grad_norm": 1.0}
    if method == "dp-dfa":
        model = sdfa.convert(model, "dfa")
        options = {"max_input_norm": 3.0}
    x, y = torch.randn(40, 5, dtype=DT), torch.randint(0, 3, (40,))
    engine = PrivacyEngine(accountant=accountant)
    model, opt, data = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=loader(x, y, 8), method=method, noise_multiplier=1.1, **options,
    )
    for xb, yb in data:
        opt.zero_grad()
        F.cross_entropy(model(xb), yb).backward()
        opt.step()
    reference = create_accountant(accountant)
    reference.history = [(1.1, 1 / 5, 5)]
    assert engine.steps == 5
    assert engine.get_epsilon(1e-5) == reference.get_epsilon(delta=1e-5)


@pytest.mark.parametrize("method", ["dp-sgd", "dp-dfa"])
def test_the_model_stays_the_users_model(method):
    """Hooks, not wrappers: the same module, with the same state_dict keys (checkpoints)."""
    model = mlp((5, 8, 3), "tanh")
    options = {"max_grad_norm": 1.0}
    if method == "dp-dfa":
        model, options = sdfa.convert(model, "dfa"), {"max_input_norm": 3.0}
    # (a DFA Linear chain has its feedback matrices from convert() on: compared without them)
    keys = [k for k in model.state_dict() if "dfa_feedback" not in k]
    x, y = torch.randn(8, 5, dtype=DT), torch.randint(0, 3, (8,))
    _, private_model, opt, data = private(model, x, y, noise=1.0, method=method, **options)
    assert private_model is model
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    assert [k for k in model.state_dict() if "dfa_feedback" not in k] == keys


def test_training_stops_before_the_target_epsilon():
    model = sdfa.convert(mlp((5, 8, 3), "tanh"), "dfa")
    x, y = torch.randn(40, 5, dtype=DT), torch.randint(0, 3, (40,))
    engine = PrivacyEngine()
    model, opt, data = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=loader(x, y, 8), noise_multiplier=2.0, max_input_norm=3.0,
        target_epsilon=2.0, target_delta=1e-5,
    )
    with pytest.raises(PrivacyBudgetExhausted, match="epsilon 2 at delta 1e-05"):
        for _ in range(100):
            for xb, yb in data:
                opt.zero_grad()
                F.cross_entropy(model(xb), yb).backward()
                opt.step()
    steps = engine.steps
    assert 10 < steps < 30 and engine.get_epsilon(1e-5) <= 2.0
    reference = create_accountant("rdp")
    reference.history = [(2.0, 0.2, steps + 1)]
    assert reference.get_epsilon(delta=1e-5) > 2.0


def test_make_private_with_epsilon_spends_the_budget_in_the_epochs():
    model = sdfa.convert(mlp((5, 8, 3), "tanh"), "dfa")
    x, y = torch.randn(40, 5, dtype=DT), torch.randint(0, 3, (40,))
    engine = PrivacyEngine()
    model, opt, data = engine.make_private_with_epsilon(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=loader(x, y, 8), target_epsilon=2.0, target_delta=1e-5, epochs=3,
        max_input_norm=3.0,
    )
    for _ in range(3):
        for xb, yb in data:
            opt.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
            opt.step()
    assert 1.9 < engine.get_epsilon(1e-5) <= 2.0
    with pytest.raises(PrivacyBudgetExhausted):
        opt.zero_grad()
        F.cross_entropy(model(x[:8]), y[:8]).backward()
        opt.step()


def test_state_dict_resumes_accounting_and_thresholds():
    x, y = torch.randn(32, 5, dtype=DT), torch.randint(0, 3, (32,))

    def start():
        model = sdfa.convert(mlp((5, 8, 3), "tanh"), "dfa")
        return private(model, x, y, batch_size=8, noise=1.0, method="dp-noisy-projection",
                       max_input_norm=3.0)

    engine, model, opt, data = start()
    for xb, yb in data:
        opt.zero_grad()
        F.cross_entropy(model(xb), yb).backward()
        opt.step()
    state = engine.state_dict()
    thresholds = {n: layer.feedback_bound for n, layer in engine.mechanism.layers.items()}
    assert thresholds != {"0": 1.0, "2": 1.0}  # the adaptive clipping moved them

    resumed = start()[0]
    resumed.load_state_dict(state)
    assert resumed.get_epsilon(1e-5) == engine.get_epsilon(1e-5) and resumed.steps == 4
    assert {n: layer.feedback_bound for n, layer in resumed.mechanism.layers.items()} == thresholds


def test_empty_poisson_batch_steps_with_noise_only():
    """An empty batch gets the same noise scale as any other: the scale may not reveal whether
    an example was sampled."""
    model = sdfa.convert(mlp((5, 8, 3), "tanh"), "dfa")
    x, y = torch.randn(40, 5, dtype=DT), torch.randint(0, 3, (40,))
    engine, model, opt, _ = private(model, x, y, noise=1.0, max_input_norm=3.0)
    before = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    F.cross_entropy(model(x[:0]), y[:0]).backward()
    opt.step()
    assert engine.steps == 1
    assert all(not torch.equal(p, q) for p, q in zip(before, model.parameters()))
    empty = opt.max_grad_norm
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    assert opt.max_grad_norm == empty > 0


# -- bad input -----------------------------------------------------------------------------------


def make(model=None, method="dp-dfa", noise=1.0, **kwargs):
    model = model if model is not None else sdfa.convert(mlp((5, 8, 3), "tanh"), "dfa")
    x, y = torch.randn(8, 5, dtype=DT), torch.randint(0, 3, (8,))
    kwargs.setdefault("max_input_norm", 1.0) if method != "dp-sgd" else None
    return PrivacyEngine().make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=loader(x, y, 4), method=method, noise_multiplier=noise, **kwargs,
    )


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"target_epsilon": 0.0, "target_delta": 1e-5}, "epsilon must be a number > 0"),
        ({"target_epsilon": -1.0, "target_delta": 1e-5}, "epsilon must be a number > 0"),
        ({"target_epsilon": 1.0, "target_delta": 0.0}, r"delta must be in \(0, 1\)"),
        ({"target_epsilon": 1.0, "target_delta": 1.0}, r"delta must be in \(0, 1\)"),
        ({"target_epsilon": 1.0}, "both target_epsilon and target_delta"),
        ({"max_error_norm": 0.0}, "max_error_norm must be a number > 0"),
        ({"max_input_norm": -2.0}, "max_input_norm must be a number > 0"),
        ({"max_activation_norm": 0}, "max_activation_norm must be a number > 0"),
        ({"noise": -1.0}, "noise_multiplier must be a number >= 0"),
        ({"method": "dp-magic"}, "unknown privacy method 'dp-magic'"),
        ({"max_grad_norm": 1.0}, "does not take option.*max_grad_norm"),
        ({"method": "dp-sgd"}, "needs max_grad_norm"),
        ({"method": "dp-sgd", "max_grad_norm": 1.0}, "converted to dfa"),
        ({"method": "dp-noisy-projection", "target_quantile": 1.0}, "target_quantile"),
        ({"noise": 0.01, "target_epsilon": 0.1, "target_delta": 1e-5}, "add more noise"),
    ],
)
def test_invalid_settings_raise_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make(**kwargs)


def test_invalid_delta_in_make_private_with_epsilon():
    model = sdfa.convert(mlp((5, 8, 3), "tanh"), "dfa")
    with pytest.raises(ValueError, match=r"delta must be in \(0, 1\)"):
        PrivacyEngine().make_private_with_epsilon(
            module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            data_loader=loader(torch.randn(8, 5), torch.zeros(8, dtype=torch.long), 4),
            target_epsilon=1.0, target_delta=2.0, epochs=1, max_input_norm=1.0,
        )


def seq(*modules):
    torch.manual_seed(0)
    return nn.Sequential(*modules).to(DT)


@pytest.mark.parametrize(
    "build, kwargs, message",
    [
        (lambda: sdfa.convert(seq(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3)),
                              "dfa"), {},
         "BatchNorm1d.*mixes the examples"),
        (lambda: sdfa.convert(seq(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)), "fa"), {},
         "convert the model first"),
        (lambda: seq(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)), {}, "convert the model first"),
        (lambda: sdfa.convert(seq(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3)), "dfa"), {},
         "input of layer '2' has no norm bound: pass max_activation_norm"),
        (lambda: sdfa.convert(seq(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)), "dfa"),
         {"max_input_norm": None}, "input of layer '0' has no norm bound: pass max_input_norm"),
        (lambda: sdfa.convert(seq(nn.Linear(5, 8), nn.Softmax(1), nn.Linear(8, 3)), "dfa"),
         {"max_activation_norm": 1.0}, "cannot bound module '1' \\(Softmax\\)"),
        (lambda: sdfa.convert(seq(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)), "dfa",
                              boundaries=["1"]), {}, "chain mode"),
        (lambda: sdfa.convert(seq(nn.Linear(5, 8), nn.Tanh(), nn.LayerNorm(8), nn.Linear(8, 3)),
                              "dfa"), {"max_activation_norm": 1.0},
         "parameters \\(weight, bias\\) that are not trained by DFA"),
    ],
)
def test_models_that_cannot_be_bounded_raise_clear_errors(build, kwargs, message):
    with pytest.raises(ValueError, match=message):
        make(build(), **kwargs)


def test_noisy_projection_accepts_modules_dp_dfa_cannot_bound():
    model = sdfa.convert(seq(nn.Linear(5, 8), nn.Softmax(1), nn.Linear(8, 3)), "dfa")
    make(model, method="dp-noisy-projection", max_activation_norm=1.0)


def test_shared_layer_is_refused():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x):
            return self.b(torch.tanh(self.a(torch.tanh(self.a(x)))))

    torch.manual_seed(0)
    model = sdfa.convert(Twice().to(DT), "dfa")
    x, y = torch.randn(4, 4, dtype=DT), torch.randint(0, 2, (4,))
    engine, model, opt, _ = private(model, x, y, max_input_norm=1.0, max_activation_norm=1.0)
    with pytest.raises(RuntimeError, match="ran twice in one forward pass"):
        model(x)


# -- where the noise comes from (issue 15) --------------------------------------------------------


def test_a_seeded_cpu_generator_has_only_2_to_the_32_streams():
    """Why secret noise cannot be a seed drawn from the OS: manual_seed keeps 32 bits."""
    a, b = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7 + 2**32)
    assert torch.equal(torch.randn(8, generator=a), torch.randn(8, generator=b))


def test_secret_generators_hold_a_state_no_seed_produces():
    words = [secret_generator().get_state()[24 : 24 + 8 * 624].view(torch.int64)
             for _ in range(2)]
    for w in words:  # a seeded Mersenne Twister satisfies its init recurrence; these do not
        assert w[1].item() != _next_init_word(w[0].item())
        assert (w >= 0).all() and (w < 2**32).all() and len(set(w.tolist())) > 600
    assert not torch.equal(words[0], words[1])


def step_once(engine_kwargs=None, method="dp-dfa", **kwargs):
    """One private step of the same model on the same data: the updated parameters."""
    model = sdfa.convert(mlp((5, 8, 3), "tanh", seed=0), "dfa", seed=0)
    options = {"max_input_norm": 3.0}
    if method == "dp-sgd":
        model, options = mlp((5, 8, 3), "tanh", seed=0), {"max_grad_norm": 1.0}
    x, y = torch.randn(16, 5, generator=torch.Generator().manual_seed(0), dtype=DT), torch.ones(
        16, dtype=torch.long)
    engine = PrivacyEngine(**(engine_kwargs or {}))
    model, opt, data = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=loader(x, y, 4), method=method, noise_multiplier=1.0, **options, **kwargs,
    )
    torch.manual_seed(0)  # the global generator: the attacker knows it
    for xb, yb in data:
        opt.zero_grad()
        F.cross_entropy(model(xb), yb).backward()
        opt.step()
        break
    return engine, opt, data, torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.mark.parametrize("method", ["dp-dfa", "dp-sgd"])
def test_default_noise_and_sampling_are_secret(method):
    """Same model, data, seeds and global random state: the noise and the Poisson sample still
    differ from one run to the next."""
    first, second = step_once(method=method), step_once(method=method)
    assert first[0].noise_source == second[0].noise_source == "secret"
    assert not torch.equal(first[3], second[3])
    samples = [list(data.batch_sampler) for _, _, data, _ in (first, second)]
    assert samples[0] != samples[1]


def test_a_caller_generator_is_seeded_and_reproducible():
    runs = [step_once(noise_generator=torch.Generator().manual_seed(3)) for _ in range(2)]
    assert runs[0][0].noise_source == "seeded"
    assert torch.equal(runs[0][3], runs[1][3])


def test_secure_mode_needs_torchcsprng():
    if importlib.util.find_spec("torchcsprng") is not None:
        pytest.skip("torchcsprng is installed here")
    with pytest.raises(ValueError, match="secure.*needs torchcsprng.*pip install torchcsprng"):
        PrivacyEngine(secure_mode=True)


@pytest.mark.parametrize("method", ["dp-dfa", "dp-noisy-projection", "dp-sgd"])
def test_secure_mode_draws_everything_from_the_csprng(monkeypatch, method):
    """The wiring of secure mode, with a stand-in for torchcsprng (not installable here): the
    noise, the adaptive counts and the sampling all use its generator, with Opacus's
    floating-point-safe Gaussian sampling, and a caller's generator is refused."""
    device = torch.Generator().manual_seed(11)
    fake = types.ModuleType("torchcsprng")
    fake.__spec__ = importlib.machinery.ModuleSpec("torchcsprng", None)
    fake.create_random_device_generator = lambda path: device if path == "/dev/urandom" else None
    monkeypatch.setitem(sys.modules, "torchcsprng", fake)
    engine, opt, data, _ = step_once({"secure_mode": True}, method=method)
    assert engine.noise_source == "secure" and opt.secure_mode
    assert opt.generator is device and data.batch_sampler.generator is device
    with pytest.raises(ValueError, match="do not pass noise_generator"):
        step_once({"secure_mode": True}, noise_generator=torch.Generator())


# -- models that mix the examples of a batch (issue 15) ------------------------------------------


class Center(nn.Module):
    """Subtracts the batch mean: one example's output depends on all the others."""

    def forward(self, x):
        return x - x.mean(0, keepdim=True)


class Scale(nn.Module):
    def forward(self, x):
        return x * len(x)


class MixesInForward(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(5, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)).softmax(0))


@pytest.mark.parametrize(
    "build, method, message",
    [
        (lambda: seq(Center(), nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)), "dp-dfa",
         "module '0' \\(Center\\) mixes the examples.*other examples of its batch change"),
        (lambda: seq(nn.Linear(5, 8), nn.Softmax(dim=0), nn.Linear(8, 3)), "dp-noisy-projection",
         "module '1' \\(Softmax\\) mixes the examples"),
        (lambda: seq(nn.Linear(5, 8), nn.Tanh(), Center(), nn.Linear(8, 3)), "dp-sgd",
         "module '2' \\(Center\\) mixes the examples"),
        (lambda: seq(Scale(), nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)), "dp-dfa",
         "module '0' \\(Scale\\) mixes the examples.*alone in its batch"),
        (lambda: MixesInForward().to(DT), "dp-noisy-projection",
         "the forward of MixesInForward itself"),
    ],
)
def test_models_that_mix_the_batch_are_refused(build, method, message):
    """The static checks accept these models (no BatchNorm, every module parameter-free or a
    DFA layer); the probe at make_private refuses them and names the module."""
    model = build()
    options = {"max_grad_norm": 1.0}
    if method != "dp-sgd":
        model = sdfa.convert(model, "dfa")
        options = {"max_input_norm": 1.0, "max_activation_norm": 1.0}
        mechanism.analyse(model, method, 1.0, 1.0)  # the static analysis alone lets it through
    with pytest.raises(ValueError, match=message):
        make(model, method=method, **options)


def test_without_the_probe_a_mixing_model_exceeds_its_sensitivity():
    """What the probe prevents: before the first layer, centering by the batch mean lets one
    example move the others' updates, beyond the stated sensitivity."""
    model = sdfa.convert(seq(Center(), nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)), "dfa")
    x, y = torch.randn(64, 5, dtype=DT), torch.randint(0, 3, (64,))
    x[0] = 50.0  # the target example
    engine = PrivacyEngine()
    monkey = pytest.MonkeyPatch()
    monkey.setattr(engine_module, "check_examples_independent", lambda *args: None)
    try:
        model, opt, _ = engine.make_private(
            module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            data_loader=loader(x, y, 64), noise_multiplier=0.0, poisson_sampling=False,
            max_input_norm=1.0, loss_reduction="sum",
        )
    finally:
        monkey.undo()
    updates = []
    for batch in (slice(0, 64), slice(1, 64)):  # with and without the target
        opt.zero_grad()
        F.cross_entropy(model(x[batch]), y[batch], reduction="sum").backward()
        updates.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
        engine.mechanism.discard_step()
    assert (updates[0] - updates[1]).norm() > 2 * engine.mechanism.sensitivity()


def test_the_probe_accepts_dropout_and_per_example_models():
    for model in (sdfa.convert(mlp((5, 8, 6, 3), "tanh", dropout=0.5), "dfa"),
                  sdfa.convert(conv_net(), "dfa")):
        check_examples_independent(model, (5,) if isinstance(model[0], nn.Linear) else (2, 11, 11))


def test_the_probe_leaves_the_model_and_the_random_state_as_they_were():
    model = seq(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.Linear(8, 3)).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    with pytest.raises(ValueError, match="BatchNorm1d"):
        check_examples_independent(model, (5,))
    assert not model.training and torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


# -- accounting that cannot be wrong (issue 15) -----------------------------------------------


def test_gdp_is_refused_for_a_target_epsilon():
    """Opacus's GDP accountant can underestimate: on the lee2020 digits schedule (q = 1/22, 330
    steps) the noise it calibrates for epsilon 8 spends 9.25 by PRV's upper bound, 10.37 by
    RDP."""
    q, steps = 1 / 22, 330
    with pytest.warns(UserWarning, match="GDP accounting is experimental"):
        z = get_noise_multiplier(target_epsilon=8.0, target_delta=1e-5, sample_rate=q,
                                 steps=steps, accountant="gdp")
    spent = {}
    for name in ("prv", "rdp"):
        accountant = create_accountant(name)
        accountant.history = [(z, q, steps)]
        spent[name] = accountant.get_epsilon(delta=1e-5)
    assert spent["prv"] == pytest.approx(9.25, abs=0.01)
    assert spent["rdp"] == pytest.approx(10.37, abs=0.01)

    model = sdfa.convert(mlp((5, 8, 3), "tanh"), "dfa")
    x, y = torch.randn(40, 5, dtype=DT), torch.randint(0, 3, (40,))
    with pytest.warns(UserWarning, match="GDP"):  # Opacus's own warning is not silenced
        engine = PrivacyEngine(accountant="gdp")
    with pytest.raises(ValueError, match="'gdp' can underestimate .* cannot enforce a target"):
        engine.make_private_with_epsilon(
            module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            data_loader=loader(x, y, 8), target_epsilon=2.0, target_delta=1e-5, epochs=3,
            max_input_norm=3.0)
    common = dict(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                  data_loader=loader(x, y, 8), noise_multiplier=1.0, max_input_norm=3.0)
    with pytest.raises(ValueError, match="'gdp' can underestimate"):
        engine.make_private(target_epsilon=2.0, target_delta=1e-5, **common)
    engine.make_private(**common)  # reporting its estimate only (with Opacus's warning) is fine


def one_backward_engine(method, poisson):
    model = mlp((5, 8, 3), "tanh")
    options = {"max_grad_norm": 1.0}
    if method != "dp-sgd":
        model, options = sdfa.convert(model, "dfa"), {"max_input_norm": 3.0}
    x, y = torch.randn(8, 5, dtype=DT), torch.randint(0, 3, (8,))
    engine, model, opt, _ = private(model, x, y, noise=1.0, method=method, poisson=poisson,
                                    **options)
    return engine, model, opt, torch.randn(4, 5, dtype=DT), torch.randint(0, 3, (4,))


@pytest.mark.parametrize("method, poisson", [
    ("dp-dfa", True), ("dp-dfa", False), ("dp-noisy-projection", False), ("dp-sgd", False),
    ("dp-sgd", True),
])
def test_a_second_backward_pass_before_step_is_refused(method, poisson):
    """Each pass is bounded on its own, so one example in both could contribute twice the
    sensitivity while Opacus would account a doubled sampling rate; refused (under Poisson
    sampling Opacus refuses it itself for dp-sgd)."""
    engine, model, opt, x, y = one_backward_engine(method, poisson)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(ValueError, match="second backward pass|not compatible with grad accum"):
        F.cross_entropy(model(x), y).backward()
        opt.step()
    assert engine.steps == 0


@pytest.mark.parametrize("method", ["dp-dfa", "dp-sgd"])
def test_a_pass_cleared_by_zero_grad_does_not_count(method):
    engine, model, opt, x, y = one_backward_engine(method, poisson=False)
    for _ in range(2):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
    opt.step()
    assert engine.accountant.history == [(1.0, 1 / 2, 1)]


def test_rdp_orders_reach_beyond_opacus_defaults():
    """Where Opacus's largest order (63) is optimal (it warns), the wider orders give a tighter,
    still valid epsilon, without the warning."""
    history = [(8.0, 0.01, 50)]
    opacus_default = create_accountant("rdp")
    opacus_default.history = history
    with pytest.warns(UserWarning, match="largest alpha"):
        loose = opacus_default.get_epsilon(delta=1e-5)
    engine = PrivacyEngine()
    engine.accountant.history = list(history)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tight = engine.get_epsilon(1e-5)
    assert 0 < tight < loose
