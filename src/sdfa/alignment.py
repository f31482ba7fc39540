"""Alignment diagnostics: how closely a rule's updates follow the true gradient, layer by layer.

Feedback alignment works because the forward weights come to agree with the feedback, so the
updates the rule applies turn towards the backprop gradient. :func:`measure_alignment` measures
that during training, from any training loop, without copying the model::

    rng = capture_rng(x.device)                 # only on the steps you measure
    loss = loss_fn(model(x), y)
    optimizer.zero_grad()
    loss.backward()                             # the rule's update is now in .grad
    metrics = measure_alignment(model, loss_fn, x, y, rng_state=rng)
    optimizer.step()

It compares ``.grad`` (what the rule produced) with the true gradient of the same loss on the same
batch and weights, computed by a second forward/backward pass inside :func:`sdfa.backprop` with
``torch.autograd.grad`` (so ``.grad`` is not touched). Everything that pass could change is put
back: the random number generators (``rng_state`` replays the training pass's dropout masks) and
the BatchNorm running statistics; any other buffer it changed raises an error. So training with
and without measurements gives bit-for-bit the same weights.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable

import torch
from torch import nn

from .layers import FeedbackLayer, backprop, trainable_units

RngState = tuple[torch.Tensor, "torch.Tensor | None", "torch.device"]


def capture_rng(device: torch.device | str | None = None) -> RngState:
    """The random state before the training forward pass, to replay its dropout masks."""
    device = torch.device(device if device is not None else "cpu")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda, device


def angle(a: torch.Tensor, b: torch.Tensor) -> float:
    """Angle in degrees between two tensors seen as vectors; nan if either is zero.

    Uses ``2 atan2(|u - v|, |u + v|)`` of the unit vectors (Kahan), which is accurate near 0 and
    exactly 0 for equal tensors, unlike ``acos`` of the cosine.
    """
    a, b = a.detach().flatten().double(), b.detach().flatten().double()
    norm_a, norm_b = a.norm(), b.norm()
    if norm_a == 0 or norm_b == 0:
        return math.nan
    u, v = a / norm_a, b / norm_b
    return math.degrees(2 * math.atan2((u - v).norm().item(), (u + v).norm().item()))


def measure_alignment(
    model: nn.Module,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    rng_state: RngState | None = None,
) -> dict[str, float]:
    """Compare the update in ``.grad`` with the true gradient, for every trainable layer.

    Call after ``loss.backward()`` and before ``optimizer.step()`` (the weights must be those of
    the forward pass), with the same ``loss_fn``, ``x`` and ``y``. Pass ``rng_state`` from
    :func:`capture_rng` taken before the training forward pass so the reference pass sees the same
    dropout masks; without it the reference draws its own (the training's random stream is left
    as it was either way).

    Returns a flat dict, for each trainable layer ``<name>`` (weight and bias together):

    * ``align/angle/<name>``: degrees between the rule's update and the true gradient
      (0: identical direction; 90: orthogonal, no better than chance);
    * ``align/sign/<name>``: fraction of entries whose signs agree;
    * ``align/norm_ratio/<name>``: norm of the rule's update / norm of the true gradient;
    * ``align/feedback_angle/<name>``: for layer-wise rules, degrees between the forward weight W
      and the feedback B that replaces it (0 for backprop's W itself); only for layers that send
      an error to their input (not the first layer, whose feedback is never used).
    """
    layers = _trainable_layers(model)
    if not layers:
        raise ValueError("the model has no trainable unit (sdfa.layers) to measure")
    updates = {}
    for name, params in layers.items():
        missing = [p for p in params if p.grad is None]
        if missing:
            raise ValueError(
                f"layer {name!r} has no .grad: call measure_alignment after loss.backward() "
                "and before optimizer.zero_grad()"
            )
        updates[name] = torch.cat([p.grad.detach().flatten() for p in params])

    flat = [p for params in layers.values() for p in params]
    feedback_layers = {
        name: module for name, module in model.named_modules()
        if isinstance(module, FeedbackLayer) and name in layers
    }
    sends_error = set()  # layers whose input needs a gradient: only there is the feedback used

    def record(name):
        def hook(module, args):
            if args[0].requires_grad:
                sends_error.add(name)
        return hook

    hooks = [m.register_forward_pre_hook(record(n)) for n, m in feedback_layers.items()]
    try:
        with _untouched(model, rng_state, x.device):
            with torch.enable_grad(), backprop():
                loss = loss_fn(model(x), y)
            true_grads = torch.autograd.grad(loss, flat, allow_unused=True)
            feedback_angles = {
                name: angle(module.weight, module.feedback_weight())
                for name, module in feedback_layers.items() if name in sends_error
            }
    finally:
        for hook in hooks:
            hook.remove()

    grads = iter(true_grads)
    metrics: dict[str, float] = {}
    for name, params in layers.items():
        true = torch.cat([_or_zeros(next(grads), p).flatten() for p in params]).double()
        update = updates[name].double()
        label = name or "model"
        metrics[f"align/angle/{label}"] = angle(update, true)
        metrics[f"align/sign/{label}"] = (update.sign() == true.sign()).double().mean().item()
        true_norm = true.norm().item()
        metrics[f"align/norm_ratio/{label}"] = (
            update.norm().item() / true_norm if true_norm else math.inf
        )
        if name in feedback_angles:
            metrics[f"align/feedback_angle/{label}"] = feedback_angles[name]
    return metrics


def _or_zeros(grad: torch.Tensor | None, param: torch.Tensor) -> torch.Tensor:
    return grad if grad is not None else torch.zeros_like(param)


def _trainable_layers(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """Trainable units -> their parameters that learn (not a learned feedback B)."""
    layers = {}
    for name, module in trainable_units(model):
        params = [
            p for n, p in module.named_parameters()
            if p.requires_grad and not (isinstance(module, FeedbackLayer) and n == "feedback")
        ]
        if params:
            layers[name] = params
    return layers


@contextlib.contextmanager
def _untouched(model: nn.Module, rng_state: RngState | None, device: torch.device):
    """Run a block that must leave no trace on the model and on the random generators."""
    norms = [
        (buffer, buffer.clone())
        for module in model.modules()
        if isinstance(module, nn.modules.batchnorm._NormBase)
        for buffer in module.buffers(recurse=False)
    ]
    watched = {id(buffer) for buffer, _ in norms}
    versions = [(n, b, b._version) for n, b in model.named_buffers() if id(b) not in watched]
    cuda = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        if rng_state is not None:
            cpu_state, cuda_state, cuda_device = rng_state
            torch.set_rng_state(cpu_state)
            if cuda_state is not None:
                torch.cuda.set_rng_state(cuda_state, cuda_device)
        try:
            yield
        finally:
            with torch.no_grad():
                for buffer, saved in norms:
                    buffer.copy_(saved)
    changed = [name for name, buffer, version in versions if buffer._version != version]
    if changed:
        raise RuntimeError(
            f"measuring alignment changed the buffer(s) {', '.join(changed)}; the training step "
            "would no longer be reproducible. Report this: the layer needs to be handled."
        )
