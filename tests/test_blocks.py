"""DFA between blocks of any modules, feedback shared over positions, the layer registry.

Every reference is independent of the engine: autograd run on one block alone (inside
``sdfa.backprop()``, where the DFA hooks step aside) with ``e @ B_l`` injected at its output by
``torch.autograd.grad``, in float64.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import sdfa
from sdfa import feedback as fb
from sdfa.layers import LAYERS, FeedbackLayer, Work, feedback_linear, trainable_units

pytestmark = pytest.mark.usefixtures("float64")


def output_error(out, loss_fn):
    out = out.detach().requires_grad_()
    (e,) = torch.autograd.grad(loss_fn(out), out)
    return e


def block_grads(run, inputs, params, injected):
    """Gradients of ``params`` from autograd on one block alone, ``injected`` at its output."""
    with sdfa.backprop():
        out = run(*(x.detach() for x in inputs))
        return torch.autograd.grad(out, params, injected.reshape(out.shape), allow_unused=True)


def assert_grads(params, expected):
    for p, g in zip(params, expected, strict=True):
        assert p.grad is not None
        torch.testing.assert_close(p.grad, g)
        assert p.grad.abs().sum() > 0


def project(e, B):
    """e @ B at every position: e (..., C), B (C, d)."""
    return e @ B


# -- a language model: Embedding + 2 TransformerEncoderLayer + Linear -----------------------------

VOCAB, DIM, HEADS, FF, T = 7, 8, 2, 12, 5


class LM(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(VOCAB, DIM)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(
                DIM, HEADS, FF, dropout=0.0, activation=nn.ReLU(), batch_first=True
            )
            for _ in range(2)
        )
        self.head = nn.Linear(DIM, VOCAB)

    def forward(self, tokens):
        mask = nn.Transformer.generate_square_subsequent_mask(tokens.shape[1], device=tokens.device)
        h = self.embed(tokens)
        for layer in self.layers:
            h = layer(h, src_mask=mask)
        return self.head(h)


def lm_data():
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, VOCAB, (3, T), generator=g)
    targets = torch.randint(0, VOCAB, (3, T), generator=g)
    return tokens, targets


def lm_loss(targets):
    return lambda out: F.cross_entropy(out.reshape(-1, VOCAB), targets.reshape(-1))


def lm_step(model):
    tokens, targets = lm_data()
    out = model(tokens)
    lm_loss(targets)(out).backward()
    return tokens, out, output_error(out, lm_loss(targets))


MASK = nn.Transformer.generate_square_subsequent_mask(T)


@pytest.mark.parametrize("opts", [{}, {"k": 1}, {"rank": 3}, {"k": 2, "rank": 4}])
def test_transformer_lm_macro_feedback_per_position(opts):
    boundaries = ["embed", "layers.0", "layers.1"]
    model = sdfa.convert(LM(), "dfa", boundaries=boundaries, per_position=True, **opts)
    tokens, out, e = lm_step(model)
    B = sdfa.feedback_matrices(model)
    assert {n: tuple(b.shape) for n, b in B.items()} == {n: (VOCAB, DIM) for n in boundaries}
    if "k" in opts:
        assert ((B["embed"] != 0).sum(0) == opts["k"]).all()
    if "rank" in opts:
        assert all(torch.linalg.matrix_rank(b) == opts["rank"] for b in B.values())

    with sdfa.backprop():
        h0 = model.embed(tokens)
        h1 = model.layers[0](h0, src_mask=MASK)
        h2 = model.layers[1](h1, src_mask=MASK)
    emb = [model.embed.weight]
    assert_grads(emb, block_grads(model.embed, [tokens], emb, project(e, B["embed"])))
    for i, (h_in, name) in enumerate([(h0, "layers.0"), (h1, "layers.1")]):
        layer = model.layers[i]
        params = list(layer.parameters())
        assert len(params) == 12  # attention in/out projections, FFN, two LayerNorms
        expected = block_grads(
            lambda x, layer=layer: layer(x, src_mask=MASK), [h_in], params, project(e, B[name])
        )
        assert_grads(params, expected)
    torch.testing.assert_close(model.head.weight.grad, e.reshape(-1, VOCAB).T @ h2.reshape(-1, DIM))


def test_transformer_lm_micro_feedback():
    """Launay et al.'s micro points: after attention + add + norm1, after the FFN's first linear
    and its activation, and at the block output."""
    points = ["norm1", "activation", ""]
    boundaries = ["embed"] + [
        f"layers.{i}.{p}".rstrip(".") for i in range(2) for p in points
    ]
    model = sdfa.convert(LM(), "dfa", boundaries=boundaries, per_position=True, seed=3)
    tokens, out, e = lm_step(model)
    B = sdfa.feedback_matrices(model)
    assert tuple(B["layers.0.activation"].shape) == (VOCAB, FF)
    assert tuple(B["layers.1.norm1"].shape) == (VOCAB, DIM)

    with sdfa.backprop():
        h = model.embed(tokens)
    for i, layer in enumerate(model.layers):
        attn = list(layer.self_attn.parameters()) + list(layer.norm1.parameters())
        ffn1 = list(layer.linear1.parameters())
        rest = list(layer.linear2.parameters()) + list(layer.norm2.parameters())

        def attention(x, layer=layer):
            return layer.norm1(x + layer.self_attn(x, x, x, attn_mask=MASK, need_weights=False)[0])

        def first_linear(x, layer=layer):
            return layer.activation(layer.linear1(x))

        def rest_of_block(x, a, layer=layer):
            return layer.norm2(x + layer.linear2(layer.dropout(a)))

        with sdfa.backprop():
            x1 = attention(h)
            a = first_linear(x1)
            h_next = rest_of_block(x1, a)
        name = f"layers.{i}"
        assert_grads(attn, block_grads(attention, [h], attn, project(e, B[f"{name}.norm1"])))
        ffn1_feedback = project(e, B[f"{name}.activation"])
        assert_grads(ffn1, block_grads(first_linear, [x1], ffn1, ffn1_feedback))
        assert_grads(rest, block_grads(rest_of_block, [x1, a], rest, project(e, B[name])))
        h = h_next


def test_chain_mode_trains_transformer_layers_as_blocks():
    """In chain mode a TransformerEncoderLayer is one unit: macro feedback with no boundaries."""
    model = nn.Sequential(
        nn.Linear(DIM, DIM),
        nn.TransformerEncoderLayer(DIM, HEADS, FF, dropout=0.0, batch_first=True),
        nn.Linear(DIM, 3),
    )
    assert [n for n, _ in trainable_units(model)] == ["0", "1", "2"]  # not its inner layers
    model = sdfa.convert(model, "dfa", per_position=True)
    x = torch.randn(2, T, DIM)
    out = model(x)
    out.square().sum().backward()
    e = 2 * out.detach()
    B = sdfa.feedback_matrices(model)
    params = list(model[1].parameters())
    with sdfa.backprop():
        h = model[0](x)
    assert_grads(params, block_grads(model[1], [h], params, e @ B["1"]))


def test_per_position_shape_mismatch_names_both_shapes():
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Flatten(), nn.Linear(18, 3))
    converted = sdfa.convert(model, "dfa", per_position=True, boundaries=["1"])
    with pytest.raises(ValueError, match=r"\(2, 3, 6\).*\(2, 3\)"):
        converted(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="per_position must be True or False"):
        sdfa.convert(model, "dfa", per_position="yes")


@pytest.mark.parametrize("rank", [None, 2])
def test_per_position_k1_one_nonzero_per_feature(rank):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(5, 40), nn.Tanh(), nn.Linear(40, 4))
    model = sdfa.convert(base, "dfa", per_position=True, k=1, rank=4 if rank else None)
    B = sdfa.feedback_matrices(model)["0"]  # known at convert(): a Linear chain
    assert B.shape == (4, 40)
    assert ((B != 0).sum(0) == 1).all()  # one class per feature, the same at every position
    assert ((B != 0).sum(1) == 10).all()  # every class feeds 40 / 4 features
    x, y = torch.randn(3, 6, 5), torch.randint(0, 4, (3, 6))
    out = model(x)
    F.cross_entropy(out.reshape(-1, 4), y.reshape(-1)).backward()
    e = output_error(out, lambda o: F.cross_entropy(o.reshape(-1, 4), y.reshape(-1)))
    params = list(model[0].parameters())
    expected = block_grads(lambda v: torch.tanh(model[0](v)), [x], params, e @ B)
    assert_grads(params, expected)


# -- recurrent modules --------------------------------------------------------------------------


class RecurrentClassifier(nn.Module):
    def __init__(self, cell):
        super().__init__()
        torch.manual_seed(0)
        self.rnn = getattr(nn, cell)(3, 5, num_layers=2, batch_first=True)
        self.fc = nn.Linear(10, 4)

    def forward(self, x):
        out, state = self.rnn(x)
        h = state[0] if isinstance(state, tuple) else state
        return self.fc(torch.cat([out[:, -1], h[-1]], -1))


@pytest.mark.parametrize("cell", ["LSTM", "GRU"])
def test_recurrent_block_learns_from_its_output_sequence_only(cell):
    """The boundary feeds the first tensor of the tuple, the output sequence; the other tensors
    (h_n, c_n) are detached, so the classifier's gradient never reaches the RNN through them."""
    model = sdfa.convert(RecurrentClassifier(cell), "dfa", boundaries=["rnn"], k=2)
    x, y = torch.randn(4, 6, 3), torch.randint(0, 4, (4,))
    out = model(x)
    F.cross_entropy(out, y).backward()
    e = output_error(out, lambda o: F.cross_entropy(o, y))
    B = sdfa.feedback_matrices(model)["rnn"]
    assert B.shape == (4, 6 * 5)
    params = list(model.rnn.parameters())
    assert len(params) == 8  # two layers: weight_ih, weight_hh, bias_ih, bias_hh
    assert_grads(params, block_grads(lambda v: model.rnn(v)[0], [x], params, e @ B))
    # h_n is (layers, batch, hidden): marking it says what to do instead
    h_n = (1, 0) if cell == "LSTM" else (1,)
    picked = sdfa.convert(RecurrentClassifier(cell), "dfa", boundaries=[("rnn", h_n)])
    with pytest.raises(ValueError, match="batch dimension first"):
        picked(x)


class Pair(nn.Module):
    """A module with a tuple output whose second tensor is the block output."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 5)

    def forward(self, x):
        return x.sum(-1, keepdim=True), torch.tanh(self.lin(x))


class PairNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.pair, self.fc = Pair(), nn.Linear(6, 2)

    def forward(self, x):
        aux, h = self.pair(x)
        return self.fc(torch.cat([aux, h], -1))


@pytest.mark.parametrize("index", [1, (1,)])
def test_boundary_picks_a_tensor_of_a_tuple_by_index(index):
    model = sdfa.convert(PairNet(), "dfa", boundaries=[("pair", index)])
    x = torch.randn(4, 3, requires_grad=True)
    out = model(x)
    out.square().sum().backward()
    e = 2 * out.detach()
    B = sdfa.feedback_matrices(model)["pair"]
    params = list(model.pair.parameters())
    assert_grads(params, block_grads(lambda v: model.pair(v)[1], [x], params, e @ B))
    # aux is detached too: x gets only what the picked tensor sends back through the block
    x0 = x.detach().requires_grad_()
    with sdfa.backprop():
        (expected,) = torch.autograd.grad(model.pair(x0)[1], x0, e @ B)
    torch.testing.assert_close(x.grad, expected)
    with pytest.raises(RuntimeError, match=r"\('pair', \(2,\)\) picks no tensor"):
        sdfa.convert(PairNet(), "dfa", boundaries=[("pair", 2)])(x)
    with pytest.raises(ValueError, match="a boundary is a module name or a"):
        sdfa.convert(PairNet(), "dfa", boundaries=[("pair", "x")])


class Last(nn.Module):
    def forward(self, out):
        return out[0][:, -1]


def test_chain_mode_with_an_lstm_between_two_linears():
    torch.manual_seed(0)
    base = nn.Sequential(
        nn.Linear(3, 6), nn.Tanh(), nn.LSTM(6, 5, batch_first=True), Last(), nn.Linear(5, 4)
    )
    model = sdfa.convert(base, "dfa")
    assert sdfa.rules_of(model) == {"0": "dfa", "2": "dfa", "4": "dfa"}
    x, y = torch.randn(4, 7, 3), torch.randint(0, 4, (4,))
    out = model(x)
    F.cross_entropy(out, y).backward()
    e = output_error(out, lambda o: F.cross_entropy(o, y))
    B = sdfa.feedback_matrices(model)
    assert B["0"].shape == (4, 7 * 6) and B["2"].shape == (4, 5)
    first = list(model[0].parameters())
    assert_grads(first, block_grads(lambda v: torch.tanh(model[0](v)), [x], first, e @ B["0"]))
    with sdfa.backprop():
        h = torch.tanh(model[0](x))
    lstm = list(model[2].parameters())
    assert_grads(lstm, block_grads(lambda v: model[2](v)[0][:, -1], [h], lstm, e @ B["2"]))


# -- convolutions: Conv1d chains, Han et al.'s convolutional feedback ---------------------------


def conv1d_net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv1d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv1d(4, 4, 3, stride=2), nn.Tanh(),
        nn.Flatten(), nn.Linear(4 * 4, 4),
    )


@pytest.mark.parametrize(
    "opts", [{}, {"k": 1}, {"dilation": 2}, {"dilation": 3, "groups": 2}, {"dilation": 1}]
)
def test_conv1d_net_matches_block_references(opts):
    model = sdfa.convert(conv1d_net(), "dfa", seed=2, **opts)
    x, y = torch.randn(5, 2, 10), torch.randint(0, 4, (5,))
    out = model(x)
    F.cross_entropy(out, y).backward()
    e = output_error(out, lambda o: F.cross_entropy(o, y))
    B = sdfa.feedback_matrices(model)
    assert B["0"].shape == (4, 4 * 10) and B["2"].shape == (4, 16)
    if "dilation" in opts:  # Han et al.: B[c, ch, s] = K[c, ch, s mod d]; dense B for flat ones
        d, g = opts["dilation"], opts.get("groups", 1)
        b = B["0"].view(4, 4, 10)
        for s in range(d, 10):
            torch.testing.assert_close(b[:, :, s], b[:, :, s - d])
        classes, channels = torch.arange(4) // (4 // g), torch.arange(4) // (4 // g)
        assert ((b != 0).any(-1) == (classes[:, None] == channels[None, :])).all()
        assert isinstance(model[4 - 2].dfa_feedback, fb.DenseFeedback)
    conv0, conv2 = list(model[0].parameters()), list(model[2].parameters())
    assert_grads(conv0, block_grads(lambda v: torch.relu(model[0](v)), [x], conv0, e @ B["0"]))
    with sdfa.backprop():
        h = torch.relu(model[0](x))
    expected = block_grads(lambda v: torch.tanh(model[2](v)).flatten(1), [h], conv2, e @ B["2"])
    assert_grads(conv2, expected)


@pytest.mark.parametrize("dilation, groups", [((2, 3), 1), ((1, 1), 4), (3, 2)])
def test_conv_feedback_is_the_dilated_convolution(dilation, groups):
    """e spread over a dilated error map (one copy every d positions), convolved with the
    d-sized kernel K in groups: torch's own transposed convolution with stride d."""
    shape = (4, 7, 5)
    f = fb.make_feedback(8, 140, seed=0, name="x", dilation=dilation, groups=groups,
                         sample_shape=shape, dtype=torch.float64)
    d = dilation if isinstance(dilation, tuple) else (dilation, dilation)
    assert f.weight.shape == (8, 4 // groups, *d)  # C Ch d1 d2 / groups values, not C N
    e = torch.randn(3, 8)
    reps = [-(-s // k) for s, k in zip(shape[1:], d)]
    errors = e[:, :, None, None].expand(3, 8, *reps)
    reference = F.conv_transpose2d(errors, f.weight, stride=d, groups=groups)
    reference = reference[:, :, : shape[1], : shape[2]].reshape(3, -1)
    torch.testing.assert_close(f.project(e), reference)
    torch.testing.assert_close(f.dense(), f.project(torch.eye(8)))
    with FlopCounterMode(display=False) as counter:
        f.project(e)
    assert counter.get_total_flops() == 2 * 3 * (8 // groups) * f.weight[0].numel() * groups


@pytest.mark.parametrize(
    "opts, message",
    [
        ({"groups": 2}, "give dilation= too"),
        ({"dilation": 0}, "dilation must be a positive integer"),
        ({"dilation": 2, "k": 1}, "do not combine"),
        ({"dilation": 2, "groups": 3}, "groups must be a positive integer that divides 4"),
        ({"dilation": 2, "per_position": True}, "choose one"),
    ],
)
def test_conv_feedback_bad_options(opts, message):
    with pytest.raises(ValueError, match=message):
        sdfa.convert(conv1d_net(), "dfa", **opts)


def test_conv_feedback_checks_block_shapes_and_round_trips():
    with pytest.raises(ValueError, match="groups=3 must divide the 4 channels"):
        net = conv1d_net()
        net[5] = nn.Linear(16, 3)
        sdfa.convert(net, "dfa", dilation=2, groups=3)(torch.randn(2, 2, 10))
    with pytest.raises(ValueError, match="2 spatial dimensions"):
        fb.make_feedback(4, 60, seed=0, name="x", dilation=(2, 2, 2), sample_shape=(3, 4, 5))
    x = torch.randn(2, 2, 10)
    a = sdfa.convert(conv1d_net(), "dfa", dilation=3, groups=2, example_input=x)
    b = sdfa.convert(conv1d_net(), "dfa", dilation=3, groups=2, seed=5)
    b.load_state_dict(a.state_dict())
    assert "0.dfa_feedback.weight" in a.state_dict()
    for name, matrix in sdfa.feedback_matrices(a).items():
        torch.testing.assert_close(sdfa.feedback_matrices(b)[name], matrix)


# -- no W^T delta product at a block boundary ---------------------------------------------------


def test_block_boundaries_compute_no_input_gradient_products():
    """Blocks of two Linears on token positions: inside a block the second layer sends its error
    to the first (backprop), but no block sends one below its boundary."""
    batch, positions, d, hidden, classes = 3, 4, 6, 10, 5

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(d, hidden), nn.Linear(hidden, d)

        def forward(self, x):
            return self.b(torch.tanh(self.a(x)))

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(d, d), Block(), Block(), nn.Linear(d, classes))
    model = sdfa.convert(model, "dfa", per_position=True, boundaries=["0", "1", "2"])
    x = torch.randn(batch, positions, d)
    with FlopCounterMode(display=False) as counter:
        model(x).square().sum().backward()
    rows = batch * positions
    forward = 2 * rows * (d * d + 2 * 2 * d * hidden + d * classes)
    weight_grads = forward
    inside = 2 * 2 * rows * d * hidden  # block.b -> block.a, in each of the two blocks
    projections = 3 * 2 * rows * classes * d  # e @ B_l at every position, three boundaries
    assert counter.get_total_flops() == forward + weight_grads + inside + projections


# -- the layer registry -------------------------------------------------------------------------


class Dense(nn.Module):
    """A layer sdfa does not know: y = x W^T (no bias), written by hand."""

    def __init__(self, n_in, n_out):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_out, n_in) / n_in**0.5)

    def forward(self, x):
        return x @ self.weight.T


class FeedbackDense(FeedbackLayer, Dense):
    def forward(self, x):
        return feedback_linear(self, x, self.weight)


def dense_cost(module, in_shape, out_shape):
    return Work(in_shape[0] * module.weight.numel())


@pytest.fixture
def dense_registered():
    entry = sdfa.register_layer(Dense, twin=FeedbackDense, cost=dense_cost)
    yield entry
    del LAYERS[f"{Dense.__module__}.{Dense.__qualname__}"]


def test_registered_custom_layer_trains_with_fa(dense_registered):
    torch.manual_seed(0)
    base = nn.Sequential(Dense(5, 7), nn.Tanh(), Dense(7, 3))
    model = sdfa.convert(base, "fa", seed=4)
    assert isinstance(model[2], FeedbackDense) and sdfa.rules_of(model) == {"0": "fa", "2": "fa"}
    x, y = torch.randn(6, 5), torch.randint(0, 3, (6,))
    out = model(x)
    F.cross_entropy(out, y).backward()
    delta = output_error(out, lambda o: F.cross_entropy(o, y))
    h = torch.tanh(x @ model[0].weight.T)
    torch.testing.assert_close(model[2].weight.grad, delta.T @ h)
    B = model[2].feedback
    assert B.shape == model[2].weight.shape and not torch.allclose(B, model[2].weight)
    delta0 = (delta @ B) * (1 - h**2)  # the error travels through B, not W
    torch.testing.assert_close(model[0].weight.grad, delta0.T @ x)
    report = sdfa.costs(base, "fa", (5,))
    assert report.macs == 3 * 5 * 7 + 3 * 7 * 3 - 5 * 7  # no error for the first layer
    with pytest.raises(ValueError, match="already registered"):
        sdfa.register_layer(Dense)


def test_registry_refuses_duplicates_and_bad_twins():
    with pytest.raises(ValueError, match="already registered"):
        sdfa.register_layer(nn.Linear)
    with pytest.raises(ValueError, match="must subclass both"):
        sdfa.register_layer(Dense, twin=nn.Linear)
    with pytest.raises(ValueError, match="already registered"):
        sdfa.register_rule(sdfa.RULES["fa"])
    from sdfa.models import register_model

    with pytest.raises(ValueError, match="already registered"):
        register_model("lenet5")(lambda shape, classes: None)


def test_is_trainable_and_units():
    assert sdfa.is_trainable(nn.LSTM(2, 3)) and sdfa.is_trainable(nn.ConvTranspose2d(1, 1, 2))
    assert not sdfa.is_trainable(nn.ReLU()) and not sdfa.is_trainable(nn.LayerNorm(3))
    attention = nn.MultiheadAttention(4, 2)
    model = nn.Sequential(nn.Embedding(5, 4), attention, nn.Linear(4, 2))
    assert [n for n, _ in trainable_units(model)] == ["0", "1", "2"]  # not 1.out_proj


def test_layerwise_rules_refuse_units_without_twin_with_a_mapping_that_keeps_the_rest():
    model = nn.Sequential(nn.Linear(3, 4), nn.LSTM(4, 4))
    with pytest.raises(ValueError, match=r"rule=\{'': 'usf', '1': 'bp'\}"):
        sdfa.convert(model, "usf")
    parts = {"": "fa", "0": ("usf", {"scale": 0.5})}
    with pytest.raises(ValueError, match=r"'0': \('usf', \{'scale': 0.5\}\), '1': 'bp'"):
        sdfa.convert(model, parts)
    with pytest.raises(ValueError, match="inside '1' .TransformerEncoderLayer."):
        sdfa.convert(nn.Sequential(nn.Linear(3, 4), nn.TransformerEncoderLayer(4, 2, 8)),
                     {"": "dfa", "1.linear1": "fa"})
    sdfa.convert(model, {"": "usf", "1": "bp"})


# -- small API repairs --------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [2**63, 2**70, -1, 1.5, True, "0"])
def test_seeds_outside_the_range_raise(seed):
    with pytest.raises(ValueError, match=f"got {seed!r}".replace("(", r"\(").replace("*", r"\*")):
        sdfa.convert(nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 2)), "dfa", seed=seed)


def test_largest_seed_works_and_differs():
    net = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 2))
    top = sdfa.feedback_matrices(sdfa.convert(net, "dfa", seed=2**63 - 1))["0"]
    zero = sdfa.feedback_matrices(sdfa.convert(net, "dfa", seed=0))["0"]
    assert not torch.equal(top, zero)


def test_feedback_matrices_right_after_convert_for_linear_chains():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 9), nn.Tanh(), nn.Linear(9, 7), nn.Tanh(), nn.Linear(7, 4))
    model = sdfa.convert(net, "dfa", k=2, seed=1)
    before = sdfa.feedback_matrices(model)
    assert {n: tuple(b.shape) for n, b in before.items()} == {"0": (4, 9), "2": (4, 7)}
    lazy = sdfa.convert(net, "dfa", k=2, seed=1, example_input=torch.randn(2, 6))
    for name, b in sdfa.feedback_matrices(lazy).items():
        assert torch.equal(b, before[name])  # the same matrices a forward pass makes
    model(torch.randn(3, 6)).sum().backward()
    assert all(torch.equal(b, sdfa.feedback_matrices(model)[n]) for n, b in before.items())
    # a first forward pass on positions needs other sizes: they are remade from the seed
    fresh = sdfa.convert(net, "dfa", k=2, seed=1)
    fresh(torch.randn(2, 3, 6)).sum().backward()
    assert sdfa.feedback_matrices(fresh)["0"].shape == (12, 27)
    with pytest.raises(RuntimeError, match="did the input size change"):
        fresh(torch.randn(2, 6)).sum().backward()
    # a Conv1d chain's Linear head has a known input size too
    head = sdfa.convert(nn.Sequential(nn.Conv1d(1, 2, 3), nn.Flatten(), nn.Linear(8, 2)), "dfa")
    assert sdfa.feedback_matrices(head)["0"].shape == (2, 8)
    # a block that feeds a convolution: its size is unknown until the first forward pass
    conv = sdfa.convert(
        nn.Sequential(nn.Conv1d(1, 2, 3), nn.Conv1d(2, 2, 3), nn.Flatten(), nn.Linear(8, 2)), "dfa"
    )
    with pytest.raises(ValueError, match="first forward pass"):
        sdfa.feedback_matrices(conv)


def test_sparse_low_rank_feedback():
    f = fb.make_feedback(10, 300, seed=0, name="x", k=3, rank=4, dtype=torch.float64)
    b = f.dense()
    assert ((b != 0).sum(0) == 3).all()  # every neuron reads exactly k entries of e
    assert (b != 0).any(1).all()  # every class reaches some neuron (k * rank >= C)
    assert torch.linalg.matrix_rank(b) == 4
    e = torch.randn(5, 10)
    torch.testing.assert_close(f.project(e), e @ b)
    with FlopCounterMode(display=False) as counter:
        f.project(e)
    assert counter.get_total_flops() == 0  # gathers only
    assert {k for k, _ in f.state_dict().items()} == {"index", "u", "group", "v", "_extra_state"}
    with pytest.raises(ValueError, match="k \\* rank >= 10"):
        fb.make_feedback(10, 300, seed=0, name="x", k=3, rank=3)


def test_sparse_low_rank_in_a_model_round_trips():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 20), nn.Tanh(), nn.Linear(20, 4))
    a = sdfa.convert(net, "dfa", k=2, rank=2, seed=3)
    b = sdfa.convert(net, "dfa", k=2, rank=2, seed=4, example_input=None)
    b.load_state_dict(a.state_dict())
    assert torch.equal(sdfa.feedback_matrices(a)["0"], sdfa.feedback_matrices(b)["0"])
    def conv():
        return nn.Sequential(nn.Conv1d(1, 2, 3), nn.Tanh(), nn.Conv1d(2, 2, 3), nn.Flatten(),
                             nn.Linear(12, 4))

    fresh = sdfa.convert(conv(), "dfa", k=2, rank=2)
    fresh(torch.randn(2, 1, 10))
    reloaded = sdfa.convert(conv(), "dfa", k=2, rank=2, seed=9)  # no matrices yet
    reloaded.load_state_dict(fresh.state_dict())
    assert torch.equal(sdfa.feedback_matrices(fresh)["0"], sdfa.feedback_matrices(reloaded)["0"])


# -- costs --------------------------------------------------------------------------------------


def test_costs_count_per_position_feedback():
    net = nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 4))
    positions = 5
    dense = sdfa.costs(net, "dfa", (positions, 6), per_position=True)
    hidden = dense.layers[0]
    assert hidden.error == positions * 4 * 10 and hidden.neurons == positions * 10
    sparse = sdfa.costs(net, "dfa", (positions, 6), per_position=True, k=1)
    assert sparse.layers[0].error == sparse.layers[0].gather == positions * 10
    flat = sdfa.costs(net, "dfa", (positions, 6))  # one (C T, N T) matrix over the sequence
    assert flat.layers[0].error == (positions * 4) * (positions * 10)
    # "sum": the error summed over the positions is projected once per sample, then handed to
    # every position unchanged (a copy, no MACs); the sum still reads every position's error
    summed = sdfa.costs(net, "dfa", (positions, 6), per_position="sum")
    assert summed.layers[0].error == 4 * 10 and summed.layers[0].neurons == positions * 10
    assert summed.layers[0].error_values == dense.layers[0].error_values
    assert summed.layers[0].weight_values == dense.layers[0].weight_values / positions
    assert "once, of the error summed over 5 positions" in summed.layers[0].via


def test_costs_of_recurrent_units_and_a_clear_refusal():
    steps, n_in, hidden = 7, 3, 5
    net = nn.Sequential(nn.Linear(n_in, n_in), nn.LSTM(n_in, hidden, batch_first=True), Last(),
                        nn.Linear(hidden, 2))
    report = sdfa.costs(net, "bp", (steps, n_in))
    lstm = next(c for c in report.layers if c.name == "1")
    forward = steps * 4 * hidden * (n_in + hidden)
    assert lstm.forward == forward
    # weights + the recurrence: the error reaches h_{t-1} at every step but the first
    # (FlopCounterMode agrees: tests/test_sequence.py)
    assert lstm.update == forward + (steps - 1) * 4 * hidden * hidden
    first = next(c for c in report.layers if c.name == "0")
    assert first.error == steps * 4 * hidden * n_in  # the LSTM sends its error to layer 0
    class Decoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = nn.TransformerDecoderLayer(4, 2, 8, batch_first=True)

        def forward(self, x):
            return self.layer(x, x)

    decoder = nn.Sequential(nn.Linear(4, 4), Decoder())
    with pytest.raises(ValueError, match="no cost formula for '1.layer' .TransformerDecoderLayer"):
        sdfa.costs(decoder, "dfa", (3, 4), per_position=True, boundaries=["0"], output="1.layer")


def test_modules_from_other_libraries_train_inside_a_block():
    """A module sdfa has never heard of (here one with a raw nn.Parameter, standing in for a
    graph layer or a spiking neuron) learns inside its block by autograd."""

    class Leaky(nn.Module):  # a leaky integrator over time, with a learned decay
        def __init__(self):
            super().__init__()
            self.decay = nn.Parameter(torch.tensor(0.7))

        def forward(self, x):
            v, out = torch.zeros_like(x[:, 0]), []
            for t in range(x.shape[1]):
                v = self.decay * v + x[:, t]
                out.append(torch.tanh(v))
            return torch.stack(out, 1)

    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(3, 4), Leaky(), nn.Linear(4, 2))
    model = sdfa.convert(base, "dfa", per_position=True)
    x = torch.randn(2, 5, 3)
    out = model(x)
    out.square().sum().backward()
    e = 2 * out.detach()
    params = list(model[0].parameters()) + [model[1].decay]
    B = sdfa.feedback_matrices(model)["0"]
    expected = block_grads(lambda v: model[1](model[0](v)), [x], params, e @ B)
    assert_grads(params, expected)
    with pytest.raises(ValueError, match="cannot train module '1' .Leaky"):
        sdfa.convert(base, "fa")
    copy.deepcopy(model)


@pytest.mark.parametrize(
    "make, shape",
    [
        (lambda: nn.Conv1d(2, 4, 3, stride=2, padding=2, dilation=2), (1, 2, 9)),
        (lambda: nn.Conv3d(2, 2, 2, padding=1, groups=2), (1, 2, 3, 4, 3)),
        (lambda: nn.ConvTranspose2d(2, 3, 3, stride=2, padding=1, output_padding=1), (1, 2, 3, 4)),
        (lambda: nn.ConvTranspose1d(4, 2, 3, stride=3, padding=2, groups=2), (1, 4, 5)),
    ],
)
def test_conv_cost_formula_against_flop_counter_and_jacobian(make, shape):
    from sdfa.layers.conv import conv_cost

    torch.manual_seed(0)
    conv = make()
    x = torch.randn(shape)
    with FlopCounterMode(display=False) as counter:
        y = conv(x)
    work = conv_cost(conv, tuple(x.shape), tuple(y.shape))
    assert 2 * work.forward == counter.get_total_flops()  # every product a dense engine runs
    with torch.no_grad():
        conv.weight.fill_(1.0)
    jacobian = torch.autograd.functional.jacobian(lambda v: conv(v) - conv.bias.view(-1, *[1] * (
        x.dim() - 2)), x)
    assert work.connections == int((jacobian != 0).sum())  # pairs joined by a weight


def test_costs_of_the_transformer_lm_per_position():
    boundaries = ["embed", "layers.0", "layers.1"]
    report = sdfa.costs(LM(), "dfa", (T,), input_dtype=torch.long, per_position=True,
                        boundaries=boundaries)
    rows = {c.name: c for c in report.layers}
    for name in boundaries:  # e B_l at every token: T C d MACs, and nothing sent down
        assert rows[name].error == T * VOCAB * DIM and rows[name].via.startswith("e B")
        assert rows[name].neurons == T * DIM
    layer = LM().layers[0]
    attention = T * DIM * 3 * DIM + 2 * T * T * DIM + T * DIM * DIM
    ffn = 2 * T * DIM * FF
    assert rows["layers.0"].forward == attention + ffn
    assert rows["embed"].forward == 0 and layer.linear1.out_features == FF
    assert rows["head"].forward == T * DIM * VOCAB


# -- modules from other libraries (optional: skipped when the library is absent) ---------------


def test_a_pytorch_geometric_layer_trains_inside_a_block():
    """Node classification, nodes as samples: GCNConv blocks get e @ B at their output."""
    gnn = pytest.importorskip("torch_geometric.nn")

    class GCN(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.conv1, self.conv2 = gnn.GCNConv(3, 6), gnn.GCNConv(6, 5)
            self.head = nn.Linear(5, 2)

        def forward(self, x, edge_index):
            h = torch.relu(self.conv1(x, edge_index))
            return self.head(torch.relu(self.conv2(h, edge_index)))

    x = torch.randn(7, 3)
    edge_index = torch.tensor([[0, 1, 1, 2, 3, 4, 5, 6, 2], [1, 0, 2, 1, 4, 3, 6, 5, 5]])
    y = torch.randint(0, 2, (7,))
    model = sdfa.convert(GCN(), "dfa", boundaries=["conv1", "conv2"], output="head", k=1)
    out = model(x, edge_index)
    F.cross_entropy(out, y).backward()
    e = output_error(out, lambda o: F.cross_entropy(o, y))
    B = sdfa.feedback_matrices(model)
    assert B["conv1"].shape == (2, 6) and B["conv2"].shape == (2, 5)
    first = list(model.conv1.parameters())
    assert_grads(first, block_grads(lambda v: model.conv1(v, edge_index), [x], first,
                                    e @ B["conv1"]))
    with sdfa.backprop():
        h = torch.relu(model.conv1(x, edge_index))
    second = list(model.conv2.parameters())
    assert_grads(second, block_grads(lambda v: model.conv2(torch.relu(v), edge_index), [h],
                                     second, e @ B["conv2"]))


def test_an_snntorch_neuron_trains_inside_a_block():
    """A spiking layer over time steps (surrogate gradient, learned decay beta) in a chain."""
    snn = pytest.importorskip("snntorch")

    class SNN(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.fc1 = nn.Linear(4, 6)
            self.lif = snn.Leaky(beta=0.8, learn_beta=True, threshold=0.5)
            self.fc2 = nn.Linear(6, 3)

        def spikes(self, x):
            mem, out = self.lif.init_leaky(), []
            for t in range(x.shape[1]):
                spk, mem = self.lif(self.fc1(x[:, t]), mem)
                out.append(spk)
            return torch.stack(out, 1).sum(1).to(x.dtype)  # snntorch spikes are float32

        def forward(self, x):
            return self.fc2(self.spikes(x))

    x, y = torch.randn(5, 6, 4) * 2, torch.randint(0, 3, (5,))
    model = sdfa.convert(SNN(), "dfa")
    assert sdfa.rules_of(model) == {"fc1": "dfa", "fc2": "dfa"}
    out = model(x)
    F.cross_entropy(out, y).backward()
    e = output_error(out, lambda o: F.cross_entropy(o, y))
    B = sdfa.feedback_matrices(model)["fc1"]
    params = list(model.fc1.parameters()) + [model.lif.beta]
    assert_grads(params, block_grads(model.spikes, [x], params, e @ B))


class SelfAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(4, 2, batch_first=True)

    def forward(self, x):
        return self.attn(x, x, x, need_weights=False)[0]


def test_chain_mode_cuts_every_input_of_an_attention_unit():
    """Query, key and value all come from the block below: none of them carries a gradient
    back to it (only the query is its recorded block output)."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), SelfAttention(), nn.Linear(4, 2))
    model = sdfa.convert(base, "dfa", per_position=True)
    assert sdfa.rules_of(model) == {"0": "dfa", "2.attn": "dfa", "3": "dfa"}
    x = torch.randn(2, 5, 3)
    out = model(x)
    out.square().sum().backward()
    e = 2 * out.detach()
    B = sdfa.feedback_matrices(model)
    first = list(model[0].parameters())
    assert_grads(first, block_grads(lambda v: torch.tanh(model[0](v)), [x], first, e @ B["0"]))
    attn = list(model[2].parameters())
    with sdfa.backprop():
        h = torch.tanh(model[0](x))
    assert_grads(attn, block_grads(model[2], [h], attn, e @ B["2.attn"]))
