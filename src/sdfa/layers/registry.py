"""The layer registry: the one table that says how the engine treats each layer type.

A registered type is a *unit*: a module that holds trainable parameters and that the rules train
as one piece (``is_trainable``). For each type the table may name

* ``twin``: its layer-wise feedback twin, a subclass of the type and of
  :class:`~sdfa.layers.FeedbackLayer` that sends ``delta @ B`` to its input (fa, usf, frsf, brsf,
  kp, wm need one; a unit without a twin can still be trained by DFA, inside its block);
* ``cost``: its cost formula for :func:`sdfa.costs`, ``cost(module, in_shape, out_shape) ->
  Work`` with the input and output shapes of a call on one sample (the batch dimension, of
  size 1, included: so a sequence layer need not know where its batch dimension is).

Modelled on Opacus's ``@register_grad_sampler(nn.Linear)``: adding a layer type is one call, the
engine never changes::

    sdfa.register_layer(MyLayer, twin=FeedbackMyLayer, cost=my_layer_cost)

Types are looked up along the class's MRO, so a subclass of a registered type is a unit too (it
is priced by its base's formula); a twin is used only for the exact type it was registered for,
since swapping the class of a subclass would drop its own forward.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from torch import nn

from ..registry import Registry


@dataclass(frozen=True)
class Work:
    """Multiply-accumulates of one call of a unit, per sample.

    ``update`` (the weight gradients, plus any backprop inside the unit) and ``error`` (the
    gradient sent to the unit's input, computed only when the input needs one) default to
    ``forward``, as for a matrix product; ``connections`` (input value, output value) pairs
    joined by a weight, the values read to send the error down, default to ``error``.
    """

    forward: int
    update: int | None = None
    error: int | None = None
    connections: int | None = None

    def __post_init__(self):
        for name in ("update", "error"):
            if getattr(self, name) is None:
                object.__setattr__(self, name, self.forward)
        if self.connections is None:
            object.__setattr__(self, "connections", self.error)


CostFormula = Callable[[nn.Module, tuple, tuple], Work]


@dataclass(frozen=True)
class LayerType:
    """One entry of the registry (see the module docstring)."""

    type: type
    twin: type | None = None
    cost: CostFormula | None = None


LAYERS: Registry[LayerType] = Registry("layer type")


def _key(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def register_layer(
    layer_type: type, *, twin: type | None = None, cost: CostFormula | None = None
) -> LayerType:
    """Make ``layer_type`` a unit that the rules train: with ``twin`` for the layer-wise rules,
    with ``cost`` for :func:`sdfa.costs`.

    Raises:
        ValueError: the type is registered already, or ``twin`` is not a subclass of both the
            type and :class:`~sdfa.layers.FeedbackLayer`.
    """
    from .base import FeedbackLayer

    if not (isinstance(layer_type, type) and issubclass(layer_type, nn.Module)):
        raise ValueError(f"register_layer takes an nn.Module subclass; got {layer_type!r}")
    if twin is not None and not (
        isinstance(twin, type) and issubclass(twin, layer_type) and issubclass(twin, FeedbackLayer)
    ):
        raise ValueError(
            f"the twin of {layer_type.__name__} must subclass both sdfa.layers.FeedbackLayer and "
            f"{layer_type.__name__}; got {twin!r}"
        )
    if cost is not None and not callable(cost):
        raise ValueError(
            f"cost must be a function (module, in_shape, out_shape) -> Work; got {cost!r}"
        )
    return LAYERS.register(_key(layer_type), LayerType(layer_type, twin, cost))


def layer_type(module: nn.Module) -> LayerType | None:
    """The registry entry of ``module``'s type or of its closest registered base class."""
    for cls in type(module).__mro__:
        entry = LAYERS.get(_key(cls))
        if entry is not None:
            return entry
    return None


def twin_of(module: nn.Module) -> type | None:
    """The layer-wise twin registered for exactly ``type(module)`` (None: it has none)."""
    entry = LAYERS.get(_key(type(module)))
    return entry.twin if entry is not None else None


def is_trainable(module: nn.Module) -> bool:
    """Is ``module`` a unit: a registered layer type that has parameters?"""
    return layer_type(module) is not None and any(True for _ in module.parameters())


def trainable_units(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(qualified name, module) of the outermost trainable units of ``model``, in registration
    order. The modules inside a unit (an attention layer's projections) belong to it."""
    inside: str | None = None
    for name, module in model.named_modules():
        if inside is not None and (inside == "" or name.startswith(inside + ".")):
            continue
        if is_trainable(module):
            inside = name
            yield name, module
