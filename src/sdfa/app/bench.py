"""``sdfa bench``: training-step throughput and peak memory of each rule next to plain autograd.

A training step is forward + cross-entropy loss + backward + one SGD step, on the same fixed
random batch for every contender. All contenders of a workload start from the same weights and
run interleaved in one process: after a warm-up, every round times a few steps of each contender
in turn (the order rotates from round to round), so a slow patch of a busy machine hits all of
them alike. The ratio to plain autograd BP is the median over rounds of the per-round ratio;
throughput is the median, spread the interquartile range relative to the median.

Peak memory is what one step allocates above the model, optimizer state and data that exist
before it (gradients included, since ``zero_grad(set_to_none=True)`` frees them first): on CUDA
from ``torch.cuda.max_memory_allocated``; on the CPU from the allocation and free events that
``torch.profiler`` records with ``profile_memory=True``, summed in time order.

The bound column is what the MAC count allows: BP MACs / rule MACs for one training step, from
the cost model (:func:`sdfa.costs`).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import io
import json
import os
import platform
import re
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.benchmark import Timer
from tqdm import tqdm

from ..convert import convert
from ..costs import costs
from ..feedback import DirectFeedback
from ..models import build_model
from ..models.mlp import mlp
from ..rules import RULES
from ..specs import format_rule_spec, parse_rule_spec

LEARNING_RATE = 1e-3
REFERENCE = "autograd"
# "cpu" counts the CPU time of the process instead of elapsed time: on a machine shared with
# other jobs it is far steadier, and with one thread it is the time the step would take alone.
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
BIOTORCH_MODES = {"bp": "backpropagation", "fa": "fa", "dfa": "dfa", "usf": "usf"}
LM_DFA = "per_position=true,after_output=false"


@dataclass(frozen=True)
class Workload:
    name: str
    description: str
    input_shape: tuple[int, ...]
    batch: int
    build: Callable[[], nn.Module]
    num_classes: int = 10
    # a workload whose input is no tensor batch (a graph): (generator -> (inputs, targets)),
    # its MAC bound ((model, rule, options) -> BP MACs / rule MACs) and its default contenders
    make_batch: Callable | None = None
    bound: Callable | None = None
    contenders: tuple[str, ...] | None = None
    input_dtype: torch.dtype | None = None  # torch.long: token ids in [0, num_classes)
    sequence_targets: bool = False  # a target per position (language models)


def _mlp(name: str, inputs: int, hidden: tuple[int, ...], description: str, batch: int = 128):
    sizes = "-".join(map(str, (inputs, *hidden, 10)))
    return Workload(
        name,
        f"{description} MLP {sizes} tanh, batch {batch}",
        (inputs,),
        batch,
        lambda: mlp((inputs,), 10, hidden=hidden),
    )


WORKLOADS = {
    w.name: w
    for w in [
        _mlp("mlp", 784, (1000, 1000), "MNIST"),
        _mlp("cifar-fc", 3072, (1000,) * 3, "CIFAR"),
        *(_mlp(f"depth-{d}", 784, (1000,) * d, "depth sweep:") for d in (4, 8)),
        *(_mlp(f"width-{w}", 784, (w, w), "width sweep:") for w in (256, 1024, 4096)),
        Workload(
            "cifar-conv",
            "Crafton CIFAR conv net (conv 96-128-256, FC 4096-2048-2048-10), batch 32",
            (3, 32, 32),
            32,
            lambda: build_model("crafton-cifar-conv", (3, 32, 32), 10),
        ),
        # Crafton et al.'s ImageNet heads on transferred features: 1000 classes, where sparse
        # feedback saves most (the e @ B of dense DFA reads a 1000 x 4096 matrix per layer).
        Workload(
            "alexnet-head",
            "Crafton AlexNet head FC 9216-4096-4096-1000 tanh, batch 64",
            (256, 6, 6),
            64,
            lambda: build_model("crafton-alexnet-head", (256, 6, 6), 1000, dropout=0.0),
            num_classes=1000,
        ),
        Workload(
            "vgg-head",
            "Crafton VGG head FC 25088-4096-4096-1000 tanh, batch 64",
            (512, 7, 7),
            64,
            lambda: build_model("crafton-vgg-head", (512, 7, 7), 1000, dropout=0.0),
            num_classes=1000,
        ),
        _mlp("tiny", 64, (32, 32), "smoke test:", batch=16),
        Workload(
            "gcn",
            "Zhao et al.'s GCN (3 layers, 64 hidden) on the k-NN digits graph (1797 nodes, k=10), "
            "full batch (samples = nodes)",
            (64,),
            1797,
            lambda: build_model("gcn", (64,), 10),
            make_batch=lambda gen: _graph_batch("knn-digits"),
            bound=lambda model, rule, options: _graph_bound(model, "knn-digits", rule, options),
            contenders=("autograd", "bp", "dfa", "dfa-gnn"),
        ),
        # Launay et al.'s transformer, scaled as in `sdfa reproduce launay2020`: the error
        # before the vocabulary projection (d values per token, TinyDFA's default) and after it
        Workload(
            "transformer-lm",
            "char transformer LM 4 x 128, 4 heads, seq 64, 84 tokens, batch 16",
            (64,),
            16,
            lambda: build_model("transformer-lm", (64,), 84, d_model=128, layers=4, heads=4),
            num_classes=84,
            input_dtype=torch.long,
            sequence_targets=True,
            contenders=(
                "bp",
                f"dfa:boundaries=macro,{LM_DFA}",
                f"dfa:boundaries=micro,{LM_DFA}",
                "dfa:boundaries=macro,per_position=true",
            ),
        ),
    ]
}
GROUPS = {
    "main": ["mlp", "cifar-fc"],
    "depth": ["mlp", "depth-4", "depth-8"],  # mlp has 2 hidden layers of 1000
    "width": ["width-256", "width-1024", "width-4096"],
    "conv": ["cifar-conv"],
    "heads": ["alexnet-head", "vgg-head"],
    "graph": ["gcn"],
    "sequence": ["transformer-lm"],
}
GROUPS["all"] = [w for g in ("main", "depth", "width", "conv", "heads", "graph", "sequence")
                 for w in GROUPS[g]]
DEFAULT_CONTENDERS = ["autograd", "bp", "fa", "usf", "dfa", "dfa:k=1", "dfa:rank=2"]
BIOTORCH_CONTENDERS = [f"biotorch-{r}" for r in ("bp", "fa", "usf", "dfa")]


@dataclass(frozen=True)
class Contender:
    """One way of training: plain autograd, an sdfa rule with options, or a biotorch mode."""

    label: str
    library: str  # "torch", "sdfa" or "biotorch"
    rule: str  # the learning rule, whose MAC bound applies
    options: dict = field(default_factory=dict)


def parse_contender(label: str) -> Contender:
    """Parse ``autograd``, a rule spec (``dfa``, ``dfa:k=1``, ``usf:scale=1.0``) or
    ``biotorch-<rule>``. ``dfa-k<K>`` / ``dfa-r<R>`` are the old spellings of ``dfa:k=K`` /
    ``dfa:rank=R``; a contender is labelled by its spec."""
    if label == REFERENCE:
        return Contender(label, "torch", "bp")
    if label.startswith("biotorch-") and label[9:] in BIOTORCH_MODES:
        return Contender(label, "biotorch", label[9:])
    if m := re.fullmatch(r"dfa-([kr])([1-9]\d*)", label):
        label = f"dfa:{'k' if m[1] == 'k' else 'rank'}={m[2]}"
    name, options = parse_rule_spec(label)
    if name not in RULES or any(k in ("k", "rank") and not _positive(v)
                                for k, v in options.items()):
        raise ValueError(
            f"unknown contender {label!r}; use autograd, a rule spec such as dfa:k=1 (rules: "
            f"{', '.join(sorted(RULES))}) or biotorch-<bp|fa|usf|dfa>"
        )
    return Contender(format_rule_spec(name, options), "sdfa", name, options)


def _positive(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def biotorch_available() -> bool:
    try:
        import biotorch.module.biomodule  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_workloads(names: list[str]) -> list[Workload]:
    """Workload names and group names (main, depth, width, conv, all), in order, without repeats."""
    out: list[str] = []
    for name in names:
        if name not in GROUPS and name not in WORKLOADS:
            raise ValueError(
                f"unknown workload {name!r}; choose from {', '.join(WORKLOADS)} "
                f"or a group: {', '.join(GROUPS)}"
            )
        out += GROUPS.get(name, [name])
    return [WORKLOADS[n] for n in dict.fromkeys(out)]


@functools.cache
def _graph(name: str):
    from ..graph.data import load_graph

    return load_graph(name)


def _graph_batch(name: str):
    """(graph, labels) of a graph data set: a step trains on every node."""
    graph = _graph(name).graph
    return graph, graph.y


def _graph_bound(model: nn.Module, name: str, rule: str, options: dict) -> float:
    """BP MACs / rule MACs of a full-batch step (sdfa.graph.costs; no pseudo-errors)."""
    from ..graph.costs import graph_costs

    data = _graph(name)
    macs = [graph_costs(convert(model, r, **o), data).macs for r, o in (("bp", {}),
                                                                         (rule, options))]
    return macs[0] / macs[1]


def mac_bound(model: nn.Module, rule: str, input_shape: tuple[int, ...], input_dtype=None,
              **options) -> float:
    """The cost model's bound on a rule's speed-up: BP MACs / rule MACs of one training step."""
    bp = costs(model, "bp", input_shape, input_dtype=input_dtype).macs
    return bp / costs(model, rule, input_shape, input_dtype=input_dtype, **options).macs


def _prepare(contender: Contender, base: nn.Module, num_classes: int):
    """(model, needs_targets): a copy of ``base`` set up for this contender."""
    if contender.library == "torch":
        return copy.deepcopy(base), False
    if contender.library == "sdfa":
        return convert(base, contender.rule, **contender.options), False
    from biotorch.module.biomodule import BioModule

    mode = BIOTORCH_MODES[contender.rule]
    with contextlib.redirect_stdout(io.StringIO()):  # biotorch prints what it converted
        model = BioModule(copy.deepcopy(base), mode=mode, output_dim=num_classes)
    return model, mode == "dfa"  # biotorch's DFA must be called as model(x, y, loss_fn)


class TrainingStep:
    """forward + cross-entropy + backward + SGD step of one model on a fixed batch; the forward
    pass and the loss under ``torch.autocast`` when ``autocast`` names a dtype (bf16)."""

    def __init__(self, model: nn.Module, needs_targets: bool, x, y, autocast=None):
        self.model, self.needs_targets, self.x, self.y = model, needs_targets, x, y
        self.optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE)
        self.autocast = autocast

    def __call__(self):
        self.optimizer.zero_grad(set_to_none=True)
        x, y = self.x, self.y
        with torch.autocast(y.device.type, dtype=self.autocast, enabled=self.autocast is not None):
            out = self.model(x, y, F.cross_entropy) if self.needs_targets else self.model(x)
            loss = F.cross_entropy(out.flatten(0, -2), y.flatten())  # (batch, [positions,] C)
        loss.backward()
        self.optimizer.step()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_step_memory(step: TrainingStep, device: torch.device) -> int:
    """Bytes one training step allocates at its peak above what exists before it."""
    step.optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        _sync(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        _sync(device)
        return torch.cuda.max_memory_allocated(device) - before
    profiler = torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True
    )
    with _quiet(profiler):
        step()
    events = sorted(
        (e.start_ns(), e.nbytes())
        for e in profiler.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    )
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


@contextlib.contextmanager
def _quiet(profiler):
    """Enter and leave ``profiler`` with the process's stderr closed: kineto writes a
    "USDT ... profiler_start/stop" line to file descriptor 2 each time, which no setting turns
    off. Only the start and the stop are silenced, never the profiled code."""
    with _no_fd2():
        profiler.__enter__()
    try:
        yield profiler
    finally:
        with _no_fd2():
            profiler.__exit__(None, None, None)


@contextlib.contextmanager
def _no_fd2():
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


# A spread needs enough rounds to mean something: the interquartile range of fewer is noise.
MIN_ROUNDS_FOR_SPREAD = 5


def _spread(q1: float, q3: float, median: float, rounds: int) -> float | None:
    return (q3 - q1) / median if rounds >= MIN_ROUNDS_FOR_SPREAD else None


def feedback_bytes(model: nn.Module) -> int:
    """Bytes of the fixed DFA feedback matrices of ``model`` (sparse: index + value)."""
    return sum(
        b.numel() * b.element_size()
        for m in model.modules() if isinstance(m, DirectFeedback) for b in m.buffers()
    )


def _quartiles(values: list[float]) -> tuple[float, float, float]:
    if len(values) < 2:
        return values[0], values[0], values[0]
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3


def profile_table(step: TrainingStep, steps: int, device: torch.device, rows: int = 12):
    """torch.profiler's table of the ops that take the most time over ``steps`` steps."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with _quiet(torch.profiler.profile(activities=activities)) as prof:
        for _ in range(steps):
            step()
        _sync(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows)


def bench_workload(
    workload: Workload,
    contenders: list[Contender],
    *,
    rounds: int,
    warmup: int,
    round_time: float,
    device: torch.device,
    clock: str = "wall",
    seed: int = 0,
    profile: bool = False,
    autocast: torch.dtype | None = None,
) -> list[dict]:
    """Time, measure and bound every contender on one workload; one result dict per contender."""
    now = CLOCKS[clock]
    torch.manual_seed(seed)
    base = workload.build()
    gen = torch.Generator().manual_seed(seed)
    if workload.make_batch is not None:
        x, y = workload.make_batch(gen)
        x, y = x.to(device), y.to(device)
    else:
        shape, classes = (workload.batch, *workload.input_shape), workload.num_classes
        if workload.input_dtype == torch.long:
            x = torch.randint(0, classes, shape, generator=gen).to(device)
        else:
            x = torch.randn(shape, generator=gen).to(device)
        y_shape = shape if workload.sequence_targets else (workload.batch,)
        y = torch.randint(0, classes, y_shape, generator=gen).to(device)
    steps = {}
    for c in contenders:
        model, needs_targets = _prepare(c, base, workload.num_classes)
        steps[c.label] = TrainingStep(model.to(device), needs_targets, x, y, autocast)

    for step in steps.values():
        for _ in range(warmup):
            step()
    _sync(device)
    start = now()
    steps[REFERENCE]()
    _sync(device)
    per_round = max(1, min(50, round(round_time / (now() - start))))

    labels = list(steps)
    # torch.utils.benchmark's Timer times each round (it synchronizes CUDA and keeps the thread
    # count); the interleaving and rotation of contenders between rounds is ours.
    timers = {
        label: Timer("step()", globals={"step": step}, timer=now,
                     num_threads=torch.get_num_threads())
        for label, step in steps.items()
    }
    times: dict[str, list[float]] = {label: [] for label in labels}
    for r in tqdm(range(rounds), desc=workload.name, leave=False, unit="round"):
        for label in labels[r % len(labels) :] + labels[: r % len(labels)]:
            times[label].append(timers[label].timeit(per_round).mean)

    bounds = {}
    results = []
    for c in contenders:
        key = (c.rule, tuple(sorted(c.options.items())))
        if key not in bounds and workload.bound is not None:
            bounds[key] = workload.bound(base, c.rule, c.options)
        elif key not in bounds:
            bounds[key] = mac_bound(base, c.rule, workload.input_shape, workload.input_dtype,
                                    **c.options)
        q1, median, q3 = _quartiles(times[c.label])
        ratios = [ref / t for ref, t in zip(times[REFERENCE], times[c.label])]
        r1, ratio, r3 = _quartiles(ratios)
        results.append(
            {
                "workload": workload.name,
                "contender": c.label,
                "library": c.library,
                "rule": c.rule,
                "options": c.options,
                "batch": workload.batch,
                "steps_per_round": per_round,
                "step_seconds": times[c.label],
                "samples_per_s": workload.batch / median,
                "spread": _spread(q1, q3, median, len(times[c.label])),
                "ratio_to_autograd": ratio,
                "ratio_spread": _spread(r1, r3, ratio, len(ratios)),
                "mac_bound": bounds[key],
                "fraction_of_bound": ratio / bounds[key],
                "peak_memory_bytes": peak_step_memory(steps[c.label], device),
                "feedback_bytes": feedback_bytes(steps[c.label].model),
            }
        )
        if profile:
            table = profile_table(steps[c.label], per_round, device)
            print(f"\n== profile: {workload.name} / {c.label} ({per_round} steps)\n{table}")
    return results


def check_targets(results: list[dict]) -> list[dict]:
    """The issue's targets, each with the measured value and whether it is met."""
    by = {(r["workload"], r["contender"]): r for r in results}
    workloads = list(dict.fromkeys(r["workload"] for r in results))
    checks = []

    def add(target, workload, value, goal, met):
        checks.append(
            {"target": target, "workload": workload, "value": value, "goal": goal, "met": met}
        )

    for w in workloads:
        for r in results:  # Launay et al.'s macro feedback, d-dimensional error
            o = r.get("options") or {}
            if r["workload"] == w and o.get("boundaries") == "macro" and not o.get(
                "after_output", True
            ):
                value = r["fraction_of_bound"]
                add("DFA macro speed-up / MAC bound", w, value, ">= 0.90", value >= 0.90)
        dfa = by.get((w, "dfa"))
        if dfa and w != "tiny":
            value = dfa["fraction_of_bound"]
            add("dense DFA speed-up / MAC bound", w, value, ">= 0.95", value >= 0.95)
        if dfa and (k1 := by.get((w, "dfa:k=1"))):
            value = k1["ratio_to_autograd"] / dfa["ratio_to_autograd"]
            many = w in GROUPS["heads"]  # 1000 classes: the sparse advantage exists
            goal = 1.05 if many else 1.0
            add("DFA k=1 speed / dense DFA speed", w, value, f">= {goal:.2f}", value >= goal)
            if many and dfa.get("feedback_bytes"):
                value = k1["feedback_bytes"] / dfa["feedback_bytes"]
                # k of C entries, each an int64 index and a float32 value (3 words, not 1)
                add("DFA k=1 feedback memory / dense", w, value, "<= 3k/C (index + value)",
                    value <= 3 / WORKLOADS[w].num_classes)
        if bp := by.get((w, "bp")):
            value = bp["ratio_to_autograd"]
            add("sdfa bp speed / autograd", w, value, "0.97 .. 1.03", abs(value - 1) <= 0.03)
        if r := by.get((w, "fa")):
            value = r["ratio_to_autograd"]
            add("sdfa fa speed / autograd", w, value, ">= 0.90", value >= 0.90)
        for r in results:  # every sign rule contender, e.g. usf and usf:refresh=10
            if r["workload"] == w and r["library"] == "sdfa" and r["rule"] in ("usf", "frsf"):
                value = r["ratio_to_autograd"]
                add(f"sdfa {r['contender']} speed / autograd", w, value, ">= 0.95",
                    value >= 0.95)
        if dfa and (bio := by.get((w, "biotorch-dfa"))):
            value = dfa["ratio_to_autograd"] / bio["ratio_to_autograd"]
            add("sdfa DFA speed / biotorch DFA", w, value, ">= 1.30", value >= 1.30)
        if dfa:
            value = dfa["peak_memory_bytes"] / by[(w, REFERENCE)]["peak_memory_bytes"]
            add("DFA peak memory / autograd", w, value, "<= 1.00", value <= 1.0)
    depth = [by.get((w, "dfa")) for w in GROUPS["depth"]]
    if all(depth):
        ratios = [r["ratio_to_autograd"] for r in depth]
        add(
            "DFA speed-up grows with depth (2, 4, 8)",
            "depth",
            ratios,
            "increasing",
            ratios[0] < ratios[1] < ratios[2],
        )
    return checks


def format_table(results: list[dict]) -> str:
    width = max(14, *(len(r["contender"]) for r in results))
    head = (
        f"{'workload':14s} {'contender':{width}s} {'samples/s':>10s} {'spread':>7s} "
        f"{'x autograd':>10s} {'MAC bound':>9s} {'of bound':>8s} {'peak MB':>8s} {'B MB':>7s}"
    )
    lines = [head, "-" * len(head)]
    for r in results:
        lines.append(
            f"{r['workload']:14s} {r['contender']:{width}s} {r['samples_per_s']:10.0f} "
            f"{_percent(r['spread']):>7s} {r['ratio_to_autograd']:10.3f} {r['mac_bound']:9.3f} "
            f"{r['fraction_of_bound']:8.1%} {r['peak_memory_bytes'] / 2**20:8.1f} "
            f"{r.get('feedback_bytes', 0) / 2**20:7.2f}"
        )
    return "\n".join(lines)


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def format_checks(checks: list[dict]) -> str:
    lines = []
    for c in checks:
        value = c["value"]
        shown = ", ".join(f"{v:.3f}" for v in value) if isinstance(value, list) else f"{value:.3f}"
        mark = "met" if c["met"] else "MISSED"
        lines.append(f"{mark:6s}  {c['target']:40s} {c['workload']:11s} {shown} (goal {c['goal']})")
    return "\n".join(lines)


def run(
    workloads: list[str],
    contenders: list[str] | None = None,
    *,
    rounds: int = 15,
    warmup: int = 3,
    round_time: float = 0.3,
    threads: int | None = None,
    device: str = "cpu",
    clock: str = "wall",
    seed: int = 0,
    profile: bool = False,
    autocast: str | None = None,
    out=print,
) -> dict:
    """Run the benchmark; print the table and the targets; return everything as a dict.

    ``autocast="bf16"`` runs each step's forward pass and loss under ``torch.autocast`` with
    bfloat16 (weights, gradients and the optimizer stay float32)."""
    if autocast not in (None, "bf16"):
        raise ValueError(f"autocast must be bf16 (or left out for float32); got {autocast!r}")
    cast = torch.bfloat16 if autocast else None
    if rounds < 1 or warmup < 1:
        raise ValueError(f"rounds and warmup must be >= 1; got {rounds} and {warmup}")
    if not round_time > 0:
        raise ValueError(f"round_time must be a positive number of seconds; got {round_time}")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but torch sees no CUDA device")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu or cuda; got {device!r}")
    if clock not in CLOCKS:
        raise ValueError(f"clock must be one of {', '.join(CLOCKS)}; got {clock!r}")
    if clock == "cpu" and dev.type == "cuda":
        raise ValueError("--clock cpu measures CPU time: use the wall clock on CUDA")
    selected = resolve_workloads(workloads)
    chosen_by_user = contenders is not None
    if contenders is None:
        contenders = DEFAULT_CONTENDERS + (BIOTORCH_CONTENDERS if biotorch_available() else [])
    parsed = [parse_contender(c) for c in dict.fromkeys([REFERENCE, *contenders])]
    if any(c.library == "biotorch" for c in parsed) and not biotorch_available():
        raise ValueError("biotorch contenders need biotorch: pip install --no-deps biotorch")
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1; got {threads}")
        torch.set_num_threads(threads)
    # Unstable feedback-alignment runs create subnormal floats that slow a CPU many times over.
    torch.set_flush_denormal(True)

    meta = {
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else _cpu_name(),
        "threads": torch.get_num_threads(),
        "flush_denormal": True,
        "dtype": "bf16 autocast" if cast else "float32",
        "optimizer": f"SGD lr={LEARNING_RATE}",
        "clock": clock,
        "rounds": rounds,
        "warmup_steps": warmup,
        "round_time_s": round_time,
        "biotorch": _biotorch_version(),
        "load_average_start": _load_average(),
    }
    out(
        f"sdfa bench: torch {meta['torch']}, {dev.type} ({meta['device']}), "
        f"{meta['threads']} threads, {meta['dtype']}, SGD, {rounds} rounds, {clock} clock, "
        f"load average {meta['load_average_start']}"
    )
    results = []
    for workload in selected:
        out(f"\n{workload.name}: {workload.description}")
        own = workload.contenders if not chosen_by_user else None
        chosen = [parse_contender(c) for c in dict.fromkeys([REFERENCE, *own])] if own else parsed
        with warnings.catch_warnings():  # biotorch's layers use deprecated module hooks
            warnings.filterwarnings("ignore", "Using a non-full backward hook", FutureWarning)
            rows = bench_workload(
                workload,
                chosen,
                rounds=rounds,
                warmup=warmup,
                round_time=round_time,
                device=dev,
                clock=clock,
                seed=seed,
                profile=profile,
                autocast=cast,
            )
        out(format_table(rows))
        results += rows
    meta["load_average_end"] = _load_average()
    checks = check_targets(results)
    if checks:
        out("\nTargets\n" + format_checks(checks))
    return {"meta": meta, "results": results, "targets": checks}


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    except OSError:
        names = []
    return names[0] if names else platform.processor() or platform.machine()


def _load_average() -> float | None:
    """The 1-minute load average: other jobs on the machine make timings noisy."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):  # not on every platform
        return None


def _biotorch_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("biotorch")
    except PackageNotFoundError:
        return None


def write_json(report: dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
