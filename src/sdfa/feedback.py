"""Direct feedback matrices B_l of shape (C, N_l): dense, sparse (k per neuron) and low rank.

A feedback matrix is a small module holding fixed, seeded buffers, so it lives in the model's
``state_dict``, moves with ``.to()`` and survives save/load. ``project(e)`` computes ``e @ B`` for
an output error ``e`` of shape (batch, C) in whatever way suits the storage: a matmul for dense
B, a gather for sparse B (O(N k) memory and time, never a matmul with zeros), two thin matmuls
for low-rank B.

Value distribution (Crafton et al. 2019, code bcrafton/ssdfa; Nokland 2016 uses the dense case):
entries are drawn from U(-h, h) with

* dense:   h = 1 / sqrt(N)
* sparse:  h = 1 / sqrt(N / sqrt(C k))   (larger entries, so e @ B keeps a similar magnitude)
* low rank: U V with U, V uniform, rescaled so that the entries of U V have the standard
  deviation of the dense distribution (h / sqrt(3)); Crafton's code rescales to std h instead.

``init="gaussian"`` draws N(0, h^2) instead, ``init="sign"`` draws +-h with equal probability
(binary feedback, as used for hardware), and ``scale=`` overrides h.
"""

from __future__ import annotations

import math
import zlib

import torch
from torch import nn

INITS = ("uniform", "gaussian", "sign")


def generator(seed: int, name: str) -> torch.Generator:
    """A CPU generator seeded from ``seed`` and a layer name, identical on every machine."""
    return torch.Generator().manual_seed(
        (int(seed) * 1_000_003 + zlib.crc32(name.encode())) % 2**63
    )


def draw(shape, h: float, init: str, gen: torch.Generator) -> torch.Tensor:
    """Random float64 values of scale ``h`` from the named distribution (on the CPU, seeded)."""
    if init == "uniform":
        return (torch.rand(shape, generator=gen, dtype=torch.float64) * 2 - 1) * h
    if init == "gaussian":
        return torch.randn(shape, generator=gen, dtype=torch.float64) * h
    if init == "sign":
        return (torch.randint(0, 2, shape, generator=gen, dtype=torch.int64) * 2 - 1).double() * h
    raise ValueError(f"unknown feedback init {init!r}; choose one of {', '.join(INITS)}")


def balanced_classes(
    num_neurons: int, num_classes: int, k: int, gen: torch.Generator
) -> torch.Tensor:
    """(N, k) class indices: k distinct classes per neuron, every class used equally often (+-1).

    Neurons are taken in blocks of C. Inside a block, neuron j reads the k classes at positions
    jk .. jk+k-1 (mod C) of a fresh random permutation, so a full block uses every class exactly
    k times and a partial block spreads its slots evenly over the cycle. A final random shuffle of
    the neurons removes the block structure.
    """
    blocks = -(-num_neurons // num_classes)
    perms = torch.argsort(
        torch.rand(blocks, num_classes, generator=gen, dtype=torch.float64), dim=1
    )
    j = torch.arange(num_neurons)
    positions = (j[:, None] % num_classes) * k + torch.arange(k)[None, :]
    index = perms[j // num_classes][torch.arange(num_neurons)[:, None], positions % num_classes]
    return index[torch.randperm(num_neurons, generator=gen)]


class DirectFeedback(nn.Module):
    """Base class: a fixed (C, N) matrix that turns the output error into a hidden signal."""

    def project(self, e: torch.Tensor) -> torch.Tensor:
        """``e @ B`` for ``e`` of shape (batch, C); returns (batch, N)."""
        raise NotImplementedError

    def dense(self) -> torch.Tensor:
        """The (C, N) matrix B as a dense tensor (for inspection and tests)."""
        raise NotImplementedError

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.dense().shape)


class DenseFeedback(DirectFeedback):
    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.register_buffer("weight", weight)

    def project(self, e):
        return e @ self.weight

    def dense(self):
        return self.weight

    @property
    def shape(self):
        return tuple(self.weight.shape)


class SparseFeedback(DirectFeedback):
    """Each of the N neurons reads k entries of e: ``index`` (N, k) and ``value`` (N, k)."""

    def __init__(self, index: torch.Tensor, value: torch.Tensor, num_classes: int):
        super().__init__()
        self.num_classes = num_classes
        self.register_buffer("index", index)
        self.register_buffer("value", value)

    def project(self, e):
        # One gather of e's columns per connection, weighted and summed in place. The result
        # keeps the contiguous (batch, N) layout of the block output: a transposed one made
        # every elementwise op and matmul after it slower than the dense product.
        out = e.index_select(1, self.index[:, 0]).mul_(self.value[:, 0])
        for j in range(1, self.index.shape[1]):
            out.addcmul_(e.index_select(1, self.index[:, j]), self.value[:, j])
        return out

    def dense(self):
        n = self.index.shape[0]
        b = torch.zeros(self.num_classes, n, dtype=self.value.dtype, device=self.value.device)
        return b.scatter_(0, self.index.t(), self.value.t())

    @property
    def shape(self):
        return (self.num_classes, self.index.shape[0])

    def get_extra_state(self):
        return {"num_classes": self.num_classes}

    def set_extra_state(self, state):
        self.num_classes = int(state["num_classes"])


class LowRankFeedback(DirectFeedback):
    """B = U V with U (C, r) and V (r, N); e @ B is computed as (e @ U) @ V."""

    def __init__(self, u: torch.Tensor, v: torch.Tensor):
        super().__init__()
        self.register_buffer("u", u)
        self.register_buffer("v", v)

    def project(self, e):
        return (e @ self.u) @ self.v

    def dense(self):
        return self.u @ self.v

    @property
    def shape(self):
        return (self.u.shape[0], self.v.shape[1])


def default_scale(num_neurons: int, num_classes: int, k: int | None) -> float:
    """Crafton et al.'s h: 1/sqrt(N) dense, 1/sqrt(N / sqrt(C k)) sparse."""
    if k is None:
        return 1.0 / math.sqrt(num_neurons)
    return 1.0 / math.sqrt(num_neurons / math.sqrt(num_classes * k))


def check_options(num_classes: int | None, k: int | None, rank: int | None, init: str) -> None:
    """Raise ValueError for k / rank / init outside their allowed range.

    ``num_classes`` (C) may be None while it is unknown: then only lower bounds are checked.
    """
    if k is not None and rank is not None:
        raise ValueError(
            "choose either k= (sparse feedback) or rank= (low-rank feedback), not both"
        )
    upper = (
        "C (the number of outputs)"
        if num_classes is None
        else f"{num_classes} (the number of outputs)"
    )
    for name, value in (("k", k), ("rank", rank)):
        if value is None:
            continue
        bad_type = isinstance(value, bool) or not isinstance(value, int)
        if bad_type or value < 1 or (num_classes is not None and value > num_classes):
            raise ValueError(
                f"{name} must be an integer with 1 <= {name} <= {upper}; got {value!r}"
            )
    if init not in INITS:
        raise ValueError(f"unknown feedback init {init!r}; choose one of {', '.join(INITS)}")


def make_feedback(
    num_classes: int,
    num_neurons: int,
    *,
    seed: int,
    name: str,
    k: int | None = None,
    rank: int | None = None,
    init: str = "uniform",
    scale: float | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> DirectFeedback:
    """Build the seeded feedback matrix of one hidden layer (``name`` makes layers differ)."""
    check_options(num_classes, k, rank, init)
    if rank is not None and rank > num_neurons:
        raise ValueError(
            f"rank must be <= {num_neurons} (the size of layer {name!r}) as well; got {rank}"
        )
    gen = generator(seed, name)
    h = float(scale) if scale is not None else default_scale(num_neurons, num_classes, k)
    if k is not None:
        index = balanced_classes(num_neurons, num_classes, k, gen)
        value = draw((num_neurons, k), h, init, gen)
        return SparseFeedback(index, value.to(dtype), num_classes).to(device)
    if rank is not None:
        u = draw((num_classes, rank), 1.0, init, gen)
        v = draw((rank, num_neurons), 1.0, init, gen)
        target_std = h / math.sqrt(3) if init == "uniform" else h
        factor = math.sqrt(target_std / (u @ v).std().clamp_min(1e-30).item())
        return LowRankFeedback((u * factor).to(dtype), (v * factor).to(dtype)).to(device)
    return DenseFeedback(draw((num_classes, num_neurons), h, init, gen).to(dtype)).to(device)
