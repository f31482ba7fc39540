"""Direct feedback alignment wired into an ordinary model with forward hooks.

How it works, without touching the user's layers:

* Every hidden block output (by default: the input of each trainable unit after the first; or
  the outputs of the modules named in ``boundaries=``) is recorded during the forward pass and
  handed on *detached*. So no gradient travels from one block to the one below, and autograd never
  computes the discarded ``delta @ W`` products: a layer whose input is detached gets only its
  weight gradient.
* After the output layer, one autograd node takes the network output y and all recorded block
  outputs h_l as inputs and returns y unchanged. Its backward receives e = dL/dy and returns e to
  y (the output layer gets its true gradient) and ``e @ B_l`` to every h_l; autograd then applies
  the local derivatives of everything inside the block (activations, norms, pooling, attention,
  recurrences: any module) and computes the gradient of every parameter of the block.
* With ``per_position=True`` the output y has shape (batch, *positions, C) and every block output
  (batch, *positions, d_l): B_l has shape (C, d_l) and is applied at every position;
  ``per_position="sum"`` sends the error summed over the positions, (sum_p e_p) B_l, to every
  position (a spiking network's error once per sample instead of at every time step).
* With ``after_output=False`` the error is taken *before* the output unit instead: e is the
  gradient at the output unit's input (for a language model, the d-dimensional input of the
  vocabulary projection, as TinyDFA's default ``dfa_after_vocab=False``), computed by autograd
  through the output unit alone, and B_l has shape (d, N_l).
* A module whose output is a tuple (nn.LSTM's ``(output, (h, c))``) marks one tensor of it as its
  block output, the first one by default or the one at the index given with
  ``boundaries=[("lstm", (1, 0))]``; every other tensor of the tuple is detached too, so no
  gradient crosses the boundary.

The feedback matrices B_l (:mod:`sdfa.feedback`) are created at the first forward pass, when
their size is known, as a child module ``dfa_feedback`` of the hidden layer they belong to; a
``load_state_dict`` pre-hook creates them from a checkpoint before that.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn
from torch.autograd import Function

from . import feedback as fb
from .layers import backprop_enabled, trainable_units

FEEDBACK_ATTR = "dfa_feedback"
_CONFIG_ATTR = "_sdfa_dfa"


def dfa_config(model: nn.Module) -> DirectFeedbackAlignment | None:
    """The DFA set-up that ``convert`` installed on ``model`` (None if it has none).

    For code that builds on DFA's structure (e.g. :mod:`sdfa.privacy`): ``output_name``, the
    chain of block outputs ``producer`` and ``boundaries``.
    """
    return getattr(model, _CONFIG_ATTR, None)


class _DirectFeedback(Function):
    """Identity on y in the forward pass; sends ``e @ B_l`` to every block output h_l backwards.

    ``per_position``: e of shape (batch, *positions, C) is projected at every position.
    """

    @staticmethod
    def forward(ctx, per_position, feedbacks, y, *hidden):
        ctx.per_position = per_position
        ctx.feedbacks = feedbacks
        ctx.shapes = [(h.shape, h.dtype) for h in hidden]
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad):
        if ctx.per_position == "sum":  # once per sample: the error summed over the positions
            e = grad.flatten(1, -2).sum(1)
        else:
            e = grad.reshape(-1, grad.shape[-1]) if ctx.per_position else grad.flatten(1)
        # Under autocast e and h are bfloat16 while B keeps float32: project in B's dtype and
        # hand each block output a gradient of its own dtype (both casts are no-ops otherwise).
        hidden = [
            _spread(f.project(e.to(f.dtype)), shape, ctx.per_position).to(dtype)
            for f, (shape, dtype) in zip(ctx.feedbacks, ctx.shapes)
        ]
        return (None, None, grad, *hidden)


def _spread(projected: torch.Tensor, shape: torch.Size, per_position) -> torch.Tensor:
    """The projected error in the block output's shape; ``"sum"``: the same at every position."""
    if per_position != "sum":
        return projected.reshape(shape)
    batch, features = shape[0], shape[-1]
    return projected.view(batch, *(1,) * (len(shape) - 2), features).expand(shape)


class DirectFeedbackAlignment:
    """The hooks and the configuration of DFA on one model (created by ``convert``)."""

    def __init__(
        self,
        model: nn.Module,
        layers: list[tuple[str, nn.Module]],
        *,
        seed: int,
        k=None,
        rank=None,
        init="uniform",
        scale=None,
        output=None,
        boundaries=None,
        example_input=None,
        per_position=False,
        dilation=None,
        groups=None,
        feedback="exact",
        feedback_options=None,
        after_output=True,
    ):
        if not layers:
            raise ValueError(
                "rule 'dfa' found no trainable unit to train (sdfa.layers.LAYERS lists the layer "
                "types; add yours with sdfa.register_layer)"
            )
        if not isinstance(per_position, bool) and per_position != "sum":
            raise ValueError(
                f"per_position must be True or False, or 'sum' (the error summed over the "
                f"positions); got {per_position!r}"
            )
        if not isinstance(after_output, bool):
            raise ValueError(f"after_output must be True or False; got {after_output!r}")
        if per_position and dilation is not None:
            raise ValueError(
                "per_position=True shares B over positions; dilation= (convolutional feedback) "
                "takes a per-sample error: choose one"
            )
        self.seed = seed
        self.per_position = per_position
        self.after_output = after_output
        self.options = {
            "k": k, "rank": rank, "init": init, "scale": scale, "dilation": dilation,
            "groups": groups,
        }
        self.backend = fb.BACKENDS.lookup(feedback)
        if feedback_options is not None and not isinstance(feedback_options, dict):
            raise ValueError(
                f"feedback_options must be a dict of device options; got {feedback_options!r}"
            )
        self.backend_options = self.backend.check(
            dict(feedback_options or {}), {**self.options, "per_position": per_position}
        )
        self.boundaries = _parse_boundaries(_named_boundaries(model, boundaries))
        self.modules = dict(model.named_modules())
        self.provisional: set[str] = set()  # matrices made at convert(), before any forward
        self.positions: dict[str, int] = {}  # per_position: positions of each block output
        names = [name for name, _ in layers]
        self.output_name = output if output is not None else names[-1]
        if self.output_name not in names:
            raise ValueError(
                f"output={self.output_name!r} is not a trainable layer trained by 'dfa'; "
                f"choose one of: {', '.join(names)}"
            )
        output_layer = self.modules[self.output_name]
        num_classes = _error_size(output_layer, after_output)
        fb.check_options(num_classes, k, rank, init, dilation, groups)
        self.pending: dict[int, tuple[str, torch.Tensor, torch.Tensor]] = {}
        self.output_ran = False
        setattr(model, _CONFIG_ATTR, self)

        model.register_forward_pre_hook(self._start)
        model.register_forward_hook(self._finish)
        model.register_load_state_dict_pre_hook(self._create_from_state_dict)
        output_layer.register_forward_pre_hook(partial(self._detach_input, self.output_name))
        output_layer.register_forward_hook(self._project)
        if self.boundaries is None:
            # Chain mode: the input of each trainable unit is the block output of the unit
            # registered before it (exact for nn.Sequential and for models that define their
            # layers in the order they run).
            trainable = [n for n, _ in trainable_units(model)]
            self.producer = {
                n: trainable[trainable.index(n) - 1] if trainable.index(n) else None for n in names
            }
            for name in names:
                if name != self.output_name:
                    self.modules[name].register_forward_pre_hook(partial(self._detach_input, name))
            if names == trainable and self.output_name == names[-1] and example_input is None:
                self._create_for_linear_chain(names)
        else:
            missing = [b for b in self.boundaries if b not in self.modules]
            if missing:
                raise ValueError(f"boundaries name no module of the model: {', '.join(missing)}")
            self.producer = {self.output_name: None}
            for name, path in self.boundaries.items():
                self.modules[name].register_forward_hook(partial(self._detach_output, name, path))

        if example_input is not None:  # create B now, without touching BatchNorm statistics
            was_training = model.training
            with torch.enable_grad():
                model.eval()(example_input)
            model.train(was_training)

    # -- forward hooks ------------------------------------------------------------------------

    def _active(self, x) -> bool:
        return (
            torch.is_grad_enabled()
            and isinstance(x, torch.Tensor)
            and x.requires_grad
            and not backprop_enabled()
        )

    def _start(self, module, args):
        self.pending.clear()
        self.output_ran = False

    def _finish(self, module, args, out):
        self.output_ran = False
        if self.pending:
            labels = ", ".join(label for label, _, _ in self.pending.values())
            self.pending.clear()
            raise RuntimeError(
                f"DFA: block output(s) of {labels} were recorded but the output layer "
                f"{self.output_name!r} did not run after them. The output layer must be the "
                "last trainable layer to run: pass output='<name>' to sdfa.convert."
            )

    def _record(self, label: str, x: torch.Tensor) -> torch.Tensor:
        entry = self.pending.get(id(x))
        if entry is None:
            entry = self.pending[id(x)] = (label, x, x.detach())
        return entry[2]

    def _detach_input(self, name, module, args):
        if backprop_enabled():  # the hooks step aside entirely (also for layer-parallel stages)
            return None
        if self.output_ran:
            raise RuntimeError(
                f"DFA: layer {name!r} ran after the output layer "
                f"{self.output_name!r}. The output layer must be the last trainable layer to run: "
                "pass output='<name>' to sdfa.convert."
            )
        x = args[0]
        if name == self.output_name and not self.after_output:
            return self._project_input(module, args)
        if not self._active(x):
            return None
        if id(x) not in self.pending:
            label = self.producer.get(name)
            if label is None:  # the model's own input, or (boundaries mode) an unmarked block
                if name == self.output_name:
                    raise RuntimeError(
                        f"DFA: the input of the output layer {self.output_name!r} needs a gradient "
                        "but is not a marked block output: add the module that produces it to "
                        "boundaries=[...]"
                    )
                return None
            self._record(label, x)
        if len(args) == 1:
            return (self.pending[id(x)][2],)
        # the unit's other tensor inputs (attention's key and value) are cut off too: no
        # gradient crosses a block boundary
        return (self.pending[id(x)][2], *(_detached(a) for a in args[1:]))

    def _detach_output(self, name, path, module, args, out):
        if path is None and isinstance(out, torch.Tensor):  # the common case, kept fast
            return self._record(name, out) if self._active(out) else None
        chosen, path = _pick(out, path, name)
        if not self._active(chosen):
            return None
        return _rebuild(out, path, self._record(name, chosen))

    def _project_input(self, module, args):
        """``after_output=False``: the error is the gradient at the output unit's input x, so the
        feedback node goes on x (autograd brings dL/dx through the output unit alone). A block
        output recorded for x is handed on detached; a part between the last boundary and the
        output unit (a final LayerNorm) gets its true gradient from dL/dx."""
        x = args[0]
        if self._active(x) and id(x) not in self.pending:
            label = self.producer.get(self.output_name)
            if label is not None:  # chain mode: x is the block output of the unit before
                self._record(label, x)
        if id(x) in self.pending:
            x = self.pending[id(x)][2]
        y = self._feed(x)
        return None if y is None else (y, *(_detached(a) for a in args[1:]))

    def _project(self, module, args, y):
        if backprop_enabled():
            return None
        self.output_ran = True
        return self._feed(y) if self.after_output else None

    def _feed(self, y):
        """y unchanged; in the backward pass e = dL/dy goes on as ``e @ B_l`` to every pending
        block output."""
        if not self.pending:
            return None
        entries = list(self.pending.values())
        self.pending.clear()
        labels = [label for label, _, _ in entries]
        if len(set(labels)) < len(labels):
            raise RuntimeError(
                f"DFA: several block outputs were attributed to the same layer ({labels}); the "
                "layers do not form a chain. Name the block outputs with boundaries=[...]."
            )
        feedbacks = tuple(self._feedback(label, h, y) for label, h, _ in entries)
        if self.provisional:  # the first forward pass confirmed the matrices made at convert()
            self.provisional.clear()
        return _DirectFeedback.apply(self.per_position, feedbacks, y, *(h for _, h, _ in entries))

    # -- feedback matrices ----------------------------------------------------------------------

    def _sizes(self, label: str, h: torch.Tensor, y: torch.Tensor) -> tuple[int, int]:
        """(C, N) of the feedback matrix that block output ``h`` needs for output ``y``."""
        if h.shape[0] != y.shape[0]:
            raise ValueError(
                f"the block output of {label!r} has shape {tuple(h.shape)} and the output of "
                f"{self.output_name!r} {tuple(y.shape)}: a block output must have the batch "
                "dimension first (nn.RNN/LSTM/GRU's h_n is (layers, batch, hidden): mark the "
                "output sequence, or a module that returns h_n batch first)"
            )
        if not self.per_position:  # y.shape, not y[0]: Poisson sampling makes empty batches
            return y.shape[1:].numel(), h.shape[1:].numel()
        if h.dim() != y.dim() or h.shape[:-1] != y.shape[:-1]:
            raise ValueError(
                f"per_position=True needs every block output to have the positions of the output "
                f"(batch, *positions, features): the block output of {label!r} has shape "
                f"{tuple(h.shape)}, the output of {self.output_name!r} {tuple(y.shape)}"
            )
        self.positions[label] = h.shape[1:-1].numel()
        return y.shape[-1], h.shape[-1]

    def _feedback(self, label: str, h: torch.Tensor, y: torch.Tensor) -> fb.DirectFeedback:
        owner = self.modules[label]
        num_classes, num_neurons = self._sizes(label, h, y)
        feedback = getattr(owner, FEEDBACK_ATTR, None)
        if feedback is not None and (
            feedback.shape != (num_classes, num_neurons)
            or (isinstance(feedback, fb.ConvFeedback) and feedback.sample_shape != h.shape[1:])
        ):
            if label not in self.provisional:
                raise RuntimeError(
                    f"DFA: the feedback matrix of {label!r} has shape {feedback.shape} but this "
                    f"forward pass needs ({num_classes}, {num_neurons}): did the input size "
                    "change?"
                )
            feedback = None  # made at convert() for one feature vector per sample: remake it
        if feedback is None:
            # float32 at least: a first forward pass under autocast (bfloat16) must not make B
            # a bfloat16 matrix
            dtype = torch.promote_types(h.dtype, torch.float32)
            feedback = self._make(label, num_classes, num_neurons, h.shape[1:], dtype, h.device)
        return feedback

    def _make(self, label, num_classes, num_neurons, sample_shape, dtype, device):
        options = self.options
        if options["dilation"] is not None and len(sample_shape) < 2:
            # convolutional feedback is for (channels, *positions) block outputs; a flat one
            # (the input of a classifier's Linear) gets the dense matrix
            options = {**options, "dilation": None, "groups": None}
        feedback = fb.make_feedback(
            num_classes,
            num_neurons,
            seed=self.seed,
            name=label,
            sample_shape=tuple(sample_shape),
            dtype=dtype,
            device=device,
            **options,
        )
        feedback = self.backend.build(
            feedback, options=self.backend_options, seed=self.seed, name=label
        )
        self.modules[label].add_module(FEEDBACK_ATTR, feedback)
        return feedback

    def _create_for_linear_chain(self, names: list[str]) -> None:
        """Make B at convert() when every size is known: a chain whose units after the first,
        the output included, are nn.Linear (so ``feedback_matrices`` works before any forward
        pass). Assumes one feature vector per sample (or per position); a first forward pass
        that needs other sizes remakes them from the seed."""
        consumers = names[1:]
        if (
            self.options["dilation"] is not None
            or not consumers
            or not all(isinstance(self.modules[n], nn.Linear) for n in consumers)
            or not all(p.requires_grad for n in names for p in self.modules[n].parameters())
        ):
            return
        num_classes = _error_size(self.modules[self.output_name], self.after_output)
        for label, consumer in zip(names, consumers):
            weight = self.modules[consumer].weight
            n = weight.shape[1]
            self._make(label, num_classes, n, (n,), weight.dtype, weight.device)
            self.provisional.add(label)

    def _create_from_state_dict(self, module, state_dict, prefix, *args):
        """Create empty feedback modules for the ones a checkpoint holds, so loading fills them."""
        self.provisional.clear()  # loaded matrices are the user's, never remade
        for label, owner in self.modules.items():
            key = f"{prefix}{label}.{FEEDBACK_ATTR}." if label else f"{prefix}{FEEDBACK_ATTR}."
            if getattr(owner, FEEDBACK_ATTR, None) is not None:
                continue
            extra = state_dict.get(key + "_extra_state") or {}
            device = self.backend.empty(state_dict, key, self.backend_options)
            if device is not None:
                empty = device
            elif key + "weight" in state_dict and "groups" in extra:
                empty = fb.ConvFeedback(
                    torch.empty_like(state_dict[key + "weight"]), extra["groups"], extra["shape"]
                )
            elif key + "weight" in state_dict:
                empty = fb.DenseFeedback(torch.empty_like(state_dict[key + "weight"]))
            elif key + "group" in state_dict:
                empty = fb.SparseLowRankFeedback(
                    *(torch.empty_like(state_dict[key + n]) for n in ("index", "u", "group", "v")),
                    extra["num_classes"],
                )
            elif key + "index" in state_dict:
                empty = fb.SparseFeedback(
                    torch.empty_like(state_dict[key + "index"]),
                    torch.empty_like(state_dict[key + "value"]),
                    state_dict[key + "_extra_state"]["num_classes"],
                )
            elif key + "u" in state_dict:
                empty = fb.LowRankFeedback(
                    torch.empty_like(state_dict[key + "u"]), torch.empty_like(state_dict[key + "v"])
                )
            else:
                continue
            owner.add_module(FEEDBACK_ATTR, empty)


def _error_size(output_layer: nn.Module, after_output: bool) -> int | None:
    """C, the size of the error e: the outputs of the output unit, or (``after_output=False``)
    its inputs; None when only the first forward pass can tell."""
    if not isinstance(output_layer, nn.Linear):
        return None
    return output_layer.out_features if after_output else output_layer.in_features


def _detached(value):
    return value.detach() if isinstance(value, torch.Tensor) and value.requires_grad else value


NAMED_BOUNDARIES = "sdfa_boundaries"


def _named_boundaries(model: nn.Module, boundaries):
    """``boundaries="macro"``: a list that the model publishes under that name in its attribute
    ``sdfa_boundaries`` (a dict; the sequence presets publish Launay et al.'s feedback points)."""
    if not isinstance(boundaries, str):
        return boundaries
    named = getattr(model, NAMED_BOUNDARIES, None) or {}
    if boundaries not in named:
        offers = f"it names: {', '.join(named)}" if named else "it names none"
        raise ValueError(
            f"boundaries={boundaries!r} is no boundary set of this model ({offers}); give a "
            "list of module names, or one of its names"
        )
    return list(named[boundaries])


def _parse_boundaries(boundaries) -> dict[str, tuple[int, ...] | None] | None:
    """``["a", ("lstm", 0), ("rnn", (1, 0))]`` -> {name: index path into the module's output}."""
    if boundaries is None:
        return None
    if isinstance(boundaries, str) or not isinstance(boundaries, (list, tuple)):
        raise ValueError(
            f"boundaries must be a list of module names (or (name, index) pairs for modules "
            f"whose output is a tuple); got {boundaries!r}"
        )
    parsed = {}
    for entry in boundaries:
        name, index = (entry, None) if isinstance(entry, str) else (tuple(entry) + (None,))[:2]
        path = (index,) if isinstance(index, int) else index
        if not isinstance(name, str) or not (
            path is None or (isinstance(path, tuple) and all(isinstance(i, int) for i in path))
        ):
            raise ValueError(
                f"a boundary is a module name or a (name, index) pair, the index an int or a "
                f"tuple of ints into the module's output; got {entry!r}"
            )
        parsed[name] = path
    return parsed


def _pick(out, path, name):
    """The tensor at ``path`` in a module's output (None: the first tensor), and its path."""
    if path is None:
        stack = [((), out)]
        while stack:
            where, value = stack.pop(0)
            if isinstance(value, torch.Tensor):
                return value, where
            if isinstance(value, (tuple, list)):
                stack[:0] = [(where + (i,), v) for i, v in enumerate(value)]
        raise RuntimeError(f"DFA: the output of boundary {name!r} holds no tensor")
    value = out
    try:
        for i in path:
            value = value[i]
    except (IndexError, TypeError, KeyError):
        value = None
    if not isinstance(value, torch.Tensor):
        raise RuntimeError(
            f"DFA: boundary ({name!r}, {path}) picks no tensor of the module's output "
            f"({type(out).__name__}); give the index of a tensor in it"
        )
    return value, path


def _rebuild(out, path, chosen):
    """``out`` with ``chosen`` at ``path`` and every other tensor detached (path None: off it)."""
    if isinstance(out, torch.Tensor):
        return chosen if path == () else out.detach()
    if isinstance(out, (tuple, list)):
        items = [
            _rebuild(v, path[1:] if path and path[0] == i else None, chosen)
            for i, v in enumerate(out)
        ]
        return type(out)(*items) if hasattr(out, "_fields") else type(out)(items)
    return out
