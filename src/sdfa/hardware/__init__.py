"""Simulated hardware for DFA's random projection (and for in-memory forward layers).

* :mod:`sdfa.hardware.crossbar`: an RRAM crossbar storing a matrix as conductances
  (:class:`Crossbar`, :class:`CrossbarLinear`, :func:`on_crossbar`);
* :mod:`sdfa.hardware.optical`: an optical processing unit (OPU) measuring intensities;
* :mod:`sdfa.hardware.backends`: both as DFA feedback backends,
  ``sdfa.convert(model, "dfa", feedback="optical" | "crossbar", feedback_options={...})``.
"""

from .backends import CrossbarFeedback
from .crossbar import Crossbar, CrossbarLinear, CrossbarOptions, on_crossbar, quantize_signed
from .optical import OpticalFeedback, OpticalOptions, bitplanes, ternarize

__all__ = [
    "Crossbar",
    "CrossbarFeedback",
    "CrossbarLinear",
    "CrossbarOptions",
    "OpticalFeedback",
    "OpticalOptions",
    "bitplanes",
    "on_crossbar",
    "quantize_signed",
    "ternarize",
]
