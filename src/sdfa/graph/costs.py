"""MACs and data movement of one full-batch training step of a graph network (whole graph).

Per graph layer with N nodes, E' = |E| + N entries of S (self-loops included), n_in -> n_out:

* forward: GCN N n_in n_out + E' n_out (the product, then the aggregation S (X W)); SGConv K E'
  n_in + N n_in n_out; ChebConv K N n_in n_out + (K - 1) E' n_in; GAT N n_in h f + E' h f + 2 N
  h f (h heads of f features: product, aggregation, attention scores);
* update: the weight gradient (the products again) and the aggregation's backward inside the
  layer (S^T delta: E' n_out); error (backprop, every layer but the first): delta W^T, N n_out
  n_in, reading W and the deltas of the neighbours (E' n_out values);
* dfa: e B_l for each hidden block, N C N_l, reading B_l (C N_l) and e (N C);
  dfa-gnn adds the diffusion (S^T)^k of the projected error, k E' N_l;
* the pseudo-error generator: T E' C for the label spreading (elementwise work left out, as in
  :mod:`sdfa.costs`).
Data movement counts the values a step reads to get the errors: error values and feedback
weights (W for backprop, B_l for DFA) and, for the graph factors, one neighbour row per entry of S.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from ..convert import rules_of


@dataclass
class GraphLayerCost:
    name: str
    rule: str
    forward: int = 0
    update: int = 0
    error: int = 0
    movement: int = 0

    @property
    def macs(self) -> int:
        return self.forward + self.update + self.error


@dataclass
class GraphCosts:
    layers: list[GraphLayerCost] = field(default_factory=list)
    eg: int = 0  # MACs of the pseudo-error generator per step

    @property
    def macs(self) -> int:
        return sum(layer.macs for layer in self.layers) + self.eg

    @property
    def movement(self) -> int:
        return sum(layer.movement for layer in self.layers) + self.eg

    def __str__(self):
        rows = [f"{'layer':<10} {'rule':<8} {'forward':>12} {'error':>12} {'update':>12}"]
        for c in self.layers:
            rows.append(f"{c.name:<10} {c.rule:<8} {c.forward:>12,} {c.error:>12,} {c.update:>12,}")
        rows.append(f"pseudo-errors: {self.eg:,} MACs; total {self.macs:,} MACs, "
                    f"{self.movement:,} values moved per step")
        return "\n".join(rows)


def graph_costs(model: nn.Module, data, *, eg: bool = False, steps: int = 50) -> GraphCosts:
    """The cost of one training step of converted ``model`` on graph ``data``
    (:class:`~sdfa.graph.data.GraphData`, or anything with ``.graph``), by the formulas above."""
    from .layers import CONVS, hops

    graph = getattr(data, "graph", data)
    n, entries = graph.num_nodes, graph.edge_index.shape[1] + graph.num_nodes
    rules = rules_of(model)
    convs = [(name, m) for name, m in model.named_modules() if isinstance(m, tuple(CONVS.values()))]
    if not convs:
        raise ValueError("graph_costs: the model has no graph layer (sdfa.graph.layers.CONVS)")
    classes = _out_features(convs[-1][1])
    report = GraphCosts(eg=steps * entries * classes if eg else 0)
    hop_counts = [hops(m) for _, m in convs]
    for i, (name, conv) in enumerate(convs):
        rule = rules.get(name, "bp")
        n_in, n_out = _in_features(conv), _out_features(conv)
        dense, aggregation, inside = _layer(conv, n, entries, n_in, n_out)
        cost = GraphLayerCost(name, rule, forward=dense + aggregation + inside,
                              update=dense + entries * n_out)
        # the error that reaches this layer's block output (its output, for layer i - 1)
        if i + 1 < len(convs):
            follower = convs[i + 1][1]
            if rules.get(convs[i + 1][0], rule) == "bp" and rule == "bp":
                cost.error = n * n_out * _out_features(follower)
                cost.movement = entries * _out_features(follower) + n_out * _out_features(follower)
            else:
                cost.error = n * classes * n_out
                cost.movement = classes * n_out + n * classes
                if rule == "dfa-gnn":
                    k = sum(hop_counts[i + 1:])
                    cost.error += k * entries * n_out
                    cost.movement += k * entries * n_out
        report.layers.append(cost)
    return report


def _in_features(conv) -> int:
    return conv.in_channels if isinstance(conv.in_channels, int) else conv.in_channels[0]


def _out_features(conv) -> int:
    heads = getattr(conv, "heads", 1) if getattr(conv, "concat", False) else 1
    return conv.out_channels * heads


def _layer(conv, n, entries, n_in, n_out) -> tuple[int, int, int]:
    """(dense products, aggregation, other) MACs of the layer's forward pass."""
    kind = type(conv).__name__
    if kind == "SGConv":
        return n * n_in * n_out, conv.K * entries * n_in, 0
    if kind == "ChebConv":
        order = len(conv.lins)
        return order * n * n_in * n_out, (order - 1) * entries * n_in, 0
    if kind == "GATConv":
        width = conv.heads * conv.out_channels
        return n * n_in * width, entries * width, 2 * n * width
    return n * n_in * n_out, entries * n_out, 0
