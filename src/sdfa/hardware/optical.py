"""A simulated optical processing unit (OPU) that computes DFA's random projection with light.

After LightOn's device as their simulator describes it (lightonai/lightonml,
``internal/simulated_device.py``; Launay et al. 2020, "Hardware Beyond Backpropagation"):

* a fixed complex Gaussian transmission matrix R = N(0, 1/n) + i N(0, 1/n), n the number of
  input pixels (the scattering medium; drawn from the seed);
* the input is a **binary** pattern on a digital micro-mirror device (DMD), so the real error e
  must be encoded in binary frames: ``"ternary"`` (TinyDFA: e_t = 1[e > tau/B] - 1[e < -tau/B],
  its positive and negative parts shown as two frames, the projection scaled by 1/B) or
  ``"bitplanes"`` (|e| quantised to ``input_bits`` bits, one frame per bit and sign, summed
  with weights 2^k);
* the camera measures only the **intensity** |x R|^2: shot (Poisson) noise at ``photons``
  photo-electrons per pixel at full scale, an additive Gaussian ``noise`` (a fraction of the
  full scale), then ``camera_bits`` (8) of quantisation over a full scale set per frame batch
  to its largest expected intensity (auto-exposure) unless ``exposure`` fixes it.

**Linear projections from intensities** (Ohana, Hesslow, Brunner, Gigan, Mueller 2023, "Linear
optical random projections without holography", Opt. Express 31, 25881; only its abstract was
available to us, so the scheme below is our reading of "a combination of multiple intensity
measurements"). A fixed binary *anchor* a (``anchor`` pixels, always on, beside the input) adds
a known field c = a R_a to every frame. With x shown alone and together with the anchor,

    |x R + c|^2 - |x R|^2 - |c|^2 = 2 Re((x R) conj(c)),

linear in x: half of it is ``x M`` with M_ij = Re(R_ij conj(c_j)), Gaussian given the anchor
field, column j scaled by |c_j| (a Rayleigh factor). |c|^2 is one frame measured per batch.
Cost: **2 frames per binary input** plus one, i.e. 4 frames per error vector with ternary
encoding, 4 * input_bits with bit planes. Ohana et al. report i.i.d. Gaussian entries; we do
not divide column j by the measured |c_j| (which would make M_ij = Re(R_ij e^{-i arg c_j}),
i.i.d. N(0, 1/n)), because it amplifies the camera's quantisation noise without bound on the
pixels where the anchor's speckle is dark: with an 8-bit camera the projection lost all
direction (cosine 0.1 with e @ M in our check). M is rescaled digitally (one gain per
matrix, set at calibration) to the standard deviation of the exact backend's B, so learning
rates carry over. ``dense()`` is that effective matrix; with no noise and no quantisation the
projection equals ``e @ dense()`` exactly (bit planes: up to the input's quantisation).
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import torch

from ..feedback import DirectFeedback
from .options import DeviceOptions

ENCODINGS = ("ternary", "bitplanes")


@dataclasses.dataclass(frozen=True)
class OpticalOptions(DeviceOptions):
    """Physical parameters of the simulated OPU (docs/hardware.md gives each default's source).

    encoding: "bitplanes" or "ternary" (TinyDFA; it did not learn in our runs, docs/hardware.md).
    threshold: tau of the ternarisation (e_t = +-1 where |e| > tau / B).
    input_bits: bit planes per sign ("bitplanes").
    camera_bits: camera quantisation (None: ideal camera).
    photons: photo-electrons at full scale (shot noise; None: no shot noise).
    noise: additive Gaussian camera noise, std as a fraction of full scale.
    exposure: fixed full scale in intensity units (None: auto-exposure per batch of frames).
    anchor: anchor pixels of the recovery scheme (None: as many as the error has entries).
    """

    device: ClassVar[str] = "optical"

    encoding: str = "bitplanes"
    threshold: float = 0.1
    input_bits: int = 4
    camera_bits: int | None = 8
    photons: float | None = None
    noise: float = 0.0
    exposure: float | None = None
    anchor: int | None = None

    def __post_init__(self):
        if self.encoding not in ENCODINGS:
            raise ValueError(
                f"unknown optical encoding {self.encoding!r}; choose one of {', '.join(ENCODINGS)}"
            )
        for name in ("input_bits", "camera_bits", "anchor"):
            value = getattr(self, name)
            if value is None and name != "input_bits":
                continue
            top = 10**9 if name == "anchor" else 32
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= top:
                raise ValueError(f"optical {name} must be a positive integer; got {value!r}")
        if not self.threshold >= 0:
            raise ValueError(f"optical threshold must be >= 0; got {self.threshold!r}")
        if self.photons is not None and not self.photons > 0:
            raise ValueError(f"optical photons must be > 0 or None; got {self.photons!r}")
        if not self.noise >= 0:
            raise ValueError(f"optical noise must be >= 0; got {self.noise!r}")
        if self.exposure is not None and not self.exposure > 0:
            raise ValueError(f"optical exposure must be > 0 or None; got {self.exposure!r}")



def ternarize(e: torch.Tensor, threshold: float) -> torch.Tensor:
    """TinyDFA's e_t = 1[e > tau/B] - 1[e < -tau/B], B = e.shape[0] (rows of the batch)."""
    # the threshold in e's own dtype: at a uniform output (zero-initialised DFA layers, C = 10)
    # e's entries are exactly tau / B there, and a float64 threshold would flip them all to +1
    t = torch.tensor(threshold, dtype=e.dtype) / max(e.shape[0], 1)
    return (e > t).to(e.dtype) - (e < -t).to(e.dtype)


def bitplanes(e: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """|e| as ``bits`` binary planes per sign: (positive (bits, rows, C), negative, step) with
    e ~ step * sum_k 2^k (pos_k - neg_k), |e| rounded to integers 0..2^bits - 1 of step."""
    step = e.abs().max().clamp_min(1e-30) / (2**bits - 1)
    level = torch.round(e.abs() / step).to(torch.int64)
    planes = torch.stack([(level >> k) & 1 for k in range(bits)]).to(e.dtype)
    return planes * (e > 0), planes * (e < 0), step


class OpticalFeedback(DirectFeedback):
    """DFA's ``e @ B`` measured on a simulated OPU (module docstring: the model and the costs).

    Buffers ``r_real``, ``r_imag`` ((C + anchor, N): the transmission matrix, the anchor's rows
    last) and ``gain`` (the digital rescaling), so the device lives in the ``state_dict``.
    """

    def __init__(self, r_real, r_imag, gain, num_classes: int, options, seed: int = 0):
        super().__init__()
        self.options = (
            options if isinstance(options, OpticalOptions) else OpticalOptions.from_dict(options)
        )
        self.register_buffer("r_real", r_real)
        self.register_buffer("r_imag", r_imag)
        self.register_buffer("gain", torch.as_tensor(gain, dtype=r_real.dtype))
        self.num_classes = int(num_classes)
        self._noise_gen = torch.Generator().manual_seed(seed)
        self.frames = 0  # camera frames taken so far (the cost of the recovery scheme)

    @classmethod
    def create(cls, num_classes, num_neurons, *, target_std, options, gen, seed, dtype, device):
        """Draw the transmission matrix from ``gen`` and set the gain to ``target_std``."""
        options = options if isinstance(options, OpticalOptions) else OpticalOptions.from_dict(
            options
        )
        n = num_classes + (options.anchor or num_classes)
        std = 1.0 / math.sqrt(n)  # per component, as in lightonml's simulator
        r_real = torch.randn(n, num_neurons, generator=gen, dtype=torch.float64) * std
        r_imag = torch.randn(n, num_neurons, generator=gen, dtype=torch.float64) * std
        anchor = torch.complex(r_real[num_classes:], r_imag[num_classes:]).sum(0)
        m = (torch.complex(r_real[:num_classes], r_imag[:num_classes]) * anchor.conj()).real
        gain = target_std / float(m.std()) if m.numel() > 1 else target_std  # M to B's std
        return cls(r_real.to(dtype), r_imag.to(dtype), gain, num_classes, options, seed).to(device)

    # -- the optics -------------------------------------------------------------------------

    def _fields(self):
        c = self.num_classes
        r = torch.complex(self.r_real, self.r_imag)
        anchor = r[c:].sum(0)  # the field of the anchor pattern (all its pixels on)
        return r[:c], anchor

    def intensity(self, x: torch.Tensor, with_anchor: bool) -> torch.Tensor:
        """The ideal camera image |x R (+ c)|^2 of binary frames ``x`` (frames, C)."""
        r, anchor = self._fields()
        field = x.to(r.dtype) @ r
        if with_anchor:
            field = field + anchor
        return field.abs() ** 2

    def camera(self, intensity: torch.Tensor, full_scale: torch.Tensor) -> torch.Tensor:
        """What the camera reports for an ideal image: shot noise, read noise, quantisation."""
        o = self.options
        fs = full_scale.clamp_min(1e-30)
        measured = intensity
        if o.photons is not None:
            rate = (intensity / fs * o.photons).double().cpu()
            measured = (torch.poisson(rate, generator=self._noise_gen) / o.photons).to(fs) * fs
        if o.noise > 0:
            n = torch.randn(intensity.shape, generator=self._noise_gen, dtype=torch.float64)
            measured = measured + (o.noise * n).to(fs) * fs
        if o.camera_bits is not None:
            levels = 2**o.camera_bits - 1
            measured = torch.round((measured / fs).clamp(0, 1) * levels) * (fs / levels)
        self.frames += intensity.shape[0]
        return measured

    def measure_linear(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ M``, M = Re(R conj(c)), for binary frames ``x`` (frames, C), recovered from 2
        intensity frames each (x with and without the anchor) and one of the anchor alone."""
        _, anchor = self._fields()
        with_anchor = self.intensity(x, True)
        alone = self.intensity(x, False)
        reference = (anchor.abs() ** 2)[None]
        fs = (
            torch.as_tensor(self.options.exposure, dtype=with_anchor.dtype)
            if self.options.exposure is not None
            else torch.cat([with_anchor, reference]).max()
        )
        i1, i2, i0 = (self.camera(i, fs) for i in (with_anchor, alone, reference))
        return (i1 - i2 - i0) / 2

    # -- DirectFeedback ---------------------------------------------------------------------

    def project(self, e):
        o = self.options
        e = e.to(self.r_real.dtype)
        if o.encoding == "ternary":
            t = ternarize(e, o.threshold)
            frames = torch.cat([(t > 0).to(e.dtype), (t < 0).to(e.dtype)])
            y = self.measure_linear(frames)
            rows = e.shape[0]
            return (y[:rows] - y[rows:]) * (self.gain / max(rows, 1))
        pos, neg, step = bitplanes(e, o.input_bits)
        bits, rows = pos.shape[:2]
        y = self.measure_linear(torch.cat([pos.flatten(0, 1), neg.flatten(0, 1)]))
        y = y.view(2, bits, rows, -1)
        weights = (2.0 ** torch.arange(bits, dtype=y.dtype, device=y.device))[:, None, None]
        return ((y[0] - y[1]) * weights).sum(0) * (step * self.gain)

    def dense(self):
        r, anchor = self._fields()
        return (r * anchor.conj()).real * self.gain

    @property
    def shape(self):
        return (self.num_classes, self.r_real.shape[1])

    def direct_cost(self):
        """For sdfa.costs: the C N products of e @ B, done by the OPU (its frames apart)."""
        c, n = self.shape
        return c * n, 0, c * n, c * n, "e B (OPU)"

    def get_extra_state(self):
        return {"options": dataclasses.asdict(self.options), "num_classes": self.num_classes}

    def set_extra_state(self, state):
        self.options = OpticalOptions.from_dict(state["options"])
        self.num_classes = int(state["num_classes"])
