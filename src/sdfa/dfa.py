"""Direct feedback alignment wired into an ordinary model with forward hooks.

How it works, without touching the user's layers:

* Every hidden block output (by default: the input of each trainable layer after the first; or
  the outputs of the modules named in ``boundaries=``) is recorded during the forward pass and
  handed on *detached*. So no gradient travels from one block to the one below, and autograd never
  computes the discarded ``delta @ W`` products: a layer whose input is detached gets only its
  weight gradient.
* After the output layer, one autograd node takes the network output y and all recorded block
  outputs h_l as inputs and returns y unchanged. Its backward receives e = dL/dy and returns e to
  y (the output layer gets its true gradient) and ``e @ B_l`` to every h_l; autograd then applies
  the local derivatives (activation, batch norm, pooling, dropout) and computes dW_l.

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
from .layers import backprop_enabled

FEEDBACK_ATTR = "dfa_feedback"
_CONFIG_ATTR = "_sdfa_dfa"


def dfa_config(model: nn.Module) -> DirectFeedbackAlignment | None:
    """The DFA set-up that ``convert`` installed on ``model`` (None if it has none).

    For code that builds on DFA's structure (e.g. :mod:`sdfa.privacy`): ``output_name``, the
    chain of block outputs ``producer`` and ``boundaries``.
    """
    return getattr(model, _CONFIG_ATTR, None)


class _DirectFeedback(Function):
    """Identity on y in the forward pass; sends ``e @ B_l`` to every block output h_l backwards."""

    @staticmethod
    def forward(ctx, feedbacks, y, *hidden):
        ctx.feedbacks = feedbacks
        ctx.shapes = [h.shape for h in hidden]
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad):
        e = grad.flatten(1)
        hidden = [f.project(e).reshape(shape) for f, shape in zip(ctx.feedbacks, ctx.shapes)]
        return (None, grad, *hidden)


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
    ):
        if not layers:
            raise ValueError("rule 'dfa' found no trainable nn.Linear / nn.Conv2d layer to train")
        self.seed = seed
        self.options = {"k": k, "rank": rank, "init": init, "scale": scale}
        self.boundaries = boundaries
        self.modules = dict(model.named_modules())
        names = [name for name, _ in layers]
        self.output_name = output if output is not None else names[-1]
        if self.output_name not in names:
            raise ValueError(
                f"output={self.output_name!r} is not a trainable layer trained by 'dfa'; "
                f"choose one of: {', '.join(names)}"
            )
        output_layer = self.modules[self.output_name]
        num_classes = output_layer.out_features if isinstance(output_layer, nn.Linear) else None
        fb.check_options(num_classes, k, rank, init)
        self.pending: dict[int, tuple[str, torch.Tensor, torch.Tensor]] = {}
        self.output_ran = False
        setattr(model, _CONFIG_ATTR, self)

        model.register_forward_pre_hook(self._start)
        model.register_forward_hook(self._finish)
        model.register_load_state_dict_pre_hook(self._create_from_state_dict)
        output_layer.register_forward_pre_hook(partial(self._detach_input, self.output_name))
        output_layer.register_forward_hook(self._project)
        if boundaries is None:
            # Chain mode: the input of each trainable layer is the block output of the trainable
            # layer registered before it (exact for nn.Sequential and for models that define
            # their layers in the order they run).
            trainable = [n for n, m in model.named_modules() if _is_trainable_layer(m)]
            self.producer = {
                n: trainable[trainable.index(n) - 1] if trainable.index(n) else None for n in names
            }
            for name in names:
                if name != self.output_name:
                    self.modules[name].register_forward_pre_hook(partial(self._detach_input, name))
        else:
            missing = [b for b in boundaries if b not in self.modules]
            if missing:
                raise ValueError(f"boundaries name no module of the model: {', '.join(missing)}")
            self.producer = {self.output_name: None}
            for name in boundaries:
                self.modules[name].register_forward_hook(partial(self._detach_output, name))

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
        return (self.pending[id(x)][2], *args[1:])

    def _detach_output(self, name, module, args, out):
        if not self._active(out):
            return None
        return self._record(name, out)

    def _project(self, module, args, y):
        if backprop_enabled():
            return None
        self.output_ran = True
        if not self.pending:
            return None
        entries = list(self.pending.values())
        self.pending.clear()
        num_classes = y.shape[1:].numel()  # not y[0]: Poisson sampling makes empty batches
        labels = [label for label, _, _ in entries]
        if len(set(labels)) < len(labels):
            raise RuntimeError(
                f"DFA: several block outputs were attributed to the same layer ({labels}); the "
                "layers do not form a chain. Name the block outputs with boundaries=[...]."
            )
        feedbacks = tuple(self._feedback(label, h, num_classes) for label, h, _ in entries)
        return _DirectFeedback.apply(feedbacks, y, *(h for _, h, _ in entries))

    # -- feedback matrices ----------------------------------------------------------------------

    def _feedback(self, label: str, h: torch.Tensor, num_classes: int) -> fb.DirectFeedback:
        owner = self.modules[label]
        num_neurons = h.shape[1:].numel()
        feedback = getattr(owner, FEEDBACK_ATTR, None)
        if feedback is None:
            feedback = fb.make_feedback(
                num_classes,
                num_neurons,
                seed=self.seed,
                name=label,
                dtype=h.dtype,
                device=h.device,
                **self.options,
            )
            owner.add_module(FEEDBACK_ATTR, feedback)
        elif feedback.shape != (num_classes, num_neurons):
            raise RuntimeError(
                f"DFA: the feedback matrix of {label!r} has shape {feedback.shape} but this "
                f"forward pass needs ({num_classes}, {num_neurons}): did the input size change?"
            )
        return feedback

    def _create_from_state_dict(self, module, state_dict, prefix, *args):
        """Create empty feedback modules for the ones a checkpoint holds, so loading fills them."""
        for label, owner in self.modules.items():
            key = f"{prefix}{label}.{FEEDBACK_ATTR}." if label else f"{prefix}{FEEDBACK_ATTR}."
            if getattr(owner, FEEDBACK_ATTR, None) is not None:
                continue
            if key + "weight" in state_dict:
                empty = fb.DenseFeedback(torch.empty_like(state_dict[key + "weight"]))
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


def _is_trainable_layer(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, nn.Conv2d)) and any(
        p is not None for p in module._parameters.values()
    )
