"""How far one example can move a layer's update: the bounds that calibrate the privacy noise.

A trainable layer's per-example update is built from two factors: the feedback signal that
reaches the layer's output (``delta``, per example) and the layer's input ``h``. For a Linear
layer the weight update is ``sum_t delta_t h_t^T`` over the example's positions t, for a Conv2d
layer ``delta`` correlated with the unfolded input. So (docs/privacy.md proves it)

    ||per-example update||_F  <=  D * sqrt(m * A^2 + P * [bias])

with D a bound on ``||delta||``, A a bound on ``||h||``, m the number of windows that can read
one input element (1 for Linear) and P the number of output positions (the bias sums delta over
them). The tables below give, for the parameter-free modules that may sit between two trainable
layers, a bound on the norm of their input-gradient map (to bound D from the feedback signal)
and on the magnitude of their outputs (to bound A from a bounded activation). Modules missing
from a table cannot be bounded: the caller turns that into a clear error.
"""

from __future__ import annotations

import math

from torch import nn
from torch.nn.modules.dropout import _DropoutNd

# sup |f(x)| whatever x is (bounded activations).
_BOUNDED_OUTPUT = {nn.Sigmoid: 1.0, nn.Hardsigmoid: 1.0}
# |f(x)| <= min(|x|, 1).
_SATURATING = (nn.Tanh, nn.Softsign)
# |f(x)| <= |x| element-wise (or a max / mean of input elements).
_SHRINKING = (
    nn.ReLU,
    nn.GELU,
    nn.SiLU,
    nn.Identity,
    nn.Flatten,
    nn.Unflatten,
    nn.MaxPool2d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d,
)
# sup |f'(x)|: the input-gradient map of an element-wise function is diagonal, so its norm is
# the largest derivative (GELU: Phi(x) + x phi(x) peaks at 1.129 near x = sqrt 2; SiLU: 1.0998).
_DERIVATIVE = {
    nn.Tanh: 1.0,
    nn.Sigmoid: 0.25,
    nn.Softsign: 1.0,
    nn.Hardsigmoid: 0.1666667,  # 1/6, rounded up: PyTorch differentiates with float32 1/6
    nn.Hardtanh: 1.0,  # and its subclass ReLU6
    nn.ReLU: 1.0,
    nn.GELU: 1.13,
    nn.SiLU: 1.1,
    nn.Identity: 1.0,
    nn.Flatten: 1.0,
    nn.Unflatten: 1.0,
}


def magnitude_after(module: nn.Module, bound: float) -> float:
    """Element-wise bound on the output of ``module`` when its input is bounded by ``bound``.

    ``math.inf`` when no bound is known (unknown modules, or an unbounded input to a module that
    does not bound it).
    """
    for kind, value in _BOUNDED_OUTPUT.items():
        if isinstance(module, kind):
            return value
    if isinstance(module, _SATURATING):
        return min(bound, 1.0)
    if isinstance(module, nn.Hardtanh):
        return min(bound, max(abs(module.min_val), abs(module.max_val)))
    if isinstance(module, _SHRINKING):
        return bound
    if isinstance(module, nn.LeakyReLU):
        return bound * max(1.0, abs(module.negative_slope))
    if isinstance(module, nn.ELU):
        return max(bound, module.alpha)
    if isinstance(module, _DropoutNd) and not isinstance(module, nn.AlphaDropout):
        return bound / (1.0 - module.p) if module.p < 1 else 0.0
    return math.inf


def jacobian_bound(module: nn.Module) -> float | None:
    """Bound on ||J^T g|| / ||g|| for the module's Jacobian J, per example; None if unknown."""
    for kind, value in _DERIVATIVE.items():
        if isinstance(module, kind):
            return value
    if isinstance(module, nn.LeakyReLU):
        return max(1.0, abs(module.negative_slope))
    if isinstance(module, nn.ELU):
        return max(1.0, module.alpha)
    if isinstance(module, _DropoutNd) and not isinstance(module, nn.AlphaDropout):
        return 1.0 / (1.0 - module.p) if module.p < 1 else 0.0
    if isinstance(module, nn.MaxPool2d):
        # Each output's gradient goes to one input; an input is the max of at most m windows,
        # so by Cauchy-Schwarz ||J^T g||^2 <= m ||g||^2.
        return math.sqrt(window_overlap(module.kernel_size, module.stride, module.dilation))
    if isinstance(module, nn.AvgPool2d):
        if module.divisor_override is not None or module.ceil_mode or not (
            module.count_include_pad or _pair(module.padding) == (0, 0)
        ):
            return None  # some windows divide by less than K
        # An input receives g_w / K from each of its <= m windows: ||J^T g||^2 <= (m / K) ||g||^2.
        kernel = _pair(module.kernel_size)
        overlap = window_overlap(kernel, module.stride, 1)
        return math.sqrt(overlap / (kernel[0] * kernel[1]))
    return None


def window_overlap(kernel, stride, dilation) -> int:
    """The most sliding windows (of a conv or pool) that can contain one input element."""
    total = 1
    for k, s, d in zip(_pair(kernel), _pair(stride if stride is not None else kernel),
                       _pair(dilation)):
        total *= min(k, math.ceil((d * (k - 1) + 1) / s))
    return total


def layer_sensitivity(
    feedback_bound: float, input_bound: float, overlap: int, positions: int, bias: bool
) -> float:
    """L2 bound on one example's update of a Linear / Conv2d layer (weight and bias together)."""
    if feedback_bound == 0:
        return 0.0
    return feedback_bound * math.sqrt(overlap * input_bound**2 + (positions if bias else 0))


def _pair(value) -> tuple[int, int]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)
