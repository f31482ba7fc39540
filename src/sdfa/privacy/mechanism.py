"""Per-example bounding for DFA-trained models, and the optimizer that adds the calibrated noise.

DFA's update of a layer, for one example, is the outer product of the feedback signal that
reaches the layer's output (``delta``) and the layer's input ``h``. Bounding the two factors
per example bounds the whole update without ever materializing per-example gradients, so a
private step costs about what a plain DFA step costs. Hooks on the converted model:

* every trainable layer's input is clipped to its bound A per example (forward pass; it is part
  of the private model's function, in training and in evaluation);
* every trainable layer's output gradient (``delta``; for the output layer the error e, before
  DFA projects it) is clipped to its bound D per example (backward pass).

``dp-dfa`` (Lee & Kifer 2020) clips only e; the bounds of the hidden layers follow from it:
D_l = C_e ||B_l||_2 J_l, with J_l the Jacobian bound of the modules between layer l and its block
output, so their clip never acts unless the model does something the analysis could not see
(it then keeps the guarantee). ``dp-noisy-projection`` clips each layer's feedback signal to a
threshold that tracks a quantile of its per-example norms (adaptive clipping).

:class:`DPFeedbackOptimizer` then adds Gaussian noise of std ``z * sqrt(sum_l S_l^2)`` to every
parameter's summed update (S_l from :func:`bounds.layer_sensitivity`): one Gaussian mechanism on
the concatenated update, as Opacus does with per-layer clipping, so Opacus's accountants apply.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from opacus.optimizers import DPOptimizer
from opacus.optimizers.optimizer import _generate_noise
from torch import nn

from ..convert import rules_of
from ..dfa import FEEDBACK_ATTR, dfa_config
from ..feedback import DirectFeedback
from ..layers import is_trainable
from . import bounds

SECOND_BACKWARD = (
    "privacy: a second backward pass before optimizer.step(): each pass is bounded on its own, "
    "so one example could contribute to both and move the update by up to twice the "
    "sensitivity that calibrates the noise. Call optimizer.step() after every backward pass "
    "(or optimizer.zero_grad() to discard one)"
)


@dataclass
class LayerBound:
    """What the mechanism knows about one trainable layer; the run-time fields fill in lazily."""

    name: str
    module: nn.Module
    is_output: bool
    input_clip: float | None  # max_input_norm / max_activation_norm (None: rely on the model)
    input_magnitude: float  # element-wise bound on the input implied by the modules before it
    jacobian: float | None  # bound from the layer's output to its block output (None: unknown)
    overlap: int
    bias: bool
    input_bound: float = 0.0  # A (the largest used so far: it depends on shapes only)
    positions: int = 1  # P
    feedback_bound: float | None = None  # D
    norms: list[torch.Tensor] = field(default_factory=list)  # per-example ||delta||, this step
    calls: int = 0

    def sensitivity(self) -> float:
        return bounds.layer_sensitivity(
            self.feedback_bound, self.input_bound, self.overlap, self.positions, self.bias
        )


class FeedbackMechanism:
    """Installs the per-example bounds of ``method`` on a model converted with rule "dfa"."""

    def __init__(
        self,
        model: nn.Module,
        method: str,
        *,
        loss_reduction: str,
        max_input_norm: float | None,
        max_activation_norm: float | None,
        max_error_norm: float | None = None,
        max_feedback_norm: float | None = None,
        target_quantile: float = 0.5,
        clip_learning_rate: float = 0.2,
        expected_batch_size: float = 1.0,
    ):
        self.method = method
        self.loss_reduction = loss_reduction
        self.max_error_norm = max_error_norm
        self.target_quantile = target_quantile
        self.clip_learning_rate = clip_learning_rate
        self.count_noise = 0.0  # std of the adaptive-clipping counts' noise (set by the engine)
        self.expected_batch_size = expected_batch_size
        self.backward_passes = 0
        self.layers = analyse(model, method, max_input_norm, max_activation_norm)
        for layer in self.layers.values():
            if method == "dp-dfa":
                layer.feedback_bound = max_error_norm if layer.is_output else None
            else:
                layer.feedback_bound = max_feedback_norm
            layer.module.register_forward_pre_hook(self._clip_input(layer))
            layer.module.register_forward_hook(self._watch_output(layer))
        model.register_forward_pre_hook(self._new_forward)

    # -- hooks ---------------------------------------------------------------------------------

    def _new_forward(self, module, args):
        for layer in self.layers.values():
            layer.calls = 0

    def _clip_input(self, layer: LayerBound):
        def hook(module, args):
            layer.calls += 1
            if layer.calls > 1:
                raise RuntimeError(
                    f"privacy: layer {layer.name!r} ran twice in one forward pass; a layer "
                    "shared between several places of a model cannot be bounded per example"
                )
            x = args[0]
            clip = math.inf if layer.input_clip is None else layer.input_clip
            bound = min(clip, layer.input_magnitude * math.sqrt(x.shape[1:].numel()))
            layer.input_bound = max(layer.input_bound, bound)
            if math.isinf(bound):
                return None
            return (_clip_rows(x, bound)[0], *args[1:])

        return hook

    def _watch_output(self, layer: LayerBound):
        def hook(module, args, out):
            spatial = out.shape[2:] if isinstance(module, nn.Conv2d) else out.shape[1:-1]
            layer.positions = max(layer.positions, spatial.numel())
            if out.requires_grad:
                out.register_hook(lambda grad: self._clip_feedback(layer, grad))

        return hook

    def _clip_feedback(self, layer: LayerBound, grad: torch.Tensor) -> torch.Tensor:
        if layer.is_output:
            self.backward_passes += 1
            if self.backward_passes > 1:
                raise ValueError(SECOND_BACKWARD)
            if self.loss_reduction == "mean":  # per-example errors, not their batch average
                grad = grad * grad.shape[0]
        if layer.feedback_bound is None:
            layer.feedback_bound = self._derived_bound(layer)
        grad, norms = _clip_rows(grad, layer.feedback_bound)
        layer.norms.append(norms.detach())
        return grad

    def _derived_bound(self, layer: LayerBound) -> float:
        """dp-dfa, hidden layer: ||delta|| <= C_e ||B_l||_2 J_l."""
        feedback = getattr(layer.module, FEEDBACK_ATTR, None)
        if not isinstance(feedback, DirectFeedback):
            raise RuntimeError(
                f"privacy: layer {layer.name!r} has no DFA feedback matrix yet: run a forward "
                "and backward pass before the first optimizer step"
            )
        spectral = torch.linalg.matrix_norm(feedback.dense().double(), ord=2).item()
        return self.max_error_norm * spectral * layer.jacobian

    # -- per step ------------------------------------------------------------------------------

    def sensitivity(self) -> float:
        """L2 bound on one example's contribution to the whole summed update of a step.

        It depends on the clipping bounds and the layers' shapes only, never on the batch.
        """
        return math.sqrt(sum(s**2 for s in self.sensitivities().values()))

    def sensitivities(self) -> dict[str, float]:
        for layer in self.layers.values():
            if layer.feedback_bound is None:
                layer.feedback_bound = self._derived_bound(layer)
        return {name: layer.sensitivity() for name, layer in self.layers.items()}

    def end_step(self, generator: torch.Generator | None, secure_mode: bool = False) -> None:
        """Adapt the clipping thresholds (dp-noisy-projection) and forget this step's records.

        Each threshold moves geometrically towards the ``target_quantile`` of its per-example
        norms, estimated from a noisy count (Andrew et al. 2021): the count of
        ``1[norm <= C] - 1/2`` changes by at most 1/2 per example.
        """
        for layer in self.layers.values():
            if self.count_noise and layer.norms:
                norms = torch.cat(layer.norms)
                below = ((norms <= layer.feedback_bound).double() - 0.5).sum().item()
                reference = torch.zeros(1, dtype=torch.float64, device=norms.device)
                noise = _generate_noise(self.count_noise, reference, generator, secure_mode).item()
                fraction = (below + noise) / self.expected_batch_size + 0.5
                layer.feedback_bound *= math.exp(
                    -self.clip_learning_rate * (fraction - self.target_quantile)
                )
        self.discard_step()

    def discard_step(self) -> None:
        """Forget the records of the backward passes since the last step (not a step)."""
        for layer in self.layers.values():
            layer.norms.clear()
        self.backward_passes = 0


def _clip_rows(x: torch.Tensor, bound: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale each example (first dim) of ``x`` to L2 norm <= bound; also return the norms."""
    norms = x.flatten(1).norm(dim=1)
    if math.isinf(bound):
        return x, norms
    factor = (bound / norms).clamp(max=1.0)
    return x * factor.view(-1, *([1] * (x.dim() - 1))), norms


def analyse(
    model: nn.Module, method: str, max_input_norm: float | None, max_activation_norm: float | None
) -> dict[str, LayerBound]:
    """Check that ``model`` can be bounded per example and collect each layer's static bounds."""
    config = dfa_config(model)
    layer_rules = rules_of(model) if config is not None else {}
    if config is None or "dfa" not in layer_rules.values():
        raise ValueError(
            f"method {method!r} trains with DFA: convert the model first, "
            "e.g. sdfa.convert(model, 'dfa')"
        )
    if config.boundaries is not None:
        raise ValueError(
            f"method {method!r} needs DFA in chain mode (block outputs are the inputs of the "
            "trainable layers); convert without boundaries=[...]"
        )
    if not config.after_output:  # the sensitivity bounds assume the error at the output
        raise ValueError(
            f"method {method!r} bounds the output error e = dL/dy: convert without "
            "after_output=False"
        )
    modules = dict(model.named_modules())
    dfa_layers = [name for name, rule in layer_rules.items() if rule == "dfa"]
    for name, module in modules.items():
        if isinstance(module, nn.modules.batchnorm._NormBase):
            raise ValueError(
                f"module {name!r} ({type(module).__name__}) mixes the examples of a batch, so "
                "no per-example bound holds: remove it (DP-DFA bounds only bounded activations, "
                "pooling, dropout and flatten between its layers)"
            )
        own = [n for n, p in module.named_parameters(recurse=False) if p.requires_grad]
        if own and name not in dfa_layers:
            raise ValueError(
                f"module {name!r} has trainable parameters ({', '.join(own)}) that are not "
                f"trained by DFA; {method!r} can only bound DFA-trained nn.Linear / nn.Conv2d "
                f"layers. Freeze it (e.g. sdfa.convert(model, {{{name!r}: 'frozen', ...}})) "
                "or give it rule 'dfa'"
            )
        if isinstance(module, nn.Conv2d) and module.padding_mode != "zeros":
            raise ValueError(
                f"layer {name!r} pads with {module.padding_mode!r}: padding repeats input "
                "values, which the per-example bound does not cover; use padding_mode='zeros'"
            )

    sequence = _sequence(model)
    layers = {}
    for name in dfa_layers:
        producer = config.producer.get(name)
        start = sequence.index(producer) + 1 if producer is not None else 0
        between = sequence[start : sequence.index(name)]
        magnitude = math.inf
        for module_name in between:
            magnitude = bounds.magnitude_after(modules[module_name], magnitude)
        clip = max_input_norm if producer is None else max_activation_norm
        if clip is None and math.isinf(magnitude):
            option = "max_input_norm" if producer is None else "max_activation_norm"
            raise ValueError(
                f"the input of layer {name!r} has no norm bound: pass {option}=... (per-example "
                "clipping of that input)" + ("" if producer is None else
                " or end the block before it with a bounded activation (tanh, sigmoid, hardtanh)")
            )
        module = modules[name]
        overlap = 1
        if isinstance(module, nn.Conv2d):
            overlap = bounds.window_overlap(module.kernel_size, module.stride, module.dilation)
        layers[name] = LayerBound(
            name=name,
            module=module,
            is_output=name == config.output_name,
            input_clip=clip,
            input_magnitude=magnitude,
            jacobian=None,
            overlap=overlap,
            bias=module.bias is not None and module.bias.requires_grad,
        )
    for name, layer in layers.items():
        consumers = [n for n in dfa_layers if config.producer.get(n) == name]
        if layer.is_output or not consumers:
            continue
        between = sequence[sequence.index(name) + 1 : sequence.index(consumers[0])]
        jacobian = 1.0
        for module_name in between:
            factor = bounds.jacobian_bound(modules[module_name])
            if factor is None:
                if method == "dp-dfa":
                    raise ValueError(
                        f"method 'dp-dfa' cannot bound module {module_name!r} "
                        f"({type(modules[module_name]).__name__}) between layer {name!r} and "
                        "its block output: its input gradient has no known bound. Supported: "
                        "element-wise activations, dropout, flatten, max / average pooling; or "
                        "use method 'dp-noisy-projection', which clips the feedback directly"
                    )
                jacobian = math.inf
                break
            jacobian *= factor
        layer.jacobian = jacobian
    return layers


def _sequence(model: nn.Module) -> list[str]:
    """Trainable layers and parameter-free leaf modules, in registration order."""
    names = []
    for name, module in model.named_modules():
        if isinstance(module, DirectFeedback):
            continue
        children = [c for c in module.children() if not isinstance(c, DirectFeedback)]
        if is_trainable(module) or not children:
            names.append(name)
    return names


class DPFeedbackOptimizer(DPOptimizer):
    """Opacus's DPOptimizer with the per-example bounding done by :class:`FeedbackMechanism`.

    The gradients that reach ``step()`` are already sums of bounded per-example contributions,
    so "clip and accumulate" just takes them; noise (std ``noise_multiplier * sensitivity``),
    averaging over the expected batch size and the step hook (accounting) are Opacus's.
    """

    def __init__(self, optimizer, *, mechanism: FeedbackMechanism, **kwargs):
        super().__init__(optimizer, max_grad_norm=0.0, **kwargs)
        self.mechanism = mechanism
        self._zeroed = True

    @property
    def accumulated_iterations(self) -> int:
        return 1  # a second backward pass before step() is refused (FeedbackMechanism)

    def zero_grad(self, set_to_none: bool = False):
        super().zero_grad(set_to_none)
        self.mechanism.discard_step()  # the cleared passes are not part of the next step
        self._zeroed = True

    def pre_step(self, closure=None) -> bool:
        if not self._zeroed:
            raise ValueError(
                "gradients were not cleared since the last private step: call "
                "optimizer.zero_grad() before each backward pass"
            )
        sensitivity = self.mechanism.sensitivity()
        if math.isinf(sensitivity) and self.noise_multiplier > 0:
            raise ValueError("a layer's update is unbounded: set finite clipping bounds")
        self.max_grad_norm = sensitivity if self.noise_multiplier > 0 else 0.0
        for p in self.params:
            p.summed_grad = p.grad if p.grad is not None else torch.zeros_like(p)
        self.add_noise()
        self.scale_grad()
        if self.step_hook:
            self.step_hook(self)
        self.mechanism.end_step(self.generator, self.secure_mode)
        self._zeroed = False
        return True
