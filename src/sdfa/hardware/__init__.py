"""Simulated hardware for DFA's random projection (and for in-memory forward layers).

* :mod:`sdfa.hardware.crossbar`: an RRAM crossbar storing a matrix as conductances
  (:class:`Crossbar`, :class:`CrossbarLinear`, :func:`on_crossbar`).
"""

from .crossbar import Crossbar, CrossbarLinear, CrossbarOptions, on_crossbar, quantize_signed

__all__ = ["Crossbar", "CrossbarLinear", "CrossbarOptions", "on_crossbar", "quantize_signed"]
