"""Spiking presets: LIF neurons from snntorch simulated over T time steps.

Every tensor between layers is (batch, T, features). The trainable units are ordinary
``nn.Linear`` (applied at every step) and :class:`TimeConv2d`, so ``sdfa.convert`` trains them
with any rule, and the LIF neurons sit inside the blocks: DFA's ``e @ B`` reaches the spikes of
a hidden layer and goes through the surrogate derivative of the spike function and the
membrane recurrence (backprop through time inside the block) to the weights.

* ``convert(snn, "dfa", per_position=True)``: the error at every step, h_t <- e_t B with
  e_t = dL/dy_t, y_t the output layer's input current at step t;
* ``convert(snn, "dfa", per_position="sum")``: once per sample, h_t <- (sum_t e_t) B at every
  step (sum_t e_t is the gradient of the loss for a current shift held over the whole run).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import register_layer
from ..layers.conv import FeedbackConv2d, conv_cost
from ..models.registry import register_model
from .encoding import SpikeEncoder

READOUTS = ("count", "membrane")


def _snntorch():
    try:
        import snntorch
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "spiking models need snntorch: pip install 'sdfa[spiking]' (or pip install snntorch)"
        ) from err
    return snntorch


class FastSigmoidSpike(torch.autograd.Function):
    """H(x) forward; the fast-sigmoid surrogate 1 / (slope |x| + 1)^2 as its derivative in
    both modes (snntorch's ``fast_sigmoid`` has no forward-mode rule, which FDFA needs)."""

    @staticmethod
    def forward(ctx, x, slope):
        ctx.save_for_backward(x)
        ctx.save_for_forward(x)
        ctx.slope = slope
        return (x > 0).to(x.dtype)

    @staticmethod
    def _surrogate(ctx, x):
        return 1.0 / (ctx.slope * x.abs() + 1.0) ** 2

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * FastSigmoidSpike._surrogate(ctx, x), None

    @staticmethod
    def jvp(ctx, x_tangent, slope_tangent):
        (x,) = ctx.saved_tensors
        return x_tangent * FastSigmoidSpike._surrogate(ctx, x)


class LIF(nn.Module):
    """snntorch's ``Leaky`` neuron run over the time axis of (batch, T, ...) currents.

    Per step (snntorch's difference equation, reset by subtraction, delayed by one step):
    U[t] = beta U[t-1] + I[t] - theta S[t-1], S[t] = H(U[t] - theta); the backward pass uses a
    fast-sigmoid surrogate of H' with ``slope`` (:class:`FastSigmoidSpike`, also in forward
    mode). ``output="spikes"`` returns S, ``"membrane"`` the potentials U (a non-spiking
    readout layer).
    """

    def __init__(self, beta=0.9, threshold=1.0, slope=25.0, output="spikes"):
        super().__init__()
        if output not in ("spikes", "membrane"):
            raise ValueError(f"LIF output must be 'spikes' or 'membrane'; got {output!r}")
        snntorch = _snntorch()
        self.output = output
        self.neuron = snntorch.Leaky(
            beta=beta, threshold=threshold,
            spike_grad=lambda x: FastSigmoidSpike.apply(x, slope),
            reset_mechanism="subtract" if output == "spikes" else "none",
        )

    def forward(self, current):
        mem = torch.zeros_like(current[:, 0])
        out = []
        for t in range(current.shape[1]):
            spk, mem = self.neuron(current[:, t], mem)
            out.append(spk if self.output == "spikes" else mem)
        return torch.stack(out, 1).to(current.dtype)  # snntorch's spikes are float32


class TimeConv2d(nn.Conv2d):
    """A 2-D convolution applied at every step to (batch, T, C*H*W) inputs of map ``size``,
    with an optional average pooling; returns (batch, T, features) so that feedback can be
    shared over the steps (``per_position``)."""

    def __init__(self, in_channels, out_channels, kernel_size, size, padding=0, pool=1):
        super().__init__(in_channels, out_channels, kernel_size, padding=padding)
        self.size, self.pool = tuple(size), pool

    def forward(self, x):
        batch, steps = x.shape[:2]
        maps = self.step(x.reshape(batch * steps, self.in_channels, *self.size))
        if self.pool > 1:
            maps = F.avg_pool2d(maps, self.pool)
        return maps.reshape(batch, steps, -1)

    def step(self, maps):
        """The convolution of (batch * T, C, H, W) maps (the layer-wise twin swaps it)."""
        return nn.Conv2d.forward(self, maps)

    def out_size(self) -> tuple[int, int]:
        k, p = self.kernel_size[0], self.padding[0]
        return tuple((s + 2 * p - k + 1) // self.pool for s in self.size)


class FeedbackTimeConv2d(FeedbackConv2d, TimeConv2d):
    """TimeConv2d's layer-wise twin: the step convolution sends delta through the rule's B."""

    forward = TimeConv2d.forward

    def step(self, maps):
        return FeedbackConv2d.forward(self, maps)


def _time_conv_cost(module, in_shape, out_shape):
    batch, steps = in_shape[:2]
    maps_in = (batch * steps, module.in_channels, *module.size)
    size = tuple(s * module.pool for s in module.out_size())
    return conv_cost(module, maps_in, (batch * steps, module.out_channels, *size))


register_layer(TimeConv2d, twin=FeedbackTimeConv2d, cost=_time_conv_cost)


class Readout(nn.Module):
    """(batch, T, C) -> (batch, C) logits: the spike count, or the membrane's mean over time."""

    def __init__(self, mode="count"):
        super().__init__()
        if mode not in READOUTS:
            raise ValueError(f"unknown readout {mode!r}; choose one of {', '.join(READOUTS)}")
        self.mode = mode

    def forward(self, x):
        return x.sum(1) if self.mode == "count" else x.mean(1)


def _check(steps, readout):
    if readout not in READOUTS:
        raise ValueError(f"unknown readout {readout!r}; choose one of {', '.join(READOUTS)}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer; got {steps!r}")


def _head(width, num_classes, readout, beta, threshold):
    out = "spikes" if readout == "count" else "membrane"
    return [nn.Linear(width, num_classes), LIF(beta, threshold, output=out), Readout(readout)]


@register_model("snn-mlp")
def snn_mlp(input_shape, num_classes, hidden=(100,), steps=25, coding="rate", readout="count",
            beta=0.9, threshold=1.0):
    """Encoder, ``hidden`` Linear+LIF layers, a Linear+LIF output layer and a readout
    (``count``: spike counts as logits; ``membrane``: the mean potential of non-spiking
    output neurons). ``coding="series"`` reads (channels, T, features) series, one step per row
    (T = their length)."""
    _check(steps, readout)
    layers: list[nn.Module] = [SpikeEncoder(steps, coding)]
    width = math.prod(input_shape) // (input_shape[-2] if coding == "series" else 1)
    for size in hidden:
        layers += [nn.Linear(width, size), LIF(beta, threshold)]
        width = size
    return nn.Sequential(*layers, *_head(width, num_classes, readout, beta, threshold))


@register_model("snn-conv")
def snn_conv(input_shape, num_classes, channels=(8, 16), steps=10, coding="rate",
             readout="count", beta=0.9, threshold=1.0):
    """A small convolutional SNN: per channel count a 3x3 TimeConv2d (padding 1) + 2x2 average
    pooling + LIF, then a Linear+LIF output layer and a readout."""
    _check(steps, readout)
    if coding == "series" or len(input_shape) != 3:
        raise ValueError("snn-conv takes images (C, H, W) with rate, latency or current coding")
    layers: list[nn.Module] = [SpikeEncoder(steps, coding)]
    in_ch, size = input_shape[0], input_shape[1:]
    for ch in channels:
        conv = TimeConv2d(in_ch, ch, 3, size, padding=1, pool=2)
        layers += [conv, LIF(beta, threshold)]
        in_ch, size = ch, conv.out_size()
    width = in_ch * math.prod(size)
    return nn.Sequential(*layers, *_head(width, num_classes, readout, beta, threshold))
