"""``sdfa train --log-alignment N``: how the rule's updates align with the true gradient, per
layer, every N training steps, written to ``RUN_DIR/alignment.csv`` and TensorBoard.

The measurement is :func:`sdfa.measure_alignment` (docs/alignment.md): one extra forward and
backward pass on the step's batch, between ``backward()`` and ``optimizer.step()``, that puts
back the random state and the BatchNorm statistics, so a run ends with the same weights, bit for
bit, with or without it.
"""

from __future__ import annotations

import csv
import io
import time

from .alignment import capture_rng, measure_alignment
from .training import Callback, Trainer, write_text

FILE_NAME = "alignment.csv"


class AlignmentLog(Callback):
    """Measure on training steps 1, N+1, 2N+1, ... (``every`` = N).

    Steps are counted from 1 as in metrics.csv; the row of step s describes the update of step s,
    computed from the weights left by step s - 1. Each epoch's row of metrics.csv gets
    ``alignment_seconds``, the time spent measuring (it is part of ``epoch_seconds``).
    """

    name = "alignment"

    def __init__(self, every: int):
        if every < 1:
            raise ValueError(f"log_alignment must be a number of steps >= 1; got {every}")
        self.every = every
        self.rng = None  # the random state before the forward pass of a step to measure
        self.seconds = 0.0
        self.columns: list[str] | None = None

    def on_train_start(self, trainer: Trainer) -> None:
        self.path = trainer.run_dir / FILE_NAME
        self.columns = _keep_steps(self.path, trainer.global_step)

    def on_step_start(self, trainer: Trainer, inputs, labels) -> None:
        if trainer.global_step % self.every == 0:
            self.rng = capture_rng(inputs.device)

    def on_before_optimizer_step(self, trainer: Trainer, inputs, labels, loss) -> None:
        if self.rng is None:
            return
        start = time.perf_counter()
        metrics = measure_alignment(
            trainer.model, trainer.task.loss, inputs, labels, rng_state=self.rng
        )
        self.rng = None
        step = trainer.global_step + 1
        for key, value in metrics.items():
            trainer.log.scalar(key, value, step)
        self._append({"step": step, "epoch": trainer.epoch + 1, **metrics})
        self.seconds += time.perf_counter() - start

    def on_epoch_end(self, trainer: Trainer, row: dict) -> None:
        row["alignment_seconds"] = self.seconds
        self.seconds = 0.0

    def _append(self, row: dict) -> None:
        new = self.columns is None
        if new:
            self.columns = list(row)
        with open(self.path, "a" if not new else "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.columns, lineterminator="\n")
            if new:
                writer.writeheader()
            writer.writerow(row)


def _keep_steps(path, last_step: int) -> list[str] | None:
    """Keep the rows up to ``last_step``, dropping those a killed run logged after its last
    checkpoint (the last of them possibly cut short); returns the file's columns, or None when
    no row is left (the file is then removed)."""
    if not path.exists():
        return None
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        rows = [row for row in reader if _complete(row) and int(row["step"]) <= last_step]
        columns = reader.fieldnames
    if not rows:
        path.unlink()
        return None
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text(path, text.getvalue())
    return list(columns)


def _complete(row: dict) -> bool:
    """False for a line cut short (missing cells) or garbled (extra cells)."""
    return None not in row and None not in row.values()
