"""Callbacks: code that observes or wraps a run without the training core knowing it."""

from __future__ import annotations


class Callback:
    """Hooks into a run; override what you need. ``name`` keys the state kept in checkpoints.

    A callback may replace ``trainer.model``, ``trainer.optimizer`` or ``trainer.train_loader``
    in :meth:`on_train_start` (e.g. to wrap them, as a privacy engine does), add columns to an
    epoch's row in :meth:`on_epoch_end` (they reach metrics.csv and TensorBoard) and keys to the
    summary in :meth:`on_train_end`.
    """

    name = "callback"

    def on_train_start(self, trainer) -> None:
        pass

    def on_step_start(self, trainer, inputs, targets) -> None:
        """Before the forward pass (``inputs`` prepared and on the device)."""

    def on_before_optimizer_step(self, trainer, inputs, targets, loss) -> None:
        """After the backward pass, before ``optimizer.step()``: the rule's update is in
        ``.grad``; ``loss`` is the batch's mean loss (a tensor)."""

    def on_step_end(self, trainer, inputs, targets, loss) -> None:
        pass

    def on_epoch_end(self, trainer, row: dict) -> None:
        pass

    def on_train_end(self, trainer, summary: dict) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class CallbackList:
    """The callbacks of a run, called in order; their states keyed by name in checkpoints."""

    def __init__(self, callbacks=()):
        self.callbacks = list(callbacks)
        names = [cb.name for cb in self.callbacks]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(
                f"two callbacks share the name(s) {', '.join(repeated)}: their checkpoint states "
                "would overwrite each other; give each a distinct name"
            )

    def __iter__(self):
        return iter(self.callbacks)

    def __len__(self):
        return len(self.callbacks)

    def __getitem__(self, index):
        return self.callbacks[index]

    def fire(self, event: str, *args) -> None:
        for cb in self.callbacks:
            getattr(cb, event)(*args)

    def state_dict(self) -> dict:
        return {cb.name: cb.state_dict() for cb in self.callbacks}

    def load_state_dict(self, states: dict) -> None:
        for cb in self.callbacks:
            cb.load_state_dict(states.get(cb.name, {}))
