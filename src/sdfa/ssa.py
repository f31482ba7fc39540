"""SVD-space alignment (SSA): local learning on low-rank manifolds (Roy, Apolinario, Biswas, Roy
2025, arXiv 2510.25594; earlier "Unlocking SVD-Space for Feedback Aligned Local Training").

``sdfa.convert(model, "ssa", rank=..., energy=...)`` replaces every Linear and Conv2d unit by its
SVD form (:mod:`sdfa.layers.svd`, from the SVD of its current weights) and trains it locally:

* the error: DFA's ``e B_l`` at every hidden block output (the true gradient at the output
  layer), with B_l built in the same factored form, ``B_l = B_V diag(B_S) B_U^T`` with
  orthonormal B_V (C, q), B_U (N_l, q), q = min(C, N_l) and equal singular values, weighted by
  ``alpha``;
* subspace alignment, ``beta * mean_b (1 - cos(h_b, -e_b B_l))``: the block output is pulled
  towards the direction the feedback asks it to move;
* orthogonality, ``gamma ||U^T U - I||_F^2 + delta ||V^T V - I||_F^2`` per layer;
* Hoyer sparsity of the singular values, ``epsilon ||S||_1 / ||S||_2`` per layer, which drives
  singular values to zero so that the rank schedule can drop them.

All of it happens inside the user's ``loss.backward()``: the alignment term is added to the
gradient arriving at each block output, the per-layer terms to the gradients of U, S, V when the
backward pass crosses the layer. The rank schedule (:func:`truncate`, :class:`RankSchedule`)
keeps, per layer, the fewest singular triplets that hold ``energy`` of sum(S^2), at conversion
and after each epoch listed in ``schedule``. :func:`to_dense` gives back a plain model with
W = U S V^T. Formulas and our choices: ``docs/ssa.md``.
"""

from __future__ import annotations

import copy
import math
from functools import partial

import torch
from torch import nn
from torch.autograd import Function

from . import feedback as fb
from .dfa import FEEDBACK_ATTR, DirectFeedbackAlignment
from .layers import SVDConv2d, SVDLayer, SVDLinear, backprop_enabled
from .rules import Rule, register_rule
from .training import Callback

WEIGHTS = ("alpha", "beta", "gamma", "delta", "epsilon")
_EPS = 1e-12


# -- the loss terms (plain functions: the tests check them against their formulas) -----------


def orthogonality(u: torch.Tensor) -> torch.Tensor:
    """``||U^T U - I||_F^2``: zero exactly when the columns of U are orthonormal."""
    gram = u.t() @ u
    return (gram - torch.eye(gram.shape[0], dtype=u.dtype, device=u.device)).square().sum()


def orthogonality_grad(u: torch.Tensor) -> torch.Tensor:
    """d/dU of :func:`orthogonality`: 4 U (U^T U - I)."""
    gram = u.t() @ u
    return 4 * u @ (gram - torch.eye(gram.shape[0], dtype=u.dtype, device=u.device))


def hoyer(s: torch.Tensor) -> torch.Tensor:
    """Hoyer's sparsity measure ``||s||_1 / ||s||_2`` (1 for one non-zero, sqrt(r) for equal)."""
    return s.abs().sum() / s.norm().clamp_min(_EPS)


def hoyer_grad(s: torch.Tensor) -> torch.Tensor:
    """d/ds of :func:`hoyer`: sign(s) / ||s||_2 - ||s||_1 s / ||s||_2^3."""
    norm = s.norm().clamp_min(_EPS)
    return torch.sign(s) / norm - s.abs().sum() * s / norm**3


def alignment(h: torch.Tensor, signal: torch.Tensor) -> torch.Tensor:
    """``mean_b (1 - cos(h_b, -signal_b))`` over the batch, each sample flattened: 0 when every
    block output points where the feedback ``signal`` (its gradient, e B) asks it to move."""
    h, t = h.flatten(1), -signal.flatten(1)
    cos = (h * t).sum(1) / (h.norm(dim=1) * t.norm(dim=1)).clamp_min(_EPS)
    return (1 - cos).mean()


def alignment_grad(h: torch.Tensor, signal: torch.Tensor) -> torch.Tensor:
    """d/dh of :func:`alignment` (``signal`` held fixed); 0 for a sample whose signal is 0."""
    flat, t = h.flatten(1), -signal.flatten(1)
    hn = flat.norm(dim=1, keepdim=True).clamp_min(_EPS)
    tn = t.norm(dim=1, keepdim=True)
    unit_t = t / tn.clamp_min(_EPS)
    cos = (flat * unit_t).sum(1, keepdim=True) / hn
    grad = -(unit_t / hn - cos * flat / hn**2) / flat.shape[0]
    return grad.masked_fill(tn == 0, 0).reshape(h.shape)


class _LocalTerms(Function):
    """Identity on y; adds the gradients of the layer's own terms to U, S, V on the way back."""

    @staticmethod
    def forward(ctx, y, u, s, v, weights):
        ctx.save_for_backward(u, s, v)
        ctx.weights = weights
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad):
        u, s, v = ctx.saved_tensors
        gamma, delta, epsilon = ctx.weights
        return (
            grad,
            gamma * orthogonality_grad(u) if gamma else None,
            epsilon * hoyer_grad(s) if epsilon else None,
            delta * orthogonality_grad(v) if delta else None,
            None,
        )


def _attach_terms(layer: SVDLayer, y: torch.Tensor) -> torch.Tensor:
    weights = layer.local_weights
    if not (layer.training and torch.is_grad_enabled()) or backprop_enabled() or not any(weights):
        return y
    return _LocalTerms.apply(y, layer.U, layer.S, layer.V, weights)


# -- the feedback matrices ------------------------------------------------------------------


def svd_feedback(num_classes: int, num_neurons: int, *, seed: int, name: str,
                 scale: float | None = None, dtype=torch.float32, device=None
                 ) -> fb.LowRankFeedback:
    """B = B_V diag(B_S) B_U^T (C, N): B_V, B_U with orthonormal columns (QR of seeded Gaussian
    draws), q = min(C, N) equal singular values B_S. By default B_S = sqrt(C / (3 q)), so that
    ||B||_F equals the expected norm of dense DFA's U(-1/sqrt(N), 1/sqrt(N)) matrix; ``scale``
    sets B_S. Stored as the low-rank pair (B_V diag(B_S), B_U^T)."""
    q = min(num_classes, num_neurons)
    gen = fb.generator(seed, name)
    b_v = torch.linalg.qr(torch.randn(num_classes, q, generator=gen, dtype=torch.float64))[0]
    b_u = torch.linalg.qr(torch.randn(num_neurons, q, generator=gen, dtype=torch.float64))[0]
    singular = float(scale) if scale is not None else math.sqrt(num_classes / (3 * q))
    return fb.LowRankFeedback((b_v * singular).to(dtype), b_u.t().contiguous().to(dtype)).to(device)


def _aligned(h: torch.Tensor, alpha: float, beta: float, grad: torch.Tensor) -> torch.Tensor:
    """The gradient at a block output: alpha e B plus the alignment term's gradient."""
    out = grad if alpha == 1 else alpha * grad
    if beta:
        out = out + beta * alignment_grad(h, grad)
    return out


class _SSAFeedback(DirectFeedbackAlignment):
    """DFA's wiring with SVD-structured matrices and the alignment term at every block output."""

    def __init__(self, model, layers, *, seed, alpha, beta, scale, **options):
        self.alpha, self.beta, self.scale = alpha, beta, scale
        super().__init__(model, layers, seed=seed, **options)

    def _make(self, label, num_classes, num_neurons, sample_shape, dtype, device):
        feedback = svd_feedback(num_classes, num_neurons, seed=self.seed, name=label,
                                scale=self.scale, dtype=dtype, device=device)
        self.modules[label].add_module(FEEDBACK_ATTR, feedback)
        return feedback

    def _project(self, module, args, y):
        hidden = [h for _, h, _ in self.pending.values()]
        out = super()._project(module, args, y)
        if out is None or backprop_enabled():
            return out
        for h in hidden:  # h.detach() in the closure: no reference cycle through h's hooks
            h.register_hook(partial(_aligned, h.detach(), self.alpha, self.beta))
        if self.alpha != 1 and y.requires_grad:
            y.register_hook(lambda grad: self.alpha * grad)
        return out


# -- the rule -------------------------------------------------------------------------------


def _number(name, value, low=0.0, high=math.inf, open_low=False):
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or not (value > low if open_low else value >= low) or value > high:
        bound = f"{'>' if open_low else '>='} {low:g}" + (f" and <= {high:g}" if high < math.inf
                                                             else "")
        raise ValueError(f"rule 'ssa': {name} must be a number {bound}; got {value!r}")


@register_rule
class SSA(Rule):
    """SVD-space alignment: layers trained as U S V^T by DFA plus local alignment,
    orthogonality and sparsity terms, with rank reduction by an energy threshold."""

    name = "ssa"
    paper = "Roy, Apolinario, Biswas, Roy 2025"
    options = {
        "rank": None,  # initial rank per layer: an int, or a fraction of min(m, n) in (0, 1]
        "energy": None,  # keep this fraction of sum(S^2) at conversion and at each schedule epoch
        "schedule": None,  # epochs after which to truncate by energy (list of ints, or every N)
        "min_rank": 1,  # truncation by energy never goes below this rank (nor the layer's own)
        "alpha": 1.0,  # the error (DFA at hidden blocks, the loss at the output layer)
        "beta": 0.1,  # subspace alignment
        "gamma": 0.01,  # orthogonality of U
        "delta": 0.01,  # orthogonality of V
        "epsilon": 0.3,  # Hoyer sparsity of S
        "scale": None,  # singular value of the feedback matrices (default sqrt(C / 3q))
        "output": None,
        "boundaries": None,
        "example_input": None,
    }

    def __init__(self, **options):
        super().__init__(**options)
        c = self.config
        for name in WEIGHTS:
            _number(name, c[name])
        rank = c["rank"]
        if rank is not None:
            if isinstance(rank, float):
                _number("rank (a fraction)", rank, 0.0, 1.0, open_low=True)
            elif isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
                raise ValueError(
                    f"rule 'ssa': rank must be a positive int or a fraction in (0, 1]; got {rank!r}"
                )
        if c["energy"] is not None:
            _number("energy", c["energy"], 0.0, 1.0, open_low=True)
        if c["scale"] is not None:
            _number("scale", c["scale"], open_low=True)
        _check_min_rank(c["min_rank"])
        schedule = c["schedule"]
        if schedule is not None:
            every = isinstance(schedule, int) and not isinstance(schedule, bool) and schedule > 0
            listed = isinstance(schedule, (list, tuple)) and all(
                isinstance(e, int) and not isinstance(e, bool) and e > 0 for e in schedule)
            if not (every or listed):
                raise ValueError(
                    "rule 'ssa': schedule must be a list of epochs (positive ints) or an int N "
                    f"(every N epochs); got {schedule!r}"
                )
            if c["energy"] is None:
                raise ValueError("rule 'ssa': a schedule truncates by energy: give energy= too")

    def _rank(self, shape) -> int:
        full, rank = min(shape), self.config["rank"]
        if rank is None:
            return full
        return min(full, max(1, round(rank * full)) if isinstance(rank, float) else rank)

    def apply(self, model, layers, seed):
        c = self.config
        swapped = []
        for name, module in layers:
            layer = _factored(name, module, self._rank)
            layer.local_terms = _attach_terms
            layer.local_weights = (c["gamma"], c["delta"], c["epsilon"])
            if c["energy"] is not None and not layer.S.is_meta:
                _truncate_layer(layer, c["energy"], None, min_rank=c["min_rank"])
            swapped.append((name, layer))
            if not name:
                model = layer
            else:
                parent, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent), child, layer)
        model._sdfa_ssa = dict(c)
        _SSAFeedback(
            model, swapped, seed=seed, alpha=c["alpha"], beta=c["beta"], scale=c["scale"],
            output=c["output"], boundaries=c["boundaries"], example_input=c["example_input"],
        )
        return model


def _factored(name: str, module: nn.Module, rank_of) -> SVDLayer:
    if isinstance(module, SVDLayer):
        return module
    if type(module) is nn.Linear:
        return SVDLinear.from_linear(module, rank_of(module.weight.shape))
    if type(module) is nn.Conv2d:
        n, c, h, w = module.weight.shape
        return SVDConv2d.from_conv(module, rank_of((n * w, c * h)))
    raise ValueError(
        f"rule 'ssa' factors nn.Linear and nn.Conv2d layers; {name or '<root>'!r} is a "
        f"{type(module).__name__}: train it by another rule, e.g. rule={{'': 'ssa', "
        f"{name!r}: 'dfa'}} is not possible either (one DFA wiring per model), so freeze it "
        f"({{'': 'ssa', {name!r}: 'frozen'}})"
    )


# -- ranks ----------------------------------------------------------------------------------


def energy_rank(s: torch.Tensor, energy: float) -> int:
    """The fewest singular values (largest |s| first) whose squares hold ``energy`` of the sum."""
    squares = s.detach().double().square().sort(descending=True).values
    total = squares.sum()
    if total <= 0:
        return 1
    cumulative = squares.cumsum(0) / total
    return min(int((cumulative < energy - 1e-12).sum().item()) + 1, s.numel())


def _check_min_rank(min_rank) -> None:
    if isinstance(min_rank, bool) or not isinstance(min_rank, int) or min_rank < 1:
        raise ValueError(f"rule 'ssa': min_rank must be a positive int; got {min_rank!r}")


def _truncate_layer(layer: SVDLayer, energy: float | None, rank: int | None,
                    optimizer: torch.optim.Optimizer | None = None, min_rank: int = 1) -> int:
    if energy is not None:
        keep = max(energy_rank(layer.S, energy), min(min_rank, layer.rank))
    else:
        keep = min(rank, layer.rank)
    if keep == layer.rank:
        return keep
    index = layer.S.detach().abs().argsort(descending=True)[:keep].sort().values
    old = {name: getattr(layer, name).shape for name in ("U", "S", "V")}
    layer.keep(index)
    if optimizer is not None:  # slice the optimizer's per-parameter state the same way
        for name, dim in (("U", 1), ("S", 0), ("V", 1)):
            state = optimizer.state.get(getattr(layer, name), {})
            for key, value in state.items():
                if isinstance(value, torch.Tensor) and value.shape == old[name]:
                    state[key] = value.index_select(dim, index.to(value.device)).contiguous()
    return keep


def svd_layers(model: nn.Module) -> dict[str, SVDLayer]:
    """The SVD layers of ``model`` by qualified name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, SVDLayer)}


def ranks(model: nn.Module) -> dict[str, int]:
    """The current rank of every SVD layer."""
    return {n: m.rank for n, m in svd_layers(model).items()}


def truncate(model: nn.Module, *, energy: float | None = None, rank: int | None = None,
             optimizer: torch.optim.Optimizer | None = None, min_rank: int = 1
             ) -> dict[str, int]:
    """Reduce every SVD layer to the fewest triplets holding ``energy`` of sum(S^2), but not
    below ``min_rank`` (or to ``rank``), in place; the parameters stay the same objects and
    ``optimizer``'s state (Adam's moments) is sliced with them, so training goes on. Returns the
    new ranks."""
    if (energy is None) == (rank is None):
        raise ValueError("truncate needs exactly one of energy= and rank=")
    if energy is not None:
        _number("energy", energy, 0.0, 1.0, open_low=True)
    elif isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be a positive int; got {rank!r}")
    _check_min_rank(min_rank)
    return {n: _truncate_layer(m, energy, rank, optimizer, min_rank)
            for n, m in svd_layers(model).items()}


def due(schedule, epoch: int) -> bool:
    """Is ``epoch`` (1-based, just finished) in the schedule (a list of epochs, or every N)?"""
    if schedule is None:
        return False
    return epoch % schedule == 0 if isinstance(schedule, int) else epoch in schedule


class RankSchedule(Callback):
    """Applies a converted model's ``schedule`` after each epoch and logs the ranks.

    Adds ``ssa_rank/<layer>`` and ``ssa_parameters`` (trainable parameters) to every epoch row,
    and ``ssa_ranks`` (ranks after each epoch) to the summary; after a truncation the trainer's
    MACs per sample are recounted.
    """

    name = "ssa_ranks"

    def __init__(self):
        self.history: list[dict] = []

    def on_train_start(self, trainer):
        self.config = getattr(trainer.model, "_sdfa_ssa", None) or {}

    def on_epoch_end(self, trainer, row):
        epoch = row.get("epoch", len(self.history) + 1)
        if due(self.config.get("schedule"), epoch):
            truncate(trainer.model, energy=self.config["energy"], optimizer=trainer.optimizer,
                     min_rank=self.config.get("min_rank", 1))
            if getattr(trainer, "sample_macs", None) is not None:  # fewer MACs from now on
                from .costs import costs

                report = costs(trainer.model, None, trainer.task.input_shape)
                trainer.sample_macs = report.macs
                trainer.feedback_macs = report.total.feedback_macs_per_step
        current = ranks(trainer.model)
        row.update({f"ssa_rank/{n}": r for n, r in current.items()})
        row["ssa_parameters"] = sum(p.numel() for p in trainer.model.parameters()
                                    if p.requires_grad)
        self.history.append({"epoch": epoch, **current})

    def on_train_end(self, trainer, summary):
        summary["ssa_ranks"] = self.history

    def state_dict(self):
        return {"history": self.history}

    def load_state_dict(self, state):
        self.history = list(state.get("history", []))


# -- back to a plain model --------------------------------------------------------------------


def to_dense(model: nn.Module) -> nn.Module:
    """A copy of a model converted by rule ``ssa`` for inference: every SVD layer becomes the
    plain nn.Linear / nn.Conv2d with W = U diag(S) V^T, and the feedback matrices and sdfa's
    hooks are gone (the copy computes what the converted model computes)."""
    model = copy.deepcopy(model)
    wiring = getattr(model, "_sdfa_dfa", None)
    for name, layer in list(svd_layers(model).items()):
        dense = layer.to_dense()
        if not name:
            return dense
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, dense)
    for module in model.modules():
        if hasattr(module, FEEDBACK_ATTR):
            delattr(module, FEEDBACK_ATTR)
        if wiring is not None:
            for hooks in (module._forward_hooks, module._forward_pre_hooks,
                          module._load_state_dict_pre_hooks):
                for key, hook in list(hooks.items()):
                    if _bound_to(hook, wiring):
                        del hooks[key]
    for attr in ("_sdfa_dfa", "_sdfa_ssa", "_sdfa_rules"):
        model.__dict__.pop(attr, None)
    return model


def _bound_to(hook, obj) -> bool:
    hook = getattr(hook, "hook", hook)  # load_state_dict pre-hooks come wrapped
    while isinstance(hook, partial):
        hook = hook.func
    return getattr(hook, "__self__", None) is obj
