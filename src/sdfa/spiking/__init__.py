"""Spiking networks for every sdfa rule.

* :mod:`.encoding`: rate, latency and current (time-series) input coding over T steps;
* :mod:`.models`: LIF layers from snntorch simulated over time, the presets ``snn-mlp`` and
  ``snn-conv`` (DFA at every time step with ``per_position=True``, once per sample with
  ``per_position="sum"``);
* :mod:`.sfdfa`: spike-time LIF networks trained by SFDFA (Bacho & Chu 2024), exact local spike
  time gradients (eligibility traces) computed online on the CPU;
* :mod:`.adaptation`: online adaptation of a pre-trained SNN on a simulated RRAM crossbar.

snntorch is an optional extra (``pip install sdfa[spiking]``); it is imported when a spiking
model is built.
"""

from .encoding import SpikeEncoder, encode

__all__ = ["SpikeEncoder", "encode"]
