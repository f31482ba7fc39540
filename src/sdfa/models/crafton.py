"""The networks of Crafton, Parihar, Gebhardt, Raychowdhury 2019 (sparse DFA; code bcrafton/ssdfa).

All use tanh, as the paper's code does. Convolutional presets are ``features`` (the
convolutions) followed by ``classifier`` (flatten and the fully connected layers): the transfer
protocol keeps ``features`` fixed and trains ``classifier`` from scratch.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
from torch import nn

from .mlp import ACTIVATIONS, mlp
from .registry import register_model


def _conv_net(input_shape, num_classes, convs, pool, hidden, activation, dropout) -> nn.Sequential:
    """``convs``: (channels, kernel) pairs, each conv with 'same' padding and ``activation``;
    ``pool``: a max-pool factory, applied after every conv (``per_conv``) or once at the end."""
    if activation not in ACTIVATIONS:
        choices = ", ".join(ACTIVATIONS)
        raise ValueError(f"unknown activation {activation!r}; choose one of {choices}")
    layers: list[nn.Module] = []
    channels = input_shape[0]
    for out_channels, kernel in convs:
        layers += [nn.Conv2d(channels, out_channels, kernel, padding=kernel // 2)]
        layers += [ACTIVATIONS[activation]()]
        if pool["per_conv"]:
            layers.append(pool["make"]())
        channels = out_channels
    if not pool["per_conv"]:
        layers.append(pool["make"]())
    features = nn.Sequential(*layers)
    with torch.no_grad():
        flat = features(torch.zeros(1, *input_shape)).shape[1:]
    classifier = mlp(tuple(flat), num_classes, hidden, activation, dropout)
    return nn.Sequential(OrderedDict(features=features, classifier=classifier))


@register_model("crafton-mnist-fc")
def mnist_fc(input_shape, num_classes, hidden=(400,), activation="tanh", dropout=0.0):
    """MNIST fully connected 784-400-10, tanh (Crafton et al. 2019)."""
    return mlp(input_shape, num_classes, hidden=hidden, activation=activation, dropout=dropout)


@register_model("crafton-mnist-conv")
def mnist_conv(input_shape, num_classes, hidden=(128,), activation="tanh", dropout=0.0):
    """MNIST conv: 3x3x32, 3x3x64, 2x2 max pool, FC 12544-128-10, tanh (Crafton et al. 2019)."""
    pool = {"per_conv": False, "make": lambda: nn.MaxPool2d(2)}
    convs = [(32, 3), (64, 3)]
    return _conv_net(input_shape, num_classes, convs, pool, hidden, activation, dropout)


@register_model("crafton-cifar-fc")
def cifar_fc(input_shape, num_classes, hidden=(1000, 1000, 1000), activation="tanh", dropout=0.25):
    """CIFAR fully connected 3072-1000-1000-1000-C, tanh, dropout 0.25 (Crafton et al. 2019)."""
    return mlp(input_shape, num_classes, hidden=hidden, activation=activation, dropout=dropout)


@register_model("crafton-cifar-conv")
def cifar_conv(input_shape, num_classes, hidden=(2048, 2048), activation="tanh", dropout=0.0):
    """CIFAR conv: 5x5 96/128/256 each with 3x3/2 max pool, FC 4096-2048-2048-C (Crafton 2019)."""
    pool = {"per_conv": True, "make": lambda: nn.MaxPool2d(3, stride=2, padding=1)}
    convs = [(96, 5), (128, 5), (256, 5)]
    return _conv_net(input_shape, num_classes, convs, pool, hidden, activation, dropout)


def _head(input_shape, num_classes, expected, hidden, activation, dropout, name):
    if math.prod(input_shape) != expected:
        raise ValueError(
            f"crafton-{name} takes conv features of {expected} values per image (flattened); got "
            f"input shape {tuple(input_shape)}. Feed it features, e.g. a pretrained network's "
            "conv output, or use a convolutional preset."
        )
    return mlp(input_shape, num_classes, hidden=hidden, activation=activation, dropout=dropout)


@register_model("crafton-alexnet-head")
def alexnet_head(input_shape, num_classes, hidden=(4096, 4096), activation="tanh", dropout=0.5):
    """ImageNet classifier head on AlexNet conv features: 9216-4096-4096-1000 (Crafton 2019)."""
    return _head(input_shape, num_classes, 9216, hidden, activation, dropout, "alexnet-head")


@register_model("crafton-vgg-head")
def vgg_head(input_shape, num_classes, hidden=(4096, 4096), activation="tanh", dropout=0.5):
    """ImageNet classifier head on VGG conv features: 25088-4096-4096-1000 (Crafton 2019)."""
    return _head(input_shape, num_classes, 25088, hidden, activation, dropout, "vgg-head")
