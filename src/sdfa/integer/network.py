"""Integer-only DFA training of a fully connected network (TIFeD: Colombo, Falcetta, Roveri 2023).

Every tensor of a training step has an integer dtype: int8 inputs, int32 weights, biases and
feedback matrices, int32 activations and errors (products accumulated exactly and checked, see
:mod:`sdfa.integer.ops`). One step on a batch (x, y):

    a_0 = x;  a_l, g_l = pla_tanh(a_{l-1} W_l + b_l, fan_in_l)      (g_l: inverse slopes)
    e   = a_L - target * onehot(y)                                    (L2 loss gradient)
    d_L = e // g_L;   d_l = (e B_l) // g_l  for hidden layers          (direct feedback)
    W_l -= (a_{l-1}^T d_l) // lr_inv;   b_l -= sum_batch(d_l) // lr_inv

W and b start at zero; B_l (classes x N_l) is drawn uniformly from the integers in [-r, r),
r = isqrt(12 * 32767 // (classes + N_l)), from ``seed``. The trained network loads as a float64
PyTorch module that computes the same outputs (:meth:`IntegerDFA.to_float`) and exports as a C
header (:meth:`IntegerDFA.c_header`).
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch
from torch import nn

from .ops import (
    INT8_MAX,
    INT8_MIN,
    SHRT_MAX,
    checked,
    floor_div,
    isqrt,
    matmul,
    pla_pieces,
    pla_tanh,
    require_integer,
)

TARGET = 16  # the one-hot target's value (the notebook's onehot * 16)


def check_lr_inv(lr_inv) -> int:
    """The learning-rate divisor 1/eta as a positive int, or a ValueError that says so."""
    if isinstance(lr_inv, bool) or not isinstance(lr_inv, numbers.Integral) or lr_inv < 1:
        raise ValueError(
            f"lr_inv (the learning-rate divisor 1/eta) must be a positive integer such as 4096; "
            f"got {lr_inv!r}"
        )
    return int(lr_inv)


def to_int8(images: torch.Tensor, value_range: int = 255) -> torch.Tensor:
    """Stored images with values 0 .. value_range as int8 inputs: x * 255 // value_range - 128
    (for 8-bit images exactly the notebook's x - 128), flattened to (N, features)."""
    require_integer(images, "images")
    if not isinstance(value_range, int) or value_range < 1:
        raise ValueError(f"value_range must be a positive integer; got {value_range!r}")
    x = images.reshape(len(images), -1).to(torch.int32)
    if x.numel() and (int(x.min()) < 0 or int(x.max()) > value_range):
        raise ValueError(f"image values must lie in 0 .. {value_range}")
    return (x * 255 // value_range - 128).to(torch.int8)


def quantize(features: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """Frozen float features (e.g. a transferred CNN's) as int8 inputs of an integer head: the
    range [low, high] (take the training features' min and max, and the same for the test
    features) mapped linearly onto -128 .. 127, rounded and clamped. Runs once, before training.
    """
    if not features.dtype.is_floating_point:
        raise ValueError(f"quantize takes float features; got {features.dtype}")
    if not high > low:
        raise ValueError(f"quantize needs low < high; got {low}, {high}")
    q = torch.round((features.reshape(len(features), -1) - low) * (255 / (high - low))) - 128
    return q.clamp(INT8_MIN, INT8_MAX).to(torch.int8)


class IntegerDFA:
    """A fully connected tanh network trained by integer DFA.

    ``sizes`` = [inputs, hidden..., classes].
    """

    def __init__(self, sizes: Sequence[int], *, seed: int = 0, target: int = TARGET):
        sizes = list(sizes)
        if len(sizes) < 2 or any(not isinstance(n, int) or isinstance(n, bool) or n < 1
                                 for n in sizes):
            raise ValueError(f"sizes must be at least two positive integers; got {sizes!r}")
        self.sizes, self.target, self.seed = sizes, int(target), seed
        classes = sizes[-1]
        self.weights = [torch.zeros(i, o, dtype=torch.int32) for i, o in zip(sizes, sizes[1:])]
        self.biases = [torch.zeros(o, dtype=torch.int32) for o in sizes[1:]]
        gen = torch.Generator().manual_seed(seed)
        self.feedback = []  # B_l for every hidden layer (the output layer reads e itself)
        for n in sizes[1:-1]:
            r = isqrt(12 * SHRT_MAX // (classes + n))
            self.feedback.append(torch.randint(-r, r, (classes, n), generator=gen,
                                               dtype=torch.int32))

    @classmethod
    def from_module(cls, model: nn.Module, *, seed: int = 0) -> IntegerDFA:
        """The integer twin of a float chain Flatten? (Linear, Tanh)* Linear Tanh?: its sizes.

        The integer path trains exactly that (every Linear followed by the integer tanh);
        anything else is refused, naming the layer.
        """
        modules = list(model) if isinstance(model, nn.Sequential) else [model]
        sizes: list[int] = []
        for index, module in enumerate(modules):
            if isinstance(module, nn.Linear):
                if sizes and sizes[-1] != module.in_features:
                    raise ValueError(f"layer {index}: Linear takes {module.in_features} inputs "
                                     f"after {sizes[-1]}")
                sizes += [module.in_features] * (not sizes) + [module.out_features]
            elif isinstance(module, (nn.Tanh, nn.Flatten, nn.Identity)):
                continue
            else:
                raise ValueError(
                    f"layer {index} ({type(module).__name__}) cannot be trained by the integer "
                    "path: it trains chains of Linear layers with tanh (nn.Flatten, nn.Linear, "
                    "nn.Tanh); keep other layers frozen as a feature extractor and quantize "
                    "their output (sdfa.integer.quantize)"
                )
        if len(sizes) < 2:
            raise ValueError("the model has no nn.Linear layer for the integer path to train")
        return cls(sizes, seed=seed)

    # -- the step ---------------------------------------------------------------------------

    def _check_input(self, x: torch.Tensor) -> torch.Tensor:
        require_integer(x, "the input")
        x = x.reshape(len(x), -1)
        if x.shape[1] != self.sizes[0]:
            raise ValueError(f"the input has {x.shape[1]} features; the network takes "
                             f"{self.sizes[0]}")
        if x.dtype != torch.int8 and x.numel() and (int(x.min()) < INT8_MIN
                                                     or int(x.max()) > INT8_MAX):
            raise ValueError("inputs must lie in the int8 range -128 .. 127 "
                             "(use sdfa.integer.to_int8 or quantize)")
        return x

    def forward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Activations [a_0 .. a_L] (int32) and inverse slopes [g_1 .. g_L] of a batch."""
        acts, slopes = [self._check_input(x).to(torch.int32)], []
        for index, (w, b) in enumerate(zip(self.weights, self.biases)):
            pre = checked(matmul(acts[-1], w, f"layer {index}: x W").to(torch.int64) + b,
                          f"layer {index}: x W + b")
            a, g = pla_tanh(pre, w.shape[0])
            acts.append(a)
            slopes.append(g)
        return acts, slopes

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward(x)[0][-1]

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self(x).argmax(dim=1)

    def error(self, out: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """e = out - target * onehot(labels), the gradient of the L2 loss (int32)."""
        require_integer(labels, "labels")
        classes = self.sizes[-1]
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= classes):
            raise ValueError(f"labels must be class indices 0 .. {classes - 1}")
        onehot = torch.nn.functional.one_hot(labels.to(torch.int64), classes)
        return (out - self.target * onehot).to(torch.int32)

    def deltas(self, e: torch.Tensor, slopes: list[torch.Tensor]) -> list[torch.Tensor]:
        """d_l for every layer: (e B_l) // g_l for hidden layers, e // g_L for the output."""
        hidden = [floor_div(matmul(e, b, f"layer {i}: e B"), g)
                  for i, (b, g) in enumerate(zip(self.feedback, slopes))]
        return hidden + [floor_div(e, slopes[-1])]

    def step(self, x: torch.Tensor, labels: torch.Tensor, lr_inv: int,
             layers: Sequence[int] | None = None) -> torch.Tensor:
        """One integer DFA step on a batch; updates ``layers`` (default all); returns e."""
        lr_inv = check_lr_inv(lr_inv)
        acts, slopes = self.forward(x)
        e = self.error(acts[-1], labels)
        ds = self.deltas(e, slopes)
        for k in range(len(self.weights)) if layers is None else layers:
            grad_w = matmul(acts[k].T, ds[k], f"layer {k}: x^T d")
            self.weights[k] = checked(
                self.weights[k].to(torch.int64) - floor_div(grad_w, lr_inv), f"layer {k}: W")
            grad_b = checked(ds[k].to(torch.int64).sum(0), f"layer {k}: sum(d)")
            self.biases[k] = checked(
                self.biases[k].to(torch.int64) - floor_div(grad_b, lr_inv), f"layer {k}: b")
        return e

    # -- state, float twin, export ----------------------------------------------------------

    def parameters(self) -> list[torch.Tensor]:
        return [t for wb in zip(self.weights, self.biases) for t in wb]

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {}
        for k, (w, b) in enumerate(zip(self.weights, self.biases)):
            state[f"{k}.weight"], state[f"{k}.bias"] = w.clone(), b.clone()
        for k, fb in enumerate(self.feedback):
            state[f"{k}.feedback"] = fb.clone()
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for k in range(len(self.weights)):
            for name, store in (("weight", self.weights), ("bias", self.biases)):
                store[k] = _int32(state[f"{k}.{name}"], store[k].shape, f"{k}.{name}")
        for k in range(len(self.feedback)):
            self.feedback[k] = _int32(state[f"{k}.feedback"], self.feedback[k].shape,
                                      f"{k}.feedback")

    def to_float(self, dtype: torch.dtype = torch.float64) -> nn.Sequential:
        """A float PyTorch module computing the same outputs from ``x.to(dtype)`` (exact in
        float64: every intermediate is an integer below 2**53)."""
        layers: list[nn.Module] = [nn.Flatten()]
        for w, b in zip(self.weights, self.biases):
            linear = nn.Linear(w.shape[0], w.shape[1], dtype=dtype)
            with torch.no_grad():
                linear.weight.copy_(w.T.to(dtype))
                linear.bias.copy_(b.to(dtype))
            layers += [linear, IntegerTanh(w.shape[0])]
        return nn.Sequential(*layers).eval()

    def c_header(self, name: str = "tifed") -> str:
        """The network as a C header of int32 arrays (row-major W[in][out]) for a device."""
        lines = [f"/* {name}: integer DFA network {'-'.join(map(str, self.sizes))}, "
                 f"exported by sdfa.integer */", "#include <stdint.h>",
                 f"#define {name.upper()}_LAYERS {len(self.weights)}"]
        for n, size in enumerate(self.sizes):
            lines.append(f"#define {name.upper()}_SIZE{n} {size}")
        for key, t in self.state_dict().items():
            array = f"{name}_{key.replace('.', '_')}"
            dims = "".join(f"[{d}]" for d in t.shape)
            values = ", ".join(map(str, t.flatten().tolist()))
            lines.append(f"static const int32_t {array}{dims} = {{{values}}};")
        return "\n".join(lines) + "\n"


class IntegerTanh(nn.Module):
    """The integer tanh (:func:`sdfa.integer.ops.pla_tanh`) on float tensors holding integers."""

    def __init__(self, fan_in: int):
        super().__init__()
        self.fan_in = fan_in

    def forward(self, pre: torch.Tensor) -> torch.Tensor:
        v = torch.floor(pre / (256 * self.fan_in))
        y = torch.zeros_like(v)
        for inside, (_, num, den, offset, _) in pla_pieces(v):
            y = torch.where(inside, torch.floor(v * num / den) + offset, y)
        return y

    def extra_repr(self) -> str:
        return f"fan_in={self.fan_in}"


def _int32(t: torch.Tensor, shape, name: str) -> torch.Tensor:
    require_integer(t, name)
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(t.shape)}; expected {tuple(shape)}")
    return checked(t, name).clone()
