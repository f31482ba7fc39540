"""Input coding: a batch of static inputs (or time series) -> (batch, T, features) over T steps."""

from __future__ import annotations

import torch
from torch import nn

CODINGS = ("rate", "latency", "current", "series")


def encode(x: torch.Tensor, steps: int, coding: str = "rate",
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Spike (or current) trains of shape (batch, T, features) from a batch ``x``.

    * ``rate``: Bernoulli spikes with probability p = clamp(x, 0, 1) at every step;
    * ``latency``: one spike per feature at step round((1 - p) (T - 1)), none where p = 0;
    * ``current``: the value itself, fed as input current at every step;
    * ``series``: ``x`` is (batch, channels, T, features), one time step per row (BasicMotions,
      SHD): the features of step t are the input at step t.
    """
    if coding not in CODINGS:
        raise ValueError(f"unknown coding {coding!r}; choose one of {', '.join(CODINGS)}")
    if coding == "series":
        return x.movedim(-2, 1).flatten(2)
    flat = x.flatten(1)
    if coding == "current":
        return flat.unsqueeze(1).expand(-1, steps, -1)
    p = flat.clamp(0, 1)
    if coding == "rate":
        probs = p.unsqueeze(1).expand(-1, steps, -1)
        return torch.bernoulli(probs, generator=generator)
    when = torch.round((1 - p) * (steps - 1)).long()
    spikes = torch.zeros(flat.shape[0], steps, flat.shape[1], dtype=x.dtype, device=x.device)
    spikes.scatter_(1, when.unsqueeze(1), (p > 0).to(x.dtype).unsqueeze(1))
    return spikes


class SpikeEncoder(nn.Module):
    """The first module of a spiking preset: for rate and latency coding each normalized image
    is mapped back to [0, 1] by its own minimum and maximum (the normalization sdfa applies is
    affine, so this recovers the pixel intensities up to the image's brightest pixel), then
    encoded over ``steps`` steps."""

    def __init__(self, steps: int, coding: str = "rate"):
        super().__init__()
        if coding not in CODINGS:
            raise ValueError(f"unknown coding {coding!r}; choose one of {', '.join(CODINGS)}")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be a positive integer; got {steps!r}")
        self.steps, self.coding = steps, coding

    def forward(self, x):
        if self.coding in ("rate", "latency"):
            flat = x.flatten(1)
            low = flat.min(1, keepdim=True).values
            span = (flat.max(1, keepdim=True).values - low).clamp_min(1e-12)
            x = ((flat - low) / span).view_as(x)
        return encode(x, self.steps, self.coding)

    def extra_repr(self):
        return f"steps={self.steps}, coding={self.coding!r}"
