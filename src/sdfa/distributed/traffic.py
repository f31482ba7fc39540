"""Bytes per training step between the ranks of a pipeline: layer-parallel DFA against backprop.

The analytic model of what :class:`~sdfa.distributed.Comm` counts, to project measured runs to
any number of ranks. For a batch of B samples split into S contiguous stages, with N_b values per
sample crossing boundary b and C outputs per sample:

* forward (both rules): every boundary carries the activations once, B N_b values;
* backprop pipeline: every boundary carries the gradient back as well, B N_b values again;
* layer-parallel DFA: the last rank's output error, B C values, must reach each of the other
  S - 1 ranks once, so a broadcast delivers (S - 1) B C values whatever its algorithm. The
  algorithm changes how long it takes: a binomial tree needs ceil(log2 S) rounds of B C values
  (the root sends log2 S copies); a pipelined ring/chain sends each value over S - 1 links one
  after another, the root sending one copy.

Rounds after the last forward pass: backprop needs S - 1 transfers in a chain, each waiting for
a stage's backward computation; DFA needs the ceil(log2 S) rounds of the tree broadcast, and no
rank computes in between.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from .pipeline import balanced, block_outputs, blocks_of


@dataclass(frozen=True)
class Traffic:
    stages: int
    forward: int  # bytes of activations sent forward (both rules)
    dfa: int  # bytes per step, layer-parallel DFA: forward + output-error broadcast
    bp: int  # bytes per step, backprop pipeline: forward + gradients back
    dfa_rounds: int  # communication rounds after the forward pass (tree broadcast)
    bp_rounds: int  # transfers in the backward chain


def pipeline_traffic(
    boundaries: Sequence[int], num_outputs: int, batch: int, bytes_per_value: int = 4
) -> Traffic:
    """Bytes per step for a pipeline whose stage boundaries carry ``boundaries`` values/sample."""
    stages = len(boundaries) + 1
    forward = batch * sum(boundaries) * bytes_per_value
    error = (stages - 1) * batch * num_outputs * bytes_per_value
    return Traffic(
        stages=stages,
        forward=forward,
        dfa=forward + error,
        bp=2 * forward,
        dfa_rounds=math.ceil(math.log2(stages)),
        bp_rounds=stages - 1,
    )


def stage_boundaries(block_sizes: Sequence[int], ranks: int) -> list[int]:
    """Values per sample at each stage boundary, for blocks split evenly over the ranks.

    ``block_sizes`` are the output sizes of the model's blocks in order (the last one is the
    model output). Blocks are never cut, so at most ``len(block_sizes)`` stages are used: with
    more ranks than blocks the extra ranks would hold no layer (use them for data parallelism).
    """
    stages = min(ranks, len(block_sizes))
    ends = list(itertools.accumulate(balanced(len(block_sizes), stages)))
    return [block_sizes[end - 1] for end in ends[:-1]]


def block_sizes(model: nn.Sequential, example_input) -> list[int]:
    """Output values per sample of each block of ``model`` (see :func:`blocks_of`).

    Build the model and ``example_input`` on the meta device to size networks of any width
    without allocating them.
    """
    outputs = block_outputs(model, blocks_of(model), example_input)
    return [out[0].numel() for out in outputs]
