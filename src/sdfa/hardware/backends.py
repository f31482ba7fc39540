"""The device backends of DFA's projection: ``sdfa.convert(model, "dfa", feedback=...)``.

* ``"crossbar"``: the exact B_l (dense, sparse, low rank: any of them, as a dense array) is
  programmed into an RRAM crossbar (:mod:`sdfa.hardware.crossbar`) and ``e @ B_l`` is read from
  it, with the array's levels, variation, faults, read noise and ADC.
* ``"optical"``: the OPU's own fixed random matrix replaces B_l (:mod:`sdfa.hardware.optical`);
  it is dense and Gaussian by nature, so ``k``, ``rank`` and ``dilation`` are refused; ``init``
  and ``scale`` set only the standard deviation it is rescaled to.

Each layer's device is seeded from the conversion's seed and the layer's name, so the same
seed gives the same devices (and the same sequence of noise) on every machine.
"""

from __future__ import annotations

import dataclasses

import torch

from .. import feedback as fb
from .crossbar import Crossbar, CrossbarOptions
from .optical import OpticalFeedback, OpticalOptions


def _device_seed(seed: int, name: str, kind: str) -> int:
    gen = fb.generator(seed, f"{kind}:{name}")
    return int(torch.randint(0, 2**62, (1,), generator=gen))


class CrossbarFeedback(fb.DirectFeedback):
    """``e @ B`` read from a crossbar holding B (C, N): the child module ``crossbar``."""

    def __init__(self, crossbar: Crossbar):
        super().__init__()
        self.crossbar = crossbar

    def project(self, e):
        return self.crossbar(e).to(e.dtype)

    def dense(self):
        return self.crossbar.effective_weight()

    def direct_cost(self):
        """For sdfa.costs: the C N products of e @ B, done by the array."""
        c, n = self.shape
        return c * n, 0, c * n, c * n, "e B (crossbar)"

    @property
    def shape(self):
        return tuple(self.crossbar.g_pos.shape)


class CrossbarBackend(fb.FeedbackBackend):
    name = "crossbar"

    def check(self, options, dfa_options):
        if dfa_options.get("dilation") is not None:
            raise ValueError(
                "feedback='crossbar' stores B_l as a dense array; dilation= (convolutional "
                "feedback) would program C x N cells for a kernel of C x Ch x d values: use "
                "feedback='exact' with dilation="
            )
        return dataclasses.asdict(CrossbarOptions.from_dict(options))

    def build(self, exact, *, options, seed, name):
        b = exact.dense().detach()
        return CrossbarFeedback(Crossbar(b, options, seed=_device_seed(seed, name, "crossbar")))

    def empty(self, state_dict, key, options):
        if key + "crossbar.g_pos" not in state_dict:
            return None
        g = state_dict[key + "crossbar.g_pos"]
        return CrossbarFeedback(Crossbar(torch.zeros_like(g), options))


class OpticalBackend(fb.FeedbackBackend):
    name = "optical"

    def check(self, options, dfa_options):
        refused = [k for k in ("k", "rank", "dilation") if dfa_options.get(k) is not None]
        if refused:
            raise ValueError(
                f"feedback='optical' uses the OPU's own dense random matrix: "
                f"{', '.join(f'{k}=' for k in refused)} cannot shape it. Drop "
                f"{'them' if len(refused) > 1 else 'it'}, or use feedback='crossbar' (any B) "
                "or 'exact'"
            )
        return dataclasses.asdict(OpticalOptions.from_dict(options))

    def build(self, exact, *, options, seed, name):
        b = exact.dense().detach()
        classes, neurons = b.shape
        device_seed = _device_seed(seed, name, "optical")
        return OpticalFeedback.create(
            classes,
            neurons,
            target_std=1.0 if b.is_meta or b.numel() < 2 else float(b.double().std()),
            options=options,
            gen=torch.Generator().manual_seed(device_seed),
            seed=device_seed,
            dtype=b.dtype,
            device=b.device,
        )

    def empty(self, state_dict, key, options):
        if key + "r_real" not in state_dict:
            return None
        extra = state_dict.get(key + "_extra_state") or {}
        r = torch.empty_like(state_dict[key + "r_real"])
        return OpticalFeedback(
            r, torch.empty_like(r), 1.0, extra.get("num_classes", 0), options
        )


fb.BACKENDS.register("crossbar", CrossbarBackend())
fb.BACKENDS.register("optical", OpticalBackend())
