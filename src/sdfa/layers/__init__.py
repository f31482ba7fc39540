"""Layer types: the registry (which modules are units, their twins and cost formulas) and the
layer-wise twins of the built-in ones.

Registered here: nn.Linear, nn.Conv1d/2d/3d and nn.ConvTranspose1d/2d/3d (with twins, so every
rule trains them); nn.Embedding, nn.RNN/LSTM/GRU, nn.MultiheadAttention,
nn.TransformerEncoderLayer/DecoderLayer (DFA trains them inside their block). Add your own with
:func:`register_layer`.
"""

from . import conv, linear, sequence, svd  # noqa: F401  (register the built-in layer types)
from .base import FeedbackLayer, backprop, backprop_enabled
from .conv import (
    FeedbackConv1d,
    FeedbackConv2d,
    FeedbackConv3d,
    FeedbackConvTranspose1d,
    FeedbackConvTranspose2d,
    FeedbackConvTranspose3d,
)
from .linear import FeedbackLinear, feedback_linear
from .registry import (
    LAYERS,
    LayerType,
    Work,
    is_trainable,
    layer_type,
    register_layer,
    trainable_units,
    twin_of,
)
from .svd import SVDConv2d, SVDLayer, SVDLinear

__all__ = [
    "LAYERS",
    "FeedbackConv1d",
    "FeedbackConv2d",
    "FeedbackConv3d",
    "FeedbackConvTranspose1d",
    "FeedbackConvTranspose2d",
    "FeedbackConvTranspose3d",
    "FeedbackLayer",
    "FeedbackLinear",
    "LayerType",
    "SVDConv2d",
    "SVDLayer",
    "SVDLinear",
    "Work",
    "backprop",
    "backprop_enabled",
    "feedback_linear",
    "is_trainable",
    "layer_type",
    "register_layer",
    "trainable_units",
    "twin_of",
]
