"""Named model presets: ``build_model("resnet20", input_shape=(3, 32, 32), num_classes=10)``.

Each preset is a plain function registered with :func:`register_model` that returns an ordinary
``nn.Module`` (plain torch, no torchvision), ready for ``sdfa.convert``.
"""

from . import alexnet, crafton, lenet, mlp, resnet, sequence  # noqa: F401  (registers the presets)
from .registry import MODELS, available_models, build_model, model_options, register_model

__all__ = ["MODELS", "available_models", "build_model", "model_options", "register_model"]
