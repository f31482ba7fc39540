"""Energy (and projection latency) of one training step per sample, per feedback backend.

Built on :func:`sdfa.costs` (MACs and data movement of BP and DFA per sample): the forward and
update products and the data movement are digital in every case; what changes is where DFA's
projection ``e @ B_l`` runs:

* **digital** (BP, exact DFA): every MAC at ``digital_mac_pj``, every value read at
  ``sram_read_pj``;
* **OPU**: one optical device whose output pixels cover every hidden layer (as TinyDFA and
  Launay et al. use one matrix for all layers), ``frames`` camera frames per sample (4 per
  bit plane with the anchor scheme of :mod:`sdfa.hardware.optical`), each costing the device's
  power for one frame time. The "full use" column prices instead ``opu_watts /
  opu_ops_per_s`` per operation (input pixels x output pixels per frame): the bound for a
  problem that fills the device;
* **crossbar**: 2 C N_l cell reads (differential pair) and N_l ADC conversions per sample and
  layer.

Every figure is a field of :class:`Figures` with its source (docs/costs.md, docs/hardware.md);
the RRAM figures are assumptions of ours, to be replaced by measured ones.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from ..costs import PAPER_ARCHITECTURES, _format_table, _meta_preset, costs


@dataclasses.dataclass(frozen=True)
class Figures:
    """Per-operation energies and speeds (defaults and their sources: docs/costs.md)."""

    digital_mac_pj: float = 4.6  # FP32 multiply 3.7 pJ + add 0.9 pJ, 45 nm (Horowitz 2014)
    sram_read_pj: float = 5.0  # 32-bit read from an 8 KB SRAM, 45 nm (Horowitz 2014)
    opu_watts: float = 30.0  # LightOn OPU, "under 30 W" (Wang et al. 2024, as reported)
    opu_ops_per_s: float = 1.5e15  # 1500 TeraOPS (Brossollet et al. 2021; Wang et al. 2024)
    opu_frame_s: float = 5e-4  # lightonml SimulatedOpuDevice default frametime_us=500
    frames_per_sample: int = 16  # 4 bit planes per sign x (2 signs x 2 frames): our default
    rram_cell_read_fj: float = 1.0  # ASSUMED (no measured figure read by us)
    rram_adc_pj: float = 2.0  # ASSUMED, one 8-bit conversion (no measured figure read by us)
    rram_read_s: float = 1e-6  # ASSUMED, one array read incl. conversions (column-parallel)


@dataclasses.dataclass
class Energy:
    """Energy per sample of one training step (joules) under each backend."""

    model: str
    bp: float
    dfa: float
    dfa_opu: float
    dfa_opu_full_use: float
    dfa_crossbar: float
    projection_macs: int  # C * sum N_l per sample
    opu_latency_s: float  # the projection's latency per sample on the OPU
    crossbar_latency_s: float  # ... on the crossbar (one read per layer, column-parallel)


def _digital(report, figures: Figures, without_error: bool = False) -> float:
    t = report.total
    macs = t.forward + t.update + (0 if without_error else t.error)
    moved = 0 if without_error else t.movement
    return (macs * figures.digital_mac_pj + moved * figures.sram_read_pj) * 1e-12


def estimate(model, input_shape, *, name: str = "model", figures: Figures = Figures()) -> Energy:
    """The :class:`Energy` of ``model`` (a module, e.g. on the meta device) for one input."""
    bp = costs(model, "bp", input_shape, name=name)
    dfa = costs(model, "dfa", input_shape, name=name)
    hidden = [layer for layer in dfa.layers if layer.via.startswith("e B")]
    macs = sum(layer.error for layer in hidden)
    classes = macs // max(sum(layer.neurons for layer in hidden), 1)
    outputs = sum(layer.neurons for layer in hidden)
    base = _digital(dfa, figures, without_error=True)
    frames = figures.frames_per_sample
    opu = frames * figures.opu_watts * figures.opu_frame_s
    pixels_in = 2 * classes  # the error and as many anchor pixels (the default)
    full_use = frames * pixels_in * outputs * figures.opu_watts / figures.opu_ops_per_s
    crossbar = (2 * macs * figures.rram_cell_read_fj * 1e-15
                + outputs * figures.rram_adc_pj * 1e-12)
    return Energy(
        name, _digital(bp, figures), _digital(dfa, figures), base + opu, base + full_use,
        base + crossbar, macs, frames * figures.opu_frame_s,
        len(hidden) * figures.rram_read_s,
    )


def _uj(joules: float) -> str:
    return f"{joules * 1e6:,.3f}"


def energy_report(architectures: Mapping | None = None, *, markdown: bool = False,
                  figures: Figures = Figures()) -> str:
    """The table of ``sdfa costs --energy``: the Crafton et al. networks by default."""
    rows = []
    for label, (preset, shape, classes) in (architectures or PAPER_ARCHITECTURES).items():
        e = estimate(_meta_preset(preset, shape, classes), shape, name=label, figures=figures)
        rows.append([label, _uj(e.bp), _uj(e.dfa), _uj(e.dfa_opu), _uj(e.dfa_opu_full_use),
                     _uj(e.dfa_crossbar), f"{e.projection_macs:,}",
                     f"{e.opu_latency_s * 1e3:,.1f}", f"{e.crossbar_latency_s * 1e6:,.1f}"])
    headers = ["network", "BP digital uJ", "DFA digital uJ", "DFA + OPU uJ",
               "DFA + OPU full use uJ", "DFA + crossbar uJ", "e B MACs",
               "OPU ms", "crossbar us"]
    notes = [
        "Energy of one training step per sample; OPU / crossbar: the projection e @ B on the "
        "device, everything else digital. Latency: the projection's, per sample.",
        f"Figures: digital MAC {figures.digital_mac_pj} pJ and SRAM read "
        f"{figures.sram_read_pj} pJ (45 nm, Horowitz 2014); OPU {figures.opu_watts:g} W, "
        f"{figures.opu_ops_per_s / 1e12:,.0f} TeraOPS, {figures.opu_frame_s * 1e3:g} ms per "
        f"frame, {figures.frames_per_sample} frames per sample; RRAM cell read "
        f"{figures.rram_cell_read_fj} fJ and ADC {figures.rram_adc_pj} pJ (ASSUMED). Sources: "
        "docs/costs.md.",
    ]
    return _format_table("Energy per sample of a training step, per feedback backend", headers,
                         rows, markdown, 1, notes)
