"""``convert()``: turn an ordinary PyTorch model into one trained by a chosen learning rule.

Modelled on torch.ao's ``convert(module, mapping)`` and Opacus's ``make_private``: the user keeps
their model class, optimizer and ``loss.backward()``; conversion swaps or hooks the trainable
units (the layer types of :mod:`sdfa.layers`) and leaves everything else alone. Different parts
of a model can use different rules, e.g. a frozen (transferred) feature extractor and a DFA
classifier.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from torch import nn

from .dfa import FEEDBACK_ATTR
from .feedback import DirectFeedback, check_seed
from .layers import FeedbackLayer, twin_of
from .layers.registry import trainable_units
from .rules import RULES, Rule, available_rules

FROZEN = "frozen"
# Layers whose parameters learn from the signal that reaches their own output, so every rule
# trains them with their local gradient (autograd between the trainable units).
LOCAL_LAYERS = (
    nn.modules.batchnorm._NormBase,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.PReLU,
)
_ATTR = "_sdfa_rules"


def convert(
    model: nn.Module,
    rule: str | Mapping[str, str | None | tuple[str, dict]],
    *,
    seed: int = 0,
    inplace: bool = False,
    **options,
) -> nn.Module:
    """Return ``model`` set up to be trained by ``rule`` with a plain ``loss.backward()``.

    Args:
        model: any module. Its trainable units are the modules of a registered layer type
            (:mod:`sdfa.layers`: Linear, Conv1d/2d/3d, ConvTranspose1d/2d/3d, Embedding, RNN,
            LSTM, GRU, MultiheadAttention, Transformer layers; ``sdfa.register_layer`` adds
            yours). DFA trains every module inside a block by autograd; the layer-wise rules
            need a twin for each unit and accept, besides, parameter-free and local layers
            (activations, norms, pooling, dropout, flatten, residual additions).
        rule: a rule name (see ``sdfa.RULES``), or a mapping from submodule name prefixes to
            rule names for per-part rules, e.g. ``{"features": "frozen", "classifier": "dfa"}``.
            ``""`` is the whole model; the longest matching prefix wins; parts that no prefix
            covers, and parts mapped to None, keep plain backprop. A value may also be a
            ``(rule, {option: value})`` pair for options that only apply to that part.
            ``"frozen"`` turns off ``requires_grad`` for the part's parameters.
        seed: seeds every random feedback matrix (same seed, same matrices, on any machine);
            an integer in [0, 2**63).
        inplace: modify ``model`` itself instead of a deep copy (keeps parameter identity, so an
            optimizer created before conversion keeps working). By default the returned model
            is a copy: **build the optimizer on the returned model**; one built before on the
            original trains nothing.
        **options: rule options, e.g. ``k=1`` (sparse DFA), ``rank=4`` (low-rank DFA),
            ``init="gaussian"``, ``scale=0.1``, ``output="fc"``, ``boundaries=["layer1", ...]``,
            ``per_position=True``, ``dilation=2``, ``groups=2`` (docs/engine.md). Each option
            goes to every rule of the conversion that takes it.

    Raises:
        ValueError: unknown rule or option, an option out of range, a model that is already
            converted, or a parametric layer that the rule cannot train (the message names it).
    """
    parts = _parse_parts(rule)
    check_seed(seed)
    if getattr(model, _ATTR, None) is not None:
        raise ValueError("this model is already converted; convert the original model instead")
    if not inplace:
        model = copy.deepcopy(model)
    modules = dict(model.named_modules())
    for prefix in parts:
        if prefix and prefix not in modules:
            children = ", ".join(n for n, _ in model.named_children())
            raise ValueError(
                f"{prefix!r} names no submodule of the model; its children are: {children}"
            )

    rules = _build_rules(parts, options)
    units = dict(trainable_units(model))
    _check_parts_inside_units(parts, units)
    assigned: dict[str, list[tuple[str, nn.Module]]] = {prefix: [] for prefix in parts}
    layer_rules: dict[str, str] = {}
    unit = None  # the unit that the module being visited belongs to
    for name, module in modules.items():
        prefix = _part_of(name, parts)
        rule_name = parts[prefix][0] if prefix is not None else "bp"
        if rule_name == FROZEN:
            for p in module.parameters(recurse=False):
                p.requires_grad_(False)
        if name in units:
            unit = name
            layer_rules[name] = rule_name
            if prefix is not None:
                assigned[prefix].append((name, module))
            if prefix in rules and rules[prefix].needs_twin:
                _check_twin(name, module, rule_name, parts)
        elif unit is not None and (unit == "" or name.startswith(unit + ".")):
            continue  # part of a unit: trained with it
        elif prefix in rules and rules[prefix].needs_twin:  # DFA trains anything in a block
            _check_supported(name, module, rule_name, parts)

    # Layer-wise rules swap modules; DFA hooks the final ones, so it goes last.
    for prefix in sorted(rules, key=lambda p: rules[p].direct):
        model = rules[prefix].apply(model, assigned[prefix], seed)
    setattr(model, _ATTR, layer_rules)
    return model


def rules_of(model: nn.Module) -> dict[str, str]:
    """The rule name that trains each trainable layer of a converted model (qualified names)."""
    layer_rules = getattr(model, _ATTR, None)
    if layer_rules is None:
        raise ValueError("this model was not converted by sdfa.convert")
    return dict(layer_rules)


def feedback_matrices(model: nn.Module) -> dict[str, torch.Tensor]:
    """The feedback matrix of every layer that has one, as a dense tensor, by qualified name.

    DFA: for each hidden layer l, B_l of shape (C, N_l), with C the number of model outputs and
    N_l the number of values of the layer's block output per sample. Layer-wise rules: the
    tensor used in place of W at this step (W's shape).
    """
    layer_rules = rules_of(model)
    matrices = {}
    for name, module in model.named_modules():
        direct = getattr(module, FEEDBACK_ATTR, None)
        if isinstance(direct, DirectFeedback):
            matrices[name] = direct.dense().detach()
        elif isinstance(module, FeedbackLayer):
            matrices[name] = module.feedback_weight().detach()
    if "dfa" in layer_rules.values() and not any(
        isinstance(m, DirectFeedback) for m in model.modules()
    ):
        raise ValueError(
            "DFA feedback matrices are created at the first forward pass, when the size of each "
            "block output is known: run one forward pass, or pass example_input= to convert()"
        )
    return matrices


def _parse_parts(rule) -> dict[str, tuple[str, dict]]:
    if isinstance(rule, str) or rule is None:
        rule = {"": rule}
    if not isinstance(rule, Mapping):
        raise ValueError(f"rule must be a rule name or a mapping of parts to rules; got {rule!r}")
    parts = {}
    for prefix, value in rule.items():
        name, opts = value if isinstance(value, tuple) else (value, {})
        name = "bp" if name is None else name
        if name not in RULES and name != FROZEN:
            raise ValueError(
                f"unknown rule {name!r}; available rules: {', '.join(available_rules())} "
                f"(and {FROZEN!r} for parts that must not learn)"
            )
        parts[prefix] = (name, dict(opts))
    return parts


def _build_rules(parts: dict[str, tuple[str, dict]], options: dict) -> dict[str, Rule]:
    rules = {}
    used = set()
    for prefix, (name, opts) in parts.items():
        if name == FROZEN:
            continue
        cls = RULES[name]
        shared = {k: v for k, v in options.items() if k in cls.options}
        used.update(shared)
        rules[prefix] = cls(**shared, **opts)
    unused = sorted(set(options) - used)
    if unused:
        accepted = sorted({k for r in rules.values() for k in r.options})
        raise ValueError(
            f"unknown option(s) {', '.join(unused)} for rule(s) "
            f"{', '.join(sorted({r.name for r in rules.values()})) or FROZEN}; "
            f"options they take: {', '.join(accepted) or 'none'}"
        )
    return rules


def _part_of(name: str, parts: Mapping) -> str | None:
    best = None
    for prefix in parts:
        if prefix == "" or name == prefix or name.startswith(prefix + "."):
            if best is None or len(prefix) > len(best):
                best = prefix
    return best


def _suggest(parts: Mapping, name: str, fix: str) -> str:
    """The user's mapping with ``name`` mapped to ``fix``: the rest keeps its rule."""
    mapping = {prefix: value[0] if not value[1] else value for prefix, value in parts.items()}
    mapping[name] = fix
    return repr(mapping)


def _check_supported(name: str, module: nn.Module, rule_name: str, parts: Mapping) -> None:
    own = [n for n, p in module.named_parameters(recurse=False) if p is not None]
    if own and not isinstance(module, LOCAL_LAYERS):
        raise ValueError(
            f"rule {rule_name!r} cannot train module {name or '<root>'!r} "
            f"({type(module).__name__} with parameters {', '.join(own)}): it is no registered "
            f"layer type (sdfa.register_layer adds one) and no normalization layer trained by "
            f"its local gradient. Keep the rest on {rule_name!r} and train it by backprop, or "
            f"freeze it: rule={_suggest(parts, name, 'bp')} (or 'frozen'); 'dfa' trains any "
            "module inside its blocks"
        )


def _check_twin(name: str, module: nn.Module, rule_name: str, parts: Mapping) -> None:
    if twin_of(module) is None:
        raise ValueError(
            f"rule {rule_name!r} cannot train module {name or '<root>'!r} "
            f"({type(module).__name__}): layer-wise rules need its layer-wise twin and "
            f"{type(module).__name__} has none registered (sdfa.register_layer(..., twin=...)). "
            f"Keep the rest on {rule_name!r} and train it by backprop, or freeze it: "
            f"rule={_suggest(parts, name, 'bp')} (or 'frozen'); 'dfa' trains it inside its block"
        )


def _check_parts_inside_units(parts: Mapping, units: Mapping[str, nn.Module]) -> None:
    """A unit learns as one piece: a part strictly inside one may only freeze parameters."""
    for prefix, (name, _) in parts.items():
        if name == FROZEN:
            continue
        for unit, module in units.items():
            if prefix.startswith(unit + ".") or (unit == "" and prefix):
                raise ValueError(
                    f"{prefix!r} is inside {unit or '<root>'!r} ({type(module).__name__}), a "
                    f"unit that its rule trains as one piece: map {unit!r} instead (or "
                    f"{prefix!r} to 'frozen')"
                )
