"""Residual networks (He, Zhang, Ren, Sun 2016), written with plain torch.

* CIFAR ResNet-20/32/56 (paper section 4.2): a 3x3 stem of 16 channels, three stages of n basic
  blocks (16, 32, 64 channels, depth 6n + 2), global average pooling, one linear layer. Shortcuts
  that change the shape subsample and zero-pad the channels (the paper's option A) unless
  ``shortcut="projection"`` (option B: 1x1 convolution + BatchNorm).
* ImageNet ResNet-18/50: the 7x7 stem with max pooling, four stages of basic (18) or bottleneck
  (50) blocks with projection shortcuts, as in torchvision (stride on the 3x3 convolution).

Every block adds its shortcut to its residual branch in ``forward``, so a layer-wise rule trains
each convolution (shortcut projections included) and autograd adds the two error paths. The
output layer is ``fc``. Convolutions start from He initialization (fan-out mode), BatchNorm from
weight 1 and bias 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .registry import register_model


def _conv_bn(in_channels, out_channels, kernel_size, stride=1) -> list[nn.Module]:
    conv = nn.Conv2d(
        in_channels, out_channels, kernel_size, stride, padding=kernel_size // 2, bias=False
    )
    return [conv, nn.BatchNorm2d(out_channels)]


class PadShortcut(nn.Module):
    """Option A shortcut: subsample by ``stride`` and append zero channels (no parameters)."""

    def __init__(self, extra_channels: int, stride: int):
        super().__init__()
        self.extra, self.stride = extra_channels, stride

    def forward(self, x):
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2))


def _shortcut(in_channels, out_channels, stride, kind) -> nn.Module:
    if stride == 1 and in_channels == out_channels:
        return nn.Identity()
    if kind == "pad":
        return PadShortcut(out_channels - in_channels, stride)
    return nn.Sequential(*_conv_bn(in_channels, out_channels, 1, stride))


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with BatchNorm; ReLU after the addition of the shortcut."""

    expansion = 1

    def __init__(self, in_channels, channels, stride=1, shortcut="projection"):
        super().__init__()
        self.conv1, self.bn1 = _conv_bn(in_channels, channels, 3, stride)
        self.conv2, self.bn2 = _conv_bn(channels, channels, 3)
        self.shortcut = _shortcut(in_channels, channels, stride, shortcut)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carries the stride), 1x1 expand by 4; ReLU after the addition."""

    expansion = 4

    def __init__(self, in_channels, channels, stride=1, shortcut="projection"):
        super().__init__()
        out_channels = channels * self.expansion
        self.conv1, self.bn1 = _conv_bn(in_channels, channels, 1)
        self.conv2, self.bn2 = _conv_bn(channels, channels, 3, stride)
        self.conv3, self.bn3 = _conv_bn(channels, out_channels, 1)
        self.shortcut = _shortcut(in_channels, out_channels, stride, shortcut)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        return F.relu(self.bn3(self.conv3(out)) + self.shortcut(x))


class ResNet(nn.Module):
    """A stem, stages ``layer1``..``layerN`` of residual blocks, average pooling and ``fc``."""

    def __init__(self, stem, block, widths, depths, num_classes, shortcut="projection"):
        super().__init__()
        self.stem = stem
        in_channels = stem[0].out_channels
        for index, (width, depth) in enumerate(zip(widths, depths), start=1):
            blocks = []
            for i in range(depth):
                stride = 2 if i == 0 and index > 1 else 1
                blocks.append(block(in_channels, width, stride, shortcut))
                in_channels = width * block.expansion
            self.add_module(f"layer{index}", nn.Sequential(*blocks))
        self.num_stages = len(widths)
        self.fc = nn.Linear(in_channels, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x):
        x = self.stem(x)
        for index in range(1, self.num_stages + 1):
            x = getattr(self, f"layer{index}")(x)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def _channels(name, input_shape) -> int:
    if len(input_shape) != 3:
        raise ValueError(f"{name} needs images (channels, height, width); got shape {input_shape}")
    return input_shape[0]


def _cifar_resnet(name, depth, input_shape, num_classes, shortcut):
    if shortcut not in ("pad", "projection"):
        raise ValueError(f"shortcut must be 'pad' (option A) or 'projection' (B); got {shortcut!r}")
    stem = nn.Sequential(*_conv_bn(_channels(name, input_shape), 16, 3), nn.ReLU())
    n = (depth - 2) // 6
    return ResNet(stem, BasicBlock, (16, 32, 64), (n, n, n), num_classes, shortcut)


@register_model("resnet20")
def resnet20(input_shape, num_classes, shortcut="pad"):
    """CIFAR ResNet-20 (0.27M parameters): 3 stages of 3 basic blocks, 16-32-64 channels."""
    return _cifar_resnet("resnet20", 20, input_shape, num_classes, shortcut)


@register_model("resnet32")
def resnet32(input_shape, num_classes, shortcut="pad"):
    """CIFAR ResNet-32 (0.46M parameters): 3 stages of 5 basic blocks, 16-32-64 channels."""
    return _cifar_resnet("resnet32", 32, input_shape, num_classes, shortcut)


@register_model("resnet56")
def resnet56(input_shape, num_classes, shortcut="pad"):
    """CIFAR ResNet-56 (0.85M parameters): 3 stages of 9 basic blocks, 16-32-64 channels."""
    return _cifar_resnet("resnet56", 56, input_shape, num_classes, shortcut)


def _imagenet_stem(name, input_shape) -> nn.Sequential:
    return nn.Sequential(
        *_conv_bn(_channels(name, input_shape), 64, 7, 2),
        nn.ReLU(),
        nn.MaxPool2d(3, 2, padding=1),
    )


@register_model("resnet18")
def resnet18(input_shape, num_classes):
    """ImageNet ResNet-18 (11.7M parameters): 7x7 stem, 4 stages of 2 basic blocks."""
    stem = _imagenet_stem("resnet18", input_shape)
    return ResNet(stem, BasicBlock, (64, 128, 256, 512), (2, 2, 2, 2), num_classes)


@register_model("resnet50")
def resnet50(input_shape, num_classes):
    """ImageNet ResNet-50 (25.6M parameters): 7x7 stem, 4 stages of 3-4-6-3 bottleneck blocks."""
    stem = _imagenet_stem("resnet50", input_shape)
    return ResNet(stem, Bottleneck, (64, 128, 256, 512), (3, 4, 6, 3), num_classes)
