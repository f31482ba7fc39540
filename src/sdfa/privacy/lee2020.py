"""The lee2020 comparison: DP-SGD vs DP-DFA vs noisy-projection DP-DFA at equal (epsilon, delta).

Lee & Kifer (2020) report DP-DFA "often 10-20%" more accurate than DP-SGD at the same budget;
Ohana, Cappelli et al. (2021) train with the noise of the feedback projection. This module runs
the three methods on scikit-learn's digits (the data every install has) for epsilon in
{1, 2, 4, 8}, delta 1e-5, over several seeds, and writes ``results.csv``, ``results.md`` (table)
and ``accuracy-vs-epsilon.png``. Non-private BP and DFA runs give the ceiling.

Each method's hyperparameters (``SETTINGS``) were chosen by :func:`tune`: a small grid at
epsilon 2 on a validation split of the training set (seed 0), as the papers do; that choice is
not itself accounted for in epsilon.
"""

from __future__ import annotations

import csv
import itertools
import math
import statistics
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from ..convert import convert
from ..models import build_model
from .engine import PrivacyEngine

EPSILONS = (1.0, 2.0, 4.0, 8.0)
DELTA = 1e-5
METHOD_LABELS = {
    "dp-sgd": "DP-SGD (Opacus)",
    "dp-dfa": "DP-DFA (Lee & Kifer)",
    "dp-noisy-projection": "noisy-projection DP-DFA",
    "bp": "BP, non-private",
    "dfa": "DFA, non-private",
}


@dataclass(frozen=True)
class Setting:
    lr: float
    batch_size: int
    epochs: int = 30
    options: dict = field(default_factory=dict)


# Chosen by tune() (python -m sdfa.privacy.lee2020 --tune); see docs/privacy.md for the grid.
SETTINGS = {
    "dp-sgd": Setting(3e-2, batch_size=256, epochs=30, options={"max_grad_norm": 0.1}),
    "dp-dfa": Setting(1e-2, batch_size=64, epochs=30, options={
        "max_error_norm": 0.2, "max_input_norm": 4.0, "max_activation_norm": 5.0}),
    "dp-noisy-projection": Setting(3e-2, batch_size=256, epochs=15, options={
        "max_input_norm": 4.0, "max_activation_norm": 3.0}),
    # Non-private ceilings: the settings of tests/test_learning.py, 30 epochs.
    "bp": Setting(1e-3, batch_size=32),
    "dfa": Setting(1e-3, batch_size=32),
}
# The grid of tune(): every method tries each learning rate, batch size and epoch count; the
# DFA methods also try activation clips, DP-SGD gradient clips.
GRID = {
    "lr": (3e-3, 1e-2, 3e-2),
    "batch_size": (64, 256),
    "epochs": (15, 30),
}
GRID_OPTIONS = {
    "dp-sgd": [{"max_grad_norm": c} for c in (0.1, 1.0)],
    "dp-dfa": [{"max_error_norm": 0.2, "max_input_norm": 4.0, "max_activation_norm": a}
               for a in (2.0, 3.0, 5.0)],
    "dp-noisy-projection": [{"max_input_norm": 4.0, "max_activation_norm": a}
                            for a in (2.0, 3.0, 5.0)],
}


def digits(validation: bool = False):
    """(x_train, y_train, x_test, y_test): 75/25 stratified split of digits, pixels in [0, 1].

    With ``validation`` the test part is 20% of the training split instead (for tuning).
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    split = train_test_split(x / 16.0, y, test_size=0.25, random_state=0, stratify=y)
    x_train, x_test, y_train, y_test = split
    if validation:
        x_train, x_test, y_train, y_test = train_test_split(
            x_train, y_train, test_size=0.2, random_state=0, stratify=y_train
        )
    return (
        torch.tensor(x_train, dtype=torch.float32),
        torch.tensor(y_train),
        torch.tensor(x_test, dtype=torch.float32),
        torch.tensor(y_test),
    )


def train_one(method: str, epsilon: float | None, seed: int, setting: Setting, data,
              on_epoch=None) -> dict:
    """Train the digits MLP (64-100-100-10, tanh) with ``method``; return test accuracy etc.

    ``on_epoch(model, engine, epoch)`` is called before the first epoch and after each one.
    """
    x_train, y_train, x_test, y_test = data
    torch.manual_seed(seed)
    model = build_model("mlp", (x_train.shape[1],), 10)
    if method not in ("bp", "dp-sgd"):
        model = convert(model, "dfa", seed=seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=setting.lr)
    loader = DataLoader(TensorDataset(x_train, y_train), batch_size=setting.batch_size,
                        shuffle=True, generator=torch.Generator().manual_seed(seed))
    engine = None
    if method.startswith("dp-"):
        engine = PrivacyEngine(accountant="rdp")
        model, optimizer, loader = engine.make_private_with_epsilon(
            module=model, optimizer=optimizer, data_loader=loader, method=method,
            target_epsilon=epsilon, target_delta=DELTA, epochs=setting.epochs,
            noise_generator=torch.Generator().manual_seed(seed), **setting.options,
        )
    seconds = 0.0
    for epoch in range(setting.epochs):
        if on_epoch is not None:
            on_epoch(model, engine, epoch)
        start = time.perf_counter()
        model.train()
        for x, y in loader:
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
        seconds += time.perf_counter() - start
    if on_epoch is not None:
        on_epoch(model, engine, setting.epochs)
    model.eval()
    with torch.no_grad():
        accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
    return {
        "method": method,
        "epsilon": math.inf if engine is None else epsilon,
        "seed": seed,
        "accuracy": accuracy,
        "epsilon_spent": math.inf if engine is None else engine.get_epsilon(DELTA),
        "noise_multiplier": 0.0 if engine is None else engine.noise_multiplier,
        "seconds": seconds,
    }


def tune(epsilon: float = 2.0, log=print) -> dict[str, Setting]:
    """Best setting per private method on the validation split at ``epsilon`` (seed 0)."""
    data = digits(validation=True)
    best = {}
    for method, options in GRID_OPTIONS.items():
        scored = []
        for lr, batch, epochs, opts in itertools.product(*GRID.values(), options):
            setting = Setting(lr, batch, epochs, opts)
            accuracy = train_one(method, epsilon, 0, setting, data)["accuracy"]
            log(f"{method:20s} {setting}: validation accuracy {accuracy:.3f}")
            scored.append((accuracy, setting))
        best[method] = max(scored, key=lambda pair: pair[0])[1]
    return best


def signal_fractions(epsilon: float = 2.0, samples: int = 200, log=print) -> dict:
    """How much of its sensitivity one example's update uses, on average (seed 0).

    The noise is z times the sensitivity S; an example contributes ||u_i|| <= S (for DP-SGD
    its clipped gradient, S = max_grad_norm). The mean of ||u_i|| / S over training examples,
    at the start, middle and end of training, compares the methods' signal-to-noise ratios.
    """
    data = digits()
    x, y = data[0][:samples], data[1][:samples]
    fractions = {}

    def measure(method, model, engine, epoch):
        setting = SETTINGS[method]
        if epoch not in (0, setting.epochs // 2, setting.epochs):
            return
        model.train()
        total = 0.0
        for i in range(samples):
            model.zero_grad()
            for p in model.parameters():
                p.grad_sample = None  # Opacus's per-example gradients of the last batch
            F.cross_entropy(model(x[i : i + 1]), y[i : i + 1], reduction="sum").backward()
            if method == "dp-sgd":
                clip = setting.options["max_grad_norm"]
                norm = torch.cat([p.grad_sample.flatten() for p in model.parameters()]).norm()
                total += min(norm.item(), clip) / clip
            else:
                norm = torch.cat([p.grad.flatten() for p in model.parameters()]).norm()
                total += norm.item() / engine.mechanism.sensitivity()
        model.zero_grad()
        for p in model.parameters():
            p.grad_sample = None
        if engine.mechanism is not None:
            engine.mechanism.discard_step()
        fractions[(method, epoch)] = total / samples
        log(f"{method:20s} epoch {epoch:>2}: mean ||u_i|| / S = {total / samples:.2f}")

    for method in ("dp-sgd", "dp-dfa", "dp-noisy-projection"):
        train_one(method, epsilon, 0, SETTINGS[method], data,
                  on_epoch=lambda model, engine, epoch, m=method: measure(m, model, engine, epoch))
    return fractions


def speed(batch_size: int = 256, epochs: int = 10, log=print) -> dict[str, float]:
    """Milliseconds per training step of each method at the same batch size (seed 0)."""
    data = digits()
    steps = epochs * math.ceil(len(data[0]) / batch_size)
    timings = {}
    for method in ("bp", "dp-sgd", "dfa", "dp-dfa", "dp-noisy-projection"):
        setting = Setting(1e-3, batch_size, epochs, SETTINGS[method].options)
        seconds = train_one(method, 4.0 if method.startswith("dp") else None, 0, setting,
                            data)["seconds"]
        timings[method] = 1000 * seconds / steps
        log(f"{method:20s} {timings[method]:.2f} ms per step (expected batch {batch_size})")
    return timings


def run(out_dir: str | Path, *, quick: bool = False, epsilons=EPSILONS, seeds=None,
        log=print) -> list[dict]:
    """Run every method at every epsilon and seed; write results.csv, results.md and the plot."""
    seeds = seeds if seeds is not None else ((0, 1) if quick else (0, 1, 2, 3, 4))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    data = digits()
    rows = []
    jobs = [(m, e) for m in ("dp-sgd", "dp-dfa", "dp-noisy-projection") for e in epsilons]
    jobs += [("bp", None), ("dfa", None)]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Ss]ecure RNG.*")
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        for (method, epsilon), seed in itertools.product(jobs, seeds):
            row = train_one(method, epsilon, seed, SETTINGS[method], data)
            rows.append(row)
            log(f"{method:20s} epsilon {row['epsilon']:>4} seed {seed}: accuracy "
                f"{row['accuracy']:.3f} ({row['seconds']:.1f} s)")
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (out / "results.md").write_text(table(rows, epsilons))
    plot(rows, epsilons, out / "accuracy-vs-epsilon.png")
    return rows


def summarize(rows: list[dict], method: str, epsilon: float) -> tuple[float, float, int]:
    """Mean and standard deviation of the test accuracy (%) over seeds, and the seed count."""
    values = [100 * r["accuracy"] for r in rows if r["method"] == method
              and (r["epsilon"] == epsilon or math.isinf(r["epsilon"]))]
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return statistics.mean(values), spread, len(values)


def table(rows: list[dict], epsilons=EPSILONS) -> str:
    """Markdown table: test accuracy (%) mean +- std over seeds, per method and epsilon."""
    header = "| method | " + " | ".join(f"epsilon = {e:g}" for e in epsilons) + " |"
    lines = [header, "|---" * (len(epsilons) + 1) + "|"]
    for method in ("dp-sgd", "dp-dfa", "dp-noisy-projection"):
        cells = []
        for epsilon in epsilons:
            mean, spread, n = summarize(rows, method, epsilon)
            cells.append(f"{mean:.1f} +- {spread:.1f}")
        lines.append(f"| {METHOD_LABELS[method]} | " + " | ".join(cells) + " |")
    for method in ("bp", "dfa"):
        mean, spread, n = summarize(rows, method, math.inf)
        lines.append(f"| {METHOD_LABELS[method]} (epsilon = inf) | "
                     + " | ".join([f"{mean:.1f} +- {spread:.1f}"] * len(epsilons)) + " |")
    seeds = len({r["seed"] for r in rows})
    lines.append("")
    lines.append(
        f"scikit-learn digits (1347 train / 450 test), MLP 64-100-100-10 tanh, Adam, "
        f"delta = {DELTA:g}, RDP accountant; test accuracy (%) after the last epoch, mean +- "
        f"standard deviation over {seeds} seeds."
    )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], epsilons, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for method, marker in (("dp-sgd", "o"), ("dp-dfa", "s"), ("dp-noisy-projection", "^")):
        stats = [summarize(rows, method, e) for e in epsilons]
        ax.errorbar(epsilons, [s[0] for s in stats], yerr=[s[1] for s in stats],
                    marker=marker, capsize=3, label=METHOD_LABELS[method])
    for method, style in (("bp", "--"), ("dfa", ":")):
        ax.axhline(summarize(rows, method, math.inf)[0], color="gray", linestyle=style,
                   label=METHOD_LABELS[method])
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(epsilons), [f"{e:g}" for e in epsilons])
    ax.set_xlabel(f"epsilon (delta = {DELTA:g})")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("digits, MLP 64-100-100-10")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="reproduce/lee2020", help="output folder")
    parser.add_argument("--quick", action="store_true", help="2 seeds instead of 5")
    parser.add_argument("--tune", action="store_true", help="run the hyperparameter grid")
    parser.add_argument("--signal", action="store_true",
                        help="measure how much of its sensitivity an example's update uses")
    parser.add_argument("--speed", action="store_true", help="time a step of each method")
    args = parser.parse_args()
    if args.signal or args.speed:
        torch.set_num_threads(1)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore")
            signal_fractions() if args.signal else speed()
    elif args.tune:
        torch.set_num_threads(1)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore")
            for method, setting in tune().items():
                print(f"best {method}: {setting}")
    else:
        run(args.out, quick=args.quick)
