"""Direct feedback matrices B_l of shape (C, N_l): dense, sparse (k per neuron), low rank, both
together, and Han et al.'s convolutional form.

A feedback matrix is a small module holding fixed, seeded buffers, so it lives in the model's
``state_dict``, moves with ``.to()`` and survives save/load. ``project(e)`` computes ``e @ B`` for
an output error ``e`` of shape (rows, C) (one row per sample, or per position) in whatever way
suits the storage: a matmul for dense B, a gather for sparse B (O(N k) memory and time, never a
matmul with zeros), two thin matmuls for low-rank B, two gathers for sparse low-rank B, a small
product and a tiling for the convolutional form.

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
import numbers
import zlib

import torch
from torch import nn

from .registry import Registry

INITS = ("uniform", "gaussian", "sign")


def check_seed(seed) -> int:
    """``seed`` itself if it is an integer in [0, 2**63); else a ValueError naming it.

    Larger or negative seeds would alias smaller ones (the generator takes 63 bits).
    """
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < 2**63:
        raise ValueError(f"seed must be an integer with 0 <= seed < 2**63; got {seed!r}")
    return int(seed)


def generator(seed: int, name: str) -> torch.Generator:
    """A CPU generator seeded from ``seed`` and a layer name, identical on every machine."""
    check_seed(seed)
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

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of B's values (the error is cast to it: under autocast e is bfloat16)."""
        return next(b.dtype for b in self.buffers() if b.is_floating_point())


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


class SparseLowRankFeedback(DirectFeedback):
    """Sparse and low rank together (Crafton et al.'s code allows it when k * rank >= C).

    B = U V with U (C, r) whose column i is non-zero on one group of k distinct classes
    (``index`` (r, k), values ``u`` (r, k)), the r groups covering every class, and V (r, N)
    with one non-zero per neuron: neuron j reads group ``group[j]`` with weight ``v[j]``. So
    every neuron reads exactly k entries of e and B has rank r. ``e @ B`` is two gathers:
    e U (r k values) and one value of e U per neuron.
    """

    def __init__(self, index, u, group, v, num_classes: int):
        super().__init__()
        self.num_classes = num_classes
        self.register_buffer("index", index)
        self.register_buffer("u", u)
        self.register_buffer("group", group)
        self.register_buffer("v", v)

    def project(self, e):
        r, k = self.index.shape
        eu = (e.index_select(1, self.index.flatten()).view(-1, r, k) * self.u).sum(-1)
        return eu.index_select(1, self.group).mul_(self.v)

    def dense(self):
        r = self.index.shape[0]
        u = torch.zeros(self.num_classes, r, dtype=self.u.dtype, device=self.u.device)
        u.scatter_(0, self.index.t(), self.u.t())
        v = torch.zeros(r, self.group.shape[0], dtype=self.v.dtype, device=self.v.device)
        return u @ v.scatter_(0, self.group[None], self.v[None])

    @property
    def shape(self):
        return (self.num_classes, self.group.shape[0])

    def get_extra_state(self):
        return {"num_classes": self.num_classes}

    def set_extra_state(self, state):
        self.num_classes = int(state["num_classes"])


class ConvFeedback(DirectFeedback):
    """Han et al. 2020's feedback for a convolutional block output (Ch, S_1, ..., S_n).

    The error e (C values) is spread over a *dilated* error map, one copy every d_i positions
    with d_i - 1 zeros between copies, and convolved with a kernel K of size d_1 x ... x d_n
    (``weight``, (C, Ch / groups, *d)), in ``groups`` groups: channel group g reads only the
    classes of error group g (C / groups of them). As a matrix, B[c, ch, s] = K[c, ch, s mod d]
    on the group's classes and 0 elsewhere: a structured sparse B with C Ch d_1...d_n / groups
    free values instead of C N. ``project`` computes it as the conv-transpose it is, in the
    cheap order: the small product e K, then a tiling over the positions (no product with a
    zero).
    """

    def __init__(self, weight: torch.Tensor, groups: int, shape: tuple[int, ...]):
        super().__init__()
        self.groups = groups
        self.sample_shape = tuple(shape)
        self.register_buffer("weight", weight)

    def project(self, e):
        m, c, g = e.shape[0], self.weight.shape[0], self.groups
        if g == 1:
            t = e @ self.weight.reshape(c, -1)
        else:
            kernel = self.weight.reshape(g, c // g, -1)
            t = torch.bmm(e.reshape(m, g, c // g).transpose(0, 1), kernel).transpose(0, 1)
        dilation = self.weight.shape[2:]
        t = t.reshape(m, self.sample_shape[0], *dilation)
        sizes = self.sample_shape[1:]
        t = t.repeat(1, 1, *(-(-s // d) for s, d in zip(sizes, dilation, strict=True)))
        return t[(slice(None), slice(None), *(slice(0, s) for s in sizes))].reshape(m, -1)

    def dense(self):
        c = self.weight.shape[0]
        return self.project(torch.eye(c, dtype=self.weight.dtype, device=self.weight.device))

    @property
    def shape(self):
        return (self.weight.shape[0], math.prod(self.sample_shape))

    def get_extra_state(self):
        return {"groups": self.groups, "shape": list(self.sample_shape)}

    def set_extra_state(self, state):
        self.groups = int(state["groups"])
        self.sample_shape = tuple(int(s) for s in state["shape"])


def default_scale(num_neurons: int, num_classes: int, k: int | None) -> float:
    """Crafton et al.'s h: 1/sqrt(N) dense, 1/sqrt(N / sqrt(C k)) sparse."""
    if k is None:
        return 1.0 / math.sqrt(num_neurons)
    return 1.0 / math.sqrt(num_neurons / math.sqrt(num_classes * k))


def _positive_int(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, int) and value >= 1


def check_options(
    num_classes: int | None,
    k: int | None,
    rank: int | None,
    init: str,
    dilation=None,
    groups: int | None = None,
) -> None:
    """Raise ValueError for k / rank / init / dilation / groups outside their allowed range.

    ``num_classes`` (C) may be None while it is unknown: then only lower bounds are checked.
    """
    upper = (
        "C (the number of outputs)"
        if num_classes is None
        else f"{num_classes} (the number of outputs)"
    )
    for name, value in (("k", k), ("rank", rank)):
        if value is None:
            continue
        if not _positive_int(value) or (num_classes is not None and value > num_classes):
            raise ValueError(
                f"{name} must be an integer with 1 <= {name} <= {upper}; got {value!r}"
            )
    if k is not None and rank is not None and num_classes is not None and k * rank < num_classes:
        raise ValueError(
            f"sparse low-rank feedback needs k * rank >= {num_classes} (the number of outputs) "
            f"so that every class reaches a neuron; got k={k}, rank={rank}. Raise k or rank, "
            "or use either alone"
        )
    if init not in INITS:
        raise ValueError(f"unknown feedback init {init!r}; choose one of {', '.join(INITS)}")
    if groups is not None and dilation is None:
        raise ValueError(
            "groups= sets the groups of the convolutional feedback: give dilation= too"
        )
    if dilation is not None:
        if k is not None or rank is not None:
            raise ValueError(
                "dilation= / groups= (convolutional feedback) do not combine with k= or rank="
            )
        values = dilation if isinstance(dilation, tuple) else (dilation,)
        if not values or not all(_positive_int(d) for d in values):
            raise ValueError(
                f"dilation must be a positive integer or a tuple of them (one per spatial "
                f"dimension); got {dilation!r}"
            )
        if groups is not None and (
            not _positive_int(groups) or (num_classes is not None and num_classes % groups)
        ):
            raise ValueError(
                f"groups must be a positive integer that divides {upper}; got {groups!r}"
            )


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
    dilation=None,
    groups: int | None = None,
    sample_shape: tuple[int, ...] | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> DirectFeedback:
    """Build the seeded feedback matrix of one hidden layer (``name`` makes layers differ).

    ``dilation`` / ``groups`` build :class:`ConvFeedback` for a block output of
    ``sample_shape`` (channels, *positions).
    """
    check_options(num_classes, k, rank, init, dilation, groups)
    if rank is not None and rank > num_neurons:
        raise ValueError(
            f"rank must be <= {num_neurons} (the size of layer {name!r}) as well; got {rank}"
        )
    gen = generator(seed, name)
    if dilation is not None:
        return _conv_feedback(
            num_classes, sample_shape, dilation, groups or 1, init, scale, gen, name
        ).to(dtype=dtype, device=device)
    h = float(scale) if scale is not None else default_scale(num_neurons, num_classes, k)
    target_std = h / math.sqrt(3) if init == "uniform" else h  # of B's (non-zero) entries
    if k is not None and rank is not None:
        index = balanced_classes(rank, num_classes, k, gen)  # r groups of k classes
        group = balanced_classes(num_neurons, rank, 1, gen)[:, 0]
        u, v = draw((rank, k), 1.0, init, gen), draw((num_neurons,), 1.0, init, gen)
        factor = math.sqrt(target_std / (u[group] * v[:, None]).std().clamp_min(1e-30).item())
        return SparseLowRankFeedback(
            index, (u * factor).to(dtype), group, (v * factor).to(dtype), num_classes
        ).to(device)
    if k is not None:
        index = balanced_classes(num_neurons, num_classes, k, gen)
        value = draw((num_neurons, k), h, init, gen)
        return SparseFeedback(index, value.to(dtype), num_classes).to(device)
    if rank is not None:
        u = draw((num_classes, rank), 1.0, init, gen)
        v = draw((rank, num_neurons), 1.0, init, gen)
        factor = math.sqrt(target_std / (u @ v).std().clamp_min(1e-30).item())
        return LowRankFeedback((u * factor).to(dtype), (v * factor).to(dtype)).to(device)
    return DenseFeedback(draw((num_classes, num_neurons), h, init, gen).to(dtype)).to(device)


def _conv_feedback(num_classes, sample_shape, dilation, groups, init, scale, gen, name):
    shape = tuple(sample_shape or ())
    if len(shape) < 2:
        raise ValueError(
            f"dilation= (convolutional feedback) needs block outputs of shape (batch, channels, "
            f"*positions); the block output of {name!r} has shape (batch, "
            f"{', '.join(map(str, shape))})"
        )
    channels, sizes = shape[0], shape[1:]
    dilation = dilation if isinstance(dilation, tuple) else (dilation,) * len(sizes)
    if len(dilation) != len(sizes):
        raise ValueError(
            f"dilation={dilation} has {len(dilation)} entries but the block output of {name!r} "
            f"has {len(sizes)} spatial dimensions (shape (batch, {', '.join(map(str, shape))}))"
        )
    if channels % groups:
        raise ValueError(
            f"groups={groups} must divide the {channels} channels of the block output of {name!r}"
        )
    num_neurons = math.prod(shape)
    h = float(scale) if scale is not None else default_scale(
        num_neurons, num_classes, None if groups == 1 else num_classes // groups
    )
    weight = draw((num_classes, channels // groups, *dilation), h, init, gen)
    return ConvFeedback(weight, groups, shape)


# -- backends: how the product e @ B is computed ------------------------------------------------


class FeedbackBackend:
    """How DFA computes ``e @ B_l``: ``"exact"`` (digital, the matrices above) or a simulated
    device registered by :mod:`sdfa.hardware` (``"optical"``, ``"crossbar"``).

    ``check`` validates ``feedback_options`` against the DFA options at ``convert()`` (a clear
    ValueError for an invalid combination); ``build`` turns the exact feedback of one layer into
    the backend's DirectFeedback; ``empty`` makes an empty one from a checkpoint's entries (or
    None when they are not this backend's), so ``load_state_dict`` can fill it.
    """

    name = "exact"

    def check(self, options: dict, dfa_options: dict) -> dict:
        if options:
            raise ValueError(
                f"feedback='exact' takes no feedback_options; got {sorted(options)}. Choose a "
                f"device backend: feedback={' or '.join(repr(b) for b in BACKENDS if b != 'exact')}"
            )
        return {}

    def build(self, exact: DirectFeedback, *, options: dict, seed: int, name: str):
        return exact

    def empty(self, state_dict: dict, key: str, options: dict):
        return None


BACKENDS: Registry[FeedbackBackend] = Registry("feedback backend")
BACKENDS.register("exact", FeedbackBackend())
