"""Learning curves of one or several runs in one PNG: ``sdfa plot RUN_DIR... -o curves.png``.

Runs are labelled by what distinguishes them (rule, k, rank, transfer; data set and model when
those differ too). Runs that share a label -- the seeds of one setting -- are drawn as their
mean with a band from the lowest to the highest value, so rules compare at a glance.

The top row shows test accuracy and training loss against the epoch or, with ``x="macs"``, against
the MACs the rule spent (``cumulative_macs``: accuracy against compute). When runs logged their
alignment (``sdfa train --log-alignment N``), a second row shows, per setting, the angle between
each layer's update and the true gradient over the training steps (dashed: the angle between W
and its feedback, for layer-wise rules), or, with ``alignment="sign"`` / ``"norm_ratio"``, the
fraction of entries whose signs agree with it / the ratio of the norms.
"""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from ..specs import format_rule_spec
from .config import load_toml

PANELS = (
    ("test_accuracy", "test accuracy (%)", 100.0, False),
    ("train_loss", "training loss", 1.0, True),
)
PERPLEXITY = ("test_perplexity", "test perplexity", 1.0, True)
X_AXES = {  # --x: the metrics.csv column on the x axis, and its label
    "epoch": ("epoch", "epoch"),
    "macs": ("cumulative_macs", "training MACs (counted by sdfa costs)"),
}
ANGLE, FEEDBACK_ANGLE = "align/angle/", "align/feedback_angle/"
ALIGNMENT = {  # --alignment: the alignment.csv columns drawn per layer, and the y label
    "angle": (ANGLE, "update vs true gradient (degrees)\ndashed: W vs feedback"),
    "sign": ("align/sign/", "entries whose sign agrees with\nthe true gradient (0.5: chance)"),
    "norm_ratio": ("align/norm_ratio/", "norm of the update /\nnorm of the true gradient"),
}

Columns = dict[str, np.ndarray]


def read_csv(path: Path) -> Columns:
    """The columns of a CSV file as float arrays (empty cells are nan)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise ValueError(f"{path} has no rows yet")
    return {key: np.array([float(row[key] or "nan") for row in rows]) for key in rows[0]}


def read_metrics(run_dir: Path) -> Columns:
    """The columns of RUN_DIR/metrics.csv (one row per epoch)."""
    path = Path(run_dir) / "metrics.csv"
    if not path.is_file():
        raise ValueError(f"{run_dir} is not a run directory: {path.name} not found")
    return read_csv(path)


def read_alignment(run_dir: Path) -> Columns | None:
    """The columns of RUN_DIR/alignment.csv (one row per measured step), None without it."""
    path = Path(run_dir) / "alignment.csv"
    return read_csv(path) if path.is_file() else None


def run_setting(run_dir: Path) -> dict:
    """The settings that name a run: rule, k, rank, transfer, dataset, model."""
    config = load_toml(Path(run_dir) / "config.toml")
    keys = ("rule", "k", "rank", "rule_options", "transfer", "dataset", "model", "privacy",
            "epsilon")
    return {key: config.get(key) for key in keys}


def labels_for(run_dirs: list[Path]) -> list[str]:
    """A short label per run; data set and model appear only when the runs differ in them."""
    settings = [run_setting(d) for d in run_dirs]
    shared = {k for k in ("dataset", "model") if len({s[k] for s in settings}) == 1}
    labels = []
    for s in settings:
        parts = [] if {"dataset", "model"} <= shared else [f"{s['dataset']}/{s['model']}"]
        options = {"k": s["k"], "rank": s["rank"], **(s["rule_options"] or {})}
        parts.append(format_rule_spec(s["rule"], options))  # the spelling of --rule
        if s["transfer"]:
            parts.append("(transfer)")
        if s["privacy"]:
            parts.append(s["privacy"] + (f" epsilon={s['epsilon']:g}" if s["epsilon"] else ""))
        labels.append(" ".join(parts))
    return labels


def plot_runs(run_dirs, out: str | Path, title: str | None = None, x: str = "epoch",
              alignment: str = "angle") -> Path:
    """Draw the curves of ``run_dirs`` into the PNG ``out``; ``x``: "epoch" or "macs";
    ``alignment``: the measure of the alignment row, "angle", "sign" or "norm_ratio"."""
    run_dirs = [Path(d) for d in run_dirs]
    if not run_dirs:
        raise ValueError("plot needs at least one run directory")
    if x not in X_AXES:
        raise ValueError(f"x must be one of {', '.join(X_AXES)}; got {x!r}")
    if alignment not in ALIGNMENT:
        raise ValueError(f"alignment must be one of {', '.join(ALIGNMENT)}; got {alignment!r}")
    out = Path(out)
    if not out.parent.is_dir():  # a mistyped folder is not made: the figure would be lost there
        raise ValueError(f"cannot write {out}: the folder {out.parent} does not exist")
    runs = [read_metrics(d) for d in run_dirs]
    x_key = X_AXES[x][0]
    for run_dir, columns in zip(run_dirs, runs, strict=True):
        if x_key not in columns:
            raise ValueError(f"{run_dir}/metrics.csv has no {x_key} column (a run from an older "
                             "sdfa): plot it against the epoch")
    labels = labels_for(run_dirs)
    metrics = _group(labels, runs)
    measure, alignment = alignment, _group(labels, [read_alignment(d) for d in run_dirs])

    fig = Figure(figsize=(max(11, 4.4 * len(alignment)), 8.4 if alignment else 4.2),
                 layout="constrained")
    FigureCanvasAgg(fig)
    if alignment:
        top, bottom = fig.subfigures(2, 1)
        _alignment_row(bottom, alignment, measure)
    else:
        top = fig
    _metrics_row(top, metrics, x)
    if title:
        fig.suptitle(title)
    fig.savefig(out, dpi=120)
    return out


def _group(labels: list[str], runs: list[Columns | None]) -> dict[str, list[Columns]]:
    """Runs by label, leaving out those without data (None)."""
    groups: dict[str, list[Columns]] = defaultdict(list)
    for label, columns in zip(labels, runs, strict=True):
        if columns is not None:
            groups[label].append(columns)
    return dict(groups)


def _mean_of(label: str, runs: list) -> str:
    return label + (f" (mean of {len(runs)})" if len(runs) > 1 else "")


def _band(ax, runs: list[Columns], x_key: str, y_key: str, scale=1.0, **style) -> None:
    """The mean of ``y_key`` over ``runs`` against the first run's ``x_key``, with a min-max band
    when there are several runs (seeds); runs are cut to the shortest."""
    length = min(len(r[y_key]) for r in runs)
    values = np.stack([r[y_key][:length] for r in runs]) * scale
    xs = runs[0][x_key][:length]
    (line,) = ax.plot(xs, values.mean(0), **style)
    if len(runs) > 1:
        ax.fill_between(xs, values.min(0), values.max(0), color=line.get_color(), alpha=0.2)


def _metrics_row(fig, groups: dict[str, list[Columns]], x: str) -> None:
    x_key, x_label = X_AXES[x]
    panels = PANELS
    if any("test_accuracy" not in r and "test_perplexity" in r for g in groups.values() for r in g):
        panels = (PERPLEXITY, *PANELS[1:])  # language models
    axes = fig.subplots(1, len(panels))
    for ax, (key, ylabel, scale, log) in zip(axes, panels, strict=True):
        for label, runs in groups.items():
            _band(ax, runs, x_key, key, scale, label=_mean_of(label, runs), lw=1.6)
        ax.set_xlabel(x_label)
        if x == "epoch":
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(ylabel)
        if log:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)


def _alignment_row(fig, groups: dict[str, list[Columns]], measure: str = "angle") -> None:
    """One panel per setting: one colour per layer, from the input (dark) to the output.

    Every panel has the same y axis: for angles from 0 to at least 90 degrees (orthogonal: no
    better than a random direction), for sign agreement from 0 to 1, for norm ratios a log
    scale with a line at 1."""
    prefix, ylabel = ALIGNMENT[measure]
    axes = np.atleast_1d(fig.subplots(1, len(groups)))
    highest = max(np.nanmax(r[k], initial=0) for runs in groups.values() for r in runs
                  for k in r if k.startswith((ANGLE, FEEDBACK_ANGLE)))
    top = 15 * math.ceil(max(90, highest) / 15)
    for ax, (label, runs) in zip(axes, groups.items(), strict=True):
        layers = [key.removeprefix(prefix) for key in runs[0] if key.startswith(prefix)]
        colors = colormaps["viridis"](np.linspace(0, 0.9, len(layers)))
        for layer, color in zip(layers, colors, strict=True):
            _band(ax, runs, "step", prefix + layer, label=layer, color=color, lw=1.3)
            if measure == "angle" and FEEDBACK_ANGLE + layer in runs[0]:
                _band(ax, runs, "step", FEEDBACK_ANGLE + layer, color=color, lw=1.0, ls="--")
        ax.set_title(_mean_of(label, runs), fontsize=10)
        ax.set_xlabel("training step")
        if measure == "angle":
            ax.set_ylim(0, top)
            ax.yaxis.set_major_locator(MaxNLocator(6, steps=[1, 1.5, 3]))
        elif measure == "sign":
            ax.set_ylim(0, 1.02)
            ax.axhline(0.5, color="gray", lw=0.8, ls=":")
        else:
            ax.set_yscale("log")
            ax.axhline(1, color="gray", lw=0.8, ls=":")
        ax.grid(alpha=0.3)
        ax.legend(title="layer", fontsize=7, title_fontsize=7, ncols=1 + len(layers) // 8)
    axes[0].set_ylabel(ylabel)


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
