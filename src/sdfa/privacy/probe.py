"""A probe for models that mix the examples of a batch, which no per-example bound survives.

The sensitivity of every method assumes that removing one example removes its contribution and
changes nothing else. A module that looks across the batch (BatchNorm, centering by the batch
mean, ``nn.Softmax(dim=0)``, anything in a ``forward`` that reduces over dim 0) breaks that, and
a static list of modules cannot see a functional one. So :func:`check_examples_independent`
runs the model on synthetic inputs (never on the private data, so the verdict reveals nothing
about it) and watches every module:

1. in training mode, with the same random state (dropout masks) in both runs, example 0's output
   must not change when the other examples of its batch are replaced;
2. in evaluation mode, example 0's output must not change when it is alone in its batch.

The first module whose output for example 0 changes while its input did not is named.
"""

from __future__ import annotations

import torch
from torch import nn

BATCH = 4


def check_examples_independent(model: nn.Module, input_shape) -> None:
    """Raise ValueError naming the module that mixes examples, if one does (see module doc)."""
    reference = next((p for p in model.parameters() if p.is_floating_point()), None)
    dtype = reference.dtype if reference is not None else torch.get_default_dtype()
    device = reference.device if reference is not None else torch.device("cpu")
    generator = torch.Generator().manual_seed(0)  # public, fixed inputs

    def draw(n, scale=1.0, shift=0.0):
        x = torch.randn(n, *input_shape, generator=generator, dtype=torch.float64)
        return (x * scale + shift).to(device=device, dtype=dtype)

    batch = draw(BATCH)
    replaced = torch.cat([batch[:1], draw(BATCH - 1, scale=3.0, shift=1.0)])
    was_training = model.training
    buffers = {name: b.clone() for name, b in model.named_buffers()}  # e.g. running statistics
    try:
        model.train()
        runs = [_record(model, x, device) for x in (batch, replaced)]
        culprit = _first_change(*runs)
        what = "when the other examples of its batch change"
        if culprit is None:
            model.eval()
            runs = [_record(model, x, device) for x in (batch, batch[:1])]
            culprit = _first_change(*runs)
            what = "when it is alone in its batch"
    finally:
        model.train(was_training)
        with torch.no_grad():
            for name, b in model.named_buffers():
                b.copy_(buffers[name])
    if culprit is not None:
        name, module = culprit
        where = (f"module {name!r} ({type(module).__name__})" if name
                 else f"the forward of {type(module).__name__} itself (outside its submodules)")
        raise ValueError(
            f"{where} mixes the examples of a batch: one example's output changed {what}, so "
            "no per-example bound holds. Remove it or make it act on each example alone "
            "(e.g. normalize per example, not over the batch)"
        )


def _record(model: nn.Module, x: torch.Tensor, device: torch.device) -> list:
    """[(name, module, example 0's input, example 0's output)] in the order the modules finish."""
    seen: list = []
    names = {id(m): n for n, m in model.named_modules()}

    def hook(module, args, output):
        seen.append((names[id(module)], module, _first_row(args), _first_row(output)))

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    devices = [device] if device.type == "cuda" else []
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            torch.manual_seed(0)  # the same dropout masks in both runs of a comparison
            model(x)
    except RuntimeError as error:
        raise ValueError(
            f"the per-example probe could not run the model on inputs of shape "
            f"{tuple(x.shape[1:])} (pass input_shape= the shape of one example): {error}"
        ) from error
    finally:
        for handle in handles:
            handle.remove()
    return seen


def _first_row(value):
    if isinstance(value, torch.Tensor):
        return value[0].detach().clone() if value.dim() > 0 and len(value) > 0 else None
    if isinstance(value, (tuple, list)):
        return next((row for row in map(_first_row, value) if row is not None), None)
    return None


def _first_change(first: list, second: list):
    """(name, module) of the first module whose example-0 output differs with the same input."""
    for (name, module, in_a, out_a), (_, _, in_b, out_b) in zip(first, second):
        if _same(in_a, in_b) and not _same(out_a, out_b):
            return name, module
    return None


def _same(a, b) -> bool:
    if a is None or b is None:
        return a is None and b is None
    if a.shape != b.shape:
        return False
    scale = a.abs().max().item() if a.numel() else 0.0
    return bool(torch.allclose(a, b, rtol=1e-4, atol=1e-6 * (1.0 + scale)))
