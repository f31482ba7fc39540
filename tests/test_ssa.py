"""Rule ssa (SVD-space alignment, Roy et al. 2025): factored layers, loss terms, ranks, export."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sdfa
from sdfa import ssa
from sdfa.layers import SVDConv2d, SVDLinear

D = torch.float64


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def test_svd_linear_forward_is_dense_usv():
    torch.manual_seed(0)
    u, s, v, b = torch.randn(4, 2, dtype=D), torch.randn(2, dtype=D), torch.randn(3, 2, dtype=D), \
        torch.randn(4, dtype=D)
    layer = SVDLinear(u, s, v, b)
    x = torch.randn(5, 3, dtype=D)
    w = u @ torch.diag(s) @ v.t()
    torch.testing.assert_close(layer(x), x @ w.t() + b)
    lin = nn.Linear(3, 4).double()
    torch.testing.assert_close(SVDLinear.from_linear(lin)(x), lin(x))  # full rank: exact


@pytest.mark.parametrize("kw", [dict(), dict(stride=2, padding=1), dict(padding=(2, 1),
                                dilation=(1, 2), stride=(1, 2)), dict(padding="valid")])
def test_svd_conv_split_equals_original_conv(kw):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, (3, 2), **kw).double()
    layer = SVDConv2d.from_conv(conv)  # full rank min(4*2, 3*3) = 8
    assert layer.rank == 8
    x = torch.randn(2, 3, 7, 6, dtype=D)
    torch.testing.assert_close(layer(x), conv(x))
    torch.testing.assert_close(layer.dense_kernel(), conv.weight)
    k1, k2 = layer.split_kernels()  # the paper's K1 = U sqrt(S), K2 = sqrt(S) V^T
    assert k1.shape == (4, 8, 1, 2) and k2.shape == (8, 3, 3, 1)
    (sh, sw), (ph, pw), (dh, dw) = layer.stride, layer.padding, layer.dilation
    z = F.conv2d(x, k2, stride=(sh, 1), padding=(ph, 0), dilation=(dh, 1))
    y = F.conv2d(z, k1, conv.bias, stride=(1, sw), padding=(0, pw), dilation=(1, dw))
    torch.testing.assert_close(y, conv(x))
    torch.testing.assert_close(layer.to_dense()(x), conv(x))


def test_truncated_layer_is_the_best_low_rank_approximation():
    torch.manual_seed(0)
    lin = nn.Linear(6, 5).double()
    layer = SVDLinear.from_linear(lin, rank=2)
    u, s, vh = torch.linalg.svd(lin.weight.detach())
    torch.testing.assert_close(layer.matrix(), u[:, :2] @ torch.diag(s[:2]) @ vh[:2])


def test_orthogonality_term_formula_and_zero_for_orthonormal():
    u = torch.tensor([[1.0, 1.0], [0.0, 1.0]], dtype=D)  # U^T U = [[1, 1], [1, 2]]
    assert ssa.orthogonality(u).item() == pytest.approx(0 + 1 + 1 + 1)
    q = torch.linalg.qr(torch.randn(5, 3, dtype=D))[0]
    assert ssa.orthogonality(q).item() == pytest.approx(0, abs=1e-24)
    assert ssa.orthogonality_grad(q).abs().max().item() < 1e-12
    w = torch.randn(4, 3, dtype=D, requires_grad=True)
    (g,) = torch.autograd.grad(ssa.orthogonality(w), w)
    torch.testing.assert_close(ssa.orthogonality_grad(w.detach()), g)


def test_hoyer_term_formula_and_gradient():
    assert ssa.hoyer(torch.tensor([3.0, -4.0], dtype=D)).item() == pytest.approx(7 / 5)
    assert ssa.hoyer(torch.tensor([0.0, 2.0, 0.0], dtype=D)).item() == pytest.approx(1.0)
    assert ssa.hoyer(torch.ones(4, dtype=D)).item() == pytest.approx(2.0)
    s = torch.tensor([0.5, -1.5, 2.0], dtype=D, requires_grad=True)
    (g,) = torch.autograd.grad(ssa.hoyer(s), s)
    torch.testing.assert_close(ssa.hoyer_grad(s.detach()), g)


def test_alignment_term_formula_and_gradient():
    h = torch.tensor([[1.0, 0.0], [1.0, 1.0]], dtype=D)
    signal = torch.tensor([[-2.0, 0.0], [0.0, 3.0]], dtype=D)  # -signal: (2, 0) and (0, -3)
    # sample 0: cos = 1; sample 1: cos((1, 1), (0, -3)) = -1/sqrt(2)
    expected = ((1 - 1) + (1 + 1 / math.sqrt(2))) / 2
    assert ssa.alignment(h, signal).item() == pytest.approx(expected)
    h = torch.randn(4, 2, 3, dtype=D, requires_grad=True)
    signal = torch.randn(4, 2, 3, dtype=D)
    signal[2] = 0  # a sample that is already right gets no push
    (g,) = torch.autograd.grad(ssa.alignment(h, signal), h)
    mine = ssa.alignment_grad(h.detach(), signal)
    torch.testing.assert_close(mine[[0, 1, 3]], g[[0, 1, 3]])
    assert mine[2].abs().max() == 0


def test_energy_threshold_keeps_the_stated_fraction():
    s = torch.tensor([1.0, 4.0, 2.0], dtype=D)  # energies 1, 16, 4: total 21
    assert ssa.energy_rank(s, 0.75) == 1  # 16/21 = 0.762
    assert ssa.energy_rank(s, 0.8) == 2  # 20/21 = 0.952
    assert ssa.energy_rank(s, 0.96) == 3
    assert ssa.energy_rank(s, 1.0) == 3
    torch.manual_seed(1)
    model = sdfa.convert(nn.Sequential(nn.Linear(20, 16), nn.Tanh(), nn.Linear(16, 4)), "ssa")
    before = {n: m.S.detach().square() for n, m in ssa.svd_layers(model).items()}
    kept = ssa.truncate(model, energy=0.9)
    for name, layer in ssa.svd_layers(model).items():
        total, energies = before[name].sum(), before[name].sort(descending=True).values
        assert layer.S.detach().square().sum() / total >= 0.9 - 1e-6
        assert energies[: kept[name] - 1].sum() / total < 0.9  # one fewer would not hold it
        assert layer.U.shape[1] == layer.V.shape[1] == kept[name]
    floored = ssa.truncate(model, energy=0.01, min_rank=3)
    assert floored == {n: min(3, r) for n, r in kept.items()}


def test_conversion_with_energy_and_rank_options():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(20, 16), nn.Tanh(), nn.Linear(16, 4))
    assert ssa.ranks(sdfa.convert(net, "ssa", rank=3)) == {"0": 3, "2": 3}
    assert ssa.ranks(sdfa.convert(net, "ssa", rank=0.5)) == {"0": 8, "2": 2}
    s = torch.linalg.svdvals(net[0].weight.detach())
    assert ssa.ranks(sdfa.convert(net, "ssa", energy=0.8))["0"] == ssa.energy_rank(s, 0.8)


def test_step_gradients_equal_the_composite_local_loss():
    """One SSA step on a tiny net equals, layer by layer, the gradient of the paper's composite
    loss: alpha <h, e B> + beta align(h, e B) + gamma orth(U) + delta orth(V) + eps hoyer(S)."""
    w = dict(alpha=0.7, beta=0.3, gamma=0.2, delta=0.1, epsilon=0.05)
    model = sdfa.convert(_mlp(), "ssa", **w)
    torch.manual_seed(3)
    x, t = torch.randn(4, 6, dtype=D), torch.tensor([0, 2, 1, 2])
    F.cross_entropy(model(x), t).backward()
    b = sdfa.feedback_matrices(model)["0"]

    hidden, out = model[0], model[2]
    params = [p.detach().clone().requires_grad_() for p in
              (hidden.U, hidden.S, hidden.V, hidden.bias, out.U, out.S, out.V, out.bias)]
    u1, s1, v1, b1, u2, s2, v2, b2 = params
    h = torch.tanh(((x @ v1) * s1) @ u1.t() + b1)
    y = ((h.detach() @ v2) * s2) @ u2.t() + b2
    loss = F.cross_entropy(y, t)
    (e,) = torch.autograd.grad(loss, y, retain_graph=True)
    signal = e @ b
    local = (w["alpha"] * (h * signal).sum() + w["beta"] * ssa.alignment(h, signal)
             + w["alpha"] * loss)
    for u, s, v in ((u1, s1, v1), (u2, s2, v2)):
        local = local + w["gamma"] * ssa.orthogonality(u) + w["delta"] * ssa.orthogonality(v) \
            + w["epsilon"] * ssa.hoyer(s)
    expected = torch.autograd.grad(local, params)
    got = [hidden.U.grad, hidden.S.grad, hidden.V.grad, hidden.bias.grad,
           out.U.grad, out.S.grad, out.V.grad, out.bias.grad]
    for g, ref in zip(got, expected):
        torch.testing.assert_close(g, ref)


def test_feedback_matrices_have_the_svd_structure():
    model = sdfa.convert(nn.Sequential(nn.Linear(8, 12), nn.Tanh(), nn.Linear(12, 3)), "ssa")
    model(torch.randn(2, 8))
    fb = model[0].dfa_feedback
    b_v, b_u = fb.u, fb.v.t()  # B = (B_V B_S) B_U^T with q = min(3, 12) = 3
    singular = math.sqrt(3 / (3 * 3))
    torch.testing.assert_close(b_v.t() @ b_v, singular**2 * torch.eye(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(b_u.t() @ b_u, torch.eye(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.linalg.svdvals(fb.dense()), torch.full((3,), singular))
    again = sdfa.convert(nn.Sequential(nn.Linear(8, 12), nn.Tanh(), nn.Linear(12, 3)), "ssa")
    again(torch.randn(2, 8))
    torch.testing.assert_close(again[0].dfa_feedback.dense(), fb.dense())  # seeded


def test_truncate_slices_the_optimizer_state_and_checkpoints_reload():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(10, 8), nn.Tanh(), nn.Linear(8, 3))
    model = sdfa.convert(net, "ssa")
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, t = torch.randn(16, 10), torch.randint(0, 3, (16,))
    for _ in range(2):
        opt.zero_grad()
        F.cross_entropy(model(x), t).backward()
        opt.step()
    layer = model[0]
    keep = layer.S.detach().abs().argsort(descending=True)[:2].sort().values
    moment = opt.state[layer.U]["exp_avg"][:, keep].clone()
    ssa.truncate(model, rank=2, optimizer=opt)
    assert ssa.ranks(model) == {"0": 2, "2": 2}
    torch.testing.assert_close(opt.state[layer.U]["exp_avg"], moment)
    opt.zero_grad()
    F.cross_entropy(model(x), t).backward()
    opt.step()  # training goes on with the same Parameter objects
    fresh = sdfa.convert(net, "ssa")
    fresh.load_state_dict(model.state_dict())
    assert ssa.ranks(fresh) == {"0": 2, "2": 2}
    model.eval(), fresh.eval()
    torch.testing.assert_close(fresh(x), model(x))


def test_to_dense_gives_a_plain_model_with_the_same_outputs():
    torch.manual_seed(0)
    cnn = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                        nn.Linear(4 * 4 * 4, 10))
    model = sdfa.convert(cnn, "ssa", energy=0.9)
    x = torch.randn(3, 1, 8, 8)
    F.cross_entropy(model(x), torch.tensor([1, 2, 3])).backward()
    dense = sdfa.to_dense(model)
    assert [type(m) for m in dense] == [nn.Conv2d, nn.ReLU, nn.MaxPool2d, nn.Flatten, nn.Linear]
    assert not any(n.endswith("dfa_feedback") for n, _ in dense.named_modules())
    assert not dense._forward_hooks and not dense._forward_pre_hooks
    torch.testing.assert_close(dense(x), model(x))
    assert isinstance(model[0], SVDConv2d)  # the converted model is left alone


def test_costs_count_the_factored_layers():
    torch.manual_seed(0)
    model = sdfa.convert(nn.Sequential(nn.Linear(20, 16), nn.Tanh(), nn.Linear(16, 4)), "ssa",
                         rank=3)
    report = sdfa.costs(model, None, (20,))
    first, last = report.layers[0], report.layers[1]
    assert first.forward == 3 * (20 + 16) and first.update == 3 * (20 + 16) + 3 * 16
    assert first.error == 4 * 4 + 4 * 16  # (e B_V B_S) B_U^T with q = min(C, N) = 4
    assert last.forward == 3 * (16 + 4)
    dense = sdfa.costs(nn.Sequential(nn.Linear(20, 16), nn.Tanh(), nn.Linear(16, 4)), "dfa",
                       (20,))
    assert report.macs < dense.macs


def test_bad_options_get_clear_errors():
    net = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))
    for options, text in ((dict(rank=0), "rank"), (dict(rank=1.5), "rank"),
                          (dict(energy=0.0), "energy"), (dict(beta=-1), "beta"),
                          (dict(min_rank=0), "min_rank"),
                          (dict(schedule=[2]), "energy="), (dict(schedule="x", energy=0.9),
                                                            "schedule")):
        with pytest.raises(ValueError, match=text):
            sdfa.convert(net, "ssa", **options)
    grouped = nn.Sequential(nn.Conv2d(2, 4, 3, groups=2), nn.Flatten(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="groups=1"):
        sdfa.convert(grouped, "ssa")
    with pytest.raises(ValueError, match="exactly one"):
        ssa.truncate(sdfa.convert(net, "ssa"))


def test_training_run_applies_the_rank_schedule(tmp_path):
    from sdfa.app.config import config_from_dict
    from sdfa.app.run import train

    config = config_from_dict({
        "rule": "ssa", "rule_options": {"energy": 0.9, "schedule": [1]}, "epochs": 2,
        "train_samples": 500, "test_samples": 200, "lr": 1e-2, "out": str(tmp_path / "run"),
        "progress": False, "tensorboard": False,
    })
    summary = train(config)
    history = summary["ssa_ranks"]
    assert [h["epoch"] for h in history] == [1, 2]
    assert history[0]["1"] < 64 and history[0] == {**history[1], "epoch": 1}
    assert summary["test_accuracy"] > 0.3


def test_roy2025_tables_report_parameters_memory_and_ranks(tmp_path):
    from sdfa.app.reproduce import SETS, Experiment, ExperimentSet, reproduce
    from sdfa.app.roy2025 import section

    tiny = {"dataset": "digits", "model": "mlp", "epochs": 2, "train_samples": 128,
            "threads": 1, "tensorboard": False}
    schedule = {"energy": 0.9, "schedule": 1}
    chosen = ExperimentSet("tiny-roy", "tiny", "accuracy", [
        Experiment("digits", "DFA", {**tiny, "rule": "dfa"}),
        Experiment("digits", "SSA", {**tiny, "rule": "ssa", "rule_options": schedule}),
        Experiment("digits", "ablation: SSA without sparsity",
                   {**tiny, "rule": "ssa", "rule_options": {**schedule, "epsilon": 0.0}}),
    ], source="test", report=section)
    text = reproduce(chosen, out=tmp_path, progress=False).read_text()
    assert "## Ablation: SSA with one loss term dropped" in text
    assert "## Ranks over training: digits, SSA (seed 0)" in text
    rows = {line.split(" | ")[1]: line.split(" | ") for line in text.splitlines()
            if line.startswith("| digits |") and line.count("|") == 9}
    dfa, ssa_row = rows["DFA"], rows["SSA"]
    assert int(dfa[3].replace(",", "")) == 64 * 100 + 100 * 100 + 100 * 10 + 210  # with biases
    assert int(ssa_row[4].replace(",", "")) > 0 and int(ssa_row[6].replace(",", "")) > 0
    assert dfa[5] == "0" and int(ssa_row[5].replace(",", "")) > 0  # orthogonality per step
    assert "roy2025" in SETS
