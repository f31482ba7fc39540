"""Layer-parallel training: an nn.Sequential split over ranks, with micro-batches in flight.

Each rank holds one *stage*, a contiguous run of the model's blocks. A block starts at a
trainable layer (nn.Linear / nn.Conv2d) and runs up to the next one, so a stage boundary always
falls on a *block output*: the input of a trainable layer, where DFA injects its feedback. The
forward pass is the same for every rule: micro-batch after micro-batch, each rank receives its
input from the rank before it, runs its stage and sends the result on, so the ranks work on
different micro-batches at once. What follows depends on the rule:

* ``dfa``: the last rank computes the output error e of every micro-batch and broadcasts it,
  once per step (C values per sample), to all ranks. Every rank then computes the updates of its
  own layers at once: each of its block outputs receives ``e @ B_l``, with B_l the same seeded
  matrix that single-process DFA (:mod:`sdfa.dfa`) builds for that layer. Nothing travels back
  from one rank to the one before it.
* any other rule (``bp``, ``fa``, ``usf``, ...): the backward pass is a chain, so every rank
  waits for the gradient of its output from the rank after it and sends its input gradient back
  (the GPipe schedule). With ``bp`` this is the baseline that layer-parallel DFA is measured
  against.

Supported models: an ``nn.Sequential`` (nested nn.Sequentials are opened, as in the Crafton
presets' ``features`` / ``classifier``) whose trainable layers are its modules, not parts of
another container; for DFA the model ends with its output layer, and every trainable layer is
trained by DFA or frozen. The loss must be a mean over the samples (each micro-batch's loss is
weighted by its share of the batch). Results equal single-process training up to float
rounding, except for layers whose output depends on the other samples of a batch (BatchNorm in
training mode sees micro-batches) and random layers (dropout draws differ).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..convert import convert, rules_of
from ..dfa import FEEDBACK_ATTR
from ..layers import backprop, is_trainable
from .comm import Comm


class Block(NamedTuple):
    units: list[str]  # qualified names of the modules that form the block, in order
    layer: str  # its trainable layer (the first unit)


def units_of(model: nn.Module):
    """(qualified name, module) of the modules that run one after another in ``model``.

    Nested nn.Sequentials are opened; any other module is one unit.
    """
    if not isinstance(model, nn.Sequential):
        raise ValueError(
            f"layer-parallel training splits an nn.Sequential between its modules; got "
            f"{type(model).__name__}. Write the model as nn.Sequential(...) (nesting is fine)"
        )

    def walk(module, prefix):
        for name, child in module.named_children():
            if isinstance(child, nn.Sequential):
                yield from walk(child, f"{prefix}{name}.")
            else:
                yield f"{prefix}{name}", child

    return list(walk(model, ""))


def blocks_of(model: nn.Module, *, output_last: bool = False) -> list[Block]:
    """Group the units of ``model`` (see :func:`units_of`) into blocks, one per trainable layer.

    A block starts at a trainable layer and runs up to the next one; units before the first
    trainable layer join the first block. Raises ValueError for models outside the supported
    form (see the module docstring); ``output_last`` also requires the last trainable layer to
    end the model (DFA takes the output error at its output).
    """
    units = units_of(model)
    blocks: list[Block] = []
    leading: list[str] = []
    for name, unit in units:
        if is_trainable(unit):
            blocks.append(Block(leading + [name], name))
            leading = []
            continue
        inner = [f"{name}.{n}" for n, m in unit.named_modules() if is_trainable(m)]
        if inner:
            raise ValueError(
                f"{name!r} ({type(unit).__name__}) holds trainable layer(s) {', '.join(inner)}: "
                "layer-parallel training cuts the model between the modules of (nested) "
                "nn.Sequentials, so write this part as an nn.Sequential too"
            )
        if blocks:
            blocks[-1].units.append(name)
        else:
            leading.append(name)
    if not blocks:
        raise ValueError("the model has no trainable unit (sdfa.layers: Linear, Conv, ...)")
    if output_last and not is_trainable(units[-1][1]):
        raise ValueError(
            "DFA takes the output error at the output layer: the last module of the model must "
            f"be its last trainable layer, not {type(units[-1][1]).__name__}. Move trailing "
            "modules (e.g. a softmax) into the loss function"
        )
    return blocks


def balanced(num_blocks: int, num_stages: int) -> list[int]:
    """Blocks per stage for an even contiguous split (the first stages take the remainder)."""
    if num_stages > num_blocks:
        raise ValueError(
            f"layer-parallel training needs at least one block per rank: the model has "
            f"{num_blocks} block(s) (one per trainable layer) but there are {num_stages} ranks"
        )
    base, extra = divmod(num_blocks, num_stages)
    return [base + (i < extra) for i in range(num_stages)]


def block_outputs(model: nn.Sequential, blocks: Sequence[Block], example_input) -> list:
    """Each block's output for ``example_input``, computed without grad in eval mode.

    Runs on any device, the meta device included (shapes only, nothing computed).
    """
    was_training = model.training
    model.eval()
    outputs = []
    with torch.no_grad():
        h = example_input
        for block in blocks:
            for name in block.units:
                h = model.get_submodule(name)(h)
            outputs.append(h)
    model.train(was_training)
    return outputs


class LayerParallel:
    """This rank's stage of ``model``, trained in a pipeline over all ranks.

    Every rank builds the same model (same seed) and passes it here; the rank trains its own
    stage in place (the whole model runs once, on ``example_input``, to size the stages).

    Args:
        model: an nn.Sequential (see the module docstring for the supported form) on this
            rank's device: converted by ``sdfa.convert`` with one rule for every layer, or plain
            (then give ``rule``). A DFA model gives layer-parallel DFA.
        rule: a rule name from ``sdfa.RULES``, to convert a plain ``model`` in place.
        example_input: a batch of inputs of the right shape (values unused), to size the buffers
            and the feedback matrices; a batch of one is enough.
        seed, **options: as in ``sdfa.convert`` (e.g. ``k=1``), with ``rule``.
        micro_batches: the batch is cut into this many micro-batches that flow through the
            pipeline one after another.
        balance: blocks per rank, e.g. ``[2, 1]``; default an even split.
        loss_fn: ``loss_fn(output, target)``, a mean over the samples.
        comm: the :class:`Comm` to use (and to read byte counts from); a new one by default.

    Usage (on every rank)::

        model = sdfa.convert(build_my_sequential(), "dfa", k=1, seed=0)
        stage = LayerParallel(model, example_input=x[:1], micro_batches=4)
        opt = torch.optim.Adam(stage.parameters(), lr=1e-3)
        for x, y in loader:            # the same batches on every rank
            opt.zero_grad()
            loss = stage.forward_backward(x, y)   # a float on the last rank, None elsewhere
            opt.step()
    """

    def __init__(
        self,
        model: nn.Sequential,
        rule: str | None = None,
        *,
        example_input: torch.Tensor,
        seed: int = 0,
        micro_batches: int = 1,
        balance: Sequence[int] | None = None,
        loss_fn=F.cross_entropy,
        comm: Comm | None = None,
        **options,
    ):
        if isinstance(micro_batches, bool) or not isinstance(micro_batches, int) \
                or micro_batches < 1:
            raise ValueError(f"micro_batches must be a positive integer; got {micro_batches!r}")
        blocks = blocks_of(model)  # check the structure before converting in place
        model, layer_rules = _converted(model, rule, seed, options)
        self.dfa = "dfa" in layer_rules.values()
        if self.dfa:
            blocks = blocks_of(model, output_last=True)
            _create_feedback(model, example_input)
        self.comm = comm or Comm()
        self.rank, self.world_size = self.comm.rank, self.comm.world_size
        self.is_first, self.is_last = self.rank == 0, self.rank == self.world_size - 1
        self.micro_batches = micro_batches
        self.loss_fn = loss_fn
        self.output: torch.Tensor | None = None  # the last batch's output (last rank)

        counts = list(balance) if balance is not None else balanced(len(blocks), self.world_size)
        if len(counts) != self.world_size or sum(counts) != len(blocks) or min(counts) < 1:
            raise ValueError(
                f"balance must give each of the {self.world_size} ranks at least one block and "
                f"add up to the model's {len(blocks)} blocks; got {counts}"
            )
        start = sum(counts[: self.rank])
        mine = blocks[start : start + counts[self.rank]]
        with self._own_dfa():
            outputs = block_outputs(model, blocks, example_input)
        # DFA: the feedback matrix of each block output that learns (not the model output).
        feedback_of = {
            b.layer: getattr(model.get_submodule(b.layer), FEEDBACK_ATTR, None)
            for b in blocks[:-1] if layer_rules[b.layer] == "dfa"
        }
        if self.dfa:
            _check_feedback(feedback_of, blocks, outputs)
        self.in_shape = tuple((example_input if start == 0 else outputs[start - 1]).shape[1:])
        self.dtype = outputs[-1].dtype
        self.num_outputs = outputs[-1][0].numel()
        self.device = outputs[-1].device

        self.units = [(n, model.get_submodule(n)) for block in mine for n in block.units]
        self.blocks = [[model.get_submodule(n) for n in block.units] for block in mine]
        self.feedbacks = [feedback_of.get(block.layer) for block in mine]
        # Where this stage's parameters sit among the model's learning parameters: optimizer
        # states are saved as one optimizer over those would save them.
        before = [model.get_submodule(n) for block in blocks[:start] for n in block.units]
        self.param_offset = sum(p.requires_grad for m in before for p in m.parameters())

    def _own_dfa(self):
        """DFA: this class cuts and feeds the block outputs itself, so the hooks step aside."""
        return backprop() if self.dfa else contextlib.nullcontext()

    # -- training ---------------------------------------------------------------------------

    def parameters(self):
        """This stage's learning parameters (requires_grad), for its optimizer; may be empty."""
        for _, unit in self.units:
            yield from (p for p in unit.parameters() if p.requires_grad)

    def train(self, mode: bool = True) -> LayerParallel:
        for _, unit in self.units:
            unit.train(mode)
        return self

    def eval(self) -> LayerParallel:
        return self.train(False)

    def forward_backward(self, x: torch.Tensor, target: torch.Tensor) -> float | None:
        """One step's gradients for this stage's parameters (then call ``optimizer.step()``).

        Every rank passes the same batch: the first rank reads ``x``, the last rank ``target``,
        the others only the batch size. Returns the batch's mean loss on the last rank, None on
        the others; the last rank also keeps the model's output for the batch in ``output``.
        """
        batch = len(x)
        parts = self._micro_batches(batch)
        steps = self._forward(x, parts, grad=True)
        if self.is_last:
            self.output = torch.cat([y.detach() for _, _, y in steps])
        if not self.dfa:
            return self._backward_chain(steps, parts, target, batch)
        loss = None
        error = torch.empty(batch, self.num_outputs, dtype=self.dtype, device=self.device)
        if self.is_last:
            loss = 0.0
            for (_, _, y), part in zip(steps, parts):
                y_leaf = y.detach().requires_grad_()
                value = self.loss_fn(y_leaf, target[part]) * ((part.stop - part.start) / batch)
                error[part] = torch.autograd.grad(value, y_leaf)[0].reshape(len(y), -1)
                loss += value.item()
        self.comm.broadcast(error, self.world_size - 1, "error")
        self._inject(steps, parts, error)
        return loss

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor | None:
        """The model's output for ``x`` (a pipelined forward pass) on the last rank, else None."""
        steps = self._forward(x, self._micro_batches(len(x)), grad=False)
        return torch.cat([y for _, _, y in steps]) if self.is_last else None

    def _micro_batches(self, batch: int) -> list[slice]:
        bounds = torch.linspace(0, batch, min(self.micro_batches, batch) + 1).round().long()
        return [slice(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]

    def _forward(self, x, parts, grad: bool) -> list[tuple]:
        """Run every micro-batch through this stage: (input, hidden block outputs, output) each."""
        steps, sends = [], []
        for part in parts:
            if self.is_first:
                h = x[part]
            else:
                shape = (part.stop - part.start, *self.in_shape)
                h = torch.empty(shape, dtype=self.dtype, device=self.device)
                self.comm.recv(h, self.rank - 1, "activations")
                h.requires_grad_(grad and not self.dfa)
            first, hidden = h, []
            with torch.set_grad_enabled(grad), self._own_dfa():
                for j, block in enumerate(self.blocks):
                    if self.dfa and j:  # DFA: no gradient crosses a block output
                        hidden.append(h)
                        h = h.detach()
                    for unit in block:
                        h = unit(h)
            if not self.is_last:
                sends.append(self.comm.isend(h.detach(), self.rank + 1, "activations"))
                if self.dfa:
                    hidden.append(h)
            steps.append((first, hidden, h))
        for send in sends:
            send.wait()
        return steps

    def _inject(self, steps, parts, error) -> None:
        """DFA: every hidden block output of this stage receives ``e @ B_l``; the output gets e."""
        tensors, grads = [], []
        for (_, hidden, y), part in zip(steps, parts):
            e = error[part]
            for h, feedback in zip(hidden, self.feedbacks):  # the output has no feedback
                if feedback is not None:
                    tensors.append(h)
                    grads.append(feedback.project(e).reshape(h.shape))
            if self.is_last:
                tensors.append(y)
                grads.append(e.reshape(y.shape))
        torch.autograd.backward(tensors, grads)

    def _backward_chain(self, steps, parts, target, batch) -> float | None:
        """Backprop-style rules: gradients travel back rank by rank, micro-batches in reverse."""
        loss, sends = 0.0, []
        for (first, _, y), part in reversed(list(zip(steps, parts))):
            if self.is_last:
                value = self.loss_fn(y, target[part]) * ((part.stop - part.start) / batch)
                value.backward()
                loss += value.item()
            else:
                grad = torch.empty_like(y)
                self.comm.recv(grad, self.rank + 1, "gradients")
                if y.requires_grad:  # a frozen first stage has nothing to learn
                    y.backward(grad)
            if not self.is_first:
                sends.append(self.comm.isend(first.grad, self.rank - 1, "gradients"))
        for send in sends:
            send.wait()
        return loss if self.is_last else None

    # -- checkpoints: the single-process layout -----------------------------------------------

    def state_dict(self) -> dict | None:
        """The whole model's state_dict, keyed as in single-process training, on rank 0."""
        own = {
            k: _cpu(v) for name, unit in self.units
            for k, v in unit.state_dict(prefix=f"{name}.").items()
        }
        parts = self.comm.gather_object(own)
        if parts is None:
            return None
        return {k: v for part in parts for k, v in part.items()}

    def load_state_dict(self, state: dict) -> None:
        """Load this stage's part of a whole-model state_dict (e.g. a single-process checkpoint)."""
        for name, unit in self.units:
            prefix = f"{name}."
            unit.load_state_dict(
                {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
            )

    def optimizer_state_dict(self, optimizer: torch.optim.Optimizer | None) -> dict | None:
        """On rank 0, the state_dict of one optimizer over the whole model's learning parameters.

        ``optimizer`` holds ``stage.parameters()`` in one param group; None on a rank that has
        nothing to learn.
        """
        local = None if optimizer is None else self._check_optimizer(optimizer).state_dict()
        parts = self.comm.gather_object((self.param_offset, local), what="gathering optimizers")
        if parts is None:
            return None
        state, params, group = {}, [], None
        for offset, part in parts:
            if part is not None:
                state.update({offset + i: s for i, s in part["state"].items()})
                params += [offset + i for i in part["param_groups"][0]["params"]]
                group = group or part["param_groups"][0]
        return {"state": state, "param_groups": [{**group, "params": params}]}

    def load_optimizer_state_dict(self, optimizer: torch.optim.Optimizer | None, state: dict):
        """Load this stage's part of a whole-model optimizer state_dict (one param group)."""
        if optimizer is not None:
            self._check_optimizer(optimizer).load_state_dict(self.local_optimizer_state(state))

    def local_optimizer_state(self, state: dict) -> dict:
        """This stage's part of a whole-model optimizer state_dict, indexed as its optimizer's."""
        if len(state["param_groups"]) != 1:
            raise ValueError("layer-parallel checkpoints support optimizers with one param group")
        count = len(list(self.parameters()))
        span = range(self.param_offset, self.param_offset + count)
        group = state["param_groups"][0]
        params = [i - self.param_offset for i in group["params"] if i in span]
        if len(params) != count:
            raise ValueError(
                f"the optimizer state covers {len(params)} of this stage's {count} parameters: "
                "was it saved for another model?"
            )
        return {
            "state": {i - self.param_offset: s for i, s in state["state"].items() if i in span},
            "param_groups": [{**group, "params": params}],
        }

    def _check_optimizer(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        held = [p for group in optimizer.param_groups for p in group["params"]]
        if len(optimizer.param_groups) != 1 or [id(p) for p in held] != [
            id(p) for p in self.parameters()
        ]:
            raise ValueError(
                "layer-parallel checkpoints need an optimizer over stage.parameters(), in one "
                "param group"
            )
        return optimizer


def _converted(model: nn.Module, rule, seed: int, options: dict):
    """(the model converted by ``rule`` in place, or as it is; the rule of each layer)."""
    if rule is not None:
        if not isinstance(rule, str):
            raise ValueError(f"layer-parallel training takes one rule name; got {rule!r}")
        if rule == "dfa" and {"output", "boundaries", "example_input", "after_output"} & set(
            options
        ):
            raise ValueError(
                "layer-parallel DFA takes the block outputs at the trainable layers of the "
                "nn.Sequential and the output at its last layer: options output=, boundaries=, "
                "example_input= and after_output= do not apply"
            )
        model = convert(model, rule, seed=seed, inplace=True, **options)
    elif options:
        raise ValueError(
            f"options {', '.join(sorted(options))} are for converting the model: pass rule= with "
            "them, or a model already converted with them"
        )
    try:
        layer_rules = rules_of(model)
    except ValueError:
        raise ValueError(
            "pass rule= (e.g. 'dfa') to convert the model, or a model converted by sdfa.convert"
        ) from None
    rules = set(layer_rules.values())
    if "dfa" in rules and rules - {"dfa", "frozen"}:
        raise ValueError(
            "layer-parallel DFA needs every trainable layer trained by 'dfa' or frozen; this "
            f"model mixes {', '.join(sorted(rules))}"
        )
    return model, layer_rules


def _create_feedback(model: nn.Module, example_input: torch.Tensor) -> None:
    """One forward pass through the DFA hooks creates the seeded feedback matrices, if missing."""
    was_training = model.training
    with torch.enable_grad():
        model.eval()(example_input)
    model.train(was_training)


def _check_feedback(feedback_of: dict, blocks: Sequence[Block], outputs) -> None:
    """Each learning block output, and nothing else, must have its (C, N) feedback matrix."""
    num_outputs = outputs[-1][0].numel()
    needed = {b.layer: (num_outputs, out[0].numel()) for b, out in zip(blocks, outputs)
              if b.layer in feedback_of}
    found = {name: tuple(f.shape) for name, f in feedback_of.items() if f is not None}
    if found != needed:
        raise ValueError(
            "this model's DFA does not feed the block outputs of the nn.Sequential (feedback "
            f"matrices found: {found}; needed: {needed}). Convert it without output= or "
            "boundaries=, or let LayerParallel convert it (rule='dfa')"
        )


def _cpu(value):
    return value.cpu() if isinstance(value, torch.Tensor) else value
