"""Integer-only DFA (sdfa.integer): every operation against its formula on tiny arrays, one step
against a reference written from the equations in plain Python integers, the federation on real
processes against an in-process reference."""

import math

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from sdfa.integer import (
    FedConfig,
    IntegerDFA,
    IntegerOverflow,
    average,
    federate,
    isqrt,
    pla_tanh,
    quantize,
    to_int8,
)
from sdfa.integer.federated import shards, trained_layers
from sdfa.integer.ops import matmul


def ref_tanh(v):
    """The notebook's piecewise-linear tanh and inverse slope on v = pre // (256 fan_in)."""
    if v >= 128:
        return 128, 128
    if v >= 75:
        return v // 4 + 88, 8
    if v >= 32:
        return v + 32, 2
    if v >= -31:
        return 2 * v, 1
    if v >= -74:
        return v - 32, 2
    if v >= -127:
        return v // 4 - 88, 8
    return -127, 128


def test_isqrt_is_the_integer_square_root():
    for n in list(range(200)) + [1872, 10**12 + 7, 2**62]:
        assert isqrt(n) == math.isqrt(n)
    with pytest.raises(ValueError):
        isqrt(-1)


def test_pla_tanh_follows_each_piece_and_its_bounds():
    vs = [-300, -128, -127, -100, -75, -74, -50, -32, -31, -1, 0, 1, 31, 32, 50, 74, 75, 100,
          127, 128, 300]
    for fan_in in (1, 3):
        # pre-activations that floor-divide to v, from both ends of the interval
        for offset in (0, 256 * fan_in - 1):
            pre = torch.tensor([v * 256 * fan_in + offset for v in vs], dtype=torch.int32)
            y, inv = pla_tanh(pre, fan_in)
            assert y.dtype == inv.dtype == torch.int32
            assert [(int(a), int(b)) for a, b in zip(y, inv)] == [ref_tanh(v) for v in vs]


def test_matmul_is_exact_and_overflow_is_an_error():
    a = torch.tensor([[127, -128], [3, 5]], dtype=torch.int32)
    b = torch.tensor([[1000, -7], [2, 9]], dtype=torch.int32)
    assert matmul(a, b).tolist() == [[127 * 1000 - 256, -889 - 1152], [3010, 24]]
    big = torch.full((1, 2), 2**30, dtype=torch.int32)
    with pytest.raises(IntegerOverflow, match="int32"):
        matmul(big, torch.ones(2, 1, dtype=torch.int32))  # 2**31: one past INT32_MAX


def test_average_is_the_exact_truncated_mean():
    models = torch.tensor([[7, -3, -4, 2**31 - 1], [8, -4, -4, 2**31 - 1], [9, -4, -5, 2**31 - 2]])
    total = models.sum(0)  # int64: the sum of int32 models cannot wrap
    expected = [int(sum(col) / 3) for col in zip(*models.tolist())]  # np.mean(...).astype(int)
    assert average(total, 3).tolist() == expected == [8, -3, -4, 2**31 - 2]
    assert average(torch.tensor([-7]), 2).item() == -3  # towards zero, not -4


def test_to_int8_and_quantize():
    images = torch.tensor([[0, 128, 255]], dtype=torch.uint8)
    assert to_int8(images).tolist() == [[-128, 0, 127]]  # the notebook's x - 128
    assert to_int8(torch.tensor([[0, 8, 16]]), 16).tolist() == [[-128, -1, 127]]
    features = torch.tensor([[-1.0, 0.0, 1.0, 3.0, 9.0]])
    assert quantize(features, -1.0, 3.0).tolist() == [[-128, -64, 0, 127, 127]]  # -128 + 255 q
    with pytest.raises(ValueError, match="0 .. 16"):
        to_int8(torch.tensor([[17]]), 16)


def test_feedback_is_uniform_in_minus_r_to_r():
    net = IntegerDFA([784, 200, 10], seed=3)
    r = math.isqrt(12 * 32767 // 210)  # 43
    fb = net.feedback[0]
    assert fb.shape == (10, 200) and fb.dtype == torch.int32
    assert int(fb.min()) == -r and int(fb.max()) == r - 1
    assert all(int(t.abs().max()) == 0 for t in net.parameters())  # W, b start at zero
    assert torch.equal(IntegerDFA([784, 200, 10], seed=3).feedback[0], fb)


def reference_step(x, labels, W, b, B, lr_inv, target=16):
    """One integer DFA step from the equations, in plain Python ints (lists of lists)."""
    acts, slopes = [x], []
    for Wl, bl in zip(W, b):
        fan_in = len(Wl)
        a_in = acts[-1]
        pre = [[sum(a_in[n][i] * Wl[i][j] for i in range(fan_in)) + bl[j]
                for j in range(len(bl))] for n in range(len(a_in))]
        ya = [[ref_tanh(p // (256 * fan_in)) for p in row] for row in pre]
        acts.append([[a for a, _ in row] for row in ya])
        slopes.append([[g for _, g in row] for row in ya])
    out = acts[-1]
    e = [[out[n][c] - target * (c == labels[n]) for c in range(len(out[0]))]
         for n in range(len(out))]
    ds = []
    for Bl, g in zip(B, slopes):
        eb = [[sum(e[n][c] * Bl[c][j] for c in range(len(e[0]))) for j in range(len(Bl[0]))]
              for n in range(len(e))]
        ds.append([[eb[n][j] // g[n][j] for j in range(len(eb[0]))] for n in range(len(e))])
    ds.append([[e[n][c] // slopes[-1][n][c] for c in range(len(e[0]))] for n in range(len(e))])
    newW, newb = [], []
    for k, (Wl, bl) in enumerate(zip(W, b)):
        a_in, d = acts[k], ds[k]
        newW.append([[Wl[i][j] - sum(a_in[n][i] * d[n][j] for n in range(len(d))) // lr_inv
                      for j in range(len(bl))] for i in range(len(Wl))])
        newb.append([bl[j] - sum(d[n][j] for n in range(len(d))) // lr_inv
                     for j in range(len(bl))])
    return newW, newb, e


def tiny_net():
    net = IntegerDFA([3, 4, 2], seed=0)
    net.weights[0] = torch.tensor([[900, -2000, 30000, 0], [-700, 1500, 200, 40000],
                                   [100, 0, -9000, -25000]], dtype=torch.int32)
    net.biases[0] = torch.tensor([500, -300, 0, 7000], dtype=torch.int32)
    net.weights[1] = torch.tensor([[2000, -5000], [-3000, 1000], [600, 900], [-100, 4000]],
                                  dtype=torch.int32)
    net.biases[1] = torch.tensor([100, -50], dtype=torch.int32)
    net.feedback[0] = torch.tensor([[12, -40, 7, 33], [-5, 21, -43, 0]], dtype=torch.int32)
    x = torch.tensor([[127, -128, 5], [-60, 99, -1], [0, 3, 120]], dtype=torch.int8)
    y = torch.tensor([0, 1, 1])
    return net, x, y


def test_one_step_equals_the_equations():
    net, x, y = tiny_net()
    W = [w.tolist() for w in net.weights]
    b = [t.tolist() for t in net.biases]
    B = [t.tolist() for t in net.feedback]
    for lr_inv in (1, 7, 2048):
        net, x, y = tiny_net()
        newW, newb, e = reference_step(x.tolist(), y.tolist(), W, b, B, lr_inv)
        got_e = net.step(x, y, lr_inv)
        assert got_e.tolist() == e
        assert [w.tolist() for w in net.weights] == newW
        assert [t.tolist() for t in net.biases] == newb
    assert any(v not in (0,) for row in e for v in row)  # the example has a non-zero error
    assert newW != W  # and the step changed the weights


def test_single_layer_step_updates_only_its_layer():
    net, x, y = tiny_net()
    before = [t.clone() for t in net.parameters()]
    net.step(x, y, 7, layers=[1])
    after = net.parameters()
    assert torch.equal(after[0], before[0]) and torch.equal(after[1], before[1])
    assert not torch.equal(after[2], before[2])


class FloatWatch(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.floats = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and (t.dtype.is_floating_point or t.is_complex()):
                self.floats.append(str(func))
        return out


def test_the_training_step_creates_no_floating_point_tensor():
    net, x, y = tiny_net()
    with FloatWatch() as watch:
        net.step(x, y, 2048)
        net.predict(x)
    assert watch.floats == []
    with FloatWatch() as control:  # the watch does see a float op
        torch.ones(2, dtype=torch.int32) / 2
    assert control.floats


def test_overflow_in_training_is_an_error_not_a_wrap_around():
    net, x, y = tiny_net()
    net.weights[0][0, 0] = 2**31 - 1
    net.biases[0][0] = 2**31 - 1
    with pytest.raises(IntegerOverflow, match="layer 0"):
        net.step(x, y, 1)


def trained_on_digits(steps=40):
    from sdfa.data import load_dataset

    data = load_dataset("digits")
    x, y = to_int8(data.train.images, 16), data.train.labels
    net = IntegerDFA([64, 32, 10], seed=1)
    for i in range(steps):
        net.step(x[25 * i:25 * i + 25], y[25 * i:25 * i + 25], 4096)
    return net, x, y


def test_float_twin_and_c_header_and_determinism():
    net, x, y = trained_on_digits()
    twin = net.to_float()
    assert torch.equal(twin(x.double()), net(x).double())
    assert net.predict(x).float().eq(y).float().mean() > 0.5  # it did learn something
    again, _, _ = trained_on_digits()
    assert all(torch.equal(a, b) for a, b in zip(net.parameters(), again.parameters()))
    header = net.c_header("head")
    assert "static const int32_t head_0_weight[64][32] = {" in header
    assert "#define HEAD_SIZE1 32" in header
    assert ", ".join(map(str, net.biases[1].tolist())) in header
    loaded = IntegerDFA([64, 32, 10], seed=5)
    loaded.load_state_dict(net.state_dict())
    assert torch.equal(loaded(x), net(x))


def test_a_frozen_feature_extractor_feeds_an_integer_head():
    from sdfa.data import load_dataset

    torch.manual_seed(0)
    data = load_dataset("digits")
    extractor = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Flatten()).eval()  # frozen
    with torch.no_grad():
        train = extractor(data.train.images.float() / 16)
        test = extractor(data.test.images.float() / 16)
    low, high = float(train.min()), float(train.max())
    x, tx = quantize(train, low, high), quantize(test, low, high)
    head = IntegerDFA([x.shape[1], 10], seed=0)  # a one-layer integer head
    for _ in range(2):
        for i in range(0, len(x), 25):
            head.step(x[i:i + 25], data.train.labels[i:i + 25], 2048)
    assert float((head.predict(tx) == data.test.labels).double().mean()) > 0.6


def test_bad_input_gets_a_clear_error():
    net, x, y = tiny_net()
    for lr_inv in (0, -4, 2.5, True, "4096"):
        with pytest.raises(ValueError, match="positive integer"):
            net.step(x, y, lr_inv)
    with pytest.raises(ValueError, match="integer tensor"):
        net.step(x.float(), y, 8)
    with pytest.raises(ValueError, match="int8 range"):
        net.step(x.to(torch.int32) * 2, y, 8)
    with pytest.raises(ValueError, match="class indices"):
        net.step(x, torch.tensor([0, 1, 2]), 8)
    with pytest.raises(ValueError, match="Conv2d.*cannot be trained"):
        IntegerDFA.from_module(nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(8, 2)))
    assert IntegerDFA.from_module(nn.Sequential(nn.Flatten(), nn.Linear(784, 200), nn.Tanh(),
                                                nn.Linear(200, 10))).sizes == [784, 200, 10]
    with pytest.raises(ValueError, match="multiple of 2"):
        FedConfig(mode="single", workers=3).check()
    with pytest.raises(ValueError, match="bp trains with mode 'full'"):
        FedConfig(rule="bp", mode="single").check()
    with pytest.raises(ValueError, match="lr_inv"):
        FedConfig(lr_inv=0).check()


def test_single_mode_splits_the_workers_over_the_layers():
    config = FedConfig(mode="single", workers=8, hidden=(200,))
    assert [trained_layers(config, r) for r in range(8)] == [[0]] * 4 + [[1]] * 4
    assert trained_layers(FedConfig(workers=8), 5) == [0, 1]


def reference_federation(x, y, config, sizes):
    """The protocol in one process: a net per worker, integer averages after every pass."""
    parts = shards(x, y, config.workers, config.data_seed)
    nets = [IntegerDFA(sizes, seed=config.seed) for _ in parts]
    layers = len(sizes) - 1
    for buffer in range(len(parts[0][1]) // config.buffer):
        for _ in range(config.passes):
            for rank, (net, (xs, ys)) in enumerate(zip(nets, parts)):
                for first in range(0, config.buffer, config.batch_size):
                    at = buffer * config.buffer + first
                    net.step(xs[at:at + config.batch_size], ys[at:at + config.batch_size],
                             config.lr_inv, trained_layers(config, rank))
            for k in range(layers):
                group = [r for r in range(config.workers) if k in trained_layers(config, r)]
                for store in ("weights", "biases"):
                    values = [getattr(nets[r], store)[k].tolist() for r in group]
                    mean = torch.tensor(values, dtype=torch.int64).sum(0)
                    mean = average(mean, len(group))
                    for net in nets:
                        getattr(net, store)[k] = mean.clone()
    return nets[0]


@pytest.mark.parametrize("mode", ["full", "single"])
def test_federation_on_processes_equals_the_protocol(tmp_path, mode):
    from sdfa.data import load_dataset

    data = load_dataset("digits")
    x, y = to_int8(data.train.images[:400], 16), data.train.labels[:400]
    tx, ty = to_int8(data.test.images, 16), data.test.labels
    config = FedConfig(mode=mode, workers=2, hidden=(16,), lr_inv=512, buffer=50,
                       batch_size=25, passes=2, seed=4)
    result = federate(x, y, tx, ty, config, out=tmp_path)
    expected = reference_federation(x, y, config, [64, 16, 10])
    state = torch.load(tmp_path / "result.pt", weights_only=True)
    for key, value in expected.state_dict().items():
        assert torch.equal(state[key], value), key
    assert result["rounds"] == (200 // 50) * 2
    params = 64 * 16 + 16 + 16 * 10 + 10
    mine = [64 * 16 + 16, 16 * 10 + 10] if mode == "single" else [params, params]
    assert result["bytes_per_round"] == 4 * (sum(mine) + 2 * params)  # up: trained, down: all
    assert result["allreduce_bytes_per_round"] == 2 * 4 * params
    accuracy = float((expected.predict(tx) == ty).double().mean())
    assert result["test_accuracy"] == pytest.approx(accuracy)


def test_cli_trains_and_exports_a_header(tmp_path, capsys):
    from sdfa.app.cli import main

    out, header = tmp_path / "run", tmp_path / "net.h"
    code = main(["tifed", "--workers", "2", "--hidden", "16", "--lr-inv", "512",
                 "--train-samples", "200", "--out", str(out), "--header", str(header)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "integer full (2 workers, 1/eta=512, seed 0) on digits" in printed
    result = __import__("json").loads((out / "result.json").read_text())
    assert result["train_samples"] == 200 and result["rounds"] == 10
    assert "static const int32_t net_1_weight[16][10]" in header.read_text()
    assert main(["tifed", "--lr-inv", "-1"]) == 2
    assert "positive integer" in capsys.readouterr().err
    assert main(["tifed", "--rule", "dfa", "--header", str(header), "--out", str(out)]) == 2
    assert "--header exports the integer network" in capsys.readouterr().err


def test_reproduce_tifed_tabulates_medians_and_reuses_runs(tmp_path, monkeypatch):
    from sdfa.app import tifed

    group = tifed.Group("digits", "digits subset", train_samples=200, seeds=1, lr_invs=(512,),
                        baselines=False)
    monkeypatch.setattr(tifed, "groups", lambda quick: [group])
    path = tifed.reproduce_tifed(out=tmp_path, progress=False, workers=2)
    table = path.read_text()
    rows = [line.split("|")[1:4] for line in table.splitlines() if "integer DFA" in line]
    assert [[cell.strip() for cell in row] for row in rows] == [
        ["digits subset", "integer DFA, full", "1/eta = 512"],
        ["", "integer DFA, single", "1/eta = 512"]]
    done = sorted(p.parent.name for p in tmp_path.rglob("result.json"))
    assert done == ["seed0", "seed0"]
    monkeypatch.setattr(tifed, "run", lambda *a, **k: pytest.fail("a finished run ran again"))
    assert tifed.reproduce_tifed(out=tmp_path, progress=False, workers=2).read_text() == table


class EchoComm:
    """A stand-in for Comm: every one of ``workers`` workers holds the same tensors."""

    def __init__(self, workers):
        self.workers = workers

    def all_reduce(self, tensor, label):
        tensor.mul_(self.workers)
        return tensor


def test_averaging_round_refuses_a_sum_that_would_overflow_int32():
    from sdfa.integer.federated import IntegerClient, average_round

    config = FedConfig(workers=8, hidden=(4,))
    client = IntegerClient([3, 4, 2], config)
    client.net.weights[0][0, 0] = -7
    up_down = average_round(client, config, EchoComm(8), rank=0)
    assert client.net.weights[0][0, 0] == -7  # 8 equal models average to themselves
    assert up_down == 2 * 4 * (3 * 4 + 4 + 4 * 2 + 2)
    client.net.weights[1][3, 1] = (2**31 - 1) // 8 + 1
    with pytest.raises(IntegerOverflow, match="layer 1.*8 workers"):
        average_round(client, config, EchoComm(8), rank=0)
