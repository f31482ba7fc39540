"""AlexNet with BatchNorm (Krizhevsky 2014 "one weird trick" layout, as in torchvision).

Following Xiao, Chen, Liao, Poggio (2018), who trained it with sign-symmetric feedback: a
BatchNorm before every ReLU, no bias in the layers that a BatchNorm follows, no dropout.
``batchnorm=False`` gives the plain network (biases, no normalization, still no dropout).
"""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

from .registry import register_model


@register_model("alexnet")
def alexnet(input_shape, num_classes, hidden=4096, batchnorm=True) -> nn.Sequential:
    """AlexNet with BatchNorm: 5 convolutions (64-192-384-256-256), fc1, fc2 (``hidden``), fc3.

    The output layer is ``classifier.fc3``.

    Needs images of at least 63x63 pixels (224x224 for ImageNet); the features are average
    pooled to 6x6 as in torchvision, so fc1 always reads 256 x 6 x 6 values.
    """
    if len(input_shape) != 3:
        raise ValueError(f"alexnet needs images (channels, height, width); got shape {input_shape}")
    channels, height, width = input_shape
    if min(height, width) < 63:
        raise ValueError(f"alexnet needs images of at least 63x63 pixels; got {height}x{width}")

    def conv(in_channels, channels, kernel_size, stride=1, padding=1):
        conv = nn.Conv2d(in_channels, channels, kernel_size, stride, padding, bias=not batchnorm)
        return [conv, nn.BatchNorm2d(channels), nn.ReLU()] if batchnorm else [conv, nn.ReLU()]

    def fc(name, in_features):
        parts = [(name, nn.Linear(in_features, hidden, bias=not batchnorm))]
        if batchnorm:
            parts.append((f"{name}_bn", nn.BatchNorm1d(hidden)))
        return parts + [(f"{name}_act", nn.ReLU())]

    features = nn.Sequential(
        *conv(channels, 64, 11, stride=4, padding=2),
        nn.MaxPool2d(3, 2),
        *conv(64, 192, 5, padding=2),
        nn.MaxPool2d(3, 2),
        *conv(192, 384, 3),
        *conv(384, 256, 3),
        *conv(256, 256, 3),
        nn.MaxPool2d(3, 2),
        nn.AdaptiveAvgPool2d(6),
        nn.Flatten(),
    )
    head = [*fc("fc1", 256 * 6 * 6), *fc("fc2", hidden), ("fc3", nn.Linear(hidden, num_classes))]
    classifier = nn.Sequential(OrderedDict(head))
    return nn.Sequential(OrderedDict([("features", features), ("classifier", classifier)]))
