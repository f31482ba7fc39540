"""SFDFA (Bacho & Chu 2024): spiking forward DFA with exact local spike-time gradients.

The neuron (the SFDFA code's current-based LIF with tau = 2 tau_s): with x = exp(t / tau),

    V(t) = b / x - a / x^2,  a = sum_j w_j exp(2 t_j / tau),
                             b = sum_j w_j exp(t_j / tau) - theta sum_k exp(t_k / tau),

over the input spikes t_j and the neuron's own spikes t_k (the PSP kernel of one input spike
is exp(-s / tau) - exp(-2 s / tau); a spike resets V to 0 by subtracting theta exp(-(t - t_k) /
tau)). V = theta is a quadratic in x, so each spike time is solved in closed form:
x = 2 a / (b + sqrt(b^2 - 4 a theta)), t = tau ln x.

**CPU version, time-stepped (ours).** The repo solves spike times event by event in CUDA
kernels. Here time is cut into ``steps`` intervals of length dt; the input spikes of an
interval enter a and b at their exact times, then the crossing is solved in closed form inside
the interval (at most one spike per neuron and interval: a refractory time of dt). Inputs on
the grid (our latency coding puts them there) are exact; spikes of a hidden layer arrive off the
grid and are applied together with the others of their interval.

**Eligibility traces.** With the layer's inputs fixed, F(t, w) = b / x - a / x^2 - theta = 0 at
a spike, so dt_k / dw_ij = -(dF/dw_ij) / (dF/dt), where dF/dw_ij = (E_j - R_ij) / x - A_j / x^2,
A_j = sum exp(2 t_j / tau), E_j = sum exp(t_j / tau) over the inputs so far, and R_ij =
theta / tau sum_{k' < k} x_k' dt_k' / dw_ij carries the dependence on the neuron's own earlier
spikes (each reset moves with its spike). dF/dt = (2 a / x^2 - b / x) / tau, the membrane's
slope at the crossing. (The repo's "STD" kernel divides by a / x^2 instead of a / x^2 - theta;
we use the exact slope: ``tests/test_sfdfa.py`` checks the traces against finite differences.)
The trace of a weight is sum_k dt_k / dw_ij.

**Forward gradients.** Spike times also carry tangents (forward mode, by hand): the tangent of
t_k follows from those of the input spikes (da, db) the same way; every hidden neuron adds its
own perturbation u_i ~ N(0, 1) to the tangents it sends on. The output tangent d_c is the sum of
the tangents of output neuron c's spikes, so E[d u_i] = d(sum_k t_k^c) / dt_i, and B learns it:
B <- B - lr (B - mean(d u^T)) over the samples where the neuron spiked (the repo's update,
plain gradient descent as its SFDFA scripts use; B starts at zero). ``learn_feedback=False``
keeps B fixed at U(-1, 1): the repo's DFA baseline with the same neurons and traces.

**Weight updates.** The output error is delta_c = -dL/dcount_c (for the spike-count loss
0.5 sum (target - count)^2, targets 15 for the true class and 3 otherwise: target - count); a
hidden neuron's is delta B + reg (fr_target - mean_batch count). The gradient of w_ij is
delta_i sum_k dt_k/dw_ij (sum over the batch). The committed ``LIFLayer.compute_avg_gradient``
of the repo overwrites the hidden error with the regulariser term alone (so the hidden layers
never see the task's error); we add the two, which is what the paper describes.

The network is an ``nn.Module``: ``loss.backward()`` fills the weights' ``.grad`` with these
updates (an autograd node on the counts), so any torch optimizer steps them.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.autograd import Function

from .. import feedback as fb
from ..models.registry import register_model
from ..rules import Rule, register_rule
from ..tasks import register_task
from ..tasks.classification import Classification


def latency_times(x: torch.Tensor, steps: int, window: float = 0.5) -> torch.Tensor:
    """(batch, features) intensities in [0, 1] -> spike times (batch, features, steps), inf
    where none: one spike at window (1 - p), on the grid of ``steps`` intervals of [0, 1];
    none where p = 0 (the SFDFA code's coding, its window 0.1 s of a 0.2 s run)."""
    dt = 1.0 / steps
    p = x.flatten(1).clamp(0, 1)
    slot = torch.round(window * (1 - p) / dt).long().clamp(max=steps - 1)
    times = torch.full((*p.shape, steps), math.inf, dtype=x.dtype, device=x.device)
    times.scatter_(2, slot.unsqueeze(2), (slot * dt).to(x.dtype).unsqueeze(2))
    return times.masked_fill(p.unsqueeze(2) == 0, math.inf)


class SpikeTimeLayer:
    """One layer's simulation with its traces (plain tensors, made per forward pass).

    The traces are kept in factored form: sum_k dt_k/dw_ij = sum_s P_is E_js + Q_is A_js with
    E_js, A_js the input sums at step s (``inputs``: (batch, M, steps) each) and per-neuron
    coefficients P, Q (batch, N, steps) that the resets make depend on earlier spikes; so no
    (batch, N, M) tensor is needed and the weight gradient is one matrix product.
    """

    def __init__(self, weight, theta, tau, steps, perturb, generator):
        self.weight, self.theta, self.tau, self.steps = weight, theta, tau, steps
        self.perturb, self.generator = perturb, generator

    def run(self, times_in, tangent_in=None, traces=True):
        """Spike times (batch, N, steps), inf where none, and their tangents."""
        w = self.weight
        batch, m, steps = times_in.shape
        n = w.shape[0]
        tau, theta, dt = self.tau, self.theta, 1.0 / steps
        has = torch.isfinite(times_in)
        e1 = torch.where(has, torch.exp(times_in.masked_fill(~has, 0) / tau),
                         torch.zeros_like(times_in))
        e2 = e1 * e1
        # cumulative input sums per step (batch, M, steps), then a and b of every step at once
        big_e, big_a = e1.cumsum(2), e2.cumsum(2)
        a_all = (big_a.transpose(1, 2) @ w.t())  # (batch, steps, N)
        b_all = (big_e.transpose(1, 2) @ w.t())
        if tangent_in is not None:
            tan = torch.where(has, tangent_in, torch.zeros_like(tangent_in))
            da_all = ((e2 * tan).cumsum(2) * (2 / tau)).transpose(1, 2) @ w.t()
            db_all = ((e1 * tan).cumsum(2) / tau).transpose(1, 2) @ w.t()
        zeros = torch.zeros(batch, n, dtype=w.dtype, device=w.device)
        reset_b, reset_db = zeros.clone(), zeros.clone()
        last = torch.full_like(zeros, -math.inf)
        out = torch.full((batch, n, steps), math.inf, dtype=w.dtype, device=w.device)
        out_tangent = torch.zeros_like(out)
        if traces:
            self.inputs = (big_e, big_a)
            rho, sigma = torch.zeros_like(out), torch.zeros_like(out)  # R = rho E + sigma A
            self.p, self.q = torch.zeros_like(out), torch.zeros_like(out)
        for s in range(steps):
            a, b = a_all[:, s], b_all[:, s] - reset_b
            disc = b * b - 4 * a * theta
            ok = (disc > 0) & (a > 0)
            root = torch.where(ok, 2 * a / (b + disc.clamp_min(0).sqrt()), torch.ones_like(a))
            ok = ok & (root > 0)
            t = tau * torch.log(root.clamp_min(1e-30))
            fire = ok & (t >= s * dt) & (t >= last) & (t < (s + 1) * dt)
            if not fire.any():
                continue
            x = root
            slope = (2 * a / (x * x) - b / x) / tau  # dF/dt at the crossing
            out[..., s] = torch.where(fire, t, out[..., s])
            reset_b = reset_b + torch.where(fire, theta * x, zeros)  # reset at t_k
            last = torch.where(fire, t, last)
            if tangent_in is not None:
                db = db_all[:, s] - reset_db
                t_dot = torch.where(fire, -(db / x - da_all[:, s] / (x * x)) / slope, zeros)
                out_tangent[..., s] = t_dot
                reset_db = reset_db + theta * x / tau * t_dot  # the reset moves with t_k
            if traces:
                g = torch.where(fire, 1 / (x * slope), zeros).unsqueeze(2)
                p_k, q_k = g * rho, g * sigma
                p_k[..., s] -= g[..., 0]
                q_k[..., s] += (g[..., 0] / x)
                k = theta / tau * torch.where(fire, x, zeros).unsqueeze(2)
                rho += k * p_k
                sigma += k * q_k
                self.p += p_k
                self.q += q_k
        if self.perturb:
            self.noise = torch.randn(batch, n, generator=self.generator, dtype=w.dtype)
            self.noise = self.noise.to(w.device)
            out_tangent = torch.where(torch.isfinite(out), out_tangent + self.noise.unsqueeze(2),
                                      out_tangent)
        return out, out_tangent

    @property
    def trace(self) -> torch.Tensor:
        """sum_k dt_k / dw_ij of every sample (batch, N, M) (for inspection and tests)."""
        big_e, big_a = self.inputs
        return self.p @ big_e.transpose(1, 2) + self.q @ big_a.transpose(1, 2)

    def weight_grad(self, err: torch.Tensor) -> torch.Tensor:
        """sum_b err_bi sum_k dt_k/dw_ij for per-neuron errors ``err`` (batch, N)."""
        big_e, big_a = self.inputs
        e = err.unsqueeze(2)
        return (torch.einsum("bns,bms->nm", e * self.p, big_e)
                + torch.einsum("bns,bms->nm", e * self.q, big_a))


class _SpikeCountGrad(Function):
    """Identity on the counts; its backward puts SFDFA's weight updates into the weights."""

    @staticmethod
    def forward(ctx, net, counts, *weights):
        ctx.net = net
        return counts.clone()

    @staticmethod
    def backward(ctx, grad):
        return (None, None, *ctx.net._weight_grads(-grad))


class SFDFANetwork(nn.Module):
    """A fully connected spike-time LIF network (e.g. 784-400-400-10) trained by SFDFA.

    Input: intensities in [0, 1] (any shape per sample; latency coded) or spike times
    (batch, M, steps). Output: the spike counts (batch, C) of the output neurons.
    """

    def __init__(self, sizes, steps=30, tau_s=0.65, thresholds=None, window=0.5,
                 learn_feedback=True, feedback_lr=1e-4, reg_factor=0.3, fr_target=0.4,
                 seed=0):
        super().__init__()
        if len(sizes) < 2:
            raise ValueError("sizes lists the input size, hidden sizes and the classes")
        self.sizes, self.steps, self.tau, self.window = tuple(sizes), steps, 2 * tau_s, window
        hidden = len(sizes) - 2
        self.thresholds = tuple(thresholds) if thresholds is not None else (
            (0.2 / (2 * tau_s),) * hidden + (0.7 / (2 * tau_s),))
        if len(self.thresholds) != len(sizes) - 1:
            raise ValueError(f"thresholds: one per layer ({len(sizes) - 1}); got "
                             f"{len(self.thresholds)}")
        self.learn_feedback, self.feedback_lr = learn_feedback, feedback_lr
        self.reg_factor, self.fr_target = reg_factor, fr_target
        gen = torch.Generator().manual_seed(seed)
        self.generator = torch.Generator().manual_seed(seed + 1)
        self.weights = nn.ParameterList(
            nn.Parameter(torch.rand(o, i, generator=gen) * 2 - 1)
            for i, o in zip(sizes[:-1], sizes[1:])
        )
        for i, size in enumerate(sizes[1:-1]):
            init = torch.zeros(sizes[-1], size) if learn_feedback else (
                torch.rand(sizes[-1], size, generator=gen) * 2 - 1)
            self.register_buffer(f"feedback{i}", init)
        self.layers: list[SpikeTimeLayer] = []

    def feedbacks(self) -> list[torch.Tensor]:
        """B_l (C, N_l) of every hidden layer."""
        return [getattr(self, f"feedback{i}") for i in range(len(self.sizes) - 2)]

    def forward(self, x):
        """Spike counts (batch, C) for intensities (any shape per sample; each sample rescaled
        to [0, 1] by its own minimum and maximum, then latency coded) or for input spike
        times (batch, M, steps)."""
        dtype = self.weights[0].dtype
        if self.weights[0].is_meta:  # a shape-only copy (sdfa.costs): nothing to simulate
            return torch.zeros(len(x), self.sizes[-1], dtype=dtype, device="meta")
        if x.dim() == 3 and x.shape[1:] == (self.sizes[0], self.steps):
            times = x.to(dtype)
        else:
            flat = x.flatten(1)
            low = flat.min(1, keepdim=True).values
            flat = (flat - low) / (flat.max(1, keepdim=True).values - low).clamp_min(1e-12)
            times = latency_times(flat, self.steps, self.window).to(dtype)
        learning = self.training and torch.is_grad_enabled()
        tangent = None
        self.layers = []
        for i, w in enumerate(self.weights):
            last = i == len(self.weights) - 1
            layer = SpikeTimeLayer(w.detach(), self.thresholds[i], self.tau, self.steps,
                                   perturb=learning and not last, generator=self.generator)
            times, tangent = layer.run(times, tangent if learning else None, traces=learning)
            layer.counts = torch.isfinite(times).sum(2).to(dtype)
            self.layers.append(layer)
        self.output_times = times
        counts = self.layers[-1].counts
        if not learning:
            return counts
        self.output_tangent = tangent.sum(2)  # d: tangent of each output neuron's spike times
        if self.learn_feedback:
            self._learn_feedback()
        return _SpikeCountGrad.apply(self, counts, *self.weights)

    @torch.no_grad()
    def _learn_feedback(self):
        d = self.output_tangent
        for layer, feedback in zip(self.layers[:-1], self.feedbacks()):
            active = (layer.counts > 0).to(d.dtype)  # (batch, N)
            u = layer.noise * active
            estimate = d.t() @ u  # sum over the active samples of d u^T
            grad = feedback * active.sum(0) - estimate
            feedback -= self.feedback_lr * grad / active.sum(0).clamp_min(1)

    def _weight_grads(self, delta):
        """dL/dw of every layer from the output error delta = -dL/dcount (batch, C)."""
        grads = [None] * len(self.weights)
        grads[-1] = self.layers[-1].weight_grad(delta)
        for i, feedback in enumerate(self.feedbacks()):
            layer = self.layers[i]
            err = delta @ feedback
            if self.reg_factor:
                mean_fr = layer.counts.mean(0)
                err = err + self.reg_factor * (self.fr_target - mean_fr) / len(delta)
            grads[i] = layer.weight_grad(err)
        return grads


class SpikeCount(Classification):
    """Classification by output spike counts with the SFDFA code's loss: 0.5 sum_c (target_c -
    count_c)^2 per sample, targets ``true`` (15) for the label and ``false`` (3) otherwise."""

    name = "spike-count"

    def __init__(self, data, *, true: float = 15.0, false: float = 3.0, **options):
        super().__init__(data, **options)
        self.true, self.false = true, false

    def _targets(self, outputs, labels):
        targets = torch.full_like(outputs, self.false)
        return targets.scatter_(1, labels.unsqueeze(1), self.true)

    def loss(self, outputs, targets):
        return 0.5 * (self._targets(outputs, targets) - outputs).square().sum(1).mean()

    def metrics(self, outputs, targets, loss=None):
        if loss is None:
            with torch.no_grad():
                loss = float(self.loss(outputs, targets))
        return super().metrics(outputs, targets, loss)


register_task("spike-count", SpikeCount)


@register_rule
class SFDFA(Rule):
    """SFDFA on the spike-time LIF networks of the model (``SFDFANetwork``); with
    ``learn_feedback=False`` the same neurons and traces with a fixed U(-1, 1) B (the SFDFA
    code's DFA baseline)."""

    name = "sfdfa"
    paper = "Bacho, Chu 2024 (Forward Direct Feedback Alignment, spiking)"
    model_specific = True
    options = {"learn_feedback": True, "feedback_lr": 1e-4, "reg_factor": 0.3, "fr_target": 0.4}

    def apply(self, model, layers, seed):
        nets = [(n, m) for n, m in model.named_modules() if isinstance(m, SFDFANetwork)]
        if not nets:
            raise ValueError(
                "rule 'sfdfa' trains spike-time LIF networks (the preset sfdfa-mlp, "
                "sdfa.spiking.sfdfa.SFDFANetwork); this model has none: use 'fdfa' or 'dfa'"
            )
        for name, net in nets:
            net.learn_feedback = bool(self.config["learn_feedback"])
            net.feedback_lr = self.config["feedback_lr"]
            net.reg_factor, net.fr_target = self.config["reg_factor"], self.config["fr_target"]
            gen = fb.generator(seed, name or "sfdfa")
            with torch.no_grad():
                for feedback in net.feedbacks():
                    if net.learn_feedback:
                        feedback.zero_()
                    else:
                        feedback.copy_(torch.rand(feedback.shape, generator=gen) * 2 - 1)
        return model


@register_model("sfdfa-mlp")
def sfdfa_mlp(input_shape, num_classes, hidden=(400, 400), steps=30, tau_s=0.65,
              thresholds=None, window=0.5):
    """A fully connected spike-time LIF network (the SFDFA code's neurons; latency-coded input)
    for the rule 'sfdfa' and the task 'spike-count'. Time runs over [0, 1] in ``steps`` steps."""
    sizes = (math.prod(input_shape), *hidden, num_classes)
    return SFDFANetwork(sizes, steps=steps, tau_s=tau_s, thresholds=thresholds, window=window)
