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
        """The tensor used in place of W when sending the error to this layer's input (for a
        rule with ``refresh``: the B held since its last rebuild, once there is one)."""
        if "_held_feedback" in self.__dict__:
            return self._scratch("_held_feedback")
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
        one costs page faults on the CPU) or held from the forward to the backward pass. With
        the rule's ``refresh=N`` the scratch is rebuilt, scale included, at every N-th backward
        pass only, and used as it is in between.
        """
        refresh = getattr(self.rule, "refresh", 1)
        if refresh == 1:
            return self.rule.feedback_parts(self, out=self._scratch("_feedback_scratch"))
        due = self.feedback_age % refresh == 0 or "_held_feedback" not in self.__dict__
        out = self._scratch("_held_feedback")
        if due:
            self.rule.feedback(self, out=out)
        self.feedback_age += 1
        return out, None

    def _scratch(self, key: str) -> torch.Tensor:
        """The layer's tensor ``key`` of W's shape, dtype and device (kept, not a buffer); one
        that no longer matches W (the model was moved or cast) is converted."""
        weight = self.weight
        out = self.__dict__.get(key)
        if out is None:
            out = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)
        elif (out.shape, out.dtype, out.device) != (weight.shape, weight.dtype, weight.device):
            out = out.to(weight).reshape(weight.shape)
        self.__dict__[key] = out
        return out

    def extra_repr(self):
        return f"{super().extra_repr()}, rule={self.rule.name}"

    # Rules that draw per-step noise (brsf, wm) keep a seeded ``noise_generator`` on the layer;
    # its state travels in the state_dict so that a resumed run draws the same noise. So does the
    # backward-pass count of a rule with ``refresh`` (when B is rebuilt next).
    def get_extra_state(self):
        state = {}
        if hasattr(self, "feedback_age"):
            state["feedback_age"] = self.feedback_age
            held = self.__dict__.get("_held_feedback")
            if held is not None:
                state["held_feedback"] = held.detach().clone()
        gen = getattr(self, "noise_generator", None)
        if gen is not None:
            state.update(noise_generator=gen.get_state(), device=str(gen.device))
        return state

    def set_extra_state(self, state):
        if "feedback_age" in state and hasattr(self, "feedback_age"):
            self.feedback_age = _count(state["feedback_age"])
            self.__dict__.pop("_held_feedback", None)
            if "held_feedback" in state:
                self.__dict__["_held_feedback"] = _held(state["held_feedback"], self.weight)
        if "noise_generator" in state:
            gen = torch.Generator(state["device"])
            gen.set_state(state["noise_generator"])
            self.noise_generator = gen


def _held(value, weight: torch.Tensor) -> torch.Tensor:
    if not isinstance(value, torch.Tensor) or value.shape != weight.shape:
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise ValueError(
            f"held_feedback in the state_dict must be a tensor of W's shape "
            f"{tuple(weight.shape)}; got {shape}"
        )
    return value.to(weight).clone()


def _count(value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"feedback_age in the state_dict must be a count >= 0; got {value!r}")
    return value


def uses_plain_forward() -> bool:
    """True when a twin must run its torch layer's own forward (no autograd, or ``backprop()``)."""
    return _BACKPROP.get() or not torch.is_grad_enabled()
