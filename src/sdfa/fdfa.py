"""Forward direct feedback alignment (FDFA; Bacho & Chu 2024): DFA whose feedback matrices
learn the true output-to-hidden derivative from forward-mode gradients.

During a training forward pass the block outputs carry dual numbers (``torch.autograd.
forward_ad``): at every block output h_l a fresh perturbation u_l ~ N(0, I) is added to the
tangent, so the tangent d of the output is sum_l J_l u_l with J_l = dy/dh_l, and
E[d u_l^T] = J_l (the u_l are independent with identity covariance). Each B_l (C, N_l) starts
at zero and takes one Adam step on grad_B = B_l - mean_batch(d u_l^T) (the FDFA code's
update, learning rate ``feedback_lr``), so it converges to E[d u_l^T] = J_l: the hidden error
e B_l then estimates the true gradient e J_l. The backward pass is DFA's (:mod:`sdfa.dfa`).
B is updated in the forward pass, so the backward pass of the same step uses the new B.

The forward-mode pass costs about one more forward pass (the tangents); no backward pass
crosses a block.
"""

from __future__ import annotations

import torch
import torch.autograd.forward_ad as fwAD
from torch import nn

from . import feedback as fb
from .dfa import FEEDBACK_ATTR, DirectFeedbackAlignment
from .layers import backprop_enabled
from .rules import DFA, register_rule


class LearnedFeedback(fb.DenseFeedback):
    """A dense B with the moments of its own Adam optimizer (buffers: saved in checkpoints)."""

    def __init__(self, weight: torch.Tensor):
        super().__init__(weight)
        self.register_buffer("exp_avg", torch.zeros_like(weight))
        self.register_buffer("exp_avg_sq", torch.zeros_like(weight))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def adam_step(self, grad: torch.Tensor, lr: float, betas=(0.9, 0.999), eps=1e-8) -> None:
        self.steps += 1
        t = int(self.steps)
        self.exp_avg.lerp_(grad, 1 - betas[0])
        self.exp_avg_sq.mul_(betas[1]).addcmul_(grad, grad, value=1 - betas[1])
        denom = (self.exp_avg_sq / (1 - betas[1] ** t)).sqrt_().add_(eps)
        self.weight.addcdiv_(self.exp_avg, denom, value=-lr / (1 - betas[0] ** t))


PERTURBATIONS_ATTR = "sdfa_perturbations"


class Perturbations(nn.Module):
    """The generator of the perturbations u, as a module of the model: its state travels in the
    state_dict, so a resumed run draws the same u as an uninterrupted one."""

    def __init__(self, generator: torch.Generator):
        super().__init__()
        self.generator = generator

    def get_extra_state(self):
        return {"state": self.generator.get_state()}

    def set_extra_state(self, state):
        self.generator.set_state(state["state"])


class ForwardDirectFeedbackAlignment(DirectFeedbackAlignment):
    """DFA's hooks plus the dual-number forward pass that teaches B (created by ``convert``)."""

    def __init__(self, model, layers, *, seed, feedback_lr=1e-4, **options):
        if isinstance(feedback_lr, bool) or not isinstance(feedback_lr, (int, float)) or not (
            feedback_lr > 0
        ):
            raise ValueError(f"rule 'fdfa': feedback_lr must be a positive number; got "
                             f"{feedback_lr!r}")
        self.feedback_lr = float(feedback_lr)
        self.level = None
        self.noise: dict[int, torch.Tensor] = {}
        self.generator = fb.generator(seed, "fdfa perturbations")
        self.model_ref = model
        super().__init__(model, layers, seed=seed, **options)
        # kept on the output unit (a leaf: a container's forward would call a module added to it)
        self.modules[self.output_name].add_module(PERTURBATIONS_ATTR, Perturbations(self.generator))

    def _start(self, module, args):
        super()._start(module, args)
        self._close()
        if module.training and torch.is_grad_enabled() and not backprop_enabled():
            self.level = fwAD.enter_dual_level()

    def _finish(self, module, args, out):
        try:
            super()._finish(module, args, out)
        finally:
            self._close()

    def _close(self):
        if self.level is not None:
            fwAD.exit_dual_level(level=self.level)
            self.level = None
        self.noise.clear()

    def _record(self, label, x):
        if self.level is None or id(x) in self.pending:
            return super()._record(label, x)
        primal, tangent = fwAD.unpack_dual(x, level=self.level)
        noise = torch.randn(primal.shape, generator=self.generator, dtype=primal.dtype)
        noise = noise.to(primal.device)
        self.noise[id(x)] = noise
        handed = fwAD.make_dual(
            primal.detach(), noise if tangent is None else tangent.detach() + noise,
            level=self.level,
        )
        self.pending[id(x)] = (label, primal, handed)
        return handed

    def _project(self, module, args, y):
        if self.level is None or backprop_enabled():
            return super()._project(module, args, y)
        primal, tangent = fwAD.unpack_dual(y, level=self.level)
        if tangent is not None:
            for key, (label, h, _) in list(self.pending.items()):
                self._learn(label, h, primal, tangent.detach(), self.noise[key])
        out = super()._project(module, args, primal)
        return primal if out is None else out

    def _learn(self, label, h, y, d, u):
        feedback = self._feedback(label, h, y)
        if self.per_position:
            d, u = d.reshape(-1, d.shape[-1]), u.reshape(-1, u.shape[-1])
        else:
            d, u = d.flatten(1), u.flatten(1)
        if len(d) == 0:
            return
        estimate = d.t().to(feedback.dtype) @ u.to(feedback.dtype) / len(d)  # mean d u^T
        feedback.adam_step(feedback.weight - estimate, self.feedback_lr)

    def _make(self, label, num_classes, num_neurons, sample_shape, dtype, device):
        weight = torch.zeros(num_classes, num_neurons, dtype=dtype, device=device)
        feedback = LearnedFeedback(weight)
        self.modules[label].add_module(FEEDBACK_ATTR, feedback)
        return feedback

    def _create_from_state_dict(self, module, state_dict, prefix, *args):
        self.provisional.clear()
        for label, owner in self.modules.items():
            key = f"{prefix}{label}.{FEEDBACK_ATTR}." if label else f"{prefix}{FEEDBACK_ATTR}."
            if getattr(owner, FEEDBACK_ATTR, None) is None and key + "weight" in state_dict:
                owner.add_module(FEEDBACK_ATTR,
                                 LearnedFeedback(torch.empty_like(state_dict[key + "weight"])))


@register_rule
class FDFA(DFA):
    """Forward DFA: B_l learned towards E[d u_l^T] = dy/dh_l from forward-mode perturbations."""

    name = "fdfa"
    paper = "Bacho, Chu 2024 (Forward Direct Feedback Alignment)"
    options = {
        "feedback_lr": 1e-4,
        "output": None,
        "boundaries": None,
        "example_input": None,
        "per_position": False,
    }

    def apply(self, model: nn.Module, layers, seed):
        ForwardDirectFeedbackAlignment(model, layers, seed=seed, **self.config)
        return model
