"""The extra tables of ``sdfa reproduce roy2025`` (SVD-space alignment, Roy et al. 2025).

Besides accuracy, the paper's claims are about trainable parameters, compute and memory, about
each loss term (the ablation) and about the rank falling during training. For every run this
module reads the run's summary and weights and adds:

* trainable parameters at the end of the run (after the rank reductions);
* MACs per sample of a training step (``sdfa.costs`` of the final model: forward + error +
  update) and, apart, the per-step MACs of SSA's orthogonality gradients (2 r^2 (m + n) per
  layer, independent of the batch);
* peak memory of one training step: bytes allocated above what exists before the step (model,
  data), from the allocation events of ``torch.profiler`` (``sdfa.app.bench.peak_step_memory``),
  on a batch of 32 inputs of the data set's shape;
* the rank of every SVD layer after each epoch (seed 0).
"""

from __future__ import annotations

import statistics
from pathlib import Path

import torch

from ..costs import costs
from .bench import TrainingStep, peak_step_memory
from .run import load_run

MEMORY_BATCH = 32
ABLATION = "ablation"  # experiments whose label starts with this form the ablation table


def measure(run_dir: Path) -> dict:
    """Parameters, MACs and peak step memory of the final model of one run."""
    model, config = load_run(run_dir)
    from .build import load_data

    shape = load_data(config).input_shape
    report = costs(model, None, shape)
    model.train()
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(MEMORY_BATCH, *shape, generator=generator)
    y = torch.randint(0, 2, (MEMORY_BATCH,), generator=generator)
    peak = peak_step_memory(TrainingStep(model, False, x, y), torch.device("cpu"))
    return {
        "params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "sample_macs": report.macs,
        "step_macs": report.total.feedback_macs_per_step,
        "peak_bytes": peak,
    }


def _mean(values):
    return statistics.mean(values) if values else float("nan")


def _acc(outcome) -> str:
    values = [100 * s["test_accuracy"] for s in outcome.summaries]
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def section(outcomes, out: Path) -> list[str]:
    """The roy2025 tables (``ExperimentSet.report``): costs, ablation, ranks over training."""
    lines = ["", "## Accuracy, trainable parameters, compute and memory", "",
             "| experiment | rule | test accuracy (%) | trainable params | MACs / sample | "
             "orthogonality MACs / step | peak step memory (KiB, batch 32) | final ranks |",
             "|---|---|---|---|---|---|---|---|"]
    ablation = []
    for o in outcomes:
        if not o.summaries:
            continue
        measured = [measure(Path(d)) for d in o.run_dirs]
        ranks = o.summaries[0].get("ssa_ranks")
        final = "—" if not ranks else "/".join(
            str(v) for k, v in ranks[-1].items() if k != "epoch")
        row = (f"| {o.experiment.group} | {o.experiment.label} | {_acc(o)} | "
               f"{_mean([m['params'] for m in measured]):,.0f} | "
               f"{_mean([m['sample_macs'] for m in measured]):,.0f} | "
               f"{_mean([m['step_macs'] for m in measured]):,.0f} | "
               f"{_mean([m['peak_bytes'] for m in measured]) / 1024:,.0f} | {final} |")
        (ablation if o.experiment.label.startswith(ABLATION) else lines).append(row)
    if ablation:
        lines += ["", "## Ablation: SSA with one loss term dropped", "",
                  *lines[3:5], *ablation]
    history = [(o, o.summaries[0]["ssa_ranks"]) for o in outcomes
               if o.summaries and o.summaries[0].get("ssa_ranks")
               and not o.experiment.label.startswith(ABLATION)]
    for o, ranks in history:
        layers = [k for k in ranks[0] if k != "epoch"]
        lines += ["", f"## Ranks over training: {o.experiment.group}, {o.experiment.label} "
                  "(seed 0)", "", f"| epoch | {' | '.join(layers)} |",
                  "|---" * (len(layers) + 1) + "|"]
        lines += [f"| {r['epoch']} | {' | '.join(str(r[k]) for k in layers)} |" for r in ranks]
    return lines
