"""nn.Linear: its layer-wise twin and its cost formula."""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import nn
from torch.autograd import Function

from .base import FeedbackLayer, backward_feedback, uses_plain_forward
from .registry import Work, register_layer


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
        # Under autocast the output (so grad) is bfloat16 while x, W and B may be float32: work
        # in grad's dtype (autograd casts each returned gradient to its input's dtype).
        dtype = grad.dtype
        grad_x = None
        if need_x:
            values, scale = backward_feedback(feedback, ctx.layer)
            grad_x = grad @ values.to(dtype)
            if scale is not None:
                grad_x.mul_(scale)
        grad_w = grad_b = None
        if need_w or need_fb:
            grad_w = grad.reshape(-1, grad.shape[-1]).t() @ x.reshape(-1, x.shape[-1]).to(dtype)
        if need_b:
            grad_b = grad.reshape(-1, grad.shape[-1]).sum(0)
        return grad_x, grad_w if need_w else None, grad_b, grad_w if need_fb else None, None


def feedback_linear(layer: FeedbackLayer, x, weight, bias=None):
    """``F.linear(x, weight, bias)`` whose input gradient is ``delta @ layer.feedback_weight()``.

    The building block for the twin of any layer that is a matrix product on its last dimension
    (see ``tests/test_blocks.py`` for a custom layer registered with it).
    """
    return _LinearFeedback.apply(x, weight, bias, layer._feedback_for(x), layer)


class FeedbackLinear(FeedbackLayer, nn.Linear):
    def forward(self, x):
        if uses_plain_forward():
            return super().forward(x)
        return _LinearFeedback.apply(x, self.weight, self.bias, self._feedback_for(x), self)


def linear_cost(module: nn.Linear, in_shape: tuple, out_shape: tuple) -> Work:
    """``W x`` at every position of the input: positions x in_features x out_features."""
    return Work(math.prod(out_shape[:-1]) * module.in_features * module.out_features)


register_layer(nn.Linear, twin=FeedbackLinear, cost=linear_cost)
