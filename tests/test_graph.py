"""DFA on graph networks (Launay et al. 2020) and DFA-GNN (Zhao et al. 2024), checked against
formulas computed by hand with dense matrices in float64."""

import pickle

import numpy as np
import pytest
import torch

pytest.importorskip("torch_geometric")

import sdfa  # noqa: E402
from sdfa.graph import ops  # noqa: E402
from sdfa.models import build_model  # noqa: E402

# a 6-node graph: a triangle 0-1-2, a path 2-3-4, and 5 joined to 4
EDGES = [(0, 1), (1, 2), (0, 2), (2, 3), (3, 4), (4, 5)]


def edge_index():
    e = torch.tensor(EDGES).t()
    return torch.cat([e, e.flip(0)], 1)


def dense_S(n=6):
    A = torch.zeros(n, n, dtype=torch.float64)
    for i, j in EDGES:
        A[i, j] = A[j, i] = 1
    A += torch.eye(n, dtype=torch.float64)
    d = A.sum(1).rsqrt()
    return d[:, None] * A * d[None, :]


def test_propagation_is_the_normalized_adjacency():
    S = ops.propagation(edge_index(), 6, dtype=torch.float64)
    torch.testing.assert_close(S.to_dense(), dense_S())


def test_pseudo_error_iteration_equals_its_closed_form():
    S, Sd = ops.propagation(edge_index(), 6, dtype=torch.float64), dense_S()
    gen = torch.Generator().manual_seed(0)
    labelled = torch.tensor([1, 0, 0, 1, 0, 0], dtype=torch.bool)
    residual = torch.rand(6, 3, generator=gen, dtype=torch.float64) - 0.5
    alpha, steps = 0.3, 7
    E = residual * labelled[:, None]
    # Z_T = (alpha S)^T E + (1 - alpha) sum_{t < T} (alpha S)^t E
    P = alpha * Sd
    Z = torch.linalg.matrix_power(P, steps) @ E + (1 - alpha) * sum(
        torch.linalg.matrix_power(P, t) @ E for t in range(steps))
    eta = E[labelled].abs().sum(1).mean()
    expected = torch.where(labelled[:, None], E, eta * Z / Z.abs().sum(1, keepdim=True))
    got = ops.spread_errors(residual, labelled, S, alpha=alpha, steps=steps)
    torch.testing.assert_close(got, expected)
    # many steps: the fixed point (1 - alpha)(I - alpha S)^-1 E, rescaled the same way
    fixed = (1 - alpha) * torch.linalg.solve(torch.eye(6, dtype=torch.float64) - P, E)
    far = ops.spread_errors(residual, labelled, S, alpha=alpha, steps=200)
    torch.testing.assert_close(far[~labelled],
                               (eta * fixed / fixed.abs().sum(1, keepdim=True))[~labelled])
    # every unlabelled row has the labelled rows' mean L1 norm
    torch.testing.assert_close(far[~labelled].abs().sum(1), eta.expand(4))


def test_a_node_that_no_label_reaches_gets_no_pseudo_error():
    S = ops.propagation(torch.tensor([[0, 1], [1, 0]]), 3, dtype=torch.float64)  # node 2 alone
    pseudo = ops.spread_errors(torch.ones(3, 2, dtype=torch.float64),
                               torch.tensor([True, False, False]), S, alpha=0.5, steps=5)
    assert pseudo[2].abs().sum() == 0 and pseudo[1].abs().sum() > 0


def test_node_filter_keeps_exactly_the_nodes_with_one_class_above_epsilon():
    probs = torch.tensor([[0.9, 0.1, 0.2], [0.7, 0.8, 0.1], [0.3, 0.2, 0.1], [0.55, 0.2, 0.4]])
    errors = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.4, 0.0], [-0.3, 0.0, 0.0], [0.0, 0.0, -0.2]])
    # y^ = y~ - e^: [.9 .1 .2] one; [.7 .4 .1] one; [.6 .2 .1] one; [.55 .2 .6] two
    assert ops.node_filter(probs, errors, 0.5).tolist() == [True, True, True, False]
    # epsilon 0.05: every class of nodes 0-2 is above it
    assert ops.node_filter(probs, errors, 0.05).tolist() == [False, False, False, False]


def _reference_signal(logits, labels, labelled, alpha, steps, epsilon, nf):
    """E^ (masked by the node filter) / n, with dense matrices and loops."""
    Sd = dense_S()
    probs = torch.sigmoid(logits)
    onehot = torch.nn.functional.one_hot(labels, logits.shape[1]).double()
    E = (probs - onehot) * labelled[:, None]
    Z = E.clone()
    for _ in range(steps):
        Z = (1 - alpha) * E + alpha * Sd @ Z
    eta = np.mean([E[i].abs().sum().item() for i in range(6) if labelled[i]])
    hat = E.clone()
    for j in range(6):
        if not labelled[j]:
            hat[j] = eta * Z[j] / Z[j].abs().sum()
    if nf:
        for i in range(6):
            if ((probs[i] - hat[i]) > epsilon).sum() != 1:
                hat[i] = 0
    return hat / int(labelled.sum())


def _graph_model(layers, hidden, rule, seed=0):
    torch.manual_seed(seed)
    model = build_model("gcn", (4,), 3, layers=layers, hidden=hidden).double()
    return sdfa.convert(model, rule, seed=seed)


def _graph_input():
    from torch_geometric.data import Data

    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    return Data(x=x, edge_index=edge_index())


def _forward(model, data):
    """P1, X1, P2, X2, Z of a 3-layer (or P1, X1, Z of a 2-layer) GCN, by hand."""
    Sd, x, out = dense_S(), data.x, []
    for i, conv in enumerate(model.convs):
        p = Sd @ x @ conv.lin.weight.T + conv.bias
        out.append(p)
        if i < len(model.convs) - 1:
            x = p.clamp_min(0)
            out.append(x)
    return out


@pytest.mark.parametrize("nf", [False, True])
def test_dfa_gnn_updates_equal_eq_10_by_hand(nf):
    model, data = _graph_model(3, 5, "dfa-gnn"), _graph_input()
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    labelled = torch.tensor([1, 1, 0, 1, 0, 0], dtype=torch.bool)
    S = ops.propagation(data.edge_index, 6, dtype=torch.float64)
    logits = model(data)
    loss, _ = ops.error_signal(logits, labels, labelled, S, eg=True, nf=nf, alpha=0.2, steps=10,
                               epsilon=0.5)
    loss.backward()
    B = sdfa.feedback_matrices(model)  # "convs.0": B for X1, "convs.1": B for X2
    P1, X1, P2, X2, Z = _forward(model, data)
    G = _reference_signal(Z.detach(), labels, labelled, 0.2, 10, 0.5, nf)
    Sd, St = dense_S(), dense_S().T
    # delta X(2) = S^T E B(2), delta X(1) = (S^T)^2 E B(1); the activation derivative applied
    d2 = St @ G @ B["convs.1"] * (P2 > 0)
    d1 = St @ St @ G @ B["convs.0"] * (P1 > 0)
    expected = {
        "convs.2": (St @ G).T @ X2, "convs.1": (St @ d2).T @ X1, "convs.0": (St @ d1).T @ data.x,
    }
    for name, grad in expected.items():
        conv = model.get_submodule(name)
        torch.testing.assert_close(conv.lin.weight.grad, grad.detach())
    torch.testing.assert_close(model.convs[0].bias.grad, d1.sum(0).detach())  # after S
    assert torch.allclose(Sd, Sd.T)  # (the graph is undirected: S^T = S)


def test_plain_dfa_on_gcnconv_is_the_formula_with_s_transpose_applied():
    model, data = _graph_model(2, 5, "dfa"), _graph_input()
    G = torch.randn(6, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    (model(data) * G).sum().backward()  # dL/dZ = G
    P1, X1, Z = _forward(model, data)
    St = dense_S().T
    B = sdfa.feedback_matrices(model)["convs.0"]
    d1 = G @ B * (P1 > 0)  # Launay: e B at the block output, no graph factor
    torch.testing.assert_close(model.convs[0].lin.weight.grad, ((St @ d1).T @ data.x).detach())
    torch.testing.assert_close(model.convs[1].lin.weight.grad, ((St @ G).T @ X1).detach())


def test_backprop_context_gives_dfa_gnn_models_the_true_gradient():
    model, data = _graph_model(3, 5, "dfa-gnn"), _graph_input()
    reference = _graph_model(3, 5, "bp")
    reference.load_state_dict({k: v for k, v in model.state_dict().items()
                               if "dfa_feedback" not in k}, strict=False)
    with sdfa.backprop():
        model(data).square().sum().backward()
    reference(data).square().sum().backward()
    for a, b in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(a.grad, b.grad)


def test_error_signal_value_is_the_loss_and_gradient_the_pseudo_errors():
    data = _graph_input()
    logits = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    labelled = torch.tensor([1, 0, 0, 1, 0, 1], dtype=torch.bool)
    S = ops.propagation(data.edge_index, 6, dtype=torch.float64)
    loss, info = ops.error_signal(logits, labels, labelled, S, eg=True, alpha=0.1, steps=5)
    torch.testing.assert_close(loss, ops.node_loss(logits, labels, labelled))
    loss.backward()
    expected = _reference_signal(logits.detach(), labels, labelled, 0.1, 5, 0.5, nf=False)
    torch.testing.assert_close(logits.grad, expected)
    assert info["kept"] == 6
    # without eg: the plain loss, gradient (Y~ - Y) / n on the labelled rows only
    plain = logits.detach().requires_grad_()
    ops.error_signal(plain, labels, labelled)[0].backward()
    assert plain.grad[~labelled].abs().sum() == 0
    with pytest.raises(ValueError, match="needs the pseudo-error generator"):
        ops.error_signal(logits, labels, labelled, S, nf=True)


def _write_planetoid(directory, name="toy"):
    """A 6-node Planetoid data set: 2 training nodes (x, y), 4 more in allx, 2 test nodes."""
    import scipy.sparse as sp

    feats = np.eye(6, 4, dtype=np.float32) + 0.5
    onehot = np.eye(2, dtype=np.int64)[[0, 1, 0, 1, 0, 1]]
    graph = {i: [] for i in range(6)}
    for i, j in EDGES:
        graph[i].append(j)
        graph[j].append(i)
    parts = {"x": sp.csr_matrix(feats[:2]), "y": onehot[:2], "allx": sp.csr_matrix(feats[:4]),
             "ally": onehot[:4], "tx": sp.csr_matrix(feats[4:]), "ty": onehot[4:], "graph": graph}
    for part, obj in parts.items():
        (directory / f"ind.{name}.{part}").write_bytes(pickle.dumps(obj))
    (directory / f"ind.{name}.test.index").write_text("5\n4\n")


def test_planetoid_files_load_with_their_own_split_or_a_random_one(tmp_path):
    from sdfa.graph.data import load_graph

    _write_planetoid(tmp_path)
    data = load_graph("planetoid", tmp_path, name="toy", split="public")
    g = data.graph
    assert g.num_nodes == 6 and data.num_classes == 2 and g.edge_index.shape[1] == 12
    assert g.train_mask.tolist() == [True, True, False, False, False, False]
    # test.index lists 5, 4: the test rows are put back in node order
    assert g.test_mask[4:].all() and g.y.tolist() == [0, 1, 0, 1, 1, 0]
    rand = load_graph("planetoid", tmp_path, name="toy", seed=3).graph
    assert int(rand.train_mask.sum()) == 4 and not (rand.train_mask & rand.test_mask).any()
    (tmp_path / "ind.toy.graph").write_bytes(pickle.dumps(print))  # not data: refused
    with pytest.raises(ValueError, match="not a Planetoid file"):
        load_graph("planetoid", tmp_path, name="toy")
    with pytest.raises(ValueError, match="file not found"):
        load_graph("planetoid", tmp_path, name="cora")


def test_graph_data_sets_and_their_options():
    from sdfa.graph.data import load_graph

    karate = load_graph("karate", seed=0)
    assert karate.graph.num_nodes == 34 and karate.graph.edge_index.shape[1] == 156
    assert len(karate.train) + len(karate.val) + len(karate.test) == 34
    knn = load_graph("knn-digits", k=5, nodes=300, split="per-class", per_class=3)
    assert len(knn.train) == 30 and knn.graph.num_nodes == 300
    with pytest.raises(ValueError, match="split must be one of"):
        load_graph("karate", split="planetoid")
    with pytest.raises(ValueError, match="bad dataset option"):
        load_graph("karate", k=3)
    with pytest.raises(ValueError, match="defines no split"):
        load_graph("karate", split="public")


def test_train_on_karate_from_the_config(tmp_path):
    from sdfa.app.config import config_from_dict
    from sdfa.app.run import train

    common = {"dataset": "karate", "model": "gcn", "epochs": 3, "lr": 0.01, "progress": False,
              "tensorboard": False}
    summary = train(config_from_dict({**common, "rule": "dfa-gnn:nf=false,alpha=0.2",
                                      "out": str(tmp_path / "a")}))
    assert summary["status"] == "complete" and "test_val_accuracy" in summary
    assert summary["step_macs"] > 0
    from sdfa.app.cli import main

    assert main(["eval", str(tmp_path / "a")]) == 0  # rebuilt from the run, whole-graph batch
    bp = train(config_from_dict({**common, "rule": "bp:eg=true", "out": str(tmp_path / "b")}))
    assert bp["rule"] == "bp"
    with pytest.raises(ValueError, match="needs the pseudo-error generator"):
        train(config_from_dict({**common, "rule": "bp:nf=true", "out": str(tmp_path / "c")}))
    with pytest.raises(ValueError, match="takes no task option lr"):
        train(config_from_dict({**common, "task_options": {"lr": 1}, "out": str(tmp_path / "e")}))
    with pytest.raises(ValueError, match="dataset_options apply to graph"):
        train(config_from_dict({"dataset": "digits", "dataset_options": {"k": 3},
                                "out": str(tmp_path / "d")}))


def test_graph_costs_price_the_diffusion_and_the_pseudo_errors():
    from sdfa.graph.costs import graph_costs
    from sdfa.graph.data import load_graph

    data = load_graph("karate")
    n, entries = 34, 156 + 34
    costs = {}
    for rule in ("bp", "dfa", "dfa-gnn"):
        model = sdfa.convert(build_model("gcn", (34,), 2, layers=3, hidden=8), rule)
        costs[rule] = graph_costs(model, data, eg=rule == "dfa-gnn", steps=10)
    first = costs["bp"].layers[0]
    assert first.forward == n * 34 * 8 + entries * 8 and first.error == n * 8 * 8
    assert costs["dfa"].layers[0].error == n * 2 * 8  # e B_1
    # dfa-gnn: plus (S^T)^2 on the 8-wide projected error, and T E' C for the pseudo-errors
    assert costs["dfa-gnn"].layers[0].error == n * 2 * 8 + 2 * entries * 8
    assert costs["dfa-gnn"].eg == 10 * entries * 2


def test_dfa_gnn_refuses_what_it_cannot_train():
    with pytest.raises(ValueError, match="chain of graph layers"):
        sdfa.convert(torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2)), "dfa-gnn")
    with pytest.raises(ValueError, match="conv must be one of"):
        build_model("gcn", (4,), 3, conv="spline")


def test_bench_has_a_gcn_workload_with_its_graph_mac_bound():
    from sdfa.app import bench

    report = bench.run(["gcn"], rounds=1, warmup=1, round_time=0.01, out=lambda *a: None)
    rows = {r["contender"]: r for r in report["results"]}
    assert list(rows) == ["autograd", "bp", "dfa", "dfa-gnn"]
    # DFA skips the products delta W^T of the 64-wide layers; dfa-gnn pays (S^T)^k back
    assert rows["dfa"]["mac_bound"] > rows["dfa-gnn"]["mac_bound"] > 1.0
    assert rows["bp"]["mac_bound"] == 1.0


def test_zhao2024_tests_at_the_best_validation_epoch_with_a_t_interval(tmp_path):
    from sdfa.app.reproduce import SETS
    from sdfa.app.zhao2024 import best_epoch, confidence

    rows = ["epoch,test_accuracy,test_val_accuracy,test_val_loss",
            "1,0.5,1.0,0.9", "2,0.9,1.0,0.2", "3,0.7,0.8,0.1"]
    (tmp_path / "metrics.csv").write_text("\n".join(rows) + "\n")
    assert best_epoch(tmp_path)["epoch"] == "2"  # the tie at 100 % goes to the lower loss
    # n = 3: t(0.975, 2) = 4.303, sd = 1: half-width 4.303 / sqrt(3) = 2.48
    assert confidence([1.0, 2.0, 3.0]) == "2.00 ± 2.48"
    labels = {e.label for e in SETS["zhao2024"].experiments}
    assert {"BP", "DFA + EG", "DFA-GNN (EG + NF)", "BP + EG", "Launay protocol: DFA"} <= labels


def test_dfa_gnn_on_sgconv_diffuses_k_hops_and_gat_learns_inside_its_block():
    torch.manual_seed(0)
    model = sdfa.convert(build_model("gcn", (4,), 3, layers=2, hidden=5, conv="sg", K=2).double(),
                         "dfa-gnn")
    data = _graph_input()
    G = torch.randn(6, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    (model(data) * G).sum().backward()
    Sd = dense_S()
    St, SK = Sd.T, Sd @ Sd
    P1 = SK @ data.x @ model.convs[0].lin.weight.T + model.convs[0].lin.bias
    B = sdfa.feedback_matrices(model)["convs.0"]
    d1 = St @ St @ G @ B * (P1 > 0)  # the last layer propagates K = 2 times: (S^T)^2
    torch.testing.assert_close(model.convs[0].lin.weight.grad, (d1.T @ SK @ data.x).detach())
    gat = sdfa.convert(build_model("gcn", (4,), 3, layers=2, hidden=8, conv="gat", heads=2)
                       .double(), "dfa-gnn")
    gat(data).sum().backward()
    first = gat.convs[0]
    assert first.att_src.grad is not None and first.att_src.grad.abs().sum() > 0
