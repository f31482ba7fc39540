"""Integer-only DFA training for tiny devices, and its federation (TIFeD; Colombo, Falcetta,
Roveri 2023). See docs/integer.md.

* :class:`IntegerDFA`: a fully connected network trained by integer DFA, every tensor an integer;
  :func:`to_int8` / :func:`quantize` make its inputs (images; a frozen extractor's features).
* :func:`federate`: the TIFeD federation on worker processes (torch.distributed, gloo):
  "full" (every worker trains the whole network) or "single" (each worker trains one layer),
  with float DFA and BP (FedAvg) baselines in the same harness.
"""

from .federated import FedConfig, federate
from .network import IntegerDFA, IntegerTanh, check_lr_inv, quantize, to_int8
from .ops import IntegerOverflow, average, isqrt, pla_tanh

__all__ = [
    "FedConfig",
    "IntegerDFA",
    "IntegerOverflow",
    "IntegerTanh",
    "average",
    "check_lr_inv",
    "federate",
    "isqrt",
    "pla_tanh",
    "quantize",
    "to_int8",
]
