"""The training core: a loop that any task, strategy and callback plugs into.

It imports no feature (privacy, alignment logging, several processes): those plug in from
outside as :class:`Callback` s and :class:`Strategy` s; what is learned is a task
(:mod:`sdfa.tasks`). :mod:`sdfa.app` builds runs from a configuration.
"""

from .callbacks import Callback, CallbackList
from .checkpoint import CheckpointError, load_checkpoint, save_atomic, write_atomic, write_text
from .loaders import EpochBatches, epoch_loader
from .logging import MetricsLog
from .strategy import Strategy
from .trainer import CHECKPOINT_FORMAT, DIVERGENCE_FACTOR, Trainer, TrainingDiverged

__all__ = [
    "CHECKPOINT_FORMAT",
    "DIVERGENCE_FACTOR",
    "Callback",
    "CallbackList",
    "CheckpointError",
    "EpochBatches",
    "MetricsLog",
    "Strategy",
    "Trainer",
    "TrainingDiverged",
    "epoch_loader",
    "load_checkpoint",
    "save_atomic",
    "write_atomic",
    "write_text",
]
