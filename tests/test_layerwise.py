"""Layer-wise rules (fa, usf, frsf, brsf, kp, wm) and batch manhattan: hand-computed references."""

import copy
import importlib.util
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import same_state
from torch import nn

import sdfa
from sdfa.alignment import angle
from sdfa.layers import FeedbackLayer
from sdfa.models import build_model
from sdfa.models.resnet import Bottleneck, ResNet
from sdfa.optim import batch_manhattan
from sdfa.rules import LayerwiseRule

pytestmark = pytest.mark.usefixtures("float64", "one_thread")

RULES = ["fa", "usf", "frsf", "brsf", "kp", "wm"]


def rms(w):
    return w.detach().square().mean().sqrt()


def record_feedback(model):
    """Make every layer-wise layer of ``model`` log the feedback tensor each step uses: h F of
    ``feedback_parts`` (F itself when h is 1, a copy when F is built into ``out``, the scratch
    tensor that the layer reuses at every step)."""
    used = {}
    for name, layer in model.named_modules():
        if isinstance(layer, FeedbackLayer):
            used[name] = []
            rule = copy.copy(layer.rule)  # per-layer copy: patching it leaves others alone
            original = rule.feedback_parts

            def logged(lay, out=None, original=original, log=used[name]):
                values, scale = original(lay, out)
                if scale is not None:
                    log.append(values * scale)
                else:
                    log.append(values if out is None else values.clone())
                return values, scale

            rule.feedback_parts = logged
            layer.rule = rule
    return used


def expected_feedback(rule, layer, scale=None):
    """The formula of each rule for B at this step (brsf: ``magnitude`` holds this step's draw)."""
    w = layer.weight.detach()
    h = rms(w) if scale is None else scale
    return {
        "fa": lambda: layer.feedback,
        "usf": lambda: h * torch.sign(w),
        "frsf": lambda: h * layer.magnitude * torch.sign(w),
        "brsf": lambda: h * layer.magnitude * torch.sign(w),
        "kp": lambda: layer.feedback.detach(),
        "wm": lambda: layer.feedback,
    }[rule]()


LAYERS = {
    "linear": (lambda: nn.Linear(5, 4), (3, 5), F.linear, {}),
    "conv": (
        lambda: nn.Conv2d(3, 4, 3, stride=2, padding=1),
        (2, 3, 6, 5),
        F.conv2d,
        {"stride": 2, "padding": 1},
    ),
    "conv1d": (
        lambda: nn.Conv1d(3, 4, 3, stride=2, padding=1, dilation=2),
        (2, 3, 9),
        F.conv1d,
        {"stride": 2, "padding": 1, "dilation": 2},
    ),
    "conv3d": (
        lambda: nn.Conv3d(2, 4, (2, 3, 2), padding=(0, 1, 1), groups=2),
        (2, 2, 4, 5, 3),
        F.conv3d,
        {"padding": (0, 1, 1), "groups": 2},
    ),
    "convtranspose2d": (
        lambda: nn.ConvTranspose2d(3, 4, 3, stride=2, padding=1, output_padding=1),
        (2, 3, 4, 5),
        F.conv_transpose2d,
        {"stride": 2, "padding": 1, "output_padding": 1},
    ),
}


# -- the input gradient each layer sends back ---------------------------------------------------


@pytest.mark.parametrize("kind", sorted(LAYERS))
@pytest.mark.parametrize(
    "rule,scale", [(r, None) for r in RULES] + [(r, 0.3) for r in ("usf", "frsf", "brsf")]
)
def test_input_gradient_is_delta_times_feedback(rule, scale, kind):
    make, shape, op, kw = LAYERS[kind]
    torch.manual_seed(0)
    base = nn.Sequential(make())
    model = sdfa.convert(base, rule, seed=3, **({} if scale is None else {"scale": scale}))
    layer = model[0]
    used = record_feedback(model)["0"]
    x = torch.randn(shape, requires_grad=True)
    out = model(x)
    delta = torch.randn_like(out)
    out.backward(delta)

    (B,) = used
    assert B.shape == layer.weight.shape
    assert torch.equal(torch.sign(B), torch.sign(layer.weight)) or rule in ("fa", "kp", "wm")
    # exact for the original kinds; the RMS of W (sqrt of a mean of squares here, a norm over
    # sqrt(n) in the rule) may differ in its last bit for other shapes
    exact = kind in ("linear", "conv")
    torch.testing.assert_close(B, expected_feedback(rule, layer, scale), rtol=0 if exact else 1e-15,
                               atol=0)
    # the input gradient is delta through B; the weight and bias gradients are the true ones
    x0 = x.detach().requires_grad_()
    (grad_x,) = torch.autograd.grad(op(x0, B, None, **kw), x0, delta)
    torch.testing.assert_close(x.grad, grad_x)
    w0, b0 = layer.weight.detach().requires_grad_(), layer.bias.detach().requires_grad_()
    grad_w, grad_b = torch.autograd.grad(op(x.detach(), w0, b0, **kw), (w0, b0), delta)
    torch.testing.assert_close(layer.weight.grad, grad_w)
    torch.testing.assert_close(layer.bias.grad, grad_b)
    assert not torch.allclose(grad_x, torch.autograd.grad(op(x0, w0, None, **kw), x0, delta)[0])


@pytest.mark.parametrize("rule", RULES)
def test_chain_of_layers_matches_hand_computed_deltas(rule):
    """A tanh MLP: delta_l = (delta_{l+1} @ B_{l+1}) * tanh'(a_l), grad W_l = delta_l^T h_{l-1}."""
    torch.manual_seed(0)
    sizes = (6, 9, 7, 4)
    base = nn.Sequential(
        nn.Linear(6, 9), nn.Tanh(), nn.Linear(9, 7), nn.Tanh(), nn.Linear(7, 4)
    )
    model = sdfa.convert(base, rule, seed=1)
    used = record_feedback(model)
    x, y = torch.randn(11, sizes[0]), torch.randint(0, 4, (11,))
    out = model(x)
    F.cross_entropy(out, y).backward()

    linears = [model[0], model[2], model[4]]
    hs, As = [x], []
    for layer in linears:
        As.append(hs[-1] @ layer.weight.T + layer.bias)
        hs.append(torch.tanh(As[-1]))
    out_ = As[-1].detach().requires_grad_()
    (delta,) = torch.autograd.grad(F.cross_entropy(out_, y), out_)
    for i in reversed(range(3)):
        layer = linears[i]
        torch.testing.assert_close(layer.weight.grad, delta.T @ hs[i])
        torch.testing.assert_close(layer.bias.grad, delta.sum(0))
        if i:
            (B,) = used[str(2 * i)]
            delta = (delta @ B) * (1 - torch.tanh(As[i - 1]) ** 2)


# -- backprop through the same wrappers -------------------------------------------------------


class Transport(LayerwiseRule):
    """Test-only rule: W itself as feedback, i.e. backprop through the feedback layers."""

    name = "transport"

    def feedback(self, layer):
        return layer.weight.detach()


def transported(model):
    model = copy.deepcopy(model)
    layers = list(sdfa.layers.trainable_units(model))
    return Transport().apply(model, layers, seed=0)


WRAPPED = {
    "linear-3d": (lambda: nn.Linear(5, 3), (2, 4, 5)),
    "conv": (lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1), (2, 4, 7, 6)),
    "conv-dilation-groups": (
        lambda: nn.Conv2d(4, 6, 3, padding=2, dilation=2, groups=2, bias=False),
        (2, 4, 7, 6),
    ),
    "conv-same-reflect": (
        lambda: nn.Conv2d(4, 6, (3, 2), padding="same", padding_mode="reflect"),
        (2, 4, 7, 6),
    ),
    "conv-valid-stride": (lambda: nn.Conv2d(4, 2, 2, stride=(2, 1), padding="valid"), (2, 4, 7, 6)),
    "conv1d-same-circular": (
        lambda: nn.Conv1d(4, 6, 3, padding="same", padding_mode="circular"), (2, 4, 7)
    ),
    "conv3d-stride": (lambda: nn.Conv3d(4, 2, 2, stride=(1, 2, 2), bias=False), (2, 4, 3, 5, 4)),
    "convtranspose1d-groups": (
        lambda: nn.ConvTranspose1d(4, 6, 3, stride=2, groups=2, dilation=2), (2, 4, 5)
    ),
    "convtranspose2d": (
        lambda: nn.ConvTranspose2d(4, 3, (3, 2), stride=2, padding=1, output_padding=1),
        (2, 4, 4, 3),
    ),
    "convtranspose3d": (lambda: nn.ConvTranspose3d(4, 2, 2, stride=2), (2, 4, 2, 3, 2)),
}


@pytest.mark.parametrize("case", sorted(WRAPPED))
def test_wrappers_with_W_as_feedback_equal_autograd(case):
    make, shape = WRAPPED[case]
    torch.manual_seed(0)
    base = nn.Sequential(make(), nn.Tanh())
    wrapped = transported(base)
    assert isinstance(wrapped[0], FeedbackLayer)
    x = torch.randn(shape)
    grads = []
    for model in (base, wrapped):
        xi = x.clone().requires_grad_()
        model(xi).square().sum().backward()
        grads.append([xi.grad] + [p.grad for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def small_bottleneck_resnet(num_classes):
    """ResNet-50's blocks (1x1-3x3-1x1 bottlenecks, projection shortcuts) at a testable size."""
    stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
    return ResNet(stem, Bottleneck, (4, 8), (2, 1), num_classes)


RESIDUAL_NETS = {
    "resnet20": lambda: build_model("resnet20", (3, 16, 16), 5),
    "bottleneck": lambda: small_bottleneck_resnet(5),
}


@pytest.mark.parametrize("net", sorted(RESIDUAL_NETS))
def test_resnet_with_W_as_feedback_equals_autograd(net):
    torch.manual_seed(0)
    base = RESIDUAL_NETS[net]()
    wrapped = transported(base)
    x, y = torch.randn(3, 3, 16, 16), torch.tensor([0, 3, 4])
    for model in (base, wrapped):
        F.cross_entropy(model(x), y).backward()
    for (name, p), q in zip(base.named_parameters(), wrapped.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)


# -- sign-concordant rules over several steps ---------------------------------------------------


def test_frsf_magnitudes_are_fixed_and_brsf_redrawn_both_sign_concordant():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(40, 30), nn.Tanh(), nn.Linear(30, 5))
    x, y = torch.randn(16, 40, requires_grad=True), torch.randint(0, 5, (16,))
    magnitudes = {}
    for rule in ("frsf", "brsf"):
        model = sdfa.convert(base, rule, seed=0)
        used = record_feedback(model)
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        weights = []
        for _ in range(3):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            weights.append(model[0].weight.detach().clone())
            opt.step()
        assert not torch.equal(weights[0], weights[-1])
        steps = used["0"]
        assert len(steps) == 3
        for B, W in zip(steps, weights):
            assert torch.equal(torch.sign(B), torch.sign(W))  # sign-concordant at every step
        magnitudes[rule] = [B.abs() / rms(W) for B, W in zip(steps, weights)]
    fixed, redrawn = magnitudes["frsf"], magnitudes["brsf"]
    for m in fixed[1:]:
        torch.testing.assert_close(m, fixed[0])
    for a, b in zip(redrawn, redrawn[1:]):
        assert (a - b).abs().max() > 0.5
    for m in fixed[:1] + redrawn:  # |N(0, 1)|: mean square 1, so ||B|| = ||W|| on average
        assert abs(m.square().mean().item() - 1) < 0.1


def test_random_feedback_is_seeded_and_round_trips_through_state_dict():
    base = build_model("lenet5", (1, 8, 8), 10)
    x = torch.randn(4, 1, 8, 8)
    for rule, key in (("fa", "feedback"), ("frsf", "magnitude"), ("kp", "feedback")):
        a, b, c = (sdfa.convert(base, rule, seed=s) for s in (1, 1, 2))
        assert torch.equal(getattr(a.conv2, key), getattr(b.conv2, key))
        assert not torch.equal(getattr(a.conv2, key), getattr(c.conv2, key))
        assert f"conv2.{key}" in a.state_dict()
        c.load_state_dict(a.state_dict())
        torch.testing.assert_close(sdfa.feedback_matrices(c), sdfa.feedback_matrices(a))
    draws = []
    for _ in range(2):
        model = sdfa.convert(base, "brsf", seed=5)
        used = record_feedback(model)
        model(x).sum().backward()
        model(x).sum().backward()
        draws.append(used["conv2"])
    torch.testing.assert_close(draws[0], draws[1])
    assert not torch.equal(draws[0][0], draws[0][1])


def test_fa_feedback_starts_with_the_rms_of_w():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Conv2d(16, 32, 3), nn.Flatten(), nn.Linear(32, 64))
    model = sdfa.convert(base, "fa")
    for layer in (model[0], model[2]):
        w, B = layer.weight, layer.feedback
        assert B.abs().max() <= math.sqrt(3) * rms(w)
        assert abs(rms(B) / rms(w) - 1) < 0.05
        assert 80 < angle(B, w) < 100
    zero = nn.Linear(25, 3)
    nn.init.zeros_(zero.weight)
    B = sdfa.convert(nn.Sequential(zero), "fa")[0].feedback  # falls back to 1/sqrt(fan_in)
    assert 0.15 < B.abs().max() <= 0.2


@pytest.mark.parametrize("rule", RULES)
def test_rules_convert_shape_only_models(rule):
    with torch.device("meta"):
        base = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4 * 36, 3))
    model = sdfa.convert(base, rule)
    for layer in (model[0], model[2]):
        assert layer.feedback_weight().shape == layer.weight.shape
    x = torch.randn(2, 1, 8, 8, device="meta", requires_grad=True)
    model(x).sum().backward()
    assert x.grad.shape == x.shape and model[0].weight.grad.shape == (4, 1, 3, 3)


def test_eval_and_no_grad_do_not_build_feedback():
    model = sdfa.convert(build_model("lenet5", (1, 8, 8), 10), "brsf", seed=0)
    used = record_feedback(model)
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        a = model(x)
    with sdfa.backprop():
        b = model(x)
    assert used["conv2"] == []
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(model(x), a)
    assert len(used["conv2"]) == 1
    assert used["conv1"] == []  # its input needs no gradient: nothing would read its feedback


@pytest.mark.parametrize("rule", RULES)
def test_measuring_alignment_leaves_training_unchanged(rule):
    """Per-step draws (brsf, wm) come from the layer's generator in training passes only."""
    torch.manual_seed(0)
    base = build_model("lenet5", (1, 8, 8), 4)
    x, y = torch.randn(6, 1, 8, 8), torch.tensor([0, 1, 2, 3, 0, 1])
    runs = []
    for measure in (False, True):
        model = sdfa.convert(base, rule, seed=0)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for _ in range(3):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            if measure:
                metrics = sdfa.measure_alignment(model, F.cross_entropy, x, y)
                assert metrics["align/angle/fc3"] < 1e-6 < metrics["align/angle/fc1"]
                sdfa.feedback_matrices(model)
            opt.step()
        runs.append(model.state_dict())
    for key, value in runs[0].items():
        assert same_state(value, runs[1][key]), key


# -- learned feedback: Kolen-Pollack and weight mirror ------------------------------------------


def regression_problem():
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(8, 12), nn.Tanh(), nn.Linear(12, 3))
    x = torch.randn(64, 8)
    with torch.no_grad():
        y = teacher(x)
    student = nn.Sequential(nn.Linear(8, 12), nn.Tanh(), nn.Linear(12, 12), nn.Tanh(),
                            nn.Linear(12, 3))
    return student, x, y


def test_kp_feedback_gets_w_gradient_and_w_minus_b_decays_exactly():
    base, x, y = regression_problem()
    model = sdfa.convert(base, "kp", seed=0)
    lr, decay = 0.1, 0.05
    opt = torch.optim.SGD(model.parameters(), lr=lr, weight_decay=decay)
    layer = model[2]
    gap0 = (layer.weight - layer.feedback).detach().clone()
    angles = [angle(layer.feedback, layer.weight)]
    for step in range(1, 601):
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        torch.testing.assert_close(layer.feedback.grad, layer.weight.grad)
        opt.step()
        # same update for W and B: W - B shrinks by (1 - lr * decay) per step, nothing else
        torch.testing.assert_close(layer.weight - layer.feedback, gap0 * (1 - lr * decay) ** step)
        angles.append(angle(layer.feedback, layer.weight))
    # measured: 87 degrees at the start, 14 after 600 steps, shrinking all the way
    assert angles[0] > 80 and angles[-1] < 20
    assert all(a > b for a, b in zip(angles[::100], angles[100::100]))


def test_wm_mirror_step_formula():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Conv2d(3, 4, 2), nn.Flatten(), nn.Linear(4 * 9, 5))
    model = sdfa.convert(base, "wm", seed=0, samples=7, rate=0.3)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, FeedbackLayer)}
    gens = {n: copy.deepcopy(m.noise_generator) for n, m in layers.items()}
    before = {n: m.feedback.clone() for n, m in layers.items()}
    used = record_feedback(model)
    model(torch.randn(2, 3, 4, 4, requires_grad=True)).sum().backward()
    for name, layer in layers.items():
        w = layer.weight.detach().flatten(1)
        xi = torch.randn(7, w.shape[1], generator=gens[name])  # noise into one receptive field
        y = xi @ w.T  # the layer's linear response
        expected = 0.7 * before[name] + 0.3 * (y.T @ xi / 7).view_as(layer.weight)
        torch.testing.assert_close(layer.feedback, expected)
        assert used[name][0] is layer.feedback  # the step comes before the pass that uses B
        assert layer.weight.grad is not None and layer.feedback.grad is None
    # no mirror step when B is not used: eval mode, torch.no_grad(), sdfa.backprop(), and the
    # first layer when the input needs no gradient
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    frozen = {n: m.feedback for n, m in layers.items()}
    model.eval()(x)
    with torch.no_grad():
        model.train()(x)
    with sdfa.backprop():
        model(x)
    assert all(layers[n].feedback is b for n, b in frozen.items())
    model(x.detach())
    assert layers["0"].feedback is frozen["0"] and layers["2"].feedback is not frozen["2"]


def test_wm_feedback_converges_to_w():
    torch.manual_seed(0)
    x = torch.randn(8, 20, requires_grad=True)
    model = sdfa.convert(nn.Sequential(nn.Linear(20, 10)), "wm", seed=0)
    B = lambda: model[0].feedback  # noqa: E731
    W = model[0].weight
    start = angle(B(), W)
    for _ in range(100):
        model(x)
    # measured: 90 degrees before, 13 after (the rest is the noise of 64 samples per step)
    assert start > 80 and angle(B(), W) < 20
    assert abs(rms(B()) / rms(W) - 1) < 0.2
    many = sdfa.convert(nn.Sequential(nn.Linear(20, 10)), "wm", seed=0, samples=20000, rate=1)
    many(x)
    assert angle(many[0].feedback, many[0].weight) < 3


# -- options and mappings -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "rule, options, message",
    [
        ("usf", {"scale": 0}, "scale must be a positive number"),
        ("fa", {"scale": -1.0}, "scale must be a positive number"),
        ("brsf", {"scale": "rms"}, "scale must be a positive number"),
        ("kp", {"scale": True}, "scale must be a positive number"),
        ("wm", {"samples": 0}, "samples must be a positive integer"),
        ("wm", {"rate": 0}, r"rate must be a number in \(0, 1\]"),
        ("wm", {"rate": 1.5}, r"rate must be a number in \(0, 1\]"),
        ("usf", {"k": 1}, "unknown option.*k.*they take: refresh, scale"),
        ("usf", {"refresh": 0}, "refresh must be a whole number >= 1"),
        ("frsf", {"refresh": 2.5}, "refresh must be a whole number >= 1"),
        ("usf", {"refresh": True}, "refresh must be a whole number >= 1"),
        ("brsf", {"refresh": 2}, "unknown option.*refresh.*they take: scale$"),
    ],
)
def test_bad_options_raise_clear_errors(rule, options, message):
    with pytest.raises(ValueError, match=message):
        sdfa.convert(nn.Sequential(nn.Linear(3, 2)), rule, **options)


def test_fixed_rule_for_the_output_layer_by_mapping():
    model = sdfa.convert(build_model("lenet5", (1, 8, 8), 10), {"": "usf", "fc3": "bp"})
    assert sdfa.rules_of(model) == {
        "conv1": "usf", "conv2": "usf", "fc1": "usf", "fc2": "usf", "fc3": "bp"
    }
    assert type(model.fc3) is nn.Linear and isinstance(model.fc2, FeedbackLayer)


# -- ResNet-20 at CIFAR shape, BatchNorm, every rule ------------------------------------------


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("rule", ["bp"] + RULES)
def test_every_rule_trains_resnet20_in_train_and_eval_mode(rule, mode):
    torch.manual_seed(0)
    base = build_model("resnet20", (3, 32, 32), 10).float()
    model = sdfa.convert(base, rule, seed=0)
    getattr(base, mode)(), getattr(model, mode)()
    x, y = torch.randn(4, 3, 32, 32, dtype=torch.float32), torch.tensor([1, 2, 3, 9])
    stats = model.layer2[0].bn1.running_mean.clone()
    with torch.no_grad():
        torch.testing.assert_close(model(x), base(x))
    F.cross_entropy(model(x), y).backward()
    F.cross_entropy(base(x), y).backward()
    assert torch.equal(stats, model.layer2[0].bn1.running_mean) == (mode == "eval")
    for (name, p), q in zip(model.named_parameters(), base.parameters()):
        if name.endswith("feedback"):
            continue
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        if name == "fc.weight" or rule == "bp":  # the output layer's error is the true one
            torch.testing.assert_close(p.grad, q.grad)
    first = model.stem[0].weight.grad
    if rule != "bp":
        assert 1e-3 < first.norm() / base.stem[0].weight.grad.norm() < 1e3
        assert not torch.allclose(first, base.stem[0].weight.grad)
    shortcut_conv = model.layer2[0].shortcut
    assert not list(shortcut_conv.parameters())  # option A: identity with zero padding


@pytest.mark.parametrize("rule", RULES)
def test_every_rule_trains_projection_shortcuts(rule):
    torch.manual_seed(0)
    model = sdfa.convert(build_model("resnet20", (3, 16, 16), 4, shortcut="projection"), rule)
    shortcut = model.layer3[0].shortcut[0]
    assert isinstance(shortcut, FeedbackLayer)
    F.cross_entropy(model(torch.randn(3, 3, 16, 16)), torch.tensor([0, 1, 3])).backward()
    assert shortcut.weight.grad.abs().sum() > 0
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


PRESET_NETS = {  # (builder, input batch, output layer, a layer deep below it)
    "bottleneck": (lambda: small_bottleneck_resnet(4), (3, 3, 16, 16), "fc",
                   "layer1.0.shortcut.0"),
    "alexnet": (lambda: build_model("alexnet", (3, 63, 63), 4, hidden=16), (3, 3, 63, 63),
                "classifier.fc3", "features.0"),
}


@pytest.mark.parametrize("net,mode", [("bottleneck", "train"), ("bottleneck", "eval"),
                                      ("alexnet", "train")])
@pytest.mark.parametrize("rule", RULES)
def test_every_rule_trains_bottleneck_blocks_and_batchnorm_alexnet(rule, net, mode):
    """ResNet-50's bottleneck blocks and AlexNet's BatchNorm1d head, at small sizes.

    The output layer keeps backprop, so the deep layer's gradient departs from the true one only
    through the rule's feedback in the hidden layers.
    """
    make, shape, output, deep = PRESET_NETS[net]
    torch.manual_seed(0)
    base = make()
    model = sdfa.convert(base, {"": rule, output: "bp"}, seed=0)
    getattr(base, mode)(), getattr(model, mode)()
    x, y = torch.randn(shape), torch.tensor([0, 1, 3])
    with torch.no_grad():
        torch.testing.assert_close(model(x), base(x))
    F.cross_entropy(model(x), y).backward()
    F.cross_entropy(base(x), y).backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    true = {name: p.grad for name, p in base.named_parameters()}
    for name in true:
        assert grads[name] is not None and torch.isfinite(grads[name]).all(), name
    torch.testing.assert_close(grads[f"{output}.weight"], true[f"{output}.weight"])
    assert isinstance(model.get_submodule(deep), FeedbackLayer)
    assert not isinstance(model.get_submodule(output), FeedbackLayer)
    mine, exact = grads[f"{deep}.weight"], true[f"{deep}.weight"]
    assert mine.abs().sum() > 0 and not torch.allclose(mine, exact)


# -- batch manhattan ----------------------------------------------------------------------------


def quadratic(seed=0):
    torch.manual_seed(seed)
    p = nn.Parameter(torch.randn(6))
    q = nn.Parameter(torch.randn(2, 3))
    target = torch.randn(6)

    def loss():
        return ((p - target) ** 3).sum() + (q**2).sum() * 0.01

    return [p, q], loss


def test_batch_manhattan_sgd_steps_by_the_sign_and_restores_grads():
    params, loss = quadratic()
    opt = batch_manhattan(torch.optim.SGD(params, lr=0.1))
    before = [p.detach().clone() for p in params]
    loss().backward()
    grads = [p.grad.clone() for p in params]
    opt.step()
    for p, p0, g in zip(params, before, grads):
        torch.testing.assert_close(p.detach(), p0 - 0.1 * torch.sign(g))
        assert torch.equal(p.grad, g)  # true gradients again after the step


def test_batch_manhattan_sign_comes_before_weight_decay_and_momentum():
    params, loss = quadratic()
    lr, momentum, decay = 0.05, 0.9, 0.01
    opt = batch_manhattan(torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=decay))
    expected = [p.detach().clone() for p in params]
    buffers = [None] * len(params)
    for _ in range(3):
        opt.zero_grad()
        loss().backward()
        for i, p in enumerate(params):
            d = torch.sign(p.grad) + decay * expected[i]
            buffers[i] = d if buffers[i] is None else momentum * buffers[i] + d
            expected[i] = expected[i] - lr * buffers[i]
        opt.step()
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.detach(), e)


def test_batch_manhattan_works_with_any_optimizer_closure_and_scheduler():
    params, loss = quadratic()
    ref_params, ref_loss = quadratic()
    opt = batch_manhattan(torch.optim.Adam(params, lr=0.01))
    ref = torch.optim.Adam(ref_params, lr=0.01)
    schedulers = [torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.5) for o in (opt, ref)]

    def closure():
        opt.zero_grad()
        value = loss()
        value.backward()
        return value

    for _ in range(3):
        opt.step(closure)
        ref.zero_grad()
        ref_loss().backward()
        for p in ref_params:
            p.grad = torch.sign(p.grad)  # the reference: Adam fed sign(grad) by hand
        ref.step()
        for scheduler in schedulers:
            scheduler.step()
    for p, r in zip(params, ref_params):
        torch.testing.assert_close(p.detach(), r.detach())


def test_batch_manhattan_rejects_bad_input():
    with pytest.raises(ValueError, match="torch.optim optimizer"):
        batch_manhattan(object())
    opt = batch_manhattan(torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1))
    with pytest.raises(ValueError, match="already"):
        batch_manhattan(opt)


# -- learning on digits -------------------------------------------------------------------------


def load_benchmark():
    path = Path(__file__).parents[1] / "benchmarks" / "layerwise_digits.py"
    spec = importlib.util.spec_from_file_location("layerwise_digits", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# Test accuracy after 10 epochs, measured with benchmarks/layerwise_digits.py --epochs 10 --seeds
# 0 1 2 3 4 (lowest of the five: bp 0.938, fa 0.838, usf 0.931, frsf 0.909, brsf 0.847,
# kp 0.922, wm 0.849), minus a margin of about 0.04. Seed 0, which runs here, scored bp 0.960,
# fa 0.891, usf 0.938, frsf 0.944, brsf 0.931, kp 0.929, wm 0.942. The output layer alone, with
# the hidden layers frozen, reaches 0.12-0.45 (seeds 0-4, 10 epochs; seed 0: 0.31).
MIN_ACCURACY = {
    "bp": 0.90, "fa": 0.80, "usf": 0.89, "frsf": 0.87, "brsf": 0.80, "kp": 0.88, "wm": 0.81
}


@pytest.mark.parametrize("rule", sorted(MIN_ACCURACY))
def test_rules_learn_digits_with_a_small_cnn(rule):
    bench = load_benchmark()
    _, accuracy, _ = bench.train(rule, epochs=10, seed=0)
    assert accuracy >= MIN_ACCURACY[rule]


@pytest.mark.parametrize("rule", ["brsf", "wm"])
def test_noise_stream_survives_a_checkpoint(rule):
    """A run resumed from a state_dict draws the same per-step noise as one never stopped."""

    def make():
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
        return sdfa.convert(net, rule, seed=1)

    def train(model, steps):
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for i in range(steps):
            x = torch.randn(5, 4, generator=torch.Generator().manual_seed(i))
            opt.zero_grad()
            model(x).square().sum().backward()
            opt.step()

    reference, first = make(), make()
    train(reference, 2)
    train(reference, 2)  # continues in the same process (SGD without momentum is stateless)
    train(first, 2)
    resumed = make()
    resumed.load_state_dict(first.state_dict())
    train(resumed, 2)
    for a, b in zip(reference.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


# -- refresh: sign feedback rebuilt every N steps -----------------------------------------------


def refresh_net(rule, refresh):
    """A 4-6-5-3 tanh MLP under ``rule`` (refresh None: the option not given)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    return sdfa.convert(net, rule, seed=1, **({} if refresh is None else {"refresh": refresh}))


def refresh_steps(model, steps, start=0):
    """SGD steps on seeded batches; per step: W of layers 2 and 4 before the step, and for each
    of them (gradient at its output, gradient it sent to its input)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    log = []
    for i in range(start, start + steps):
        gen = torch.Generator().manual_seed(i)
        x, y = torch.randn(7, 4, generator=gen), torch.randint(0, 3, (7,), generator=gen)
        h1 = model[1](model[0](x))
        a2 = model[2](h1)
        h2 = model[3](a2)
        out = model[4](h2)
        for t in (h1, a2, h2, out):
            t.retain_grad()
        weights = [model[2].weight.detach().clone(), model[4].weight.detach().clone()]
        opt.zero_grad()
        F.cross_entropy(out, y).backward()
        log.append((weights, [(a2.grad, h1.grad), (out.grad, h2.grad)]))
        opt.step()
    return log


@pytest.mark.parametrize("rule", ["usf", "frsf"])
def test_refresh_rebuilds_b_from_w_every_n_steps(rule):
    """refresh=3: steps 0-2 send delta @ B with B = h M sign(W) of step 0, steps 3-5 with B of
    step 3 (the input gradient of each layer, by hand from the W saved at those steps)."""
    model = refresh_net(rule, 3)
    log = refresh_steps(model, 6)
    for step, (_, grads) in enumerate(log):
        built = log[3 * (step // 3)][0]
        for k, layer in enumerate((model[2], model[4])):
            w = built[k]
            b = rms(w) * getattr(layer, "magnitude", 1.0) * torch.sign(w)
            delta, sent = grads[k]
            torch.testing.assert_close(sent, delta @ b, rtol=1e-14, atol=0)
        if step % 3:  # in between, B differs from what W of this step would give
            w = log[step][0][0]
            b_now = rms(w) * getattr(model[2], "magnitude", 1.0) * torch.sign(w)
            assert not torch.allclose(grads[0][1], grads[0][0] @ b_now, rtol=1e-12, atol=0)
    assert model[2].feedback_age == 6
    assert "_held_feedback" not in model[0].__dict__  # the first layer sends nothing down
    # what alignment reads is the B in use, not one rebuilt from W now
    assert model[2].feedback_weight() is model[2].__dict__["_held_feedback"]


@pytest.mark.parametrize("rule", ["usf", "frsf"])
def test_refresh_one_is_the_default_rule(rule):
    a, b = refresh_net(rule, 1), refresh_net(rule, None)
    for (_, ga), (_, gb) in zip(refresh_steps(a, 3), refresh_steps(b, 3)):
        torch.testing.assert_close(ga, gb, rtol=0, atol=0)


@pytest.mark.parametrize("rule", ["usf", "frsf"])
def test_refresh_survives_a_checkpoint(rule):
    """Resumed mid-window (step 4 of refresh=3) from a state_dict, training goes on with the held
    B of step 3, exactly as a run never stopped; a damaged extra state is refused."""
    reference = refresh_net(rule, 3)
    refresh_steps(reference, 7)
    first = refresh_net(rule, 3)
    refresh_steps(first, 4)
    state = first.state_dict()
    resumed = refresh_net(rule, 3)
    resumed.load_state_dict(state)
    refresh_steps(resumed, 3, start=4)
    for key, value in reference.state_dict().items():
        assert same_state(value, resumed.state_dict()[key]), key
    bad = dict(state)
    bad["2._extra_state"] = {**state["2._extra_state"], "held_feedback": torch.zeros(2, 2)}
    with pytest.raises(ValueError, match="held_feedback .* W's shape"):
        refresh_net(rule, 3).load_state_dict(bad)
    bad["2._extra_state"] = {**state["2._extra_state"], "feedback_age": -1}
    with pytest.raises(ValueError, match="feedback_age .* count >= 0"):
        refresh_net(rule, 3).load_state_dict(bad)
