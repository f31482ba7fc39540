"""``sdfa tifed`` (one federated run) and ``sdfa reproduce tifed`` (the TIFeD experiment set).

TIFeD trains without autograd, optimizer or epochs, so it has its own small runner next to
``sdfa train``: the data set is loaded by :func:`sdfa.data.load_dataset`, turned into int8
inputs, and trained by :func:`sdfa.integer.federate` on worker processes (gloo).
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass, field, replace
from datetime import date
from pathlib import Path

import torch

from .._version import __version__
from ..data import DataError, is_present, load_dataset, missing_message
from ..integer import FedConfig, federate, to_int8
from .rundir import slug

# The repo's medians of 100 runs' best accuracy at the best 1/eta (full-network / single-layer).
PUBLISHED = {"mnist": (93.3, 91.1), "fashion-mnist": (84.4, 82.6)}
LR_INVS = (2048, 4096, 8192)  # the paper's 1/eta


def int8_data(dataset: str, data_dir=None, train_samples=None, test_samples=None):
    """(train_x, train_y, test_x, test_y) of a data set as int8 inputs and labels."""
    data = load_dataset(dataset, data_dir, train_samples=train_samples,
                        test_samples=test_samples)
    value_range = int(data.value_range)
    return (to_int8(data.train.images, value_range), data.train.labels,
            to_int8(data.test.images, value_range), data.test.labels)


def run(config: FedConfig, dataset: str = "digits", *, data_dir=None, train_samples=None,
        test_samples=None, out=None, header=None) -> dict:
    """One federated run; with ``out`` its result.json and result.pt land there, with
    ``header`` (integer rule) the trained network as a C header."""
    config.check()
    if header is not None and (config.rule != "integer" or out is None):
        raise ValueError("--header exports the integer network: use --rule integer and --out")
    start = time.perf_counter()
    data = int8_data(dataset, data_dir, train_samples, test_samples)
    result = federate(*data, config, out=out)
    result.update(dataset=dataset, train_samples=len(data[1]), test_samples=len(data[3]),
                  wall_seconds=time.perf_counter() - start)
    if out is not None:
        (Path(out) / "result.json").write_text(json.dumps(result, indent=1))
    if header is not None:
        from ..integer import IntegerDFA

        net = IntegerDFA([data[0].shape[1], *config.hidden, int(data[1].max()) + 1],
                         seed=config.seed)
        net.load_state_dict(torch.load(Path(out) / "result.pt", weights_only=True))
        Path(header).write_text(net.c_header(Path(header).stem.replace("-", "_")))
    return result


def describe(result: dict) -> str:
    c = result["config"]
    step = f"1/eta={c['lr_inv']}" if c["rule"] == "integer" else f"lr={c['lr']:g}"
    return (f"{c['rule']} {c['mode']} ({c['workers']} workers, {step}, seed {c['seed']}) on "
            f"{result['dataset']}: test accuracy {100 * result['test_accuracy']:.2f} %, "
            f"{result['rounds']} rounds, {result['bytes_per_round']:,} bytes/round "
            f"(gloo sockets {result['socket_bytes_per_round']:,}), "
            f"{result['train_seconds']:.1f} s training")


# -- the experiment set ------------------------------------------------------------------------


@dataclass
class Group:
    dataset: str
    title: str
    train_samples: int | None = None
    test_samples: int | None = None
    seeds: int = 3
    lr_invs: tuple[int, ...] = LR_INVS
    baselines: bool = True
    runs: list[tuple[str, str, dict]] = field(default_factory=list)  # (label, mode, config)

    def settings(self):
        out = []
        for mode in ("full", "single"):
            for lr_inv in self.lr_invs:
                out.append((f"integer DFA, {mode}", mode, {"rule": "integer", "lr_inv": lr_inv}))
        if self.baselines:
            out += [("float DFA, full", "full", {"rule": "dfa", "lr": FLOAT_LR["dfa"]}),
                    ("float DFA, single", "single", {"rule": "dfa", "lr": FLOAT_LR["dfa"]}),
                    ("float BP (FedAvg), full", "full", {"rule": "bp", "lr": FLOAT_LR["bp"]})]
        return out


# SGD's lr for the float baselines: the best of 0.01, 0.03, 0.1, 0.3 on a validation split
# (Fashion-MNIST, trained on training images 0-8,000, scored on 50,000-60,000; docs/integer.md).
FLOAT_LR = {"dfa": 0.3, "bp": 0.1}


def groups(quick: bool) -> list[Group]:
    if quick:
        return [Group("digits", "digits (1,437 / 360), FC 64-200-10", seeds=2,
                      lr_invs=(1024, *LR_INVS)),
                Group("fashion-mnist", "Fashion-MNIST, 8,000 / 2,000 subset, FC 784-200-10",
                      8000, 2000, seeds=1, lr_invs=(4096,))]
    return [Group("digits", "digits (1,437 / 360), FC 64-200-10", seeds=3,
                  lr_invs=(1024, *LR_INVS)),
            Group("fashion-mnist", "Fashion-MNIST, all 60,000 / 10,000, FC 784-200-10",
                  seeds=1, lr_invs=(2048, 4096)),
            Group("fashion-mnist", "Fashion-MNIST, 16,000-image training subset / 10,000, "
                  "FC 784-200-10", 16000, None, seeds=2),
            Group("mnist", "MNIST, all 60,000 / 10,000, FC 784-200-10", seeds=1,
                  lr_invs=(4096,))]


def reproduce_tifed(*, out=None, quick=False, data_root=None, seeds=None, progress=True,
                    workers: int = 8) -> Path:
    """Run the set (each finished run reused from OUT) and write OUT/results.md."""
    out = Path(out or Path("reproduce") / ("tifed" + ("-quick" if quick else "")))
    rows, missing = [], []
    for group in groups(quick):
        data_dir = (Path(data_root) / group.dataset
                    if data_root is not None and group.dataset != "digits" else None)
        if group.dataset != "digits" and not is_present(group.dataset, data_dir):
            missing.append(f"- {group.title}: {missing_message(group.dataset, data_dir)}")
            continue
        count = seeds if isinstance(seeds, int) else group.seeds
        seed_list = list(seeds) if isinstance(seeds, (list, tuple)) else list(range(count))
        for label, mode, values in group.settings():
            results = []
            for seed in seed_list:
                config = replace(FedConfig(mode=mode, workers=workers, seed=seed), **values)
                name = f"{config.rule}-{mode}-" + (f"inv{config.lr_inv}" if config.rule ==
                                                   "integer" else f"lr{config.lr:g}")
                run_dir = out / slug(group.title) / name / f"seed{seed}"
                done = run_dir / "result.json"
                if done.exists():
                    result = json.loads(done.read_text())
                else:
                    try:
                        result = run(config, group.dataset, data_dir=data_dir,
                                     train_samples=group.train_samples,
                                     test_samples=group.test_samples, out=run_dir)
                    except DataError as error:
                        missing.append(f"- {group.title}: {error}")
                        break
                if progress:
                    print(describe(result), flush=True)
                results.append(result)
            if results:
                rows.append((group, label, values, results))
    results_md = out / "results.md"
    results_md.parent.mkdir(parents=True, exist_ok=True)
    command = "sdfa reproduce tifed" + " --quick" * quick + (
        f" --data-dir {data_root}" if data_root is not None else "")
    results_md.write_text(render(rows, missing, quick, command))
    return results_md


def _median_range(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def render(rows, missing, quick, command) -> str:
    lines = [
        "# TIFeD: integer-only federated DFA (Colombo, Falcetta, Roveri 2023)", "",
        f"Produced by `{command}` on {date.today().isoformat()} (sdfa {__version__}, "
        f"torch {torch.__version__}); 8 worker processes (torch.distributed, gloo), mini-batch "
        "25, buffer 50, 5 passes per buffer, averaging after every pass.",
    ]
    if quick:
        lines += ["", "**Quick run**: data subsets and few runs; the numbers show that the set "
                  "runs, not what the full protocol reaches."]
    lines += ["", "Test accuracy (%) of the averaged network after one pass over the data: "
              "median (min-max) over runs (seeds 0..N-1: feedback matrices and float initial "
              "weights).", "",
              "| data | rule, mode | step | test accuracy % | runs | published (median of 100) "
              "| bytes/round (server model) | gloo socket bytes/round | train s/run |",
              "|---|---|---|---|---|---|---|---|---|"]
    shown = set()  # the group title and the published number once each
    for group, label, values, results in rows:
        accs = [100 * r["test_accuracy"] for r in results]
        step = (f"1/eta = {values['lr_inv']}" if values["rule"] == "integer"
                else f"SGD lr {values['lr']:g}")
        published = "—"
        if values["rule"] == "integer" and group.dataset in PUBLISHED:
            published = f"{PUBLISHED[group.dataset][label.endswith('single')]:.1f} (best 1/eta)"
        if (group.title, label) in shown:
            published = ""
        title = "" if group.title in shown else group.title
        shown.update({group.title, (group.title, label)})
        r0 = results[0]
        seconds = statistics.mean(r["train_seconds"] for r in results)
        lines.append(f"| {title} | {label} | {step} | {_median_range(accs)} | "
                     f"{len(results)} | {published} | {r0['bytes_per_round']:,} | "
                     f"{r0['socket_bytes_per_round']:,} | {seconds:.0f} |")
    lines += ["", "Bytes per round, server model: every worker uploads the parameters it trained "
              "(int32 or float32) and downloads the whole averaged network; gloo socket bytes: "
              "what the workers' all-reduce actually wrote to their sockets (headers included)."]
    if missing:
        lines += ["", "## Not run", "", *missing]
    return "\n".join(lines) + "\n"
