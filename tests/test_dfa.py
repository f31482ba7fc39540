"""DFA through convert(): hand-computed references on tiny float64 networks."""

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import sdfa

pytestmark = pytest.mark.usefixtures("float64")

ACTS = {
    "tanh": (torch.tanh, lambda a: 1 - torch.tanh(a) ** 2),
    "relu": (torch.relu, lambda a: (a > 0).double()),
}


def mlp(sizes, act):
    layers = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(nn.Tanh() if act == "tanh" else nn.ReLU())
    torch.manual_seed(0)
    return nn.Sequential(*layers)


def output_error(out, y):
    out = out.detach().requires_grad_()
    (e,) = torch.autograd.grad(F.cross_entropy(out, y), out)
    return e


def step(model, x, y):
    model.zero_grad()
    out = model(x)
    F.cross_entropy(out, y).backward()
    return out


@pytest.mark.parametrize("act", ["tanh", "relu"])
@pytest.mark.parametrize("sizes", [(6, 9, 7, 4), (5, 8, 8, 6, 3)])
def test_dense_dfa_matches_formula(act, sizes):
    model = sdfa.convert(mlp(sizes, act), "dfa", seed=1)
    x, y = torch.randn(11, sizes[0]), torch.randint(0, sizes[-1], (11,))
    out = step(model, x, y)
    e = output_error(out, y)
    B = sdfa.feedback_matrices(model)
    linears = [m for m in model if isinstance(m, nn.Linear)]
    names = [str(i) for i, m in enumerate(model) if isinstance(m, nn.Linear)]
    assert sorted(B) == sorted(names[:-1])
    f, df = ACTS[act]
    h = x
    for name, layer in zip(names, linears):
        a = h @ layer.weight.T + layer.bias
        if layer is linears[-1]:
            delta = e  # the output layer gets its true gradient
        else:
            assert B[name].shape == (sizes[-1], layer.out_features)
            delta = (e @ B[name]) * df(a)
        torch.testing.assert_close(layer.weight.grad, delta.T @ h)
        torch.testing.assert_close(layer.bias.grad, delta.sum(0))
        h = f(a)


def test_bp_is_plain_autograd():
    base = mlp((6, 9, 7, 4), "relu")
    x, y = torch.randn(5, 6), torch.randint(0, 4, (5,))
    converted = sdfa.convert(base, "bp")
    step(base, x, y)
    step(converted, x, y)
    for p, q in zip(base.parameters(), converted.parameters()):
        assert torch.equal(p.grad, q.grad)


def conv_net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.BatchNorm2d(3),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(3, 4, 3),
        nn.Tanh(),
        nn.Flatten(),
        nn.Dropout(0.3),
        nn.Linear(4, 5),
    )


@pytest.mark.parametrize("k", [None, 1, 2])
def test_conv_dfa_matches_formula(k):
    model = sdfa.convert(conv_net(), "dfa", seed=0, k=k)
    x, y = torch.randn(6, 2, 6, 6), torch.randint(0, 5, (6,))
    torch.manual_seed(5)
    out = step(model, x, y)
    e = output_error(out, y)
    B = sdfa.feedback_matrices(model)
    assert B["0"].shape == (5, 3 * 3 * 3) and B["4"].shape == (5, 4)
    # Reference: the same forward (same dropout mask), with e @ B injected at block outputs.
    conv0, bn, conv4, lin = model[0], model[1], model[4], model[8]
    w = [p.detach().clone().requires_grad_() for p in (conv0.weight, conv4.weight, lin.weight)]
    torch.manual_seed(5)
    a0 = F.conv2d(x, w[0], conv0.bias, padding=1)
    h0 = F.max_pool2d(
        torch.relu(F.batch_norm(a0, None, None, bn.weight, bn.bias, training=True)), 2
    )
    h1 = F.dropout(torch.tanh(F.conv2d(h0.detach(), w[1], conv4.bias)).flatten(1), 0.3)
    torch.autograd.backward([h0, h1], [(e @ B["0"]).view_as(h0), e @ B["4"]])
    torch.testing.assert_close(conv0.weight.grad, w[0].grad)
    torch.testing.assert_close(conv4.weight.grad, w[1].grad)
    torch.testing.assert_close(lin.weight.grad, e.T @ h1)


def test_sparse_with_all_connections_equals_dense():
    x, y = torch.randn(6, 2, 6, 6), torch.randint(0, 5, (6,))
    sparse = sdfa.convert(conv_net(), "dfa", k=5, example_input=x)
    dense = sdfa.convert(conv_net(), "dfa", example_input=x)
    for name, b in sdfa.feedback_matrices(sparse).items():
        dense.get_submodule(name).dfa_feedback.weight.copy_(b)
    for model in (sparse, dense):
        torch.manual_seed(3)
        step(model, x, y)
    for p, q in zip(sparse.parameters(), dense.parameters()):
        torch.testing.assert_close(p.grad, q.grad)


def test_low_rank_rank_and_formula():
    model = sdfa.convert(mlp((6, 9, 7, 4), "tanh"), "dfa", rank=2)
    x, y = torch.randn(5, 6), torch.randint(0, 4, (5,))
    out = step(model, x, y)
    B = sdfa.feedback_matrices(model)
    assert all(torch.linalg.matrix_rank(b) == 2 for b in B.values())
    e = output_error(out, y)
    h0 = torch.tanh(model[0](x))
    a1 = model[2](h0)
    delta = (e @ B["2"]) * (1 - torch.tanh(a1) ** 2)
    torch.testing.assert_close(model[2].weight.grad, delta.T @ h0)


def test_seed_reproduces_feedback_and_state_dict_round_trip():
    x = torch.randn(2, 2, 6, 6)
    a = sdfa.convert(conv_net(), "dfa", k=1, seed=7, example_input=x)
    b = sdfa.convert(conv_net(), "dfa", k=1, seed=7, example_input=x)
    c = sdfa.convert(conv_net(), "dfa", k=1, seed=8, example_input=x)
    fa, fb_, fc = (sdfa.feedback_matrices(m) for m in (a, b, c))
    assert all(torch.equal(fa[n], fb_[n]) for n in fa)
    assert not torch.equal(fa["0"], fc["0"])

    buffer = io.BytesIO()
    torch.save(a.state_dict(), buffer)
    buffer.seek(0)
    fresh = sdfa.convert(conv_net(), "dfa", k=1, seed=99)  # no forward yet: loading creates B
    fresh.load_state_dict(torch.load(buffer))
    restored = sdfa.feedback_matrices(fresh)
    assert all(torch.equal(fa[n], restored[n]) for n in fa)
    assert "0.dfa_feedback.index" in a.state_dict() and "0.dfa_feedback.value" in a.state_dict()


@pytest.mark.parametrize("opts", [{}, {"k": 2}, {"rank": 3}])
def test_feedback_moves_with_to(opts):
    x = torch.randn(2, 6)
    model = sdfa.convert(mlp((6, 9, 7, 4), "relu"), "dfa", example_input=x, **opts).float()
    assert all(b.dtype in (torch.float32, torch.int64) for b in model.buffers())
    out = model(x.float())
    F.cross_entropy(out, torch.tensor([0, 1])).backward()
    assert model[0].weight.grad.dtype == torch.float32


def count_flops(model, x, y):
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(model(x), y).backward()
    return counter.get_total_flops()


def test_dfa_backward_computes_no_input_gradient_matmul():
    sizes, batch = (20, 30, 40, 10), 8
    x, y = torch.randn(batch, sizes[0]), torch.randint(0, 10, (batch,))
    pairs = list(zip(sizes[:-1], sizes[1:]))
    forward = sum(2 * batch * i * o for i, o in pairs)
    weight_grads = sum(2 * batch * i * o for i, o in pairs)
    input_grads = sum(2 * batch * i * o for i, o in pairs[1:])  # layer 0 needs none
    projections = sum(2 * batch * sizes[-1] * o for _, o in pairs[:-1])  # e @ B_l, dense
    assert (
        count_flops(sdfa.convert(mlp(sizes, "tanh"), "bp"), x, y)
        == forward + weight_grads + input_grads
    )
    assert (
        count_flops(sdfa.convert(mlp(sizes, "tanh"), "dfa"), x, y)
        == forward + weight_grads + projections
    )
    # sparse feedback is a gather, not a matmul with zeros
    assert count_flops(sdfa.convert(mlp(sizes, "tanh"), "dfa", k=1), x, y) == forward + weight_grads


def test_per_part_rules_transfer_protocol():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.features = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten())
            self.classifier = nn.Sequential(nn.Linear(12, 8), nn.Tanh(), nn.Linear(8, 3))

        def forward(self, x):
            return self.classifier(self.features(x))

    x, y = torch.randn(4, 1, 4, 4), torch.randint(0, 3, (4,))
    frozen = sdfa.convert(Net(), {"features": "frozen", "classifier": "dfa"})
    out = step(frozen, x, y)
    assert all(not p.requires_grad for p in frozen.features.parameters())
    B = sdfa.feedback_matrices(frozen)
    assert list(B) == ["classifier.0"]
    e = output_error(out, y)
    h = frozen.features(x)
    a = frozen.classifier[0](h)
    torch.testing.assert_close(
        frozen.classifier[0].weight.grad, ((e @ B["classifier.0"]) * (1 - torch.tanh(a) ** 2)).T @ h
    )
    assert sdfa.rules_of(frozen) == {
        "features.0": "frozen",
        "classifier.0": "dfa",
        "classifier.2": "dfa",
    }

    # Jointly trained BP features get e @ B at their block output and backprop inside.
    joint = sdfa.convert(Net(), {"classifier": "dfa"})
    out = step(joint, x, y)
    B = sdfa.feedback_matrices(joint)
    assert sorted(B) == ["classifier.0", "features.0"]
    e = output_error(out, y)
    w = joint.features[0].weight.detach().clone().requires_grad_()
    feats = torch.relu(F.conv2d(x, w, joint.features[0].bias)).flatten(1)
    feats.backward(e @ B["features.0"])
    torch.testing.assert_close(joint.features[0].weight.grad, w.grad)


def test_boundaries_for_residual_blocks():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.conv2 = nn.Conv2d(2, 2, 3, padding=1), nn.Conv2d(2, 2, 3, padding=1)

        def forward(self, x):
            return torch.relu(x + self.conv2(torch.relu(self.conv1(x))))

    class ResNet(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.stem, self.block1, self.block2 = nn.Conv2d(1, 2, 3, padding=1), Block(), Block()
            self.fc = nn.Linear(2, 3)

        def forward(self, x):
            h = self.block2(self.block1(torch.relu(self.stem(x))))
            return self.fc(h.mean((2, 3)))

    x, y = torch.randn(3, 1, 5, 5), torch.randint(0, 3, (3,))
    model = sdfa.convert(ResNet(), "dfa", boundaries=["stem", "block1", "block2"])
    out = step(model, x, y)
    B = sdfa.feedback_matrices(model)
    assert {n: tuple(b.shape) for n, b in B.items()} == {
        "stem": (3, 50),
        "block1": (3, 50),
        "block2": (3, 50),
    }
    e = output_error(out, y)
    # block1 is trained by backprop inside the block from e @ B_block1 at its output
    ref = ResNet()
    ref.load_state_dict({k: v for k, v in model.state_dict().items() if "dfa_feedback" not in k})
    h0 = torch.relu(ref.stem(x)).detach()
    ref.block1(h0).backward((e @ B["block1"]).view(3, 2, 5, 5))
    torch.testing.assert_close(model.block1.conv1.weight.grad, ref.block1.conv1.weight.grad)
    torch.testing.assert_close(model.block1.conv2.weight.grad, ref.block1.conv2.weight.grad)


def test_gradient_accumulation_over_two_forwards():
    model = sdfa.convert(mlp((6, 9, 7, 4), "tanh"), "dfa", k=1)
    x, y = torch.randn(8, 6), torch.randint(0, 4, (8,))
    step(model, x, y)
    full = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    loss = F.cross_entropy(model(x[:4]), y[:4], reduction="sum") + F.cross_entropy(
        model(x[4:]), y[4:], reduction="sum"
    )
    (loss / 8).backward()
    for g, p in zip(full, model.parameters()):
        torch.testing.assert_close(g, p.grad)


def test_inplace_and_copy():
    base = mlp((6, 9, 4), "relu")
    copy = sdfa.convert(base, "dfa")
    assert copy is not base and copy[0].weight is not base[0].weight
    assert not hasattr(base[0], "dfa_feedback") and not base._forward_pre_hooks
    same = sdfa.convert(base, "dfa", inplace=True)
    assert same is base
    with pytest.raises(ValueError, match="already converted"):
        sdfa.convert(same, "dfa")


def test_eval_and_no_grad_forward():
    model = sdfa.convert(conv_net(), "dfa", k=1)
    with torch.no_grad():
        out = model.eval()(torch.randn(3, 2, 6, 6))
    assert out.shape == (3, 5)
    with pytest.raises(ValueError, match="first forward pass"):
        sdfa.feedback_matrices(model)


def test_custom_module_with_layers_in_a_different_order():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.out = nn.Linear(8, 3)  # registered first, runs last
            self.hidden = nn.Linear(5, 8)

        def forward(self, x):
            return self.out(torch.tanh(self.hidden(x)))

    x, y = torch.randn(4, 5), torch.randint(0, 3, (4,))
    with pytest.raises(RuntimeError, match="output="):
        step(sdfa.convert(Net(), "dfa"), x, y)
    with pytest.raises(RuntimeError, match="boundaries"):
        step(sdfa.convert(Net(), "dfa", output="out"), x, y)
    model = sdfa.convert(Net(), "dfa", output="out", boundaries=["hidden"])
    step(model, x, y)
    assert model.hidden.weight.grad is not None
    assert sdfa.feedback_matrices(model)["hidden"].shape == (3, 8)


@pytest.mark.parametrize(
    "rule, options, message",
    [
        ("dfb", {}, "available rules: bp, .*dfa"),
        ("dfa", {"kk": 1}, "unknown option.*kk.*they take: after_output, boundaries"),
        ("dfa", {"k": 0}, r"1 <= k <= 4"),
        ("dfa", {"k": 5}, r"1 <= k <= 4"),
        ("dfa", {"rank": 9}, r"1 <= rank <= 4"),
        ("dfa", {"k": 1, "rank": 1}, "either"),
        ("dfa", {"output": "9"}, "choose one of: 0, 2, 4"),
        ("dfa", {"boundaries": ["nope"]}, "nope"),
        ({"head": "dfa"}, {}, "names no submodule"),
        ("bp", {"k": 1}, "unknown option"),
    ],
)
def test_bad_input_raises_clear_errors(rule, options, message):
    with pytest.raises(ValueError, match=message):
        sdfa.convert(mlp((6, 9, 7, 4), "relu"), rule, **options)


def test_unsupported_parametric_layer_is_named():
    # DFA trains an Embedding inside its block (tests/test_blocks.py); a layer-wise rule needs a
    # twin, which Embedding has not: the error names it and offers a mapping that keeps the
    # rest of the model on its rule.
    model = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(8, 3))
    with pytest.raises(ValueError, match="'0' \\(Embedding") as error:
        sdfa.convert(model, "fa")
    assert "rule={'': 'fa', '0': 'bp'}" in str(error.value)
    sdfa.convert(model, {"": "fa", "0": "frozen"})  # freezing it is the way out
    sdfa.convert(model, {"": "fa", "0": "bp"})  # and so is backprop for it


def test_rules_are_listed():
    assert {"bp", "dfa"} <= set(sdfa.RULES)
    assert sdfa.available_rules() == sorted(sdfa.RULES)


def test_deepcopy_and_pickle_keep_working():
    # a conv net: its block sizes are known only at the first forward pass (a Linear chain's
    # matrices exist from convert() on)
    model = sdfa.convert(conv_net(), "dfa", k=1, seed=3)
    twin = copy.deepcopy(model)  # before the first forward: B is created on the copy only
    x, y = torch.randn(5, 2, 6, 6), torch.randint(0, 5, (5,))
    torch.manual_seed(0)
    step(twin, x, y)
    assert hasattr(twin[0], "dfa_feedback") and not hasattr(model[0], "dfa_feedback")
    torch.manual_seed(0)
    step(model, x, y)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    torch.manual_seed(0)
    step(loaded, x, y)
    for a, b, c in zip(model.parameters(), twin.parameters(), loaded.parameters()):
        torch.testing.assert_close(a.grad, b.grad)
        torch.testing.assert_close(a.grad, c.grad)
