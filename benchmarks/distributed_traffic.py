"""Bytes per training step between ranks: layer-parallel DFA against a backprop pipeline.

1. Measured: the papers' networks (Crafton et al. 2019; the ImageNet heads only projected)
   trained for one step on 2 and 4 gloo processes on this machine, counting what goes through
   torch.distributed (:class:`sdfa.distributed.Comm`) and, independently, what the processes
   wrote to their sockets (:func:`sdfa.distributed.bytes_written`, Linux), next to the
   analytic count.
2. Projected: the analytic model (:mod:`sdfa.distributed.traffic`) at 8, 64 and 512 ranks, for
   the same networks and a transformer-sized MLP (sized on the meta device, never allocated).

    PYTHONPATH=src python benchmarks/distributed_traffic.py            # both
    PYTHONPATH=src python benchmarks/distributed_traffic.py --projected-only

float32 values; random data (the byte counts do not depend on the values).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

from sdfa.distributed import (
    LayerParallel,
    block_sizes,
    bytes_written,
    pipeline_traffic,
    spawn,
    stage_boundaries,
)
from sdfa.models import build_model

# The papers' networks (Crafton et al. 2019, the sdfa presets) and their batch sizes:
# name: (preset, input shape, outputs C, batch per step, measured on gloo)
NETWORKS = {
    "MNIST FC 784-400-10": ("crafton-mnist-fc", (1, 28, 28), 10, 32, True),
    "MNIST conv 32-64 + FC 12544-128-10": ("crafton-mnist-conv", (1, 28, 28), 10, 32, True),
    "CIFAR-10 FC 3072-1000x3-10": ("crafton-cifar-fc", (3, 32, 32), 10, 100, True),
    "CIFAR-10 conv 96-128-256 + FC 4096-2048x2-10": ("crafton-cifar-conv", (3, 32, 32), 10, 128,
                                                      True),
    "ImageNet AlexNet head 9216-4096x2-1000": ("crafton-alexnet-head", (9216,), 1000, 128, False),
    "ImageNet VGG head 25088-4096x2-1000": ("crafton-vgg-head", (25088,), 1000, 128, False),
}
WIDTH, DEPTH, TOKENS = 12288, 512, 4096
TRANSFORMER = {  # a classifier head, and a language-model head (GPT-2's vocabulary)
    f"MLP {DEPTH}x{WIDTH}, C={c}": ("mlp", (WIDTH,), c, TOKENS, False) for c in (1000, 50257)
}
HIDDEN = {"mlp": {"hidden": [WIDTH] * DEPTH}}  # preset options


def build(preset, shape, classes):
    return build_model(preset, shape, classes, **HIDDEN.get(preset, {}))


def _measure_job(names, out_path):
    torch.set_num_threads(1)
    results = {}
    for name in names:
        preset, shape, classes, batch, _ = NETWORKS[name]
        x, y = torch.randn(batch, *shape), torch.randint(0, classes, (batch,))
        for rule in ("dfa", "bp"):
            torch.manual_seed(0)
            model = build(preset, shape, classes)
            stage = LayerParallel(model, rule, example_input=x[:1], micro_batches=4)
            stage.comm.reset()
            before = bytes_written()
            stage.forward_backward(x, y)
            written = None if before is None else bytes_written() - before
            wire = torch.tensor([-1 if written is None else written], dtype=torch.float64)
            dist.all_reduce(wire, op=dist.ReduceOp.MIN)
            if wire.item() >= 0:
                dist.all_reduce(wire.fill_(written))
            results[f"{name}|{rule}"] = (stage.comm.total(), int(wire.item()))
    if dist.get_rank() == 0:
        Path(out_path).write_text(json.dumps(results))


def measured(ranks_list=(2, 4)) -> list[str]:
    rows = ["| network | batch | ranks | DFA counted | DFA written | DFA model | BP counted "
            "| BP written | BP model |", "|---|---|---|---|---|---|---|---|---|"]  # exact bytes
    for ranks in ranks_list:
        names = [n for n, (preset, shape, classes, _, measure) in NETWORKS.items()
                 if measure and len(_sizes(preset, shape, classes)) >= ranks]
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "bytes.json"
            spawn(_measure_job, ranks, (names, str(out)), backend="gloo", timeout=600)
            results = json.loads(out.read_text())
        for name in names:
            preset, shape, classes, batch, _ = NETWORKS[name]
            sizes = _sizes(preset, shape, classes)
            model = pipeline_traffic(stage_boundaries(sizes, ranks), classes, batch)
            (dfa, dfa_wire), (bp, bp_wire) = results[f"{name}|dfa"], results[f"{name}|bp"]
            rows.append(f"| {name} | {batch} | {ranks} | {dfa:,} | {_wire(dfa_wire)} | "
                        f"{model.dfa:,} | {bp:,} | {_wire(bp_wire)} | {model.bp:,} |")
    return rows


def projected(ranks_list=(8, 64, 512)) -> list[str]:
    """One row per network and number of stages (ranks beyond the number of blocks are idle)."""
    rows = ["| network | batch | C | ranks | stages | DFA bytes/step | BP bytes/step | BP / DFA "
            "| rounds after forward (DFA / BP) |", "|---|---|---|---|---|---|---|---|---|"]
    for name, (preset, shape, classes, batch, _) in {**NETWORKS, **TRANSFORMER}.items():
        sizes = _sizes(preset, shape, classes)
        by_stages = {}
        for ranks in ranks_list:
            boundaries = stage_boundaries(sizes, ranks)
            by_stages.setdefault(len(boundaries) + 1, (boundaries, []))[1].append(str(ranks))
        for stages, (boundaries, ranks) in by_stages.items():
            t = pipeline_traffic(boundaries, classes, batch)
            rows.append(
                f"| {name} | {batch} | {classes} | {', '.join(ranks)} | {stages} | {_b(t.dfa)} "
                f"| {_b(t.bp)} | {t.bp / t.dfa:.2f} | {t.dfa_rounds} / {t.bp_rounds} |"
            )
    return rows


def _sizes(preset, shape, classes) -> list[int]:
    with torch.device("meta"):
        return block_sizes(build(preset, shape, classes), torch.empty(1, *shape))


def _wire(n: int) -> str:
    return "n/a" if n < 0 else f"{n:,}"


def _b(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.3g} {unit}"
        n /= 1000
    raise AssertionError


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--projected-only", action="store_true", help="skip the measured runs")
    args = parser.parse_args(argv)
    if not args.projected_only:
        print("Measured on gloo, one step, 4 micro-batches: bytes counted by sdfa.distributed.Comm"
              " (received, all ranks) and written to sockets (/proc/self/io, all ranks):\n")
        print("\n".join(measured()))
        print()
    print("Projected (float32; blocks split evenly, never more stages than blocks):\n")
    print("\n".join(projected()))


if __name__ == "__main__":
    main()
