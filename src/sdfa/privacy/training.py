"""Private runs of ``sdfa train``: the configuration check and the callback that makes a run
private (``--privacy dp-dfa --epsilon 2 --delta 1e-5``). Both read the run's configuration by its
attribute names only, so this module depends on the training core, not on the app.

The callback wraps the trainer's model, optimizer and data loader with :class:`PrivacyEngine`
when training starts, adds ``epsilon`` and ``delta`` to every epoch's row (metrics.csv,
TensorBoard) and the privacy figures to summary.json, and keeps the accountant and the adaptive
thresholds in checkpoints. The noise and the Poisson sampling come from secrets that are never
written anywhere (``privacy_noise``, :mod:`sdfa.privacy.randomness`): a resumed run continues
the same accounting with fresh secret noise. It also replaces the input normalization, whose
statistics the data pipeline computes from the training split without privacy, by a fixed one.
"""

from __future__ import annotations

import dataclasses
import math
import sys

import torch

from ..training import Callback
from .engine import (
    ACCOUNTANTS,
    GDP_REFUSED,
    METHODS,
    PrivacyEngine,
    _check_budget,
    _check_options,
)
from .randomness import NOISE_SOURCES, check_secure_available

RULE_OF = {"dp-sgd": "bp", "dp-dfa": "dfa", "dp-noisy-projection": "dfa"}
# What `sdfa train` uses for an option that privacy_options leaves out (the library requires
# them): Opacus's usual gradient clip, and for the first layer's input the bound that the fixed
# normalization implies (see run_options).
RUN_DEFAULTS = {"dp-sgd": {"max_grad_norm": 1.0}, "dp-dfa": {}, "dp-noisy-projection": {}}
NOT_PRIVATE = (
    "privacy: this run is NOT private: privacy_noise = 'seeded' draws the noise and the Poisson "
    "sampling from the run's seed, which config.toml and summary.json publish, so anyone with "
    "the other examples can replay it and tell whether an example was used. Use it to debug only."
)


def data_independent_normalization(data):
    """``data`` normalized from [0, value_range] to [-1, 1] in every channel.

    The pipeline's usual mean and standard deviation are statistics of the (private) training
    split released without noise, and the trained model depends on them; fixed constants keep
    the whole run within the accounted budget.
    """
    channels = data.input_shape[0]
    return dataclasses.replace(data, mean=(0.5,) * channels, std=(0.5,) * channels)


def run_options(method: str, input_shape, options: dict) -> dict:
    """``options`` completed with the defaults of ``sdfa train``.

    ``max_input_norm`` defaults to sqrt(number of input values): after
    :func:`data_independent_normalization` every value lies in [-1, 1], so this bound holds for
    every input and its clip never acts. ``dp-sgd`` clips gradients to ``max_grad_norm`` 1.
    """
    defaults = dict(RUN_DEFAULTS[method])
    if method != "dp-sgd":
        defaults["max_input_norm"] = math.sqrt(math.prod(input_shape))
    return {**defaults, **options}


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
    if config.accountant == "gdp" and config.epsilon is not None:
        raise ValueError(GDP_REFUSED)
    if config.privacy_noise not in NOISE_SOURCES:
        raise ValueError(f"privacy_noise must be one of {', '.join(NOISE_SOURCES)}; "
                         f"got {config.privacy_noise!r}")
    if config.privacy_noise == "secure":
        check_secure_available()
    _check_options(method, {**RUN_DEFAULTS[method], **config.privacy_options})


class PrivacyCallback(Callback):
    """Trains a :class:`sdfa.training.Trainer` run privately, as its configuration says."""

    name = "privacy"

    def __init__(self, config):
        self.config = config
        self.engine: PrivacyEngine | None = None
        self.loader = None
        self.options: dict = {}
        self.noise: torch.Generator | None = None  # only for privacy_noise = "seeded"
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
        loader = trainer.train_loader
        seeded = c.privacy_noise == "seeded"
        if seeded:  # reproducible, and so NOT private: the seed is published
            print(NOT_PRIVATE, file=sys.stderr)
            self.noise = torch.Generator(trainer.device).manual_seed(c.seed)
            if loader.generator is not None:  # Poisson sampling draws from it
                loader.generator.manual_seed((1_000_003 * c.seed + 1) % 2**64)
        self.engine = PrivacyEngine(accountant=c.accountant,
                                    secure_mode=c.privacy_noise == "secure")
        self.options = run_options(c.privacy, trainer.task.input_shape, dict(c.privacy_options))
        common = dict(module=trainer.model, optimizer=trainer.optimizer, data_loader=loader,
                      method=c.privacy, noise_generator=self.noise,
                      input_shape=trainer.task.input_shape, **self.options)
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
            if seeded and "noise" in self.restored:
                self.noise.set_state(self.restored["noise"])
                if self.restored.get("sampling") is not None:
                    self.loader.batch_sampler.generator.set_state(self.restored["sampling"])

    def on_epoch_end(self, trainer, row: dict) -> None:
        row["epsilon"] = self.engine.get_epsilon(self.config.delta)
        row["delta"] = self.config.delta

    def on_train_end(self, trainer, summary: dict) -> None:
        private = self.engine.noise_source != "seeded"
        summary.update(
            privacy=self.config.privacy,
            epsilon=self.engine.get_epsilon(self.config.delta),
            delta=self.config.delta,
            noise_multiplier=self.engine.noise_multiplier,
            accountant=self.config.accountant,
            privacy_steps=self.engine.steps,
            privacy_noise=self.engine.noise_source,
            private=private,
            privacy_options=self.options,
        )
        if not private:
            print(NOT_PRIVATE, file=sys.stderr)

    def state_dict(self) -> dict:
        """The accountant and the thresholds; the generators' states only when seeded (the
        secret ones never leave memory)."""
        state = {"engine": self.engine.state_dict()}
        if self.engine.noise_source == "seeded":
            sampler = getattr(self.loader.batch_sampler, "generator", None)
            state.update(noise=self.noise.get_state(),
                         sampling=sampler.get_state() if sampler is not None else None)
        return state

    def load_state_dict(self, state: dict) -> None:
        self.restored = state or None
