"""The graph operations of DFA-GNN (Zhao et al., NeurIPS 2024), in plain torch.

* :func:`propagation` builds S = D^-1/2 (A + I) D^-1/2, the GCN propagation matrix, as a sparse
  tensor (its normalization comes from PyTorch Geometric's ``gcn_norm``, so it is the S that
  GCNConv multiplies by);
* :func:`spread_errors` is the pseudo-error generator (EG): label spreading of the labelled
  nodes' residuals to the unlabelled nodes, each rescaled to the labelled nodes' mean L1 norm;
* :func:`node_filter` is the node filter (NF): keep the nodes whose corrected prediction
  Y~ - E^ has exactly one class above epsilon;
* :func:`error_signal` puts both into a loss whose value is the plain loss on the labelled nodes
  and whose gradient at the logits is the (pseudo-)error matrix, so any rule (bp, dfa, dfa-gnn)
  learns from it with a plain ``loss.backward()``.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch.autograd import Function

LOSSES = ("bce", "ce")


def propagation(edge_index: torch.Tensor, num_nodes: int, *, dtype=torch.float32,
                edge_weight: torch.Tensor | None = None) -> torch.Tensor:
    """S = D^-1/2 (A + I) D^-1/2 as a sparse CSR (num_nodes, num_nodes) tensor (CSR: 15x faster
    products than COO on a CPU); edge j -> i of ``edge_index`` (row 0 source, row 1 target,
    PyG's convention) is the entry S[i, j], so ``S @ X`` is what GCNConv aggregates."""
    from torch_geometric.nn.conv.gcn_conv import gcn_norm

    if edge_weight is not None:
        edge_weight = edge_weight.to(dtype)
    index, weight = gcn_norm(edge_index, edge_weight, num_nodes, add_self_loops=True,
                             dtype=dtype)
    coo = torch.sparse_coo_tensor(index.flip(0), weight, (num_nodes, num_nodes),
                                  check_invariants=False)
    return _csr(coo)


def _csr(coo: torch.Tensor) -> torch.Tensor:
    with warnings.catch_warnings():  # torch calls its CSR support "beta" on every conversion
        warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta")
        return coo.coalesce().to_sparse_csr()


def transpose(S: torch.Tensor) -> torch.Tensor:
    """S^T, again in CSR (a CSR tensor's ``.t()`` multiplies 40x slower)."""
    return _csr(S.to_sparse_coo().t())


def diffuse(signal: torch.Tensor, St: torch.Tensor, hops: int) -> torch.Tensor:
    """(S^T)^hops @ signal, given ``St`` = S^T: ``hops`` sparse aggregations, O(hops |E| width)."""
    for _ in range(hops):
        signal = St @ signal
    return signal


def spread_errors(errors: torch.Tensor, labelled: torch.Tensor, S: torch.Tensor, *,
                  alpha: float, steps: int) -> torch.Tensor:
    """The pseudo-error generator: E^ from the residuals ``errors`` (N, C) of the labelled nodes.

    E keeps the residual on the labelled rows and zero elsewhere; Z <- (1 - alpha) E + alpha S Z
    from Z = E for ``steps`` steps; every unlabelled row becomes eta z_j / ||z_j||_1, eta the mean
    L1 norm of the labelled rows of E (a row that no labelled node reaches stays zero). The
    labelled rows keep their true residual.
    """
    labelled = labelled.bool()
    E = torch.where(labelled[:, None], errors, torch.zeros_like(errors))
    Z = E
    for _ in range(steps):
        Z = (1 - alpha) * E + alpha * (S @ Z)
    norms = Z.abs().sum(1, keepdim=True)
    eta = E[labelled].abs().sum(1).mean() if labelled.any() else E.new_zeros(())
    pseudo = torch.where(norms > 0, eta * Z / norms.clamp_min(torch.finfo(Z.dtype).tiny),
                         torch.zeros_like(Z))
    return torch.where(labelled[:, None], E, pseudo)


def node_filter(predictions: torch.Tensor, errors: torch.Tensor, epsilon: float) -> torch.Tensor:
    """The node filter: True for node i when exactly one class of y^_i = y~_i - e^_i exceeds
    ``epsilon`` (the pseudo-label is unambiguous), as a (N,) bool tensor."""
    return ((predictions - errors) > epsilon).sum(1) == 1


class _WithGradient(Function):
    """Returns ``value``; its backward gives ``logits`` the gradient ``signal`` (times the
    incoming scale)."""

    @staticmethod
    def forward(ctx, value, logits, signal):
        ctx.save_for_backward(signal)
        return value.clone()

    @staticmethod
    def backward(ctx, grad):
        (signal,) = ctx.saved_tensors
        return None, grad * signal, None


def predictions(logits: torch.Tensor, loss: str) -> torch.Tensor:
    """Y~: sigmoid outputs for the BCE loss (the paper's), softmax for cross-entropy."""
    return torch.sigmoid(logits) if loss == "bce" else torch.softmax(logits, dim=1)


def node_loss(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor,
              loss: str = "bce") -> torch.Tensor:
    """The loss on the nodes of ``mask``: mean over them of BCE summed over the classes (one-hot
    targets), or of cross-entropy. Its gradient at a masked row is (Y~ - Y) / n."""
    x, y = logits[mask], labels[mask]
    if loss == "bce":
        target = F.one_hot(y, logits.shape[1]).to(logits.dtype)
        return F.binary_cross_entropy_with_logits(x, target, reduction="sum") / max(len(y), 1)
    return F.cross_entropy(x, y, reduction="sum") / max(len(y), 1)


def error_signal(logits: torch.Tensor, labels: torch.Tensor, labelled: torch.Tensor,
                 S: torch.Tensor | None = None, *, loss: str = "bce", eg: bool = False,
                 nf: bool = False, alpha: float = 0.1, steps: int = 50,
                 epsilon: float = 0.5) -> tuple[torch.Tensor, dict]:
    """The training loss of a node classifier, and what the error generator did.

    Without ``eg`` this is :func:`node_loss` on the labelled nodes. With ``eg`` the loss has the
    same value, but its gradient at the logits is E^ / n (n labelled nodes): the true residual
    Y~ - Y on the labelled rows and the spread pseudo-errors elsewhere; with ``nf`` the rows of
    the nodes that the node filter drops are zero. Returns (loss, {"kept": nodes kept}).
    """
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {', '.join(LOSSES)}; got {loss!r}")
    labelled = labelled.bool()
    value = node_loss(logits, labels, labelled, loss)
    if not eg:
        if nf:
            raise ValueError("the node filter (nf) needs the pseudo-error generator (eg=true)")
        return value, {"kept": int(labelled.sum())}
    if S is None:
        raise ValueError("the pseudo-error generator needs the propagation matrix S")
    with torch.no_grad():
        probs = predictions(logits, loss)
        target = F.one_hot(labels.clamp_min(0), logits.shape[1]).to(probs.dtype)
        pseudo = spread_errors(probs - target, labelled, S, alpha=alpha, steps=steps)
        keep = node_filter(probs, pseudo, epsilon) if nf else torch.ones_like(labelled)
        signal = torch.where(keep[:, None], pseudo, torch.zeros_like(pseudo))
        signal = signal / max(int(labelled.sum()), 1)
    return _WithGradient.apply(value, logits, signal), {"kept": int(keep.sum())}
