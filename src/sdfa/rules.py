"""Learning rules and their registry.

A rule decides one thing: what a trainable layer sends back towards its input in the backward
pass (see ``shared/DESIGN.md``). Each rule is a small class registered by name; ``convert()``
looks the name up, builds the rule with the user's options and lets it ``apply`` itself to the
trainable units of its part of the model (the layer types of :mod:`sdfa.layers`).

* layer-wise rules (:class:`LayerwiseRule`) swap each unit for its registered :mod:`sdfa.layers`
  twin, whose backward uses ``rule.feedback(layer)`` in place of W (as ``feedback_parts``);
* ``dfa`` (:mod:`sdfa.dfa`) cuts the chain between layers and sends the output error straight to
  every hidden block through fixed random matrices.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from . import feedback as fb
from .layers import backprop_enabled, trainable_units, twin_of
from .registry import Registry

RULES: Registry[type[Rule]] = Registry("rule")


def register_rule(cls: type[Rule]) -> type[Rule]:
    """Class decorator: make ``cls`` available to ``convert()`` under ``cls.name``.

    Raises:
        ValueError: a rule of that name is registered already.
    """
    return RULES.register(cls.name, cls)


def available_rules() -> list[str]:
    """Names of every registered rule."""
    return sorted(RULES)


class Rule:
    """Base class. ``options`` maps each keyword the rule accepts to its default;
    ``needs_twin``: the rule swaps every unit for its layer-wise twin (sdfa.layers)."""

    name: str = ""
    paper: str = ""
    options: dict[str, object] = {}
    needs_twin = False
    direct = False  # DFA-like: hooks the final modules, so convert() applies it last
    model_specific = False  # trains only its own kind of network (sfdfa), not any model

    def __init__(self, **options):
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            raise ValueError(
                f"rule {self.name!r} does not take option(s) {', '.join(unknown)}; "
                f"it takes: {', '.join(sorted(self.options)) or 'no options'}"
            )
        self.config = {**self.options, **options}

    def apply(self, model: nn.Module, layers: list[tuple[str, nn.Module]], seed: int) -> nn.Module:
        """Install the rule on ``layers`` (qualified name, module) of ``model``; return the model.

        Works in place; the return value differs from ``model`` only when ``model`` itself is one
        of the layers and gets swapped.
        """
        raise NotImplementedError

    def __repr__(self):
        opts = ", ".join(f"{k}={v!r}" for k, v in self.config.items() if v != self.options[k])
        return f"{self.name}({opts})"


@register_rule
class BP(Rule):
    """Backpropagation: plain autograd, nothing is changed."""

    name = "bp"
    paper = "Rumelhart, Hinton, Williams 1986"

    def apply(self, model, layers, seed):
        return model


@register_rule
class DFA(Rule):
    """Direct feedback alignment: each hidden block output receives ``e @ B_l``."""

    name = "dfa"
    paper = "Nokland 2016; sparse: Crafton, Parihar, Gebhardt, Raychowdhury 2019"
    direct = True
    options = {
        "k": None,
        "rank": None,
        "init": "uniform",
        "scale": None,
        "output": None,
        "boundaries": None,
        "example_input": None,
        "per_position": False,
        "dilation": None,
        "groups": None,
        "feedback": "exact",
        "feedback_options": None,
        "after_output": True,
    }

    def apply(self, model, layers, seed):
        from .dfa import DirectFeedbackAlignment

        DirectFeedbackAlignment(model, layers, seed=seed, **self.config)
        return model


@register_rule
class Shallow(Rule):
    """Only the output unit learns (by its true gradient); every other parameter is frozen: the
    "shallow" baseline of Launay et al. 2020, what DFA must beat to show that its hidden layers
    learn."""

    name = "shallow"
    paper = "Launay, Poli, Boniface, Krzakala 2020 (baseline)"
    options = {"output": None}

    def apply(self, model, layers, seed):
        names = [name for name, _ in layers]
        output = self.config["output"] if self.config["output"] is not None else names[-1]
        if output not in names:
            raise ValueError(
                f"output={output!r} is not a trainable unit of the part trained by 'shallow'; "
                f"choose one of: {', '.join(names)}"
            )
        # everything but the output unit stops learning (norms, position tables, ...), except
        # the units of other parts of a rule mapping
        others = [m for n, m in trainable_units(model) if n not in names]
        keep = {id(p) for m in [model.get_submodule(output), *others] for p in m.parameters()}
        for p in model.parameters():
            if id(p) not in keep:
                p.requires_grad_(False)
        return model


class LayerwiseRule(Rule):
    """Error travels layer by layer, through ``feedback(layer)`` instead of W.

    Subclasses implement ``setup`` (register the feedback buffers / parameters on a layer) and
    ``feedback`` (the tensor of W's shape used for the input gradient at this step); a feedback
    tensor that requires grad receives W's gradient (Kolen-Pollack). Formulas, scales and papers:
    ``docs/layerwise.md``.

    ``scale`` (every layer-wise rule takes it) is the amplitude h of B: uniform entries lie in
    [-h, h], sign entries are +-h. By default B gets the root-mean-square (RMS) of W, so the error
    keeps the magnitude that backprop would give it.

    ``learned_feedback = False`` declares that the feedback gets no gradient, so a layer whose
    input needs none (the first layer) skips computing it.

    ``derived_feedback = True`` declares that the feedback is a function of W and fixed buffers
    only: it is then built in the backward pass, into ``out``, a scratch tensor of W's shape
    that the layer reuses at every step (no W-sized allocation per step, none held from the
    forward to the backward pass).
    """

    options = {"scale": None}
    needs_twin = True  # convert() checks that every unit of the part has one
    learned_feedback = True
    derived_feedback = False

    def __init__(self, **options):
        super().__init__(**options)
        scale = self.config["scale"]
        if scale is not None and (
            isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0
        ):
            raise ValueError(
                f"rule {self.name!r}: scale must be a positive number, or None for the RMS of W; "
                f"got {scale!r}"
            )

    def apply(self, model, layers, seed):
        for name, module in layers:
            swapped = twin_of(module).from_module(module, self)
            self.setup(swapped, fb.generator(seed, name))
            if not name:
                return swapped
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, swapped)
        return model

    def setup(self, layer: nn.Module, gen: torch.Generator) -> None:
        pass

    def feedback(self, layer: nn.Module, out: torch.Tensor | None = None) -> torch.Tensor:
        """The tensor of W's shape used in place of W; a derived feedback may be written into
        ``out`` (else it is a new tensor)."""
        values, scale = self.feedback_parts(layer, out)
        return values if scale is None else values.mul_(scale)

    def feedback_parts(self, layer: nn.Module, out: torch.Tensor | None = None):
        """``(F, h)``: the feedback is ``h F`` for a scalar ``h`` (None: 1).

        The backward pass multiplies the input gradient by ``h`` rather than F: the gradient is
        smaller than W, so a derived feedback (h sign(W)) costs one pass over W fewer per step.
        A rule defines this or :meth:`feedback`.
        """
        if type(self).feedback is LayerwiseRule.feedback:
            raise NotImplementedError(f"rule {self.name!r} defines neither feedback nor its parts")
        return self.feedback(layer, out), None


def _rms(weight: torch.Tensor) -> torch.Tensor:
    # one pass over W and no W-sized temporary (square().mean() allocates one)
    return torch.linalg.vector_norm(weight.detach()) / math.sqrt(weight.numel())


def _sign_amplitude(rule: LayerwiseRule, layer: nn.Module) -> torch.Tensor | float:
    """h of the sign rules: ``scale``, or the RMS of W at this step, so that ||B|| = ||W||."""
    scale = rule.config["scale"]
    return _rms(layer.weight) if scale is None else scale


def _random_feedback(layer: nn.Module, gen: torch.Generator, scale: float | None) -> torch.Tensor:
    """Fixed U(-h, h) of W's shape; by default h = sqrt(3) RMS(W), so B starts with W's RMS.

    A layer whose weights are all zero gets PyTorch's default bound h = 1/sqrt(fan_in).
    """
    weight = layer.weight.detach()
    if weight.is_meta:  # a shape-only twin (sdfa.costs): there is nothing to draw
        return torch.empty_like(weight)
    if scale is None:
        rms = _rms(weight).item()
        scale = math.sqrt(3) * rms if rms > 0 else 1.0 / math.sqrt(weight[0].numel())
    return fb.draw(tuple(weight.shape), scale, "uniform", gen).to(weight)


def _half_normal(layer: nn.Module, gen: torch.Generator) -> torch.Tensor:
    """|N(0, 1)| of W's shape (mean square 1): the random magnitudes of brsf and frsf."""
    weight = layer.weight
    if weight.is_meta:
        return torch.empty_like(weight)
    values = torch.randn(weight.shape, generator=gen, device=gen.device, dtype=weight.dtype)
    return values.abs_().to(weight.device)


def _uses_feedback(layer: nn.Module, args: tuple) -> bool:
    """Will this forward pass send an error through B? Training mode, autograd on (not inside
    ``backprop()``) and an input that needs a gradient (not so for the first layer)."""
    x = args[0] if args else None
    return (
        layer.training
        and torch.is_grad_enabled()
        and not backprop_enabled()
        and isinstance(x, torch.Tensor)
        and x.requires_grad
    )


def _noise_generator(layer: nn.Module) -> torch.Generator:
    """The layer's own seeded generator for per-step draws, on the device of its weight."""
    gen = layer.noise_generator
    if gen.device != layer.weight.device and not layer.weight.is_meta:
        seed = int(torch.randint(2**62, (1,), generator=gen))
        gen = layer.noise_generator = torch.Generator(layer.weight.device).manual_seed(seed)
    return gen


@register_rule
class FA(LayerwiseRule):
    """Feedback alignment: a fixed random B of W's shape replaces W (input gradient delta @ B)."""

    name = "fa"
    paper = "Lillicrap, Cownden, Tweed, Akerman 2016"
    learned_feedback = False

    def setup(self, layer, gen):
        layer.register_buffer("feedback", _random_feedback(layer, gen, self.config["scale"]))

    def feedback_parts(self, layer, out=None):
        return layer.feedback, None


class SignConcordant(LayerwiseRule):
    """Base of the rules whose B is built from sign(W) at every step (usf, frsf).

    ``refresh=N`` (default 1) rebuilds B from W only every N backward passes of a layer and holds
    it in between: the passes over W that build B (sign, the RMS amplitude, frsf's product with
    M) then cost 1/N of their per-step price, and B lags W by at most N - 1 steps. The held B
    and the count travel in the state_dict (the layer's extra state), so a resumed run uses the
    same B at every step as an uninterrupted one.
    """

    options = {"scale": None, "refresh": 1}
    learned_feedback = False
    derived_feedback = True

    def __init__(self, **options):
        super().__init__(**options)
        refresh = self.refresh
        if isinstance(refresh, bool) or not isinstance(refresh, int) or refresh < 1:
            raise ValueError(
                f"rule {self.name!r}: refresh must be a whole number >= 1 (rebuild B from W "
                f"every that many steps); got {refresh!r}"
            )

    @property
    def refresh(self) -> int:
        return self.config.get("refresh", 1)

    def setup(self, layer, gen):
        if self.refresh > 1:
            layer.feedback_age = 0  # backward passes since convert; B is rebuilt at multiples

    def signs(self, layer: nn.Module, out: torch.Tensor | None) -> torch.Tensor:
        """B / h, built from the current W (into ``out`` when given)."""
        raise NotImplementedError

    def feedback_parts(self, layer, out=None):
        return self.signs(layer, out), _sign_amplitude(self, layer)


@register_rule
class USF(SignConcordant):
    """Uniform sign-concordant feedback: B = h sign(W), one amplitude h per layer."""

    name = "usf"
    paper = "Liao, Leibo, Poggio 2016; Xiao, Chen, Liao, Poggio 2018"

    def signs(self, layer, out):
        return torch.sign(layer.weight.detach(), out=out)


@register_rule
class FRSF(SignConcordant):
    """Fixed random-magnitude sign-concordant feedback: B = h M * sign(W), M >= 0 drawn once."""

    name = "frsf"
    paper = "Liao, Leibo, Poggio 2016"

    def setup(self, layer, gen):
        layer.register_buffer("magnitude", _half_normal(layer, gen))
        super().setup(layer, gen)

    def signs(self, layer, out):
        return torch.sign(layer.weight.detach(), out=out).mul_(layer.magnitude)


@register_rule
class BRSF(FRSF):
    """Batchwise random-magnitude sign-concordant feedback: B = h M * sign(W), new M each step.

    M is redrawn before every training forward pass that sends an error down, from the layer's
    own seeded generator.
    """

    name = "brsf"
    paper = "Liao, Leibo, Poggio 2016"
    options = {"scale": None}  # B changes every step by design: nothing to refresh
    derived_feedback = False  # M is redrawn per forward pass: B is fixed when the forward runs

    def setup(self, layer, gen):
        super().setup(layer, gen)
        layer.noise_generator = gen
        layer.register_forward_pre_hook(self.redraw)

    def redraw(self, layer, args):
        if _uses_feedback(layer, args):
            layer.magnitude = _half_normal(layer, _noise_generator(layer))


@register_rule
class KP(FA):
    """Kolen-Pollack: B starts random and receives W's gradient, so with weight decay B -> W.

    B is a parameter of the layer (``feedback``): create the optimizer after ``convert`` so that
    it steps B like W; the difference W - B then shrinks by the weight decay factor every step.
    """

    name = "kp"
    paper = "Kolen, Pollack 1994; Akrout, Wilson, Humphreys, Lillicrap, Tweed 2019"
    learned_feedback = True  # B takes W's gradient in every layer, the first one included

    def setup(self, layer, gen):
        feedback = _random_feedback(layer, gen, self.config["scale"])
        layer.register_parameter("feedback", nn.Parameter(feedback))


@register_rule
class WM(FA):
    """Weight mirror: before each training forward pass, B moves to the layer's noise response.

    The layer is driven with ``samples`` input noise vectors xi ~ N(0, I) (one receptive field
    each); its linear response y = W xi gives y^T xi / samples, an unbiased estimate of W, and
    B <- (1 - rate) B + rate * estimate: B follows W without ever reading it.
    """

    name = "wm"
    paper = "Akrout, Wilson, Humphreys, Lillicrap, Tweed 2019"
    options = {"scale": None, "samples": 64, "rate": 0.1}

    def __init__(self, **options):
        super().__init__(**options)
        samples, rate = self.config["samples"], self.config["rate"]
        if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
            raise ValueError(f"rule 'wm': samples must be a positive integer; got {samples!r}")
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 < rate <= 1:
            raise ValueError(f"rule 'wm': rate must be a number in (0, 1]; got {rate!r}")

    def setup(self, layer, gen):
        super().setup(layer, gen)
        layer.noise_generator = gen
        layer.register_forward_pre_hook(self.mirror)

    def mirror(self, layer, args):
        if not _uses_feedback(layer, args) or layer.weight.is_meta:  # meta: a shape-only twin
            return
        weight = layer.weight.detach().flatten(1)
        samples, rate = self.config["samples"], self.config["rate"]
        gen = _noise_generator(layer)
        noise = torch.randn(samples, weight.shape[1], generator=gen, device=gen.device,
                            dtype=weight.dtype)
        estimate = (noise @ weight.t()).t() @ noise / samples
        # a new tensor, not an in-place update: a pending backward pass keeps the B it used
        layer.feedback = torch.lerp(layer.feedback, estimate.view_as(layer.feedback), rate)
