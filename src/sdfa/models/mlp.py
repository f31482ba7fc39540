"""Fully connected networks (flattened input)."""

from __future__ import annotations

import math

from torch import nn

from .registry import register_model

ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU, "sigmoid": nn.Sigmoid}


def mlp(input_shape, num_classes, hidden=(100, 100), activation="tanh", dropout=0.0):
    """Flatten, then ``hidden`` Linear+activation(+dropout) blocks, then a Linear output layer."""
    if activation not in ACTIVATIONS:
        raise ValueError(
            f"unknown activation {activation!r}; choose one of {', '.join(ACTIVATIONS)}"
        )
    layers: list[nn.Module] = [nn.Flatten()]
    width = math.prod(input_shape)
    for size in hidden:
        layers += [nn.Linear(width, size), ACTIVATIONS[activation]()]
        if dropout:
            layers.append(nn.Dropout(dropout))
        width = size
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


@register_model("mlp")
def default_mlp(input_shape, num_classes, hidden=(100, 100), activation="tanh", dropout=0.0):
    """Two tanh hidden layers of 100 units: the quick default for small data such as digits."""
    return mlp(input_shape, num_classes, hidden, activation, dropout)
