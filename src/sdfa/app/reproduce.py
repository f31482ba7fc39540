"""Named experiment sets: ``sdfa reproduce NAME [--quick]`` runs them and writes our numbers next
to the published ones (``results.md``) with learning curves (``curves-*.png``).

Each run lives in ``OUT/<group>/<setting>/seed<N>``; a run that finished is reused and one that
was interrupted is resumed, so running the command again completes a set. Experiments whose
data set, model or rule is not available are listed with the reason (for data: which files to
download and where to put them) instead of stopping the set.

``--quick`` runs a reduced version (few epochs on a subset) on whatever data is present; its
numbers show that everything works, not what the full protocol reaches.
"""

from __future__ import annotations

import importlib.util
import json
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

import torch

from .._version import __version__
from ..data import DATASETS, DataError, is_present, missing_message
from ..graph.data import is_graph
from ..models import MODELS
from ..rules import RULES
from ..specs import toml_value
from ..training import TrainingDiverged
from .config import config_from_dict, differences, load_toml
from .experiments import Experiment, ExperimentSet
from .plot import plot_runs, plot_sweep
from .run import train
from .rundir import slug
from .sets import EMBEDDED, PROTOCOLS, SETS, SHAKESPEARE

__all__ = ["SETS", "PROTOCOLS", "Experiment", "ExperimentSet", "reproduce", "describe_sets"]


@dataclass
class Outcome:
    experiment: Experiment
    summaries: list[dict] = field(default_factory=list)
    run_dirs: list[Path] = field(default_factory=list)
    skipped: str = ""  # why it did not run
    diverged: list[str] = field(default_factory=list)


# -- running ----------------------------------------------------------------------------------


def reproduce(
    experiment_set: str | ExperimentSet,
    *,
    out: str | Path | None = None,
    quick: bool = False,
    data_root: str | Path | None = None,
    seeds: int | Sequence[int] | None = None,
    overrides: dict | None = None,
    progress: bool = True,
) -> Path:
    """Run a set (by name or object) and write OUT/results.md; returns its path.

    Args:
        data_root: folder holding one sub-folder per data set (default: the cache folder).
        seeds: the seeds of every experiment: a count N (seeds 0 .. N-1) or a list of seeds
            (default: the set's choice).
        overrides: config values applied to every run (e.g. {"threads": 1, "device": "cuda"};
            {"download": True} fetches missing data sets).
    """
    if isinstance(experiment_set, str) and experiment_set in PROTOCOLS:  # not a set of runs
        out = Path(out or Path("reproduce") / (experiment_set + ("-quick" if quick else "")))
        PROTOCOLS[experiment_set][1](out, quick=quick, seeds=seeds, data_root=data_root,
                                     progress=progress)
        return out / "results.md"
    chosen = _lookup(experiment_set)
    out = Path(out or Path("reproduce") / (chosen.name + ("-quick" if quick else "")))
    outcomes = []
    for exp in chosen.experiments:
        outcome = Outcome(exp)
        outcomes.append(outcome)
        if quick and exp.skip_quick:
            outcome.skipped = "left out of --quick (too slow for a quick run)"
            continue
        values = {**exp.config, **(_quick_values(chosen, exp) if quick else {})}
        values.update(overrides or {})
        outcome.skipped = _unavailable(values, data_root, download=values.get("download", False))
        if outcome.skipped:
            continue
        if _data_dir(data_root, values["dataset"]) is not None:
            values["data_dir"] = str(_data_dir(data_root, values["dataset"]))
        for seed in _seeds(seeds, exp):
            run_dir = out / slug(exp.run_group or exp.group) / slug(exp.label) / f"seed{seed}"
            config = config_from_dict({**values, "seed": seed, "out": str(run_dir),
                                       "progress": progress})
            if progress:
                print(f"== {chosen.name}: {exp.group} / {exp.label} / seed {seed}")
            try:
                summary = _run(config, run_dir)
            except TrainingDiverged as error:
                outcome.diverged.append(str(error))
                continue
            except DataError as error:
                outcome.skipped = str(error)
                break
            outcome.summaries.append(summary)
            outcome.run_dirs.append(run_dir)
    results = out / "results.md"
    results.parent.mkdir(parents=True, exist_ok=True)
    command = " ".join(
        [f"sdfa reproduce {chosen.name}"] + ["--quick"] * quick
        + ([f"--seeds {seeds}"] if isinstance(seeds, int) else [])
        + ([f"--seed {' '.join(map(str, seeds))}"] if isinstance(seeds, (list, tuple)) else [])
        + ([f"--data-dir {data_root}"] if data_root is not None else [])
        + [f"--set {k}={toml_value(v)}" for k, v in (overrides or {}).items()]
    )
    results.write_text(render(chosen, outcomes, quick, out, command))
    return results


def _seeds(seeds, exp: Experiment) -> list[int]:
    if seeds is None:
        return list(exp.seeds)
    if isinstance(seeds, int):
        if seeds < 1:
            raise ValueError(f"seeds must be a count >= 1; got {seeds}")
        return list(range(seeds))
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"give distinct seeds; got {list(seeds)}")
    return list(seeds)


def _quick_values(chosen: ExperimentSet, exp: Experiment) -> dict:
    return chosen.quick if exp.quick is None else exp.quick


def _run(config, run_dir: Path) -> dict:
    """The summary of the run of ``config`` in ``run_dir``: reused when it finished there with
    the same settings, resumed when it was interrupted, else trained."""
    summary_path = run_dir / "summary.json"
    if summary_path.exists():
        saved = config_from_dict(load_toml(run_dir / "config.toml"))
        changed = differences(saved, config)
        if changed:  # the set's protocol changed since: never report the old run as the new one
            details = "; ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in changed.items())
            raise ValueError(
                f"{run_dir} holds a finished run with other settings ({details}): delete it, "
                "or pass another --out, to run the set as it is now"
            )
        return json.loads(summary_path.read_text())
    return train(config, resume=(run_dir / "config.toml").exists())


def _lookup(experiment_set) -> ExperimentSet:
    if isinstance(experiment_set, ExperimentSet):
        return experiment_set
    if experiment_set not in SETS:
        names = ", ".join([*SETS, *PROTOCOLS])
        raise ValueError(f"unknown experiment set {experiment_set!r}; available: {names}")
    return SETS[experiment_set]


def _unavailable(values: dict, data_root, download: bool) -> str:
    """Why an experiment cannot run here, one reason a line ('' when it can)."""
    dataset, model = values["dataset"], values["model"]
    rule = values.get("rule", "dfa").partition(":")[0]  # a rule spec: dfa-gnn:nf=false
    problems = []
    if model not in MODELS:
        problems.append(f"model {model!r} is not in this installation "
                        f"(models: {', '.join(sorted(MODELS))})")
    if rule not in RULES:
        problems.append(f"rule {rule!r} is not in this installation "
                        f"(rules: {', '.join(sorted(RULES))})")
    if values.get("privacy") and importlib.util.find_spec("opacus") is None:
        problems.append("private training needs Opacus: pip install 'sdfa[privacy]'")
    if is_graph(dataset):
        pass  # loading says what is missing (Fashion-MNIST for its k-NN graph)
    elif dataset not in DATASETS:
        problems.append(f"unknown data set {dataset!r}")
    else:
        directory = _data_dir(data_root, dataset)
        if not download and not is_present(dataset, directory):
            problems.append(missing_message(dataset, directory))
    return "\n".join(problems)


def _data_dir(data_root, dataset: str) -> Path | None:
    """Where a data set is read from under ``data_root`` (None: the default place)."""
    if is_graph(dataset):  # graphs are built from embedded or system data (docs/graphs.md)
        return None
    if dataset == "text":  # the corpus of the launay2020 set
        from ..data import data_root as default_root

        return Path(data_root if data_root is not None else default_root()) / SHAKESPEARE
    return Path(data_root) / dataset if data_root is not None and dataset not in EMBEDDED else None


# -- the report -------------------------------------------------------------------------------


def _mean_sd(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def render(
    chosen: ExperimentSet, outcomes: list[Outcome], quick: bool, out: Path, command: str
) -> str:
    """The Markdown report: one table of our numbers next to the published ones, then notes,
    what did not run and why, and the learning curves."""
    metric = {"accuracy": "test accuracy (%)", "error": "top-1 test error (%)",
              "perplexity": "test perplexity"}[chosen.metric]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    lines = [
        f"# {chosen.title}",
        "",
        f"Produced by `{command}` on {date.today().isoformat()} (sdfa {__version__}, "
        f"torch {torch.__version__}, {device}).",
    ]
    if quick:
        lines += ["", "**Quick run**: reduced epochs and data; the numbers show that the set "
                  "runs, not what the full protocol reaches."]
    lines += [
        "",
        f"| experiment | rule | ours: {metric} | published | test loss | seeds | epochs "
        "| train s/run |",
        "|---|---|---|---|---|---|---|---|",
    ]
    if not any(o.summaries for o in outcomes):
        lines.append("| *nothing could run here: see below* | | | | | | | |")
    for o in outcomes:
        if not o.summaries:
            continue
        own = o.experiment.metric or chosen.metric
        if own == "perplexity":
            values = [s["test_perplexity"] for s in o.summaries]
        else:
            values = [100 * s["test_accuracy"] for s in o.summaries]
        if own == "error":
            values = [100 - v for v in values]
        unit = f" ({own}, %)" if own != chosen.metric else ""
        published = "—" if o.experiment.published is None else f"{o.experiment.published:.2f}"
        seconds = statistics.mean(s["train_seconds"] for s in o.summaries)
        loss = statistics.mean(s["test_loss"] for s in o.summaries)
        epochs = o.summaries[0]["epochs"]
        diverged = f" ({len(o.diverged)} diverged)" if o.diverged else ""
        lines.append(
            f"| {o.experiment.group} | {o.experiment.label} | {_mean_sd(values)}{unit}{diverged} | "
            f"{published} | {loss:.4f} | {len(o.summaries)} | {epochs} | {seconds:.1f} |"
        )
    lines += ["", f"Published numbers: {chosen.source}", "", f"Protocol: {chosen.notes}"]
    if chosen.sweep:
        lines += _sweep_section(chosen, outcomes, out)
    if chosen.report is not None:
        lines += chosen.report(outcomes, out)
    reasons: dict[str, list[str]] = {}
    for o in outcomes:
        if o.skipped or (o.diverged and not o.summaries):
            reason = o.skipped or "every seed diverged: " + o.diverged[0]
            reasons.setdefault(reason, []).append(f"{o.experiment.group} / {o.experiment.label}")
    if reasons:
        lines += ["", "## Not run", ""]
        for reason, names in reasons.items():
            lines.append(f"- {'; '.join(names)}:")
            lines.append("  " + reason.replace("\n", "\n  "))
    groups = {}
    for o in outcomes:
        groups.setdefault(o.experiment.group, []).extend(o.run_dirs)
    figures = [(g, dirs) for g, dirs in groups.items() if dirs]
    if figures:
        lines += ["", "## Learning curves", ""]
        for group, dirs in figures:
            png = plot_runs(dirs, out / f"curves-{slug(group)}.png", title=group)
            lines.append(f"![{group}]({png.name})")
    return "\n".join(lines) + "\n"


def _sweep_section(chosen: ExperimentSet, outcomes: list[Outcome], out: Path) -> list[str]:
    """Per group, a table of the metric against ``chosen.sweep`` (one row per series) and its
    plot; experiments without the swept key (e.g. non-private) are reference rows and lines."""
    lines = []
    for group in dict.fromkeys(o.experiment.group for o in outcomes if o.summaries):
        series: dict[str, dict[float, list[float]]] = {}
        references: dict[str, list[float]] = {}
        harsher: dict[str, str] = {}
        key = next((o.experiment.x_label for o in outcomes
                    if o.experiment.group == group and o.experiment.x_label), chosen.sweep)
        for o in outcomes:
            if o.experiment.group != group or not o.summaries:
                continue
            values = [100 * s["test_accuracy"] for s in o.summaries]
            x = o.experiment.x if o.experiment.x is not None else o.experiment.config.get(key)
            if x is None:
                references[o.experiment.label] = values
            else:
                series.setdefault(o.experiment.series, {})[x] = values
                harsher[o.experiment.series] = o.experiment.harsher
        xs = sorted({x for points in series.values() for x in points})
        lines += ["", f"## {group}: test accuracy (%) against {key}", "",
                  f"| | {' | '.join(f'{key} = {x:g}' for x in xs)} |",
                  "|---" * (len(xs) + 1) + "|"]
        for name, points in series.items():
            cells = [_mean_sd(points[x]) if x in points else "—" for x in xs]
            lines.append(f"| {name} | {' | '.join(cells)} |")
        for name, values in references.items():
            lines.append(f"| {name} ({key} = {chosen.reference_setting}) | "
                         f"{' | '.join([_mean_sd(values)] * len(xs))} |")
        if chosen.sweep_reference in references:
            lines += ["", *_one_point_lost(series, harsher, references, chosen.sweep_reference)]
        png = plot_sweep(series, references, out / f"sweep-{slug(group)}.png", x_label=key,
                         title=group)
        lines += ["", f"![{group}]({png.name})"]
    return lines


def _one_point_lost(series, harsher, references, reference: str) -> list[str]:
    """Per series, the first setting (from the mildest to the harshest) whose mean accuracy is
    more than one point below the reference's."""
    base = statistics.mean(references[reference])
    lines = []
    for name, points in series.items():
        order = sorted(points, reverse=harsher.get(name) == "down")
        lost = next((x for x in order if statistics.mean(points[x]) < base - 1.0), None)
        where = f"at {lost:g}" if lost is not None else "nowhere in the sweep"
        lines.append(f"- {name}: loses one point against {reference} ({base:.2f}%) {where}")
    return lines


def describe_sets() -> str:
    """One line per set, for ``sdfa reproduce --list``."""
    lines = [f"{s.name:20s} {s.title}" for s in SETS.values()]
    lines += [f"{name:20s} {title}" for name, (title, _) in PROTOCOLS.items()]
    return "\n".join(lines)

