"""A small three-layer CNN for the SVD-space alignment experiments (``sdfa reproduce roy2025``)."""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

from .mlp import ACTIVATIONS
from .registry import register_model


@register_model("roy2025-cnn")
def roy2025_cnn(input_shape, num_classes, channels=(16, 32, 64), activation="relu"):
    """Three conv3x3 (padding 1) + activation + 2x2 max-pool blocks, then one Linear classifier.

    Roy et al. 2025 train "a 3-layer CNN"; its exact widths were not available to us, so these
    are ours, sized for a CPU: 28x28 images give 64x3x3 features, 8x8 digits 64x1x1. Layers are
    named conv1..conv3 and fc (the output layer).
    """
    if len(input_shape) != 3 or min(input_shape[1:]) < 8:
        raise ValueError(
            f"roy2025-cnn needs images (channels, height, width) of at least 8x8; got {input_shape}"
        )
    if len(channels) != 3 or any(not isinstance(c, int) or c < 1 for c in channels):
        raise ValueError(f"channels must be three positive ints; got {channels!r}")
    if activation not in ACTIVATIONS:
        raise ValueError(
            f"unknown activation {activation!r}; choose one of {', '.join(ACTIVATIONS)}"
        )
    layers, previous = [], input_shape[0]
    for i, width in enumerate(channels, 1):
        layers += [(f"conv{i}", nn.Conv2d(previous, width, 3, padding=1)),
                   (f"act{i}", ACTIVATIONS[activation]()), (f"pool{i}", nn.MaxPool2d(2))]
        previous = width
    flat = previous * (input_shape[1] // 8) * (input_shape[2] // 8)
    layers += [("flatten", nn.Flatten()), ("fc", nn.Linear(flat, num_classes))]
    return nn.Sequential(OrderedDict(layers))
