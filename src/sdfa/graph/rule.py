"""The ``dfa-gnn`` rule: DFA whose feedback travels along the graph (Zhao et al. 2024).

For an L-layer graph network X(l+1) = act(S X(l) W(l)), backprop sends dL/dX(l) = S^T delta W^T
through every later layer. DFA-GNN keeps the graph factors and replaces the weights with fixed
random B_l: the block output in front of the m-th of L graph layers gets

    delta X = (S^T)^k e B_l,    k = the hops of layers m..L (one per GCN layer),

so delta X(L-1) = S^T E B and delta X(L-2) = (S^T)^2 E B, as in the paper. The paper writes no
activation derivative: here, as in DFA, autograd applies it inside the block (the standard
factor). Everything else is the ``dfa`` rule: the same blocks, matrices and options. The
pseudo-errors and the node filter change the error E itself and live in the loss
(:func:`sdfa.graph.error_signal`), so any rule can use them.

The graph factor is applied where the block output's gradient enters: a forward pre-hook on
each graph layer after the first wraps its input in an identity whose backward multiplies the
gradient by (S^T)^k, with S = D^-1/2 (A + I) D^-1/2 of the ``edge_index`` the layer is called with.
"""

from __future__ import annotations

from functools import partial

import torch
from torch.autograd import Function

from ..layers import backprop_enabled
from ..rules import DFA, register_rule
from . import ops


class _Diffuse(Function):
    """Identity forward; backward: (S^T)^hops @ grad (``St`` = S^T)."""

    @staticmethod
    def forward(ctx, x, St, hops):
        ctx.St, ctx.hops = St, hops
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        St = ctx.St if ctx.St.dtype == grad.dtype else ctx.St.to(grad.dtype)
        flat = grad.reshape(grad.shape[0], -1)
        return ops.diffuse(flat, St, ctx.hops).view_as(grad), None, None


class _Propagation:
    """S^T of the last graph seen (the graph of a node-classification run does not change)."""

    def __init__(self):
        self.key = None
        self.St = None

    def __call__(self, edge_index: torch.Tensor, num_nodes: int, dtype) -> torch.Tensor:
        key = (edge_index.data_ptr(), tuple(edge_index.shape), edge_index._version, num_nodes,
               dtype, edge_index.device)
        if key != self.key:
            S = ops.propagation(edge_index, num_nodes, dtype=dtype)
            self.St, self.key = ops.transpose(S), key
        return self.St


@register_rule
class DFAGNN(DFA):
    """DFA with the feedback diffused along the graph: ``(S^T)^k e B_l`` (Zhao et al. 2024)."""

    name = "dfa-gnn"
    model_specific = True  # graph layers only: kept out of the tests that apply every rule
    paper = "Zhao, Wang, Lang, Jin, Li, Ling, NeurIPS 2024"

    def __init__(self, **options):
        super().__init__(**options)
        from .pyg import pyg_layers  # registers PyG's layers as units before convert() looks

        self._layers = pyg_layers()

    def apply(self, model, layers, seed):
        if self.config["boundaries"] is not None:
            raise ValueError(
                "rule 'dfa-gnn' puts a block output in front of every graph layer (chain mode): "
                "boundaries= is not supported; use rule 'dfa' for custom blocks"
            )
        kinds = tuple(self._layers.CONVS.values())
        graph = [(name, m) for name, m in layers if isinstance(m, kinds)]
        if len(graph) != len(layers):
            others = ", ".join(n for n, m in layers if not isinstance(m, kinds))
            raise ValueError(
                f"rule 'dfa-gnn' needs a chain of graph layers ({', '.join(self._layers.CONVS)} "
                f"from PyTorch Geometric); {others} is not one: use rule 'dfa' for it"
            )
        if self.config["output"] not in (None, graph[-1][0]):
            raise ValueError(f"rule 'dfa-gnn' diffuses the feedback through every graph layer "
                             f"after a block: its output is the last one, {graph[-1][0]!r}")
        propagation = _Propagation()
        hops = [self._layers.hops(m) for _, m in graph]
        for i, (_, module) in enumerate(graph[1:], start=1):
            module.register_forward_pre_hook(
                partial(_diffuse_input, propagation, sum(hops[i:])), prepend=True
            )
        return super().apply(model, layers, seed)


def _diffuse_input(propagation, hops, module, args):
    x, edge_index = args[0], args[1]
    if (backprop_enabled() or not torch.is_grad_enabled() or not isinstance(x, torch.Tensor)
            or not x.requires_grad or hops == 0):
        return None
    St = propagation(edge_index, x.shape[0], torch.promote_types(x.dtype, torch.float32))
    return (_Diffuse.apply(x, St, hops), *args[1:])
