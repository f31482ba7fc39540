"""Training on several processes with torch.distributed (gloo on CPU, NCCL on GPUs, torchrun).

* :func:`data_parallel`: DistributedDataParallel around a model converted with any rule.
* :class:`LayerParallel`: the layers of an nn.Sequential split over ranks in a micro-batched
  pipeline. With DFA, the last rank broadcasts the output error once and every rank updates its
  own layers at once: no gradient travels back between ranks. With other rules (``bp``) the
  gradients travel back rank by rank (the baseline).
* :func:`setup` / :func:`spawn`: join the process group started by torchrun, or start one on
  this machine; a finite timeout turns a dead or stuck peer into a :class:`PeerFailure`.
* :class:`Comm`: the counted, failure-checked communication calls (bytes per step);
  :func:`pipeline_traffic` projects them analytically to any number of ranks;
  :func:`bytes_written` cross-checks them against what the process wrote to its sockets.
"""

from .comm import Comm, PeerFailure, bytes_written
from .data_parallel import data_parallel
from .launch import (
    DEFAULT_TIMEOUT,
    ProcessFailure,
    default_backend,
    is_main_process,
    launched,
    setup,
    spawn,
    teardown,
)
from .pipeline import LayerParallel, balanced, block_outputs, blocks_of
from .traffic import Traffic, block_sizes, pipeline_traffic, stage_boundaries

__all__ = [
    "DEFAULT_TIMEOUT",
    "Comm",
    "LayerParallel",
    "PeerFailure",
    "ProcessFailure",
    "Traffic",
    "balanced",
    "block_outputs",
    "block_sizes",
    "blocks_of",
    "bytes_written",
    "data_parallel",
    "default_backend",
    "is_main_process",
    "launched",
    "pipeline_traffic",
    "setup",
    "spawn",
    "stage_boundaries",
    "teardown",
]
