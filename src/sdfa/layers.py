"""Linear and Conv2d layers whose backward pass sends the error down through a feedback weight.

This is the one mechanism behind every layer-wise rule (fa, usf, brsf, frsf, kp, ...): the
weight gradient is the usual one, computed from the delta that reaches the layer and the layer's
input; only the gradient sent to the layer's input uses ``rule.feedback(layer)`` (a tensor of the
shape of W) in place of W. Passing W itself gives backprop, which the tests use as a reference.

When the feedback tensor requires grad (Kolen-Pollack), it receives the same gradient as W, so an
optimizer step moves B exactly like W.

Outside autograd (``torch.no_grad()``, inference) and inside :func:`backprop`, the layers run the
plain nn.Linear / nn.Conv2d forward: the feedback weight is not even built.
"""

from __future__ import annotations

import contextlib
from contextvars import ContextVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import Function

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


def _backward_feedback(feedback, layer):
    """The feedback weight at backward time: the tensor given to forward, or the layer's derived
    feedback, built now into its scratch tensor (see ``FeedbackLayer._derived_feedback``)."""
    return layer._derived_feedback() if feedback is None else feedback


class _LinearFeedback(Function):
    @staticmethod
    def forward(ctx, x, weight, bias, feedback, layer):
        # W is saved only so that autograd raises if it changes in place before the backward
        # pass, which would make a derived feedback (built then from W) differ from forward's W.
        ctx.save_for_backward(x, feedback, weight if feedback is None and x.requires_grad else None)
        ctx.layer = layer
        ctx.has_bias = bias is not None
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, feedback, _ = ctx.saved_tensors
        need_x, need_w, need_b, need_fb, _ = ctx.needs_input_grad
        grad_x = grad @ _backward_feedback(feedback, ctx.layer) if need_x else None
        grad_w = grad_b = None
        if need_w or need_fb:
            grad_w = grad.reshape(-1, grad.shape[-1]).t() @ x.reshape(-1, x.shape[-1])
        if need_b:
            grad_b = grad.reshape(-1, grad.shape[-1]).sum(0)
        return grad_x, grad_w if need_w else None, grad_b, grad_w if need_fb else None, None


class _Conv2dFeedback(Function):
    @staticmethod
    def forward(ctx, x, weight, bias, feedback, layer, stride, padding, dilation, groups):
        ctx.save_for_backward(x, weight, feedback)
        ctx.layer = layer
        ctx.conv = (stride, padding, dilation, groups)
        ctx.has_bias = bias is not None
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad):
        x, weight, feedback = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conv
        need_x, need_w, need_b, need_fb = ctx.needs_input_grad[:4]

        def conv_backward(w, mask):
            return torch.ops.aten.convolution_backward(
                grad, x, w, [w.shape[0]] if ctx.has_bias else None,
                stride, padding, dilation, False, [0, 0], groups, mask,
            )

        if need_x:
            grad_x = conv_backward(_backward_feedback(feedback, ctx.layer), [True, False, False])[0]
        else:
            grad_x = None
        grad_w = grad_b = None
        if need_w or need_fb or need_b:
            _, grad_w, grad_b = conv_backward(weight, [False, need_w or need_fb, need_b])
        return (grad_x, grad_w if need_w else None, grad_b if need_b else None,
                grad_w if need_fb else None, None, None, None, None, None)


class FeedbackLayer:
    """Mixin for layers trained by a layer-wise rule; ``self.rule`` supplies the feedback weight."""

    rule = None

    @classmethod
    def from_module(cls, module: nn.Module, rule) -> FeedbackLayer:
        """Swap ``module`` (an nn.Linear / nn.Conv2d) for this class, sharing its parameters."""
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

    def _derived_feedback(self) -> torch.Tensor:
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
        return self.rule.feedback(self, out=out)

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


class FeedbackLinear(FeedbackLayer, nn.Linear):
    def forward(self, x):
        if _BACKPROP.get() or not torch.is_grad_enabled():
            return super().forward(x)
        return _LinearFeedback.apply(x, self.weight, self.bias, self._feedback_for(x), self)


class FeedbackConv2d(FeedbackLayer, nn.Conv2d):
    def forward(self, x):
        if _BACKPROP.get() or not torch.is_grad_enabled():
            return super().forward(x)
        padding = self.padding
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding = (0, 0)
        elif isinstance(padding, str):  # "same" / "valid": resolve to numbers for the backward
            x = F.pad(x, self._reversed_padding_repeated_twice)
            padding = (0, 0)
        return _Conv2dFeedback.apply(
            x, self.weight, self.bias, self._feedback_for(x), self,
            self.stride, padding, self.dilation, self.groups,
        )


FEEDBACK_LAYERS = {nn.Linear: FeedbackLinear, nn.Conv2d: FeedbackConv2d}
