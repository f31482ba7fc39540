"""Learning rules and their registry.

A rule decides one thing: what a trainable layer sends back towards its input in the backward
pass (see ``shared/DESIGN.md``). Each rule is a small class registered by name; ``convert()``
looks the name up, builds the rule with the user's options and lets it ``apply`` itself to the
trainable layers (nn.Linear, nn.Conv2d) of its part of the model.

* layer-wise rules (:class:`LayerwiseRule`) swap each layer for a :mod:`sdfa.layers` twin whose
  backward uses ``rule.feedback(layer)`` in place of W;
* ``dfa`` (:mod:`sdfa.dfa`) cuts the chain between layers and sends the output error straight to
  every hidden block through fixed random matrices.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from . import feedback as fb
from .layers import FEEDBACK_LAYERS

RULES: dict[str, type[Rule]] = {}


def register_rule(cls: type[Rule]) -> type[Rule]:
    """Class decorator: make ``cls`` available to ``convert()`` under ``cls.name``."""
    RULES[cls.name] = cls
    return cls


def available_rules() -> list[str]:
    """Names of every registered rule."""
    return sorted(RULES)


class Rule:
    """Base class. ``options`` maps each keyword the rule accepts to its default."""

    name: str = ""
    paper: str = ""
    options: dict[str, object] = {}

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
    """Direct feedback alignment: hidden block outputs receive ``e @ B_l`` (dense, sparse or low rank)."""

    name = "dfa"
    paper = "Nokland 2016; sparse: Crafton, Parihar, Gebhardt, Raychowdhury 2019"
    options = {
        "k": None,
        "rank": None,
        "init": "uniform",
        "scale": None,
        "output": None,
        "boundaries": None,
        "example_input": None,
    }

    def apply(self, model, layers, seed):
        from .dfa import DirectFeedbackAlignment

        DirectFeedbackAlignment(model, layers, seed=seed, **self.config)
        return model


class LayerwiseRule(Rule):
    """Error travels layer by layer, through ``feedback(layer)`` instead of W.

    Subclasses implement ``setup`` (register the feedback buffers / parameters on a layer) and
    ``feedback`` (the tensor of W's shape used for the input gradient at this step).
    """

    def apply(self, model, layers, seed):
        for name, module in layers:
            swapped = FEEDBACK_LAYERS[type(module)].from_module(module, self)
            self.setup(swapped, fb.generator(seed, name))
            if not name:
                return swapped
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, swapped)
        return model

    def setup(self, layer: nn.Module, gen: torch.Generator) -> None:
        pass

    def feedback(self, layer: nn.Module) -> torch.Tensor:
        raise NotImplementedError


def _fan_in(weight: torch.Tensor) -> int:
    return weight[0].numel()


def _random_like(weight: torch.Tensor, gen: torch.Generator, scale: float | None) -> torch.Tensor:
    """U(-h, h) with PyTorch's default h = 1/sqrt(fan_in) unless ``scale`` is given."""
    if weight.is_meta:  # a shape-only twin (sdfa.costs): there is nothing to draw
        return torch.empty_like(weight)
    h = scale if scale is not None else 1.0 / math.sqrt(_fan_in(weight))
    values = fb.draw(tuple(weight.shape), h, "uniform", gen)
    return values.to(dtype=weight.dtype, device=weight.device)


@register_rule
class FA(LayerwiseRule):
    """Feedback alignment: a fixed random B replaces W (B has W's shape; the input gradient is delta B)."""

    name = "fa"
    paper = "Lillicrap, Cownden, Tweed, Akerman 2016"
    options = {"scale": None}

    def setup(self, layer, gen):
        layer.register_buffer("feedback", _random_like(layer.weight, gen, self.config["scale"]))

    def feedback(self, layer):
        return layer.feedback


@register_rule
class USF(LayerwiseRule):
    """Uniform sign-concordant feedback: B = scale * sign(W), one scale per layer."""

    name = "usf"
    paper = "Liao, Leibo, Poggio 2016; Moskovitz, Litwin-Kumar, Abbott 2018"
    options = {"scale": None}

    def feedback(self, layer):
        scale = self.config["scale"]
        if scale is None:
            scale = 1.0 / math.sqrt(_fan_in(layer.weight))
        return torch.sign(layer.weight.detach()) * scale
