"""Model presets: architecture (parameter counts of the published networks), shapes, errors."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sdfa
from sdfa.app.cli import main
from sdfa.layers import FeedbackLayer
from sdfa.models import available_models, build_model
from sdfa.models.resnet import PadShortcut

pytestmark = pytest.mark.usefixtures("one_thread")


def count(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    "name, input_shape, classes, kwargs, expected",
    [
        # torchvision's counts for the same architectures
        ("resnet18", (3, 224, 224), 1000, {}, 11_689_512),
        ("resnet50", (3, 224, 224), 1000, {}, 25_557_032),
        ("alexnet", (3, 224, 224), 1000, {"batchnorm": False}, 61_100_840),
        # by hand: BN variant = convs without bias + BN(2 per channel) + fc1/fc2 without bias + BN
        ("alexnet", (3, 224, 224), 1000, {},
         23232 + 307200 + 663552 + 884736 + 589824 + 2304 + 37748736 + 8192 + 16777216 + 8192
         + 4097000),
        # He et al. 2016, Table 6: 0.27M, 0.46M, 0.85M (exact: convs + BN + fc)
        ("resnet20", (3, 32, 32), 10, {}, 269_722),
        ("resnet32", (3, 32, 32), 10, {}, 464_154),
        ("resnet56", (3, 32, 32), 10, {}, 853_018),
        # option B adds two 1x1 projections with BN: 16*32 + 64 and 32*64 + 128
        ("resnet20", (3, 32, 32), 10, {"shortcut": "projection"}, 269_722 + 576 + 2176),
        # LeNet-5 style on MNIST: 156 + 2416 + 784*120+120 + 120*84+84 + 84*10+10
        ("lenet5", (1, 28, 28), 10, {}, 156 + 2416 + 94200 + 10164 + 850),
    ],
)
def test_parameter_counts(name, input_shape, classes, kwargs, expected):
    assert count(build_model(name, input_shape, classes, **kwargs)) == expected


@pytest.mark.parametrize(
    "name, input_shape, kwargs",
    [
        ("lenet5", (1, 8, 8), {}),
        ("lenet5", (1, 28, 28), {"batchnorm": True, "activation": "tanh"}),
        ("lenet5", (3, 32, 32), {}),
        ("resnet20", (1, 8, 8), {}),
        ("resnet20", (3, 32, 32), {"shortcut": "projection"}),
        ("resnet56", (3, 32, 32), {}),
        ("resnet18", (3, 32, 32), {}),
        ("resnet50", (3, 32, 32), {}),
        ("alexnet", (3, 63, 63), {"hidden": 32}),
    ],
)
def test_presets_run_with_a_layerwise_rule(name, input_shape, kwargs):
    torch.manual_seed(0)
    model = sdfa.convert(build_model(name, input_shape, 7, **kwargs), "usf")
    trainable = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    assert trainable and all(isinstance(m, FeedbackLayer) for m in trainable)
    out = model(torch.randn(2, *input_shape))
    assert out.shape == (2, 7)
    F.cross_entropy(out, torch.tensor([0, 6])).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_option_a_shortcut_subsamples_and_zero_pads():
    x = torch.randn(2, 4, 6, 6)
    y = PadShortcut(4, 2)(x)
    assert y.shape == (2, 8, 3, 3)
    assert torch.equal(y[:, 2:6], x[:, :, ::2, ::2])
    assert not y[:, :2].any() and not y[:, 6:].any()
    block = build_model("resnet20", (3, 32, 32), 10).layer2[0]
    assert isinstance(block.shortcut, PadShortcut)
    block = build_model("resnet20", (3, 32, 32), 10, shortcut="projection").layer2[0]
    assert isinstance(block.shortcut[0], nn.Conv2d) and block.shortcut[0].stride == (2, 2)


def test_output_layer_names():
    assert isinstance(build_model("resnet20", (3, 32, 32), 10).fc, nn.Linear)
    assert isinstance(build_model("resnet18", (3, 32, 32), 10).fc, nn.Linear)
    assert build_model("lenet5", (1, 8, 8), 10).fc3.out_features == 10
    assert build_model("alexnet", (3, 63, 63), 10, hidden=8).classifier.fc3.out_features == 10


@pytest.mark.parametrize(
    "name, input_shape, kwargs, message",
    [
        ("lenet5", (64,), {}, "needs images"),
        ("lenet5", (1, 3, 8), {}, "at least 4x4"),
        ("lenet5", (1, 8, 8), {"activation": "gelu"}, "unknown activation"),
        ("alexnet", (3, 32, 32), {}, "at least 63x63"),
        ("resnet20", (3, 32, 32), {"shortcut": "C"}, "shortcut must be"),
        ("resnet50", (32, 32), {}, "needs images"),
        ("resnet34", (3, 32, 32), {},
         "unknown model 'resnet34' \\(did you mean 'resnet32'\\?\\); available models: alexnet"),
    ],
)
def test_bad_arguments_raise_clear_errors(name, input_shape, kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_model(name, input_shape, 10, **kwargs)


def test_cli_lists_the_presets(capsys):
    assert main(["models"]) == 0
    listed = capsys.readouterr().out
    for name in ("lenet5", "resnet20", "resnet32", "resnet56", "resnet18", "resnet50", "alexnet"):
        assert name in available_models() and name in listed
