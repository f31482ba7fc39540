"""Hardware cost model: multiply-accumulates and data movement of one training step, per sample.

``costs(model, rule, input_shape)`` converts a copy of the model (on the meta device, so no weight
is copied or computed), runs one forward pass to see every trainable layer's shapes and which
inputs need a gradient, and prices what the engine then does, layer by layer:

* **forward**: the unit's own products, from its layer type's cost formula in the layer
  registry (:mod:`sdfa.layers`): ``W x`` (Linear), the convolution (Conv*, ConvTranspose*), the
  gate products (RNN, LSTM, GRU), projections and attention (MultiheadAttention, transformer
  layers). MACs count every product a dense engine executes, padding zeros included (as
  FlopCounterMode does).
* **error**: what the layer needs to get its delta, that is the error arriving at its block
  output (the input of the next trainable layer): ``delta_{l+1} W_{l+1}`` for backprop, the same
  with ``B_{l+1}`` for layer-wise rules, ``e B_l`` for DFA (dense: C N_l MACs; sparse: k N_l,
  done as a gather; low rank: C r + r N_l; with ``per_position`` all of it at every position).
  The output layer's error comes from the loss (0).
* **update**: the weight gradient ``delta x^T`` (the forward MACs again), plus the backprop
  inside a unit that has it (an LSTM's recurrence). What a rule spends to learn its feedback
  (the weight mirror's noise products) is per-step work, reported apart.
* **data movement**: the values the neurons of the block output must read from elsewhere to get
  their error: the error values (next-layer deltas, or entries of e) and the feedback weights
  that go with them (W_{l+1}, B_{l+1} or the neuron's entries of B_l). Counted per real
  connection (padding excluded).

Elementwise work (activation derivatives, bias gradients, the optimizer) is the same for every
rule and is left out. See ``docs/costs.md`` for the definitions and the choices behind them.
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields

import torch
from torch import nn

from .convert import convert, rules_of
from .dfa import FEEDBACK_ATTR, dfa_config
from .feedback import (
    ConvFeedback,
    DenseFeedback,
    DirectFeedback,
    LowRankFeedback,
    SparseFeedback,
    SparseLowRankFeedback,
)
from .layers import Work, layer_type, trainable_units
from .specs import parse_rule_spec


@dataclass(frozen=True)
class FeedbackCost:
    """How a rule's layers send the error down, and what keeping their feedback costs.

    ``via`` names the matrix the error travels through; ``rewrites`` means the feedback (one
    value per weight) is recomputed or updated at every step; ``mirror`` means the feedback is
    learned from noise: each step drives the layer with the rule's ``samples`` noise vectors,
    a product y = W xi and an outer product y xi^T, 2 x samples x (weights) MACs per step;
    ``per_step(unit)`` counts other products a unit adds once per step (SSA's orthogonality
    terms), reported with the feedback's per-step MACs.
    """

    via: str
    rewrites: bool = False
    mirror: bool = False
    tangent: bool = False  # FDFA: a tangent through every unit after the first block output,
    # and d u^T (C N_l) per block output to learn B_l: priced as error work of the block
    per_step: Callable[[nn.Module], int] | None = None  # other MACs per step of each unit


# One entry per rule name in sdfa.RULES (a test checks that none is missing).
RULE_COSTS: dict[str, FeedbackCost] = {
    "bp": FeedbackCost("W"),
    "frozen": FeedbackCost("W"),
    "fa": FeedbackCost("B"),  # fixed random B
    "usf": FeedbackCost("B", rewrites=True),  # scale * sign(W), every step
    "frsf": FeedbackCost("B", rewrites=True),  # |R| * sign(W) with fixed R
    "brsf": FeedbackCost("B", rewrites=True),  # |R| * sign(W), R redrawn every step
    "kp": FeedbackCost("B", rewrites=True),  # B takes W's gradient step (the product is shared)
    "wm": FeedbackCost("B", rewrites=True, mirror=True),  # y = W xi and y xi^T, per step
    "dfa": FeedbackCost("e B"),  # the layers send nothing down; e B_l is priced per matrix
    "fdfa": FeedbackCost("e B", tangent=True),  # DFA's pass; B learned from forward tangents
    "sfdfa": FeedbackCost("e B"),  # spike-time networks: no registered units (not priced)
    "dfa-gnn": FeedbackCost("e B"),  # graphs are priced by sdfa.graph.costs
    # DFA's wiring with factored B_l = B_V B_S B_U^T, plus the orthogonality terms (sdfa.ssa)
    "ssa": FeedbackCost("e B", per_step=lambda unit: unit.step_macs()),
    "shallow": FeedbackCost("W"),  # only the output unit learns: no error is sent down
}


@dataclass
class LayerCost:
    """Costs of one layer per sample (MACs and values); see the module docstring."""

    name: str
    rule: str = ""
    via: str = "-"  # what the error of this layer's block output comes through ("-": none)
    neurons: int = 0  # values of the block output that receive an error (total: those that read)
    forward: int = 0
    error: int = 0
    update: int = 0
    gather: int = 0  # part of `error` done by gathers (sparse DFA), not by matrix products
    error_values: int = 0
    weight_values: int = 0
    feedback_per_step: int = 0  # feedback values recomputed or updated each step (per step!)
    feedback_macs_per_step: int = 0  # MACs learning the feedback (ssa: orthogonality) per step

    @property
    def macs(self) -> int:
        """MACs of a training step: forward + error + update."""
        return self.forward + self.error + self.update

    @property
    def matmul_macs(self) -> int:
        """The MACs done by matrix products and convolutions (what FlopCounterMode counts)."""
        return self.macs - self.gather

    @property
    def movement(self) -> int:
        """Values read from elsewhere to get the error: error values plus feedback weights."""
        return self.error_values + self.weight_values

    @property
    def reads_per_neuron(self) -> float:
        return self.movement / self.neurons if self.neurons else 0.0

    def as_dict(self) -> dict[str, object]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out.update(macs=self.macs, movement=self.movement, reads_per_neuron=self.reads_per_neuron)
        return out


@dataclass
class CostReport:
    """Per-layer costs of one model under one rule, with network totals (all per sample)."""

    model: str
    rule: str
    layers: list[LayerCost] = field(default_factory=list)

    @property
    def total(self) -> LayerCost:
        total = LayerCost("total", rule=self.rule)
        for layer in self.layers:
            for f in fields(LayerCost):
                if f.type == "int" and f.name != "neurons":
                    setattr(total, f.name, getattr(total, f.name) + getattr(layer, f.name))
            if layer.movement:  # average reads over the neurons that read anything
                total.neurons += layer.neurons
        return total

    @property
    def macs(self) -> int:
        """MACs of one training step per sample (multiply by the batch size for a step)."""
        return self.total.macs

    @property
    def movement(self) -> int:
        return self.total.movement

    def as_dict(self) -> dict[str, object]:
        return {
            "model": self.model,
            "rule": self.rule,
            "layers": [layer.as_dict() for layer in self.layers],
            "total": self.total.as_dict(),
        }

    def to_markdown(self) -> str:
        return self._table(markdown=True)

    def __str__(self) -> str:
        return self._table(markdown=False)

    def _table(self, markdown: bool) -> str:
        headers = ["layer", "rule", "error via", "neurons", "forward MACs", "error MACs",
                   "update MACs", "step MACs", "data movement", "reads/neuron"]
        rows = [
            [c.name, c.rule, c.via, _n(c.neurons), _n(c.forward), _n(c.error), _n(c.update),
             _n(c.macs), _n(c.movement), f"{c.reads_per_neuron:,.1f}"]
            for c in [*self.layers, self.total]
        ]
        title = f"{self.model}, rule {self.rule}: costs per sample"
        notes = []
        if self.total.gather:
            notes.append(f"{_n(self.total.gather)} error MACs are gathers (sparse feedback).")
        if self.total.feedback_per_step:
            notes.append(f"Feedback values rewritten per step (not per sample): "
                         f"{_n(self.total.feedback_per_step)}.")
        if self.total.feedback_macs_per_step:
            notes.append(f"MACs spent learning the feedback (ssa: orthogonality terms) per step "
                         f"(not per sample): "
                         f"{_n(self.total.feedback_macs_per_step)}.")
        return _format_table(title, headers, rows, markdown, 3, notes)


def costs(
    model: nn.Module,
    rule: str | Mapping | None,
    input_shape: Sequence[int],
    *,
    seed: int = 0,
    name: str | None = None,
    input_dtype: torch.dtype | None = None,
    **options,
) -> CostReport:
    """Per-layer MACs and data movement of one training step of ``model`` trained by ``rule``.

    Args:
        model: an ordinary model, or, with ``rule=None``, a model already converted by
            ``sdfa.convert``. It is neither modified nor copied: a weightless twin of it on the
            meta device is converted and run once.
        rule: a rule name or per-part mapping, as for ``sdfa.convert``; None for a converted model.
        input_shape: the shape of one sample, without the batch dimension.
        seed, **options: passed to ``sdfa.convert`` (e.g. ``k=1``, ``rank=4``).
        name: a label for the report (default: the model's class name).
        input_dtype: the dtype of the traced input, e.g. ``torch.long`` for token ids (default:
            the model's floating dtype).

    Returns:
        A :class:`CostReport`; ``report.macs`` is the per-sample MACs of a training step.
    """
    input_shape = tuple(input_shape)
    if not input_shape or any(not isinstance(s, int) or s < 1 for s in input_shape):
        raise ValueError(
            f"input_shape must be positive integers (one sample, no batch); got {input_shape}"
        )
    label = name or type(model).__name__
    converted = _is_converted(model)
    if rule is None:
        if options:
            raise ValueError("options need a rule; a converted model has its rules already")
        if not converted:
            raise ValueError("rule=None prices a model converted by sdfa.convert; give a rule")
        trace = _trace(_meta_twin(model), input_shape, input_dtype)
        rule_label = _rule_label(rules_of(model), {})
    else:
        if converted:
            raise ValueError("this model is already converted: pass rule=None to price it as is")
        twin = convert(_meta_twin(model), rule, seed=seed, inplace=True, **options)
        trace = _trace(twin, input_shape, input_dtype)
        rule_label = _rule_label(rule, options)
    return CostReport(label, rule_label, _price(*trace))


def compare(
    model: nn.Module,
    rules: Sequence[str | tuple[str, dict]],
    input_shape: Sequence[int],
    *,
    name: str | None = None,
    seed: int = 0,
) -> Comparison:
    """Totals of ``model`` under several rules, with ratios against the first one (usually bp).

    ``rules`` holds rule names, ``(name, options)`` pairs or strings such as ``"dfa:k=1"``.
    """
    reports = []
    for spec in rules:
        rule, opts = parse_rule(spec) if isinstance(spec, str) else spec
        reports.append(costs(model, rule, input_shape, seed=seed, name=name, **opts))
    return Comparison(reports)


@dataclass
class Comparison:
    """The totals of several :class:`CostReport` of one model, side by side."""

    reports: list[CostReport]

    def rows(self) -> list[dict[str, object]]:
        base = self.reports[0].total
        out = []
        for report in self.reports:
            t = report.total
            out.append({
                "model": report.model,
                "rule": report.rule,
                "step_macs": t.macs,
                "step_ratio": _ratio(base.macs, t.macs),
                "backward_macs": t.error + t.update,
                "backward_ratio": _ratio(base.error + base.update, t.error + t.update),
                "error_macs": t.error,
                "movement": t.movement,
                "movement_ratio": _ratio(base.movement, t.movement),
                "reads_per_neuron": t.reads_per_neuron,
            })
        return out

    def to_markdown(self) -> str:
        return self._table(markdown=True)

    def __str__(self) -> str:
        return self._table(markdown=False)

    def _table(self, markdown: bool) -> str:
        base = self.reports[0].rule
        headers = ["rule", "step MACs", f"{base}/rule", "error+update MACs", f"{base}/rule",
                   "data movement", f"{base}/rule", "reads/neuron"]
        rows = [
            [r["rule"], _n(r["step_macs"]), _x(r["step_ratio"]), _n(r["backward_macs"]),
             _x(r["backward_ratio"]), _n(r["movement"]), _x(r["movement_ratio"]),
             f"{r['reads_per_neuron']:,.1f}"]
            for r in self.rows()
        ]
        title = f"{self.reports[0].model}: costs per sample"
        return _format_table(title, headers, rows, markdown, 1)


def parse_rule(spec: str) -> tuple[str, dict]:
    """``"dfa:k=1,init=sign"`` -> ``("dfa", {"k": 1, "init": "sign"})``: the rule specs of every
    command (values read as TOML, so ``per_position=true``)."""
    return parse_rule_spec(spec)


# -- paper architectures ------------------------------------------------------------------------

PAPER_RULES = ("bp", "fa", "dfa", "dfa:k=1")


# The architectures of Crafton et al. 2019, as the model presets of sdfa.models build them:
# label -> (preset, shape of one input, classes). Built on the meta device: even VGG's head
# costs nothing.
PAPER_ARCHITECTURES = {
    "MNIST FC 784-400-10": ("crafton-mnist-fc", (1, 28, 28), 10),
    "MNIST conv 32-64, FC 12544-128-10": ("crafton-mnist-conv", (1, 28, 28), 10),
    "CIFAR-10 FC 3072-1000-1000-1000-10": ("crafton-cifar-fc", (3, 32, 32), 10),
    "CIFAR-10 conv 96-128-256, FC 4096-2048-2048-10": ("crafton-cifar-conv", (3, 32, 32), 10),
    "ImageNet AlexNet head 9216-4096-4096-1000": ("crafton-alexnet-head", (256, 6, 6), 1000),
    "ImageNet VGG head 25088-4096-4096-1000": ("crafton-vgg-head", (512, 7, 7), 1000),
}


def _meta_preset(name: str, input_shape, num_classes: int, **options) -> nn.Module:
    """The model preset ``name`` with weights on the meta device (no memory, no computation)."""
    from .models import build_model

    try:
        with torch.device("meta"):
            return build_model(name, tuple(input_shape), num_classes, **options)
    except TypeError as error:  # an option the preset does not take (as sdfa train reports it)
        raise ValueError(f"model {name!r}: bad model options ({error})") from None


def paper_comparisons(rules: Sequence[str] = PAPER_RULES) -> dict[str, Comparison]:
    """The costs of the architectures of Crafton et al. 2019 under ``rules``."""
    out = {}
    for name, (preset, shape, classes) in PAPER_ARCHITECTURES.items():
        out[name] = compare(_meta_preset(preset, shape, classes), rules, shape, name=name)
    return out


def paper_report(rules: Sequence[str] = PAPER_RULES, markdown: bool = True) -> str:
    """One table for all paper architectures: totals per rule and ratios against the first rule."""
    comparisons = paper_comparisons(rules)
    base = rules[0]
    headers = ["architecture", "rule", "step MACs", f"{base}/rule", "error+update MACs",
               f"{base}/rule", "data movement", f"{base}/rule", "reads/neuron"]
    rows = []
    for name, comparison in comparisons.items():
        for r in comparison.rows():
            rows.append([name, r["rule"], _n(r["step_macs"]), _x(r["step_ratio"]),
                         _n(r["backward_macs"]), _x(r["backward_ratio"]), _n(r["movement"]),
                         _x(r["movement_ratio"]), f"{r['reads_per_neuron']:,.1f}"])
    return _format_table("Costs per sample of one training step", headers, rows, markdown, 2)


def report(
    model: str | None = None,
    rules: Sequence[str] = PAPER_RULES,
    *,
    dataset: str | None = None,
    input_shape: Sequence[int] | None = None,
    num_classes: int | None = None,
    model_options: Mapping[str, object] | None = None,
    seed: int = 0,
    markdown: bool = False,
) -> str:
    """The text of ``sdfa costs``: the paper architectures, or per-layer tables of a preset.

    With a preset name, prints one per-layer table per rule and, for several rules, their totals
    side by side (ratios against the first rule). The preset is sized for ``dataset`` (as
    ``sdfa train --dataset`` does; ``input_shape`` and ``num_classes`` override it), or for
    ``input_shape`` and ``num_classes`` (default 10) alone.
    """
    if not rules:
        raise ValueError("give at least one rule")
    if model is None:
        if dataset or input_shape or num_classes:
            raise ValueError("a data set, input shape or number of classes needs a model preset")
        return paper_report(rules, markdown)
    if dataset is not None:
        from . import data

        shape = data.input_shape(dataset)  # checks the name
        input_shape = input_shape or shape
        num_classes = num_classes or data.DATASETS[dataset].num_classes
        if num_classes is None:
            raise ValueError(
                f"data set {dataset!r} has no fixed number of classes: give num_classes "
                "(--num-classes N)"
            )
    if input_shape is None:
        raise ValueError(
            "a model preset needs a data set or the shape of one input sample, e.g. 1,28,28"
        )
    net = _meta_preset(model, input_shape, num_classes or 10, **(model_options or {}))
    units = [m for _, m in trainable_units(net)]
    # a preset that starts with an embedding reads token ids
    dtype = torch.long if units and isinstance(units[0], nn.Embedding) else None
    reports = []
    for spec in rules:
        rule, options = parse_rule(spec)
        reports.append(costs(net, rule, input_shape, seed=seed, name=model, input_dtype=dtype,
                             **options))
    texts = [r.to_markdown() if markdown else str(r) for r in reports]
    if len(reports) > 1:
        comparison = Comparison(reports)
        texts.append(comparison.to_markdown() if markdown else str(comparison))
    return "\n\n".join(texts)


# -- tracing and pricing ------------------------------------------------------------------------


@dataclass
class _Call:
    """One call of a trainable unit, as seen in the traced forward pass of one sample (shapes
    with the batch dimension, of size 1)."""

    name: str
    module: nn.Module
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    input_grad: bool


def _is_converted(model: nn.Module) -> bool:
    try:
        rules_of(model)
    except ValueError:
        return False
    return True


def _meta_twin(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` whose parameters and buffers live on the meta device (no data)."""
    memo = {}
    for t in itertools.chain(model.parameters(), model.buffers()):
        meta = torch.empty_like(t, device="meta")
        if isinstance(t, nn.Parameter):
            meta = nn.Parameter(meta, requires_grad=t.requires_grad)
        memo[id(t)] = meta
    return copy.deepcopy(model, memo)


def _trace(model: nn.Module, input_shape: tuple[int, ...], input_dtype=None):
    """One eval-mode forward pass of a meta twin: trainable-layer calls, DFA matrices, rules."""
    calls: list[_Call] = []
    finished: dict[str, int] = {}  # module name -> order in which its forward finished
    names = {id(m): n for n, m in model.named_modules()}
    units = {name for name, _ in trainable_units(model)}

    def record(module, args, out):
        name = names[id(module)]
        finished.setdefault(name, len(finished))
        if name in units and args and isinstance(args[0], torch.Tensor):
            x, y = args[0], _first_tensor(out)
            calls.append(_Call(name, module, tuple(x.shape), tuple(y.shape), x.requires_grad))

    for module in model.modules():
        module.register_forward_hook(record)
    reference = next(itertools.chain(model.parameters(), model.buffers()), None)
    dtype = reference.dtype if reference is not None and reference.is_floating_point() else None
    dtype = input_dtype or dtype
    try:
        with torch.enable_grad():
            model.eval()(torch.zeros((1, *input_shape), device="meta", dtype=dtype))
    except (RuntimeError, ValueError, TypeError) as err:
        raise ValueError(
            f"running the model on one input of shape {input_shape} failed: {err}"
        ) from err
    direct = {n: m for n, m in model.named_modules() if isinstance(m, DirectFeedback)}
    config = dfa_config(model)
    # per block output: (positions, projections e B_l per sample); per_position="sum" projects
    # the error summed over the positions once and hands the same result to every position
    once = config is not None and config.per_position == "sum"
    positions = {label: (n, 1 if once else n)
                 for label, n in (config.positions if config is not None else {}).items()}
    return calls, direct, positions, finished, rules_of(model)


def _first_tensor(value):
    if isinstance(value, (tuple, list)):
        return next(t for t in map(_first_tensor, value) if t is not None)
    return value if isinstance(value, torch.Tensor) else None


def _work(call: _Call) -> Work:
    entry = layer_type(call.module)
    if entry is None or entry.cost is None:
        raise ValueError(
            f"no cost formula for {call.name!r} ({type(call.module).__name__}): register its "
            "layer type with one, sdfa.register_layer(<type>, cost=<formula>) (sdfa.layers)"
        )
    return entry.cost(call.module, call.in_shape, call.out_shape)


def _price(calls: list[_Call], direct: dict[str, DirectFeedback],
           positions: dict[str, tuple[int, int]],
           finished: dict[str, int], layer_rules: dict[str, str]) -> list[LayerCost]:
    rows: dict[str, LayerCost] = {}

    def row(name: str) -> LayerCost:
        if name not in rows:
            rows[name] = LayerCost(name or "<model>", rule=layer_rules.get(name, ""))
        return rows[name]

    previous: str | None = None
    for call in calls:
        rule = layer_rules.get(call.name, "bp")
        if rule not in RULE_COSTS:
            raise ValueError(f"rule {rule!r} has no entry in sdfa.costs.RULE_COSTS; add one")
        cost = RULE_COSTS[rule]
        work = _work(call)
        own = row(call.name)
        own.forward += work.forward
        if cost.tangent and previous is not None:  # the unit's input carries a tangent
            # torch's jvp of a layer also runs the product with the (zero) tangent of W: 2x
            own.error += 2 * work.forward
        if any(p.requires_grad for n, p in call.module.named_parameters() if n != "feedback"):
            own.update += work.update
        if call.input_grad:
            # This unit sends delta @ W (or B) down to the block output it reads: that is the
            # error of the unit that produced it (the previous trainable unit of the chain).
            target = row(previous if previous is not None else "<input>")
            target.neurons = math.prod(call.in_shape)
            target.via = cost.via
            target.error += work.error
            target.error_values += work.connections
            target.weight_values += work.connections
            if cost.rewrites:  # usf/frsf with refresh=N rebuild B every N steps: 1/N per step
                refresh = getattr(call.module.rule, "refresh", 1)
                own.feedback_per_step += -(-call.module.weight.numel() // refresh)
            if cost.mirror:
                samples = call.module.rule.config["samples"]
                own.feedback_macs_per_step += 2 * samples * call.module.weight.numel()
        if cost.per_step is not None:
            own.feedback_macs_per_step += cost.per_step(call.module)
        previous = call.name

    for path, feedback in direct.items():
        label = path.removesuffix(FEEDBACK_ATTR).removesuffix(".")
        target = row(label)
        target.rule = target.rule or "dfa"
        macs, gather, errors, weights, target.via = _direct_cost(feedback)
        at, projections = positions.get(label, (1, 1))  # per_position: e B_l at every position
        if label in positions:
            target.via += (f" at {at:,} positions" if projections == at
                           else f" once, of the error summed over {at:,} positions")
        target.neurons = feedback.shape[1] * at
        target.error += macs * projections
        if RULE_COSTS.get(layer_rules.get(label, "dfa"), RULE_COSTS["dfa"]).tangent:
            target.error += math.prod(feedback.shape) * projections  # mean_batch(d u^T)
        target.gather += gather * projections
        target.error_values += errors * at  # the sum over the positions reads every error
        target.weight_values += weights * projections

    if calls:  # the output layer gets its error from the loss
        last = rows[calls[-1].name]
        if last.via == "-":
            last.via, last.neurons = "loss", math.prod(calls[-1].out_shape)
    return [rows[n] for n in sorted(rows, key=lambda n: finished.get(n, -1))]


def _direct_cost(feedback: DirectFeedback) -> tuple[int, int, int, int, str]:
    """(MACs, gather MACs, error values read, feedback weights read, label) of ``e @ B_l``."""
    classes, neurons = feedback.shape
    if isinstance(feedback, SparseLowRankFeedback):
        r, k = feedback.index.shape
        # e U reads the r groups of k entries of e; each neuron then reads one value of e U
        n = r * k + neurons
        return n, n, n, n, f"e U V (k={k}, r={r})"
    if isinstance(feedback, ConvFeedback):
        # e K: each of the Ch x d_1...d_n kernel outputs reads C / groups entries of e; the
        # tiling over the positions copies, it computes nothing
        macs = classes // feedback.groups * feedback.weight[0].numel() * feedback.groups
        d = "x".join(map(str, feedback.weight.shape[2:]))
        return macs, 0, macs, macs, f"e K (dilation {d}, groups={feedback.groups})"
    if isinstance(feedback, SparseFeedback):
        k = feedback.index.shape[1]
        return k * neurons, k * neurons, k * neurons, k * neurons, f"e B (k={k})"
    if isinstance(feedback, LowRankFeedback):
        r = feedback.u.shape[1]
        # e U once per layer (reads e and U), then each neuron reads r values of eU and r of V.
        return (classes * r + r * neurons, 0, classes + r * neurons, classes * r + r * neurons,
                f"e U V (r={r})")
    if isinstance(feedback, DenseFeedback):
        return classes * neurons, 0, classes * neurons, classes * neurons, "e B"
    if hasattr(feedback, "direct_cost"):  # a device backend (sdfa.hardware) prices itself
        return feedback.direct_cost()
    raise ValueError(f"no cost model for feedback matrices of type {type(feedback).__name__}")


def _rule_label(rule, options: Mapping) -> str:
    if isinstance(rule, Mapping):
        names = sorted({(v[0] if isinstance(v, tuple) else v) or "bp" for v in rule.values()})
        base = "+".join(names)
    else:
        base = str(rule)
    # Only the options that change the costs: the sparsity and the rank of DFA feedback.
    keys = ("k", "rank", "dilation", "groups", "per_position")
    opts = [f"{k}={options[k]}" for k in keys if options.get(k) not in (None, False)]
    if isinstance(options.get("boundaries"), str):  # a named set, e.g. Launay et al.'s macro
        opts.insert(0, f"boundaries={options['boundaries']}")
    if options.get("after_output") is False:  # the error before the output unit (d values)
        opts.append("after_output=False")
    return f"{base} {','.join(opts)}".strip()


# -- formatting ---------------------------------------------------------------------------------


def _n(value: int) -> str:
    return f"{value:,}"


def _ratio(base: int, value: int) -> float:
    return base / value if value else math.inf


def _x(ratio: float) -> str:
    return "inf" if math.isinf(ratio) else f"{ratio:,.2f}x"


def _format_table(title: str, headers: list[str], rows: list[list[str]], markdown: bool,
                  text_columns: int, notes: Sequence[str] = ()) -> str:
    """A Markdown or aligned plain-text table; the first ``text_columns`` are left-aligned."""
    if markdown:
        rule = ["---" if i < text_columns else "---:" for i in range(len(headers))]
        lines = [f"**{title}**", "", *("| " + " | ".join(r) + " |" for r in [headers, rule, *rows])]
        return "\n".join(lines + ([""] + list(notes) if notes else []))
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def line(cells):
        return "  ".join(
            c.ljust(w) if i < text_columns else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    lines = [title, line(headers), line(["-" * w for w in widths]), *map(line, rows)]
    return "\n".join(lines + list(notes))
