"""Tools behind the ``lee2020`` experiment set (``sdfa reproduce lee2020``): the tuning of each
method's settings, and two measurements that explain the comparison.

``python -m sdfa.app.lee2020 --tune``    grid search at epsilon 2 on a validation split
``python -m sdfa.app.lee2020 --signal [--group G]``  how much of its sensitivity an example's
update uses
``python -m sdfa.app.lee2020 --speed``   time per step of each method at the same batch size

Everything runs through :class:`sdfa.training.Trainer` with the set's configurations (digits, or
with --signal another group of the set, in its --quick reduction).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import tempfile
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from ..data import load_dataset, prepare_batch
from ..data.core import TensorSplit
from ..privacy.training import PrivacyCallback
from ..training import Callback
from .build import build_model, callbacks_for, seed_everything
from .config import config_from_dict
from .run import build_trainer
from .sets import LEE2020_METHODS, SETS

# The grid of --tune: each learning rate, expected batch size and epoch count, with each
# method's clipping choices.
GRID = {"lr": (3e-3, 1e-2, 3e-2), "batch_size": (64, 256), "epochs": (15, 30)}
GRID_OPTIONS = {
    "dp-sgd": [{"max_grad_norm": c} for c in (0.1, 1.0)],
    "dp-dfa": [{"max_error_norm": 0.2, "max_activation_norm": a} for a in (2.0, 3.0, 5.0)],
    "dp-noisy-projection": [{"max_activation_norm": a} for a in (2.0, 3.0, 5.0)],
}


DIGITS = "digits, MLP 64-100-100-10 tanh"


def digits_config(method: str | None, group: str = DIGITS, **values) -> dict:
    """The set's configuration of ``method`` (None: non-private DFA) in ``group`` (default the
    digits MLP; for other groups with the set's --quick reductions) with ``values``."""
    label = LEE2020_METHODS[method][0] if method else "DFA, non-private"
    chosen = SETS["lee2020"]
    for exp in chosen.experiments:
        if exp.group == group and exp.label.startswith(label):
            quick = chosen.quick if exp.quick is None else exp.quick
            return {**exp.config, **quick, **values}
    raise KeyError(f"no {label!r} in the group {group!r} of lee2020")


def fit(values: dict, data, callbacks=()) -> dict:
    """Train one configuration on ``data`` in a temporary run directory; return the summary."""
    with tempfile.TemporaryDirectory() as out:
        config = config_from_dict({**values, "out": out, "progress": False,
                                   "tensorboard": False, "threads": 1})
        seed_everything(config.seed)
        callbacks = [*callbacks, *callbacks_for(config)]
        trainer = build_trainer(config, data, build_model(config, data), Path(out), callbacks)
        with warnings.catch_warnings():  # a PyTorch note on Opacus's hooks, not about privacy
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            return trainer.fit()


def validation_digits():
    """digits with the last 20% of its training split as the test split (for tuning)."""
    data = load_dataset("digits")
    train = data.train
    n = int(0.8 * len(train))
    return dataclasses.replace(
        data,
        train=TensorSplit(train.images[:n], train.labels[:n]),
        test=TensorSplit(train.images[n:], train.labels[n:]),
    )


def tune(epsilon: float = 2.0, log=print) -> dict[str, dict]:
    """The best validation setting of each private method at ``epsilon`` (seed 0)."""
    data = validation_digits()
    best = {}
    for method, choices in GRID_OPTIONS.items():  # max_input_norm: sdfa train's default
        scored = []
        for lr, batch, epochs, options in itertools.product(*GRID.values(), choices):
            values = {"lr": lr, "batch_size": batch, "epochs": epochs, "privacy_options": options}
            summary = fit(digits_config(method, epsilon=epsilon, **values), data)
            log(f"{method:20s} {values}: validation accuracy {summary['test_accuracy']:.3f}")
            scored.append((summary["test_accuracy"], values))
        best[method] = max(scored, key=lambda pair: pair[0])[1]
        log(f"best {method}: {best[method]}")
    return best


class SignalFraction(Callback):
    """After epochs 1, middle and last: the mean over ``samples`` training examples of
    ||u_i|| / S, an example's update over the sensitivity that calibrates the noise (for
    DP-SGD: its clipped gradient over max_grad_norm). Kept in ``fractions``."""

    name = "signal_fraction"

    def __init__(self, samples: int = 200):
        self.samples = samples
        self.fractions: list[float] = []

    def on_epoch_end(self, trainer, row: dict) -> None:
        if row["epoch"] not in (1, trainer.epochs // 2, trainer.epochs):
            return
        privacy = next(cb for cb in trainer.callbacks if isinstance(cb, PrivacyCallback))
        mechanism, model = privacy.engine.mechanism, trainer.model
        data = trainer.task.data
        images, labels = data.train[: self.samples]
        x = prepare_batch(images, data)
        clip = privacy.options.get("max_grad_norm")
        model.train()
        total = 0.0
        for i in range(self.samples):
            # clears .grad, Opacus's per-example gradients and the mechanism's records: each
            # example is one backward pass, never a step
            trainer.optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(x[i : i + 1]), labels[i : i + 1], reduction="sum").backward()
            if mechanism is None:  # dp-sgd
                norm = torch.cat([p.grad_sample.flatten() for p in model.parameters()]).norm()
                total += min(norm.item(), clip) / clip
            else:
                norm = torch.cat([p.grad.flatten() for p in model.parameters()]).norm()
                total += norm.item() / mechanism.sensitivity()
        trainer.optimizer.zero_grad(set_to_none=True)
        self.fractions.append(total / self.samples)


def signal_fractions(epsilon: float = 2.0, group: str = DIGITS, data_root=None,
                     log=print) -> dict[str, list[float]]:
    """:class:`SignalFraction` for each private method with the set's settings in ``group``
    (data read from ``data_root/<data set>``, default the usual places)."""
    values = digits_config(None, group)
    data_dir = str(Path(data_root) / values["dataset"]) if data_root is not None else None
    data = load_dataset(values["dataset"], data_dir, train_samples=values.get("train_samples"),
                        test_samples=values.get("test_samples"))
    fractions = {}
    for method in LEE2020_METHODS:
        signal = SignalFraction()
        fit(digits_config(method, group, epsilon=epsilon, data_dir=data_dir), data,
            callbacks=[signal])
        fractions[method] = signal.fractions
        log(f"{method:20s} mean ||u_i|| / S after epoch 1, middle, last: "
            + " / ".join(f"{f:.2f}" for f in signal.fractions))
    return fractions


def speed(batch_size: int = 256, epochs: int = 10, log=print) -> dict[str, float]:
    """Milliseconds per training step of each method at the same batch size (digits)."""
    data = load_dataset("digits")
    timings = {}
    runs = [("bp", None), ("dp-sgd", "dp-sgd"), ("dfa", None), ("dp-dfa", "dp-dfa"),
            ("dp-noisy-projection", "dp-noisy-projection")]
    for name, method in runs:
        values = digits_config(method, batch_size=batch_size, epochs=epochs, lr=1e-3)
        if name == "bp":
            values["rule"] = "bp"
        if method:
            values["epsilon"] = 4.0
        summary = fit(values, data)
        steps = epochs * (len(data.train) // batch_size)  # full batches / Poisson: the same
        timings[name] = 1000 * summary["train_seconds"] / steps
        log(f"{name:20s} {timings[name]:.2f} ms per step (batch {batch_size})")
    return timings


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--tune", action="store_true", help="grid search at epsilon 2")
    group.add_argument("--signal", action="store_true", help="signal fractions at epsilon 2")
    group.add_argument("--speed", action="store_true", help="time per step of each method")
    parser.add_argument("--group", default=DIGITS,
                        help=f"with --signal: a group of the set (default {DIGITS!r})")
    parser.add_argument("--data-root", help="with --signal: folder of the data sets")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.tune:
        tune()
    elif args.signal:
        signal_fractions(group=args.group, data_root=args.data_root)
    else:
        speed()


if __name__ == "__main__":
    main()
