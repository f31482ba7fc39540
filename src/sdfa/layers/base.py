"""What every layer-wise twin shares: the ``backprop()`` switch, the :class:`FeedbackLayer` mixin.

A twin is a subclass of a torch layer (it shares the layer's parameters) whose autograd function
sends ``delta`` down through ``rule.feedback(layer)``, a tensor of W's shape, instead of W. The
weight gradient is the usual one. Passing W itself gives backprop, which the tests use as a
reference. When the feedback tensor requires grad (Kolen-Pollack), it receives W's gradient, so
an optimizer step moves B exactly like W.

Outside autograd (``torch.no_grad()``, inference) and inside :func:`backprop`, twins run the
plain torch forward: the feedback weight is not even built.
"""

from __future__ import annotations

import contextlib
from contextvars import ContextVar

import torch
from torch import nn

_BACKPROP: ContextVar[bool] = ContextVar("sdfa_backprop", default=False)


@contextlib.contextmanager
def backprop():
    """Inside this block every converted model computes plain backprop gradients.

    Used to measure the true gradient on the same weights (alignment diagnostics) without
    copying the model: DFA hooks step aside and layer-wise layers send back W.
    """
    token = _BACKPROP.set(True)
    try:
        yield
    finally:
        _BACKPROP.reset(token)


def backprop_enabled() -> bool:
    """True inside :func:`backprop`."""
    return _BACKPROP.get()


def backward_feedback(feedback, layer):
    """``(F, h)``, the feedback weight ``h F`` at backward time: the tensor given to forward, or
    the layer's derived feedback, built now into its scratch tensor (see
    ``FeedbackLayer._derived_feedback`` and ``LayerwiseRule.feedback_parts``)."""
    return layer._derived_feedback() if feedback is None else (feedback, None)


class FeedbackLayer:
    """Mixin for layers trained by a layer-wise rule; ``self.rule`` supplies the feedback weight."""

    rule = None

    @classmethod
    def from_module(cls, module: nn.Module, rule) -> FeedbackLayer:
        """Swap ``module`` (an instance of the layer this class twins) for this class, sharing
        its parameters."""
        new = cls.__new__(cls)
        new.__dict__.update(module.__dict__)
        new.rule = rule
        return new

    def feedback_weight(self) -> torch.Tensor:
        """The tensor used in place of W when sending the error to this layer's input."""
        return self.rule.feedback(self)

    def _feedback_for(self, x: torch.Tensor) -> torch.Tensor | None:
        """The feedback tensor for the autograd Function; None: build it in the backward pass.

        Nothing reads the feedback when the input needs no gradient (the first layer) unless it
        learns: it is skipped then (USF would rebuild sign(W) for nothing).
        """
        rule = self.rule
        if rule.learned_feedback or (x.requires_grad and not rule.derived_feedback):
            return self.feedback_weight()
        return None

    def _derived_feedback(self):
        """Build a derived feedback (a function of W, e.g. h sign(W)) at backward time.

        It goes into a scratch tensor of W's shape that the layer keeps and overwrites at every
        backward pass, which uses it at once: no W-sized tensor is allocated per step (a fresh
        one costs page faults on the CPU) or held from the forward to the backward pass.
        """
        weight = self.weight
        out = self.__dict__.get("_feedback_scratch")
        if out is None or (out.shape, out.dtype, out.device) != (
            weight.shape, weight.dtype, weight.device
        ):
            out = self.__dict__["_feedback_scratch"] = torch.empty(
                weight.shape, dtype=weight.dtype, device=weight.device
            )
        return self.rule.feedback_parts(self, out=out)

    def extra_repr(self):
        return f"{super().extra_repr()}, rule={self.rule.name}"

    # Rules that draw per-step noise (brsf, wm) keep a seeded ``noise_generator`` on the layer;
    # its state travels in the state_dict so that a resumed run draws the same noise.
    def get_extra_state(self):
        gen = getattr(self, "noise_generator", None)
        if gen is None:
            return {}
        return {"noise_generator": gen.get_state(), "device": str(gen.device)}

    def set_extra_state(self, state):
        if "noise_generator" in state:
            gen = torch.Generator(state["device"])
            gen.set_state(state["noise_generator"])
            self.noise_generator = gen


def uses_plain_forward() -> bool:
    """True when a twin must run its torch layer's own forward (no autograd, or ``backprop()``)."""
    return _BACKPROP.get() or not torch.is_grad_enabled()
