"""The registry of model presets (the preset modules import it; it imports none of them)."""

from __future__ import annotations

import inspect
from collections.abc import Callable

from torch import nn

from ..registry import Registry

MODELS: Registry[Callable[..., nn.Module]] = Registry("model")


def register_model(name: str):
    """Decorator: make a builder ``f(input_shape, num_classes, **options) -> nn.Module`` a preset
    (its keyword arguments, with their defaults, are the preset's options). A name is taken once."""
    return MODELS.register(name)


def available_models() -> list[str]:
    return sorted(MODELS)


def model_options(name: str) -> dict[str, object]:
    """The options of preset ``name`` with their defaults (keyword arguments of its builder)."""
    builder = _builder(name)
    params = list(inspect.signature(builder).parameters.values())[2:]  # after shape, classes
    return {p.name: p.default for p in params if p.kind is not p.VAR_KEYWORD}


def build_model(name: str, input_shape: tuple[int, ...], num_classes: int, **kwargs) -> nn.Module:
    """Build the preset ``name`` for inputs of ``input_shape`` (no batch) and ``num_classes``.

    Raises:
        ValueError: an unknown preset, or an option it does not take (the message lists them).
    """
    builder = _builder(name)
    options = model_options(name)
    unknown = sorted(set(kwargs) - set(options))
    if unknown:
        takes = ", ".join(f"{k}={v!r}" for k, v in options.items()) or "no options"
        raise ValueError(
            f"model {name!r}: bad model options: it takes no option {', '.join(unknown)}; its "
            f"options: {takes}"
        )
    return builder(tuple(input_shape), num_classes, **kwargs)


def _builder(name: str):
    return MODELS.lookup(name)

