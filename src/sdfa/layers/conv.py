"""Convolutions (1-d, 2-d, 3-d, transposed): their layer-wise twins and their cost formula.

One autograd function serves every kind: ``aten.convolution_backward`` computes the input
gradient with the feedback tensor in place of W and the weight gradient with W, for plain and
transposed convolutions alike.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import Function

from .base import FeedbackLayer, backward_feedback, uses_plain_forward
from .registry import Work, register_layer


class _ConvFeedback(Function):
    @staticmethod
    def forward(ctx, x, weight, bias, feedback, layer, conv):
        # conv: (stride, padding, dilation, transposed, output_padding, groups)
        ctx.save_for_backward(x, weight, feedback)
        ctx.layer = layer
        ctx.conv = conv
        ctx.has_bias = bias is not None
        return torch.convolution(x, weight, bias, *conv)

    @staticmethod
    def backward(ctx, grad):
        x, weight, feedback = ctx.saved_tensors
        x = x.to(grad.dtype)  # under autocast grad is bfloat16 (see _LinearFeedback)
        stride, padding, dilation, transposed, output_padding, groups = ctx.conv
        need_x, need_w, need_b, need_fb = ctx.needs_input_grad[:4]
        out_channels = weight.shape[1] * groups if transposed else weight.shape[0]

        def conv_backward(w, mask):
            return torch.ops.aten.convolution_backward(
                grad, x, w.to(grad.dtype), [out_channels] if ctx.has_bias else None,
                stride, padding, dilation, transposed, output_padding, groups, mask,
            )

        grad_x = None
        if need_x:
            values, scale = backward_feedback(feedback, ctx.layer)
            grad_x = conv_backward(values, [True, False, False])[0]
            if scale is not None:
                grad_x.mul_(scale)
        grad_w = grad_b = None
        if need_w or need_fb or need_b:
            _, grad_w, grad_b = conv_backward(weight, [False, need_w or need_fb, need_b])
        return (grad_x, grad_w if need_w else None, grad_b if need_b else None,
                grad_w if need_fb else None, None, None)


class _FeedbackConv(FeedbackLayer):
    def forward(self, x):
        if uses_plain_forward():
            return super().forward(x)
        padding = self.padding
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding = (0,) * len(self.kernel_size)
        elif isinstance(padding, str):  # "same" / "valid": resolve to numbers for the backward
            x = F.pad(x, self._reversed_padding_repeated_twice)
            padding = (0,) * len(self.kernel_size)
        conv = (self.stride, padding, self.dilation, False, (0,) * len(padding), self.groups)
        return _ConvFeedback.apply(x, self.weight, self.bias, self._feedback_for(x), self, conv)


class _FeedbackConvTranspose(FeedbackLayer):
    def forward(self, x, output_size=None):
        if uses_plain_forward():
            return super().forward(x, output_size)
        dims = len(self.kernel_size)
        output_padding = self._output_padding(
            x, output_size, self.stride, self.padding, self.kernel_size, dims, self.dilation
        )
        conv = (self.stride, self.padding, self.dilation, True, output_padding, self.groups)
        return _ConvFeedback.apply(x, self.weight, self.bias, self._feedback_for(x), self, conv)


class FeedbackConv1d(_FeedbackConv, nn.Conv1d):
    pass


class FeedbackConv2d(_FeedbackConv, nn.Conv2d):
    pass


class FeedbackConv3d(_FeedbackConv, nn.Conv3d):
    pass


class FeedbackConvTranspose1d(_FeedbackConvTranspose, nn.ConvTranspose1d):
    pass


class FeedbackConvTranspose2d(_FeedbackConvTranspose, nn.ConvTranspose2d):
    pass


class FeedbackConvTranspose3d(_FeedbackConvTranspose, nn.ConvTranspose3d):
    pass


def _left_padding(module: nn.Module, dim: int) -> int:
    if module.padding_mode != "zeros":
        return -(10**9)  # padded values are copies of real inputs: every tap reads data
    if isinstance(module.padding, str):
        return module._reversed_padding_repeated_twice[2 * (len(module.kernel_size) - 1 - dim)]
    return module.padding[dim]


def conv_cost(module: nn.modules.conv._ConvNd, in_shape: tuple, out_shape: tuple) -> Work:
    """MACs of a dense engine (padding zeros included, as FlopCounterMode counts them) and the
    connections without padding taps (the values the error really travels through).

    Convolution: every output value reads (in_channels / groups) x kernel inputs. Transposed
    convolution: every input value is spread over (out_channels / groups) x kernel outputs.
    """
    kernel, stride, dilation = module.kernel_size, module.stride, module.dilation
    transposed = module.transposed
    taps = 1
    for dim in range(len(kernel)):
        size_in, size_out = in_shape[2 + dim], out_shape[2 + dim]
        if transposed:  # input i, tap t reaches output i * stride - padding + t * dilation
            left, positions, size = module.padding[dim], size_in, size_out
        else:  # output o, tap t reads input o * stride - left + t * dilation
            left, positions, size = _left_padding(module, dim), size_out, size_in
        taps *= sum(
            1
            for p in range(positions)
            for t in range(kernel[dim])
            if left < 0 or 0 <= p * stride[dim] - left + t * dilation[dim] < size
        )
    per_group = module.in_channels * module.out_channels // module.groups
    if transposed:
        forward = math.prod(in_shape) * module.out_channels // module.groups * math.prod(kernel)
    else:
        forward = math.prod(out_shape) * module.in_channels // module.groups * math.prod(kernel)
    return Work(forward, connections=per_group * taps)


for _layer, _twin in [
    (nn.Conv1d, FeedbackConv1d),
    (nn.Conv2d, FeedbackConv2d),
    (nn.Conv3d, FeedbackConv3d),
    (nn.ConvTranspose1d, FeedbackConvTranspose1d),
    (nn.ConvTranspose2d, FeedbackConvTranspose2d),
    (nn.ConvTranspose3d, FeedbackConvTranspose3d),
]:
    register_layer(_layer, twin=_twin, cost=conv_cost)
