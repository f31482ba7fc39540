"""Time per multiply-accumulate of each convolution that a conv layer's training step runs.

The MAC bound of ``sdfa bench`` counts every MAC the same. This script checks that assumption
for the conv layers of Crafton's CIFAR net (``crafton-cifar-conv``, batch 32): it times, on one
thread and interleaved over rounds, the forward convolution, the input gradient (which DFA skips
in hidden layers), the weight + bias gradient, and both gradients together, and prints the
minimum time over the rounds and the GMAC/s.

    python benchmarks/conv_parts.py [--rounds 15] [--seconds 0.15]
"""

from __future__ import annotations

import argparse
import time

import torch

#: (in channels, out channels, height = width) of the three 5x5 convolutions, padding 2
LAYERS = [(3, 96, 32), (96, 128, 16), (128, 256, 8)]
BATCH = 32


def cases():
    for cin, cout, hw in LAYERS:
        x = torch.randn(BATCH, cin, hw, hw)
        w = torch.randn(cout, cin, 5, 5) * 0.05
        b = torch.zeros(cout)
        grad = torch.randn(BATCH, cout, hw, hw)
        macs = BATCH * cout * hw * hw * cin * 25

        def backward(mask, x=x, w=w, grad=grad, cout=cout):
            return torch.ops.aten.convolution_backward(
                grad, x, w, [cout], [1, 1], [2, 2], [1, 1], False, [0, 0], 1, mask
            )

        name = f"{cin}->{cout} @{hw}x{hw}"
        yield name, "forward", lambda x=x, w=w, b=b: torch.conv2d(x, w, b, 1, 2), macs
        yield name, "input grad", lambda f=backward: f([True, False, False]), macs
        yield name, "weight grad", lambda f=backward: f([False, True, True]), macs
        yield name, "both grads", lambda f=backward: f([True, True, True]), 2 * macs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--seconds", type=float, default=0.15, help="CPU seconds per case, round")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    todo = list(cases())
    best = {}
    for _ in range(args.rounds):
        for name, kind, run, _macs in todo:
            run()  # warm-up
            start, n = time.thread_time(), 0
            while time.thread_time() - start < args.seconds:
                run()
                n += 1
            per_call = (time.thread_time() - start) / n
            best[name, kind] = min(best.get((name, kind), per_call), per_call)
    for name, kind, _run, macs in todo:
        seconds = best[name, kind]
        print(f"{name:18s} {kind:12s} {seconds * 1e3:8.2f} ms {macs / seconds / 1e9:7.2f} GMAC/s")


if __name__ == "__main__":
    main()
