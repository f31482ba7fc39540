"""Graph neural networks trained by DFA (Launay et al. 2020) and DFA-GNN (Zhao et al. 2024).

Importing this package registers the ``dfa-gnn`` rule and the ``node-classification`` task; it
does not import PyTorch Geometric (seconds to load): :mod:`sdfa.graph.layers` does, and the
``dfa-gnn`` rule, the ``gcn`` preset and the graph data sets import it when they are used. To
train your own PyG model with plain ``dfa``, ``import sdfa.graph.layers`` first, so that each
graph layer is one unit (see docs/graphs.md).
"""

from ..tasks import TASKS
from . import rule  # noqa: F401  (registers dfa-gnn)
from .ops import diffuse, error_signal, node_filter, node_loss, propagation, spread_errors
from .pyg import pyg_layers
from .task import NodeClassification

if "node-classification" not in TASKS:
    TASKS.register("node-classification", NodeClassification)

__all__ = [
    "NodeClassification",
    "diffuse",
    "error_signal",
    "node_filter",
    "node_loss",
    "propagation",
    "pyg_layers",
    "spread_errors",
]
