"""Named model presets: ``build_model("resnet20", input_shape=(3, 32, 32), num_classes=10)``.

Each preset is a plain function registered with :func:`register_model` that returns an ordinary
``nn.Module`` (plain torch, no torchvision), ready for ``sdfa.convert``.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from ..registry import Registry

MODELS: Registry[Callable[..., nn.Module]] = Registry("model")


def register_model(name: str):
    """Decorator: make a builder ``f(input_shape, num_classes, **kwargs) -> nn.Module`` a preset.

    Raises:
        ValueError: a preset of that name is registered already.
    """
    return MODELS.register(name)


def available_models() -> list[str]:
    return sorted(MODELS)


def build_model(name: str, input_shape: tuple[int, ...], num_classes: int, **kwargs) -> nn.Module:
    """Build the preset ``name`` for inputs of ``input_shape`` (no batch) and ``num_classes``."""
    if name not in MODELS:
        raise ValueError(
            f"unknown model {name!r}; available models: {', '.join(available_models())}"
        )
    return MODELS[name](tuple(input_shape), num_classes, **kwargs)


from . import alexnet, crafton, lenet, mlp, resnet  # noqa: E402,F401  (registers the presets)
