"""``gcn``: a graph network of PyTorch Geometric layers for node classification.

X(l+1) = relu(conv_l(X(l), edge_index)); the last layer gives the logits (the task applies the
sigmoid of the paper's BCE loss, or softmax). Zhao et al. 2024: 3 layers, 64 hidden;
Launay et al. 2020 (after Kipf & Welling): 2 layers, 16 hidden.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from .registry import register_model


class GraphNet(nn.Module):
    """A chain of graph layers (each one unit: DFA puts a block output between them)."""

    def __init__(self, convs: list[nn.Module], dropout: float = 0.0):
        super().__init__()
        self.convs = nn.ModuleList(convs)
        self.dropout = dropout

    def forward(self, data):
        x, edge_index = data.x, data.edge_index
        for i, conv in enumerate(self.convs):
            if i:
                x = F.dropout(F.relu(x), self.dropout, self.training)
            x = conv(x, edge_index)
        return x


@register_model("gcn")
def gcn(input_shape, num_classes, layers: int = 3, hidden: int = 64, conv: str = "gcn",
        dropout: float = 0.0, K: int = 2, heads: int = 8):
    """``conv``: gcn, sg (SGConv, K hops), gat (GATConv, ``heads`` heads of hidden / heads
    features) or cheb (ChebConv, order K)."""
    from ..graph.pyg import pyg_layers

    CONVS = pyg_layers().CONVS  # imports PyG; registers its layers as units

    if conv not in CONVS:
        raise ValueError(f"model option conv must be one of {', '.join(CONVS)}; got {conv!r}")
    if not isinstance(layers, int) or layers < 1 or hidden < 1:
        raise ValueError(f"gcn needs layers >= 1 and hidden >= 1; got {layers}, {hidden}")
    sizes = [input_shape[0]] + [hidden] * (layers - 1) + [num_classes]

    def make(n_in, n_out, last):
        if conv == "gat":
            if last:
                return CONVS[conv](n_in, n_out, heads=1)
            if n_out % heads:
                raise ValueError(f"gat: hidden ({n_out}) must be a multiple of heads ({heads})")
            return CONVS[conv](n_in, n_out // heads, heads=heads)
        if conv in ("sg", "cheb"):
            return CONVS[conv](n_in, n_out, K=K)
        return CONVS[conv](n_in, n_out)

    return GraphNet([make(a, b, i == layers - 1) for i, (a, b) in
                     enumerate(zip(sizes, sizes[1:]))], dropout)
