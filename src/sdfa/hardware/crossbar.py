"""A resistive (RRAM) crossbar that stores a real matrix W and computes ``x @ W`` in analog.

The device model, in the order a weight goes through it:

1. **Levels.** ``W`` (in, out) is scaled by ``w_max = max|W|`` and each magnitude rounded to one
   of ``2**bits`` evenly spaced levels ``q in {0, ..., L-1}``, L = 2**bits.
2. **Differential pair.** A signed weight uses two cells: ``G+`` holds the positive part, ``G-``
   the negative part, each at ``g = g_min + q (g_max - g_min) / (L-1)``; the array reads
   ``G+ - G-``, so g_min cancels.
3. **Device-to-device programming variation** (write once, fixed afterwards): each programmed
   conductance is multiplied by a log-normal factor ``exp(sigma n)``, n ~ N(0, 1) (median kept).
4. **Stuck-at faults**: a fraction ``stuck_on`` of the cells sits at g_max (low-resistance state)
   and a fraction ``stuck_off`` at g_min (high-resistance state), whatever was programmed.
5. **Read (cycle-to-cycle) noise**: every read sees ``g (1 + read_noise n)`` with a fresh n per
   cell and per input vector. For Gaussian n the column current of one read is exactly
   ``x @ G + read_noise * sqrt(x**2 @ G**2) * n'`` (a sum of independent Gaussians), which is
   how it is sampled: the same distribution as per-cell noise at the cost of a second matmul.
6. **Input DAC** (``input_bits``, optional): each input row is quantised to signed levels of
   its own full scale max|x| (a per-row gain), as voltages or pulse counts on the word lines.
7. **Column ADC** (``adc_bits``): the differential column current is quantised to
   ``2**adc_bits - 1`` signed levels over a full scale that is either given (``adc_range``, in
   units of the output) or set per read to the largest |current| of the batch (an ideal gain
   calibration), then converted back to weight units by ``w_max / (g_max - g_min)``.

Defaults follow NeuRRAM (Wan et al., Nature 608, 2022: 4-bit weights in a differential pair,
256 x 256 cores) and common RRAM figures (see docs/hardware.md for each source); every one is
an option. All randomness is seeded: the same seed gives the same programmed device and the
same sequence of reads on every machine.

The crossbar is a module with buffers (``g_pos``, ``g_neg``, ``w_max``), so a programmed device
lives in a ``state_dict``; ``program(W)`` writes a new matrix (online adaptation re-programs
the array), ``forward(x)`` is one analog matrix-vector product per row of x, and
``effective_weight()`` is the matrix the array holds after programming (no read noise, no ADC).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
from torch import nn

from ..feedback import check_seed
from .options import DeviceOptions


@dataclasses.dataclass(frozen=True)
class CrossbarOptions(DeviceOptions):
    """The physical parameters of a crossbar (docs/hardware.md gives each default's source).

    bits: conductance levels per cell, ``2**bits`` (None: analog, no rounding).
    g_min, g_max: conductance range in microsiemens (HRS / LRS).
    variation: log-normal sigma of device-to-device programming variation.
    read_noise: relative std of a cell's conductance at each read (cycle-to-cycle).
    stuck_on, stuck_off: fractions of cells stuck at g_max / g_min.
    adc_bits: column ADC resolution (None: ideal readout).
    adc_range: ADC full scale in output units (None: set per read from the batch's largest value).
    input_bits: input DAC resolution (None: analog inputs).
    """

    device: ClassVar[str] = "crossbar"

    bits: int | None = 4
    g_min: float = 1.0
    g_max: float = 40.0
    variation: float = 0.0
    read_noise: float = 0.0
    stuck_on: float = 0.0
    stuck_off: float = 0.0
    adc_bits: int | None = 8
    adc_range: float | None = None
    input_bits: int | None = None

    def __post_init__(self):
        for name in ("bits", "adc_bits", "input_bits"):
            value = getattr(self, name)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 32
            ):
                raise ValueError(
                    f"crossbar {name} must be an integer in 1..32 or None; got {value!r}"
                )
        if not 0 <= self.g_min < self.g_max:
            raise ValueError(
                f"crossbar conductances need 0 <= g_min < g_max; got g_min={self.g_min!r}, "
                f"g_max={self.g_max!r}"
            )
        for name in ("variation", "read_noise"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"crossbar {name} must be >= 0; got {getattr(self, name)!r}")
        if not (0 <= self.stuck_on and 0 <= self.stuck_off and self.stuck_on + self.stuck_off <= 1):
            raise ValueError(
                "crossbar fault rates need stuck_on, stuck_off >= 0 and stuck_on + stuck_off <= 1; "
                f"got stuck_on={self.stuck_on!r}, stuck_off={self.stuck_off!r}"
            )
        if self.adc_range is not None and not self.adc_range > 0:
            raise ValueError(f"crossbar adc_range must be > 0 or None; got {self.adc_range!r}")



def quantize_signed(x: torch.Tensor, full_scale: torch.Tensor, bits: int | None) -> torch.Tensor:
    """``x`` rounded to ``2**bits - 1`` signed levels (0 included) over [-full_scale, full_scale],
    values beyond it clipped; ``bits=None`` returns ``x``."""
    if bits is None:
        return x
    steps = 2 ** (bits - 1) - 1 if bits > 1 else 1
    fs = torch.as_tensor(full_scale, dtype=x.dtype, device=x.device).clamp_min(1e-30)
    return torch.round((x / fs).clamp(-1, 1) * steps) * (fs / steps)


class Crossbar(nn.Module):
    """A crossbar holding ``weight`` (in_features, out_features); ``crossbar(x)`` ~ ``x @ weight``.

    Args:
        weight: the matrix to program, (in, out), as used in ``x @ weight``.
        options: a :class:`CrossbarOptions` or a dict of its fields; ``**kwargs`` override them.
        seed: seeds the programming (variation, faults) and the read noise.
    """

    def __init__(self, weight: torch.Tensor, options=None, *, seed: int = 0, **kwargs):
        super().__init__()
        if isinstance(options, CrossbarOptions):
            options = dataclasses.asdict(options)
        self.options = CrossbarOptions.from_dict({**(options or {}), **kwargs})
        self.seed = check_seed(seed)
        if weight.dim() != 2:
            raise ValueError(
                f"a crossbar stores a 2-D matrix (in, out); got shape {tuple(weight.shape)}"
            )
        self._program_gen = torch.Generator().manual_seed(self.seed)
        self._read_gen = torch.Generator().manual_seed((self.seed * 7919 + 1) % 2**63)
        self.register_buffer("g_pos", torch.empty(0))
        self.register_buffer("g_neg", torch.empty(0))
        self.register_buffer("w_max", torch.zeros((), dtype=torch.float64))
        self.program(weight)

    # -- writing ------------------------------------------------------------------------------

    def levels(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The target conductances (G+, G-) of ``weight`` before variation and faults."""
        o = self.options
        w = weight.detach().double().cpu()
        w_max = w.abs().max().clamp_min(1e-30)
        mag = w.abs() / w_max
        if o.bits is not None:
            mag = torch.round(mag * (2**o.bits - 1)) / (2**o.bits - 1)
        span = o.g_max - o.g_min
        pos = torch.where(w > 0, mag, torch.zeros_like(mag))
        neg = torch.where(w < 0, mag, torch.zeros_like(mag))
        return o.g_min + span * pos, o.g_min + span * neg

    @torch.no_grad()
    def program(self, weight: torch.Tensor) -> None:
        """Write ``weight`` into the array: levels, then variation and stuck-at faults.

        Each call draws fresh programming variation (a device is re-written, not copied);
        which cells are stuck is a property of the array, drawn once from the seed.
        """
        o = self.options
        if weight.device.type == "meta":  # sdfa.costs traces a data-free twin of the model
            self.g_pos = torch.empty(weight.shape, dtype=weight.dtype, device="meta")
            self.g_neg = torch.empty(weight.shape, dtype=weight.dtype, device="meta")
            return
        g_pos, g_neg = self.levels(weight)
        if o.variation > 0:
            g_pos = g_pos * torch.exp(
                o.variation
                * torch.randn(g_pos.shape, generator=self._program_gen, dtype=torch.float64)
            )
            g_neg = g_neg * torch.exp(
                o.variation
                * torch.randn(g_neg.shape, generator=self._program_gen, dtype=torch.float64)
            )
        if not hasattr(self, "_faults") or self._faults[0].shape != g_pos.shape:
            fault_gen = torch.Generator().manual_seed((self.seed * 104729 + 2) % 2**63)
            self._faults = tuple(
                torch.rand(g_pos.shape, generator=fault_gen, dtype=torch.float64) for _ in range(2)
            )
        for cells, fault in zip((g_pos, g_neg), self._faults, strict=True):
            cells[fault < o.stuck_on] = o.g_max
            cells[(fault >= o.stuck_on) & (fault < o.stuck_on + o.stuck_off)] = o.g_min
        dtype = weight.dtype if weight.is_floating_point() else torch.float32
        self.g_pos = g_pos.to(dtype=dtype, device=weight.device)
        self.g_neg = g_neg.to(dtype=dtype, device=weight.device)
        self.w_max = weight.detach().abs().max().double().cpu().clamp_min(1e-30)

    def stuck_mask(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Boolean masks (stuck at g_max, stuck at g_min) over the (2, in, out) cells."""
        o = self.options
        fault = torch.stack(self._faults)
        return fault < o.stuck_on, (fault >= o.stuck_on) & (fault < o.stuck_on + o.stuck_off)

    # -- reading ------------------------------------------------------------------------------

    @property
    def scale(self) -> float:
        """Weight units per microsiemens of differential conductance."""
        return float(self.w_max) / (self.options.g_max - self.options.g_min)

    def effective_weight(self) -> torch.Tensor:
        """The (in, out) matrix the array holds, (G+ - G-) in weight units (no noise, no ADC)."""
        return (self.g_pos - self.g_neg) * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """One analog product per row of ``x`` (rows, in) -> (rows, out), with its noise."""
        o = self.options
        x = x.to(self.g_pos.dtype)
        if o.input_bits is not None:
            x = quantize_signed(x, x.abs().amax(dim=-1, keepdim=True), o.input_bits)
        current = x @ (self.g_pos - self.g_neg)
        if o.read_noise > 0:
            std = torch.sqrt((x * x) @ (self.g_pos**2 + self.g_neg**2)) * o.read_noise
            noise = torch.randn(current.shape, generator=self._read_gen, dtype=torch.float64)
            current = current + std * noise.to(current.dtype).to(current.device)
        y = current * self.scale
        if o.adc_bits is not None:
            fs = o.adc_range if o.adc_range is not None else y.detach().abs().max()
            y = quantize_signed(y, fs, o.adc_bits)
        return y

    def extra_repr(self):
        fields = ", ".join(
            f"{f.name}={getattr(self.options, f.name)!r}" for f in dataclasses.fields(self.options)
        )
        return f"in={self.g_pos.shape[0]}, out={self.g_pos.shape[1]}, {fields}, seed={self.seed}"


class _StraightThrough(torch.autograd.Function):
    """The crossbar's output forwards, the ideal product's gradient backwards."""

    @staticmethod
    def forward(ctx, ideal, measured):
        return measured

    @staticmethod
    def backward(ctx, grad):
        return grad, None

    @staticmethod
    def jvp(ctx, ideal_tangent, measured_tangent):  # forward mode (FDFA): the ideal product's
        return ideal_tangent


class CrossbarLinear(nn.Linear):
    """An nn.Linear whose forward product runs on a simulated crossbar (in-memory compute).

    A subclass of nn.Linear, so every rule, DFA hook and cost formula treats it as the Linear
    it is; its ``weight`` / ``bias`` are ordinary parameters. The forward output is the
    crossbar's ``x @ W^T`` plus the bias (added digitally); gradients are those of the ideal
    product (straight-through): the update is computed digitally and written back to the
    array. The array is re-programmed lazily, at the first forward pass after the weight
    changed (an optimizer step): one write of the whole array per update. ``reprogram=False``
    keeps the first programming (inference on a fixed device).
    """

    def __init__(
        self,
        in_features,
        out_features,
        bias=True,
        options=None,
        *,
        seed: int = 0,
        reprogram: bool = True,
        device=None,
        dtype=None,
        **kwargs,
    ):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.reprogram = reprogram
        self.crossbar = Crossbar(self.weight.detach().t(), options, seed=seed, **kwargs)
        self._version = self.weight._version

    @classmethod
    def from_linear(cls, linear: nn.Linear, options=None, *, seed: int = 0, **kwargs):
        """A CrossbarLinear that shares ``linear``'s parameters, programmed with its weight."""
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"CrossbarLinear wraps an nn.Linear; got {type(linear).__name__}")
        new = cls(
            linear.in_features,
            linear.out_features,
            linear.bias is not None,
            options,
            seed=seed,
            **kwargs,
        )
        new.weight, new.bias = linear.weight, linear.bias
        new.crossbar.program(linear.weight.detach().t())
        new._version = linear.weight._version
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.reprogram and self.weight._version != self._version:
            self.crossbar.program(self.weight.detach().t())
            self._version = self.weight._version
        ideal = nn.functional.linear(x, self.weight)
        measured = self.crossbar(x.detach().reshape(-1, x.shape[-1])).reshape(ideal.shape)
        out = _StraightThrough.apply(ideal, measured.to(ideal.dtype))
        return out if self.bias is None else out + self.bias


def on_crossbar(
    model: nn.Module, options=None, *, seed: int = 0, names=None, **kwargs
) -> nn.Module:
    """Swap the nn.Linear modules of ``model`` (all, or those in ``names``) for CrossbarLinear,
    in place; each array gets its own seed (``seed`` and its position). Returns ``model``."""
    targets = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and (names is None or name in names)
    ]
    if names is not None:
        missing = sorted(set(names) - {n for n, _ in targets})
        if missing:
            raise ValueError(f"on_crossbar: no nn.Linear named {', '.join(missing)}")
    for i, (name, module) in enumerate(targets):
        wrapped = CrossbarLinear.from_linear(
            module, options, seed=(seed * 1_000_003 + i) % 2**63, **kwargs
        )
        if name == "":
            return wrapped
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, wrapped)
    return model


__all__ = ["Crossbar", "CrossbarLinear", "CrossbarOptions", "on_crossbar", "quantize_signed"]
