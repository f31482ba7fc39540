"""The TIFeD federation on real worker processes, over torch.distributed (gloo).

Protocol (the TIFeD notebook's): the shuffled training set is split into ``workers`` equal
shards; every worker walks its shard in buffers of ``buffer`` samples, makes ``passes`` passes
over each buffer in mini-batches of ``batch_size``, and after every pass the workers average
their weights (one all-reduce of the exact integer sum, then a truncating division: exact).

* ``mode="full"``: every worker trains the whole network; the average is over all workers.
* ``mode="single"``: the workers are split evenly over the layers and each trains only its
  layer (DFA's layers need nothing from each other's updates); layer k is averaged over the
  workers that trained it, and every worker receives the whole averaged network.

``rule="integer"`` is the integer network (:class:`~sdfa.integer.IntegerDFA`); ``"dfa"`` and
``"bp"`` train the same float network (tanh, softmax cross-entropy, SGD) converted by
:func:`sdfa.convert`, averaged in float (FedAvg). Traffic is counted by
:class:`sdfa.distributed.Comm` (what each worker receives from the all-reduce) and, as a
server-based deployment would move it, per round: each worker uploads the parameters it trained
and downloads the whole averaged network.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from .network import IntegerDFA, check_lr_inv
from .ops import INT32_MAX, IntegerOverflow, average

RULES = ("integer", "dfa", "bp")
MODES = ("full", "single")


@dataclass(frozen=True)
class FedConfig:
    rule: str = "integer"
    mode: str = "full"
    workers: int = 8
    batch_size: int = 25
    buffer: int = 50
    passes: int = 5
    lr_inv: int = 4096  # integer rule: the learning-rate divisor 1/eta
    lr: float = 0.01  # float rules: SGD's learning rate
    hidden: tuple[int, ...] = (200,)
    seed: int = 0  # draws the feedback matrices (and the float rules' initial weights)
    data_seed: int = 0  # shuffles the training set before sharding

    def check(self) -> None:
        if self.rule not in RULES:
            raise ValueError(f"rule must be one of {', '.join(RULES)}; got {self.rule!r}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}; got {self.mode!r}")
        if self.rule == "bp" and self.mode == "single":
            raise ValueError("mode 'single' needs a rule whose layers train independently "
                             "(integer or dfa); bp trains with mode 'full' (FedAvg)")
        check_lr_inv(self.lr_inv)
        for key in ("workers", "batch_size", "buffer", "passes"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{key} must be a positive integer; got {value!r}")
        if self.buffer % self.batch_size:
            raise ValueError(f"buffer ({self.buffer}) must be a multiple of batch_size "
                             f"({self.batch_size})")
        layers = len(self.hidden) + 1
        if self.mode == "single" and self.workers % layers:
            raise ValueError(f"mode 'single' splits the workers evenly over the {layers} "
                             f"layers: workers ({self.workers}) must be a multiple of {layers}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive; got {self.lr!r}")


def trained_layers(config: FedConfig, rank: int) -> list[int]:
    """The layers worker ``rank`` trains: all of them, or (single) its group's one layer."""
    layers = len(config.hidden) + 1
    if config.mode == "full":
        return list(range(layers))
    return [rank // (config.workers // layers)]


def shards(x: torch.Tensor, y: torch.Tensor, workers: int, seed: int):
    """The training set shuffled with ``seed`` and cut into ``workers`` equal shards."""
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    size = len(y) // workers
    return [(x[order[i * size:(i + 1) * size]], y[order[i * size:(i + 1) * size]])
            for i in range(workers)]


# -- the clients: one model each, with the same three calls ------------------------------------


class IntegerClient:
    def __init__(self, sizes, config: FedConfig):
        self.net = IntegerDFA(sizes, seed=config.seed)
        self.lr_inv = config.lr_inv

    def step(self, x, y, layers):
        self.net.step(x, y, self.lr_inv, layers)

    def tensors(self, layer: int) -> list[torch.Tensor]:
        return [self.net.weights[layer], self.net.biases[layer]]

    def set(self, layer: int, values: list[torch.Tensor]) -> None:
        self.net.weights[layer], self.net.biases[layer] = values

    def accuracy(self, x, y) -> float:
        return float((self.net.predict(x) == y).sum()) / len(y)

    def state_dict(self):
        return self.net.state_dict()


class FloatClient:
    def __init__(self, sizes, config: FedConfig):
        import sdfa

        torch.manual_seed(config.seed)
        layers: list[nn.Module] = []
        for i, o in zip(sizes, sizes[1:]):
            layers += [nn.Linear(i, o), nn.Tanh()]
        self.model = sdfa.convert(nn.Sequential(*layers[:-1]), config.rule, seed=config.seed)
        self.linears = [m for m in self.model.modules() if isinstance(m, nn.Linear)]
        self.lr = config.lr

    @staticmethod
    def inputs(x):
        return x.to(torch.float32) / 128

    def step(self, x, y, layers):
        """Plain SGD on ``layers`` (by hand: building a torch.optim optimizer imports
        torch._dynamo, seconds per worker process)."""
        self.model.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(self.model(self.inputs(x)), y).backward()
        with torch.no_grad():
            for k in layers:
                for p in (self.linears[k].weight, self.linears[k].bias):
                    p.sub_(p.grad, alpha=self.lr)

    def tensors(self, layer: int) -> list[torch.Tensor]:
        return [self.linears[layer].weight.data, self.linears[layer].bias.data]

    def set(self, layer: int, values: list[torch.Tensor]) -> None:
        self.linears[layer].weight.data.copy_(values[0])
        self.linears[layer].bias.data.copy_(values[1])

    @torch.no_grad()
    def accuracy(self, x, y) -> float:
        return float((self.model(self.inputs(x)).argmax(1) == y).sum()) / len(y)

    def state_dict(self):
        return self.model.state_dict()


def make_client(sizes, config: FedConfig):
    return (IntegerClient if config.rule == "integer" else FloatClient)(sizes, config)


# -- averaging ---------------------------------------------------------------------------------


def average_round(client, config: FedConfig, comm, rank: int) -> int:
    """Average every layer over the workers that trained it (one all-reduce); returns the bytes
    this worker would upload and download through a server (its layers up, all layers down)."""
    layers = len(config.hidden) + 1
    mine = trained_layers(config, rank)
    tensors = [client.tensors(k) for k in range(layers)]
    integer = config.rule == "integer"
    if integer:
        bound = INT32_MAX // config.workers
        for k in mine:
            if max(int(t.abs().max()) for t in tensors[k]) > bound:
                raise IntegerOverflow(
                    f"layer {k}: a weight beyond +-{bound} would overflow the int32 sum of "
                    f"{config.workers} workers: use a larger lr_inv")
    flat = torch.cat([(t if k in mine else torch.zeros_like(t)).flatten()
                      for k in range(layers) for t in tensors[k]])
    comm.all_reduce(flat, "weights")
    count = config.workers if config.mode == "full" else config.workers // layers
    offset = 0
    for k in range(layers):
        values = []
        for t in tensors[k]:
            total = flat[offset:offset + t.numel()].view_as(t)
            offset += t.numel()
            values.append(average(total, count) if integer else total / count)
        client.set(k, values)
    size = [sum(t.numel() * t.element_size() for t in ts) for ts in tensors]
    return sum(size[k] for k in mine) + sum(size)


# -- the worker and the launcher ----------------------------------------------------------------


def _worker(data_path: str, config_dict: dict, result_path: str) -> None:
    from ..distributed import Comm, bytes_written

    torch.set_num_threads(1)
    config = FedConfig(**{**config_dict, "hidden": tuple(config_dict["hidden"])})
    comm = Comm()
    rank = comm.rank
    data = torch.load(data_path, weights_only=True)
    x, y = shards(data["train_x"], data["train_y"], config.workers, config.data_seed)[rank]
    sizes = [x.shape[1], *config.hidden, int(data["classes"])]
    client = make_client(sizes, config)
    mine = trained_layers(config, rank)
    start, written = time.perf_counter(), bytes_written() or 0
    rounds = server_bytes = 0
    for buffer in range(len(y) // config.buffer):
        for _ in range(config.passes):
            for first in range(0, config.buffer, config.batch_size):
                at = buffer * config.buffer + first
                client.step(x[at:at + config.batch_size], y[at:at + config.batch_size], mine)
            server_bytes += average_round(client, config, comm, rank)
            rounds += 1
    seconds = time.perf_counter() - start
    written = (bytes_written() or 0) - written
    totals = torch.tensor([server_bytes, comm.received["weights"], written], dtype=torch.int64)
    comm.all_reduce(totals, "counters")
    if rank == 0:
        accuracy = client.accuracy(data["test_x"], data["test_y"])
        result = {
            "config": asdict(config), "test_accuracy": accuracy, "rounds": rounds,
            "train_seconds": seconds, "samples_per_worker": len(y),
            "bytes_per_round": int(totals[0]) // max(rounds, 1),
            "allreduce_bytes_per_round": int(totals[1]) // max(rounds, 1),
            "socket_bytes_per_round": int(totals[2]) // max(rounds, 1),
        }
        torch.save(client.state_dict(), Path(result_path).with_suffix(".pt"))
        Path(result_path).write_text(json.dumps(result, indent=1))


def federate(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor,
             test_y: torch.Tensor, config: FedConfig = FedConfig(), *,
             out: str | Path | None = None) -> dict:
    """Train with the TIFeD federation on ``config.workers`` processes; return the result
    (test accuracy of the averaged network, rounds, seconds, bytes per round). ``train_x`` and
    ``test_x`` are int8 inputs (N, features) (:func:`sdfa.integer.to_int8`); with ``out`` the
    result is also written to ``out``/result.json and the final weights to ``out``/result.pt.
    """
    from ..distributed import spawn

    classes = int(max(int(train_y.max()), int(test_y.max())) + 1)
    config.check()
    if train_x.dtype != torch.int8 or test_x.dtype != torch.int8:
        raise ValueError("federate takes int8 inputs: convert them with sdfa.integer.to_int8")
    if len(train_y) // config.workers < config.buffer:
        raise ValueError(f"{len(train_y)} training samples give each of {config.workers} "
                         f"workers less than one buffer of {config.buffer}")
    with tempfile.TemporaryDirectory(prefix="sdfa-tifed-") as tmp:
        data_path = Path(tmp) / "data.pt"
        torch.save({"train_x": train_x.reshape(len(train_x), -1), "train_y": train_y.long(),
                    "test_x": test_x.reshape(len(test_x), -1), "test_y": test_y.long(),
                    "classes": classes}, data_path)
        result_path = Path(out or tmp) / "result.json"
        result_path.parent.mkdir(parents=True, exist_ok=True)
        config_dict = {**asdict(config), "hidden": list(config.hidden)}
        spawn(_worker, config.workers, (str(data_path), config_dict, str(result_path)),
              backend="gloo")
        return json.loads(result_path.read_text())
