"""metrics.csv and TensorBoard: the per-epoch record of a run."""

from __future__ import annotations

import csv
import importlib.util
import io
from pathlib import Path

from .checkpoint import write_text


class MetricsLog:
    """metrics.csv (rewritten from the full history, so a resumed run has no duplicate rows)
    and, when TensorBoard is installed, the same scalars under ``tensorboard/``.

    TensorBoard's x axis is the training step for every scalar (an epoch's row at its last
    step), so callbacks' per-step figures share it, and a resumed run purges exactly what the
    killed one logged after its checkpoint. ``enabled=False`` (processes that do not write the
    run directory) makes every call a no-op.
    """

    def __init__(self, run_dir: Path, tensorboard: bool = True, *, enabled: bool = True):
        self.enabled = enabled
        self.csv_path = Path(run_dir) / "metrics.csv"
        self.tb_dir = Path(run_dir) / "tensorboard"
        self.use_tensorboard = (
            enabled and tensorboard and importlib.util.find_spec("tensorboard") is not None
        )
        self.writer = None

    def start(self, history: list[dict]) -> None:
        if not self.enabled:
            return
        self.write_csv(history)
        if self.use_tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops events a killed run logged after its last checkpoint.
            last_step = history[-1]["step"] if history else 0
            self.writer = SummaryWriter(str(self.tb_dir), purge_step=last_step + 1)

    def epoch(self, history: list[dict]) -> None:
        if not self.enabled:
            return
        self.write_csv(history)
        row = history[-1]
        for key, value in row.items():
            if key != "step" and isinstance(value, (int, float)):
                self.scalar(key, value, row["step"])
        if self.writer is not None:
            self.writer.flush()

    def scalar(self, tag: str, value: float, step: int) -> None:
        """Log one scalar to TensorBoard (no-op without it); ``step``: the training step."""
        if self.writer is not None:
            self.writer.add_scalar(tag, value, step)

    def write_csv(self, history: list[dict]) -> None:
        columns = list(dict.fromkeys(k for row in history for k in row)) or ["epoch"]
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(history)
        write_text(self.csv_path, text.getvalue())

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
