"""Bytes per training step between ranks: layer-parallel DFA against a backprop pipeline.

1. Measured: the papers' networks (Crafton et al. 2019) trained for one step on 2 and 4 gloo
   processes on this machine, counting what goes through torch.distributed
   (:class:`sdfa.distributed.Comm`), next to the analytic count.
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
from torch import nn

from sdfa.distributed import (
    LayerParallel,
    block_sizes,
    pipeline_traffic,
    spawn,
    stage_boundaries,
)


def mlp(sizes):
    layers = [nn.Flatten()]
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers)


def crafton_cifar_conv(num_classes=10):
    """5x5 convs of 96, 128, 256 channels, each with tanh and a 3x3/2 max pool; FC 2048-2048."""
    layers, channels = [], 3
    for out in (96, 128, 256):
        pool = nn.MaxPool2d(3, stride=2, padding=1)
        layers += [nn.Conv2d(channels, out, 5, padding=2), nn.Tanh(), pool]
        channels = out
    return nn.Sequential(*layers, mlp([256 * 4 * 4, 2048, 2048, num_classes]))


# name: (builder, input shape, outputs C, batch per step)
NETWORKS = {
    "MNIST FC 784-400-10": (lambda: mlp([784, 400, 10]), (1, 28, 28), 10, 32),
    "CIFAR-10 FC 3072-1000x3-10": (lambda: mlp([3072, 1000, 1000, 1000, 10]), (3, 32, 32), 10, 100),
    "CIFAR-10 conv 96-128-256 + FC 2048x2": (crafton_cifar_conv, (3, 32, 32), 10, 128),
}
WIDTH, DEPTH, TOKENS = 12288, 512, 4096
TRANSFORMER = {  # a classifier head, and a language-model head (GPT-2's vocabulary)
    f"MLP {DEPTH}x{WIDTH}, C={c}": (
        lambda c=c: mlp([WIDTH] * (DEPTH + 1) + [c]), (WIDTH,), c, TOKENS
    )
    for c in (1000, 50257)
}


def _measure_job(names, out_path):
    torch.set_num_threads(1)
    results = {}
    for name in names:
        build, shape, _, batch = NETWORKS[name]
        x, y = torch.randn(batch, *shape), torch.randint(0, 10, (batch,))
        for rule in ("dfa", "bp"):
            torch.manual_seed(0)
            stage = LayerParallel(build(), rule, example_input=x[:1], micro_batches=4)
            stage.comm.reset()
            stage.forward_backward(x, y)
            results[f"{name}|{rule}"] = stage.comm.total()
    if dist.get_rank() == 0:
        Path(out_path).write_text(json.dumps(results))


def measured(ranks_list=(2, 4)) -> list[str]:
    rows = ["| network | batch | ranks | DFA measured | DFA model | BP measured | BP model |",
            "|---|---|---|---|---|---|---|"]  # exact byte counts
    for ranks in ranks_list:
        names = [n for n, (build, shape, _, _) in NETWORKS.items()
                 if len(_sizes(build, shape)) >= ranks]
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "bytes.json"
            spawn(_measure_job, ranks, (names, str(out)), backend="gloo", timeout=600)
            results = json.loads(out.read_text())
        for name in names:
            build, shape, classes, batch = NETWORKS[name]
            model = pipeline_traffic(stage_boundaries(_sizes(build, shape), ranks), classes, batch)
            dfa, bp = results[f"{name}|dfa"], results[f"{name}|bp"]
            rows.append(f"| {name} | {batch} | {ranks} | {dfa:,} | {model.dfa:,} | "
                        f"{bp:,} | {model.bp:,} |")
    return rows


def projected(ranks_list=(8, 64, 512)) -> list[str]:
    """One row per network and number of stages (ranks beyond the number of blocks are idle)."""
    rows = ["| network | batch | C | ranks | stages | DFA bytes/step | BP bytes/step | BP / DFA "
            "| rounds after forward (DFA / BP) |", "|---|---|---|---|---|---|---|---|---|"]
    for name, (build, shape, classes, batch) in {**NETWORKS, **TRANSFORMER}.items():
        sizes = _sizes(build, shape)
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


def _sizes(build, shape) -> list[int]:
    with torch.device("meta"):
        return block_sizes(build(), torch.empty(1, *shape))


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
        print("Measured on gloo (bytes received by all ranks in one step, 4 micro-batches):\n")
        print("\n".join(measured()))
        print()
    print("Projected (float32; blocks split evenly, never more stages than blocks):\n")
    print("\n".join(projected()))


if __name__ == "__main__":
    main()
