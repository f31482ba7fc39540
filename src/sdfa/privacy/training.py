"""Private runs of ``sdfa train``: the configuration check and the callback that makes a run
private (``--privacy dp-dfa --epsilon 2 --delta 1e-5``). Both read the run's configuration by its
attribute names only, so this module depends on the training core, not on the app.

The callback wraps the trainer's model, optimizer and data loader with :class:`PrivacyEngine`
when training starts, adds ``epsilon`` and ``delta`` to every epoch's row (metrics.csv,
TensorBoard) and the privacy figures to summary.json, and keeps the accountant, the adaptive
thresholds and the sampling and noise generators in checkpoints, so a resumed run continues the
same accounting and the same random draws. It also replaces the input normalization, whose
statistics the data pipeline computes from the training split without privacy, by a fixed one.
"""

from __future__ import annotations

import dataclasses

import torch

from ..training import Callback
from .engine import ACCOUNTANTS, METHODS, PrivacyEngine, _check_budget, _check_options

RULE_OF = {"dp-sgd": "bp", "dp-dfa": "dfa", "dp-noisy-projection": "dfa"}


def data_independent_normalization(data):
    """``data`` normalized from [0, value_range] to [-1, 1] in every channel.

    The pipeline's usual mean and standard deviation are statistics of the (private) training
    split released without noise, and the trained model depends on them; fixed constants keep
    the whole run within the accounted budget.
    """
    channels = data.input_shape[0]
    return dataclasses.replace(data, mean=(0.5,) * channels, std=(0.5,) * channels)


def check_config(config) -> None:
    """Raise ValueError for a private TrainConfig that cannot run (called by ``validate``)."""
    method = config.privacy
    if method not in METHODS:
        raise ValueError(f"privacy must be one of {', '.join(METHODS)}; got {method!r}")
    if config.rule != RULE_OF[method]:
        raise ValueError(
            f"privacy {method!r} trains with rule {RULE_OF[method]!r}; got rule {config.rule!r}"
        )
    if config.transfer:
        raise ValueError("the transfer protocol pretrains on the same data without privacy: "
                         "it cannot be combined with privacy")
    if config.nproc > 1:
        raise ValueError("private training runs in one process (each process would add its "
                         "own noise): leave nproc at 1")
    if config.log_alignment:
        raise ValueError("log_alignment measures true gradients on the private data and logs "
                         "them without noise: it cannot be combined with privacy")
    if config.epsilon is None and config.noise_multiplier is None:
        raise ValueError(f"privacy {method!r} needs epsilon (a target) or noise_multiplier")
    _check_budget(1.0 if config.epsilon is None else config.epsilon, config.delta)
    if config.noise_multiplier is not None and not config.noise_multiplier >= 0:
        raise ValueError(f"noise_multiplier must be >= 0; got {config.noise_multiplier!r}")
    if config.accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {', '.join(ACCOUNTANTS)}; "
                         f"got {config.accountant!r}")
    _check_options(method, dict(config.privacy_options))


class PrivacyCallback(Callback):
    """Trains a :class:`sdfa.training.Trainer` run privately, as its configuration says."""

    name = "privacy"

    def __init__(self, config):
        self.config = config
        self.engine: PrivacyEngine | None = None
        self.loader = None
        self.noise = torch.Generator().manual_seed(config.seed)
        self.restored: dict | None = None

    def on_train_start(self, trainer) -> None:
        c = self.config
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            raise ValueError("private training runs in one process (each process would add "
                             "its own noise): run it without torchrun")
        if not hasattr(trainer.task.data, "mean"):
            raise ValueError(f"private training supports image classification, not the task "
                             f"{trainer.task.name!r}")
        trainer.task.data = data_independent_normalization(trainer.task.data)
        # Poisson sampling draws from the loader's generator: seed it with the run.
        loader = trainer.train_loader
        if loader.generator is not None:
            loader.generator.manual_seed(1_000_003 * c.seed + 1)
        self.engine = PrivacyEngine(accountant=c.accountant)
        common = dict(module=trainer.model, optimizer=trainer.optimizer, data_loader=loader,
                      method=c.privacy, noise_generator=self.noise, **c.privacy_options)
        if c.noise_multiplier is None:
            private = self.engine.make_private_with_epsilon(
                target_epsilon=c.epsilon, target_delta=c.delta, epochs=c.epochs, **common
            )
        else:
            budget = (c.epsilon, c.delta) if c.epsilon is not None else (None, None)
            private = self.engine.make_private(
                noise_multiplier=c.noise_multiplier, target_epsilon=budget[0],
                target_delta=budget[1], **common
            )
        trainer.model, trainer.optimizer, self.loader = private
        trainer.train_loader = self.loader
        steps, allowed = c.epochs * len(self.loader), self.engine.steps_within_budget
        if allowed is not None and allowed < steps:
            raise ValueError(
                f"epsilon {c.epsilon:g} at delta {c.delta:g} allows {allowed} steps with "
                f"noise_multiplier {c.noise_multiplier:g}, but {c.epochs} epochs take {steps} "
                f"(at most {allowed // len(self.loader)} epochs fit): lower epochs or add noise"
            )
        if self.restored is not None:
            self.engine.load_state_dict(self.restored["engine"])
            self.noise.set_state(self.restored["noise"])
            if self.restored["sampling"] is not None:
                self.loader.batch_sampler.generator.set_state(self.restored["sampling"])

    def on_epoch_end(self, trainer, row: dict) -> None:
        row["epsilon"] = self.engine.get_epsilon(self.config.delta)
        row["delta"] = self.config.delta

    def on_train_end(self, trainer, summary: dict) -> None:
        summary.update(
            privacy=self.config.privacy,
            epsilon=self.engine.get_epsilon(self.config.delta),
            delta=self.config.delta,
            noise_multiplier=self.engine.noise_multiplier,
            accountant=self.config.accountant,
            privacy_steps=self.engine.steps,
        )

    def state_dict(self) -> dict:
        return {
            "engine": self.engine.state_dict(),
            "noise": self.noise.get_state(),
            "sampling": getattr(self.loader.batch_sampler, "generator", None)
            and self.loader.batch_sampler.generator.get_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.restored = state or None
