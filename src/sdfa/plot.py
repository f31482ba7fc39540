"""Learning curves of one or several runs in one PNG: ``sdfa plot RUN_DIR... -o curves.png``.

Runs are labelled by what distinguishes them (rule, k, rank, transfer; data set and model when
those differ too). Runs that share a label -- the seeds of one setting -- are drawn as their
mean with a band from the lowest to the highest value, so rules compare at a glance.
"""

from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from .config import load_toml

PANELS = (
    ("test_accuracy", "test accuracy (%)", 100.0, False),
    ("train_loss", "training loss", 1.0, True),
)


def read_metrics(run_dir: Path) -> dict[str, np.ndarray]:
    """The columns of RUN_DIR/metrics.csv as float arrays."""
    path = Path(run_dir) / "metrics.csv"
    if not path.is_file():
        raise ValueError(f"{run_dir} is not a run directory: {path.name} not found")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise ValueError(f"{path} has no epoch yet")
    return {key: np.array([float(row[key] or "nan") for row in rows]) for key in rows[0]}


def run_setting(run_dir: Path) -> dict:
    """The settings that name a run: rule, k, rank, transfer, dataset, model."""
    config = load_toml(Path(run_dir) / "config.toml")
    keys = ("rule", "k", "rank", "transfer", "dataset", "model", "privacy", "epsilon")
    return {key: config.get(key) for key in keys}


def labels_for(run_dirs: list[Path]) -> list[str]:
    """A short label per run; data set and model appear only when the runs differ in them."""
    settings = [run_setting(d) for d in run_dirs]
    shared = {k for k in ("dataset", "model") if len({s[k] for s in settings}) == 1}
    labels = []
    for s in settings:
        parts = [] if {"dataset", "model"} <= shared else [f"{s['dataset']}/{s['model']}"]
        options = "".join(f" {k}={s[k]}" for k in ("k", "rank") if s[k] is not None)
        parts.append(s["rule"].upper() + options)
        if s["transfer"]:
            parts.append("(transfer)")
        if s["privacy"]:
            parts.append(s["privacy"] + (f" epsilon={s['epsilon']:g}" if s["epsilon"] else ""))
        labels.append(" ".join(parts))
    return labels


def plot_runs(run_dirs, out: str | Path, title: str | None = None) -> Path:
    """Draw test accuracy and training loss per epoch of ``run_dirs`` into the PNG ``out``."""
    run_dirs = [Path(d) for d in run_dirs]
    if not run_dirs:
        raise ValueError("plot needs at least one run directory")
    metrics = [read_metrics(d) for d in run_dirs]
    groups: dict[str, list[dict]] = defaultdict(list)
    for label, columns in zip(labels_for(run_dirs), metrics, strict=True):
        groups[label].append(columns)

    fig = Figure(figsize=(11, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(PANELS))
    for ax, (key, ylabel, scale, log) in zip(axes, PANELS, strict=True):
        for label, runs in groups.items():
            length = min(len(r[key]) for r in runs)
            values = np.stack([r[key][:length] for r in runs]) * scale
            epochs = runs[0]["epoch"][:length]
            n = f" (mean of {len(runs)})" if len(runs) > 1 else ""
            (line,) = ax.plot(epochs, values.mean(0), label=label + n, lw=1.6)
            if len(runs) > 1:
                low, high = values.min(0), values.max(0)
                ax.fill_between(epochs, low, high, color=line.get_color(), alpha=0.2)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(ylabel)
        if log:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    return out


def plot_sweep(
    series: dict[str, dict[float, list[float]]],
    references: dict[str, list[float]],
    out: str | Path,
    *,
    x_label: str,
    y_label: str = "test accuracy (%)",
    title: str | None = None,
) -> Path:
    """A metric against a swept setting (log2 x axis): one line per series, mean with error
    bars of one standard deviation over seeds; ``references`` (runs without the setting, e.g.
    non-private ones) as horizontal lines at their mean."""
    fig = Figure(figsize=(6, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    xs = sorted({x for points in series.values() for x in points})
    for name, points in series.items():
        keys = sorted(points)
        means = [np.mean(points[x]) for x in keys]
        spread = [np.std(points[x], ddof=1) if len(points[x]) > 1 else 0.0 for x in keys]
        ax.errorbar(keys, means, yerr=spread, marker="o", capsize=3, label=name)
    for (name, values), style in zip(references.items(), ("--", ":", "-.") * 3):
        ax.axhline(np.mean(values), color="gray", linestyle=style, label=name)
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [f"{x:g}" for x in xs])
    ax.set_xlabel(x_label)
    ax.set_ylabel(y_label)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    return out
