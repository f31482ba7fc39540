"""Named model presets: ``build_model("resnet20", input_shape=(3, 32, 32), num_classes=10)``.

Each preset is a plain function registered with :func:`register_model` that returns an ordinary
``nn.Module`` (plain torch, no torchvision), ready for ``sdfa.convert``.
"""

from ..spiking import models as _spiking  # noqa: F401  (registers snn-mlp, snn-conv)
from ..spiking import sfdfa as _sfdfa  # noqa: F401  (registers sfdfa-mlp, 'sfdfa', 'spike-count')

# importing each preset module registers its presets
from . import alexnet, crafton, gcn, lenet, mlp, resnet, roy2025, sequence  # noqa: F401
from .registry import MODELS, available_models, build_model, model_options, register_model

__all__ = ["MODELS", "available_models", "build_model", "model_options", "register_model"]
