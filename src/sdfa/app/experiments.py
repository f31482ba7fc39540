"""What ``sdfa reproduce`` runs: an experiment (one setting of a table, over seeds) and a named
set of them with the published numbers they are compared against."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Experiment:
    group: str  # a row block of the table, e.g. "MNIST, FC 784-400-10"
    label: str  # the setting inside the group, e.g. "DFA k=1"
    config: dict  # TrainConfig values
    published: float | None = None  # in the set's metric, percent
    seeds: tuple[int, ...] = (0,)
    quick: dict | None = None  # config for --quick; None: the set's reductions, {}: unchanged
    skip_quick: bool = False  # too slow for --quick
    series: str = ""  # with the set's ``sweep``: the line of the sweep plot it belongs to
    x: float | None = None  # with ``sweep``: the swept value when it is no top-level config key
    x_label: str = ""  # with ``sweep``: the group's x axis when it is not the set's ``sweep``
    harsher: str = "up"  # with ``sweep``: "up" (larger x is harsher, e.g. noise) or "down" (bits)
    run_group: str = ""  # the folder of its runs, if not the group's (references shared by groups)
    metric: str | None = None  # this experiment's metric, when it is not the set's


@dataclass
class ExperimentSet:
    name: str
    title: str
    metric: str  # "accuracy", "error" (top-1, %) or "perplexity": what the published numbers are
    experiments: list[Experiment]
    source: str  # where the published numbers come from
    notes: str = ""
    quick: dict = field(default_factory=dict)  # --quick reductions (epochs, data subsets)
    sweep: str | None = None  # a config key: also tabulate and plot the metric against it
    report: object = None  # (outcomes, out) -> more lines of results.md (e.g. zhao2024's table)
    sweep_reference: str = ""  # a reference label: report where each series loses one point
    reference_setting: str = "inf"  # what a reference row's swept value is, in the sweep tables
