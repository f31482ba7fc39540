"""PyTorch Geometric's graph layers as sdfa units (importing this module imports PyG).

Registering a convolution makes the whole layer one unit: ``dfa`` then puts the block outputs
between convolutions (after the activation), as Launay et al. 2020 do, and the linear map and
attention inside a layer learn by autograd from the feedback at its output. Without the
registration the engine would see only each layer's inner ``nn.Linear``, and the block output
would sit before the aggregation. Graph layers are priced by :mod:`sdfa.graph.costs` (their work
depends on the edges, not on one sample), so they carry no per-sample cost formula.
"""

from __future__ import annotations

from torch_geometric.nn import ChebConv, GATConv, GCNConv, SGConv

from ..layers import LAYERS, register_layer

#: conv name (the ``gcn`` preset's ``conv`` option) -> PyG layer type
CONVS = {"gcn": GCNConv, "sg": SGConv, "gat": GATConv, "cheb": ChebConv}

for _type in CONVS.values():
    if f"{_type.__module__}.{_type.__qualname__}" not in LAYERS:
        register_layer(_type)


def hops(conv) -> int:
    """How many times ``conv`` multiplies by the graph (SGConv: K, ChebConv: K - 1, else 1):
    the number of S^T factors that DFA-GNN's feedback adds for it."""
    if isinstance(conv, SGConv):
        return conv.K
    if isinstance(conv, ChebConv):
        return len(conv.lins) - 1
    return 1
