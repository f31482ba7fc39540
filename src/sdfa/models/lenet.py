"""LeNet-5 style convolutional network (LeCun et al. 1998), for small images of any size."""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

from .mlp import ACTIVATIONS
from .registry import register_model


@register_model("lenet5")
def lenet5(input_shape, num_classes, activation="relu", batchnorm=False) -> nn.Sequential:
    """LeNet-5 style: conv5x5(6)-pool-conv5x5(16)-pool-fc120-fc84-fc3; images of >= 4x4 pixels.

    Both convolutions pad by 2 ("same"), so any image size works: 28x28 MNIST gives 16x7x7
    features, 32x32 CIFAR 16x8x8, 8x8 digits 16x2x2. ``batchnorm=True`` puts a BatchNorm after
    every convolution and hidden linear layer (before the activation). Layers are named conv1,
    conv2, fc1, fc2 and fc3 (the output layer).
    """
    if len(input_shape) != 3:
        raise ValueError(f"lenet5 needs images (channels, height, width); got shape {input_shape}")
    channels, height, width = input_shape
    if height < 4 or width < 4:
        raise ValueError(f"lenet5 needs images of at least 4x4 pixels; got {height}x{width}")
    if activation not in ACTIVATIONS:
        raise ValueError(
            f"unknown activation {activation!r}; choose one of {', '.join(ACTIVATIONS)}"
        )

    def block(name, layer, size, norm):
        parts = [(name, layer)]
        if batchnorm:
            parts.append((f"{name}_bn", norm(size)))
        return parts + [(f"{name}_act", ACTIVATIONS[activation]())]

    flat = 16 * (height // 4) * (width // 4)
    layers = [
        *block("conv1", nn.Conv2d(channels, 6, 5, padding=2), 6, nn.BatchNorm2d),
        ("pool1", nn.MaxPool2d(2)),
        *block("conv2", nn.Conv2d(6, 16, 5, padding=2), 16, nn.BatchNorm2d),
        ("pool2", nn.MaxPool2d(2)),
        ("flatten", nn.Flatten()),
        *block("fc1", nn.Linear(flat, 120), 120, nn.BatchNorm1d),
        *block("fc2", nn.Linear(120, 84), 84, nn.BatchNorm1d),
        ("fc3", nn.Linear(84, num_classes)),
    ]
    return nn.Sequential(OrderedDict(layers))
