"""Layers in SVD form, W = U diag(S) V^T (Roy, Apolinario, Biswas, Roy 2025), for rule ``ssa``.

* :class:`SVDLinear`: ``y = ((x V) * S) U^T + b``, U (out, r), S (r,), V (in, r); r(in + out)
  MACs per position instead of in x out.
* :class:`SVDConv2d`: a kernel K (N, C, H, W) is reshaped to K' (N W, C H), K'[(n, w), (c, h)] =
  K[n, c, h, w], and factored K' = U diag(S) V^T. The convolution becomes a vertical H x 1
  convolution with V^T (r channels), a scaling by S and a horizontal 1 x W convolution with U:
  the paper's two kernels K2 = sqrt(S) V^T and K1 = U sqrt(S), with S kept apart so that it may
  change sign while training (:meth:`SVDConv2d.split_kernels` gives K1 and K2).

Both keep U, S, V as parameters (trained by the local losses of :mod:`sdfa.ssa`), may lose rank
(:meth:`SVDLayer.keep`) and turn back into the plain layer (:meth:`SVDLayer.to_dense`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .registry import Work, register_layer


def factor(matrix: torch.Tensor, rank: int | None = None) -> tuple[torch.Tensor, ...]:
    """(U, S, V) of the truncated SVD of ``matrix`` (meta tensors: empty factors of that rank)."""
    full = min(matrix.shape)
    rank = full if rank is None else min(rank, full)
    if matrix.is_meta:
        m, n = matrix.shape
        return (matrix.new_empty(m, rank), matrix.new_empty(rank), matrix.new_empty(n, rank))
    u, s, vh = torch.linalg.svd(matrix.detach(), full_matrices=False)
    return u[:, :rank].contiguous(), s[:rank].contiguous(), vh[:rank].t().contiguous()


class SVDLayer(nn.Module):
    """Shared part: the factors U, S, V, the bias, and what the local losses need."""

    def _init_factors(self, u, s, v, bias):
        self.U = nn.Parameter(u)
        self.S = nn.Parameter(s)
        self.V = nn.Parameter(v)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())
        # set by rule ssa: fn(layer, y) -> y that attaches the local losses to the output, and
        # their weights (gamma: orthogonality of U, delta: of V, epsilon: sparsity of S)
        self.local_terms = None
        self.local_weights = (0.0, 0.0, 0.0)

    @property
    def rank(self) -> int:
        return self.S.shape[0]

    def step_macs(self) -> int:
        """MACs of the orthogonality gradients, once per step (for sdfa.costs): U^T U and
        U (U^T U - I), 2 r^2 m, when weighted; the same for V, 2 r^2 n."""
        gamma, delta, _ = self.local_weights
        r, m, n = self.rank, self.U.shape[0], self.V.shape[0]
        return 2 * r * r * ((m if gamma else 0) + (n if delta else 0))

    def matrix(self) -> torch.Tensor:
        """The dense 2-D matrix U diag(S) V^T."""
        return (self.U * self.S) @ self.V.t()

    def keep(self, index: torch.Tensor) -> None:
        """Keep only the singular triplets ``index`` (in place: the Parameter objects stay)."""
        with torch.no_grad():
            for name, dim in (("U", 1), ("S", 0), ("V", 1)):
                p = getattr(self, name)
                p.data = p.data.index_select(dim, index.to(p.device)).contiguous()
                p.grad = None

    def _finish(self, y):
        return y if self.local_terms is None else self.local_terms(self, y)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # a checkpoint of a run whose ranks were reduced: take its shapes first
        for name in ("U", "S", "V"):
            saved = state_dict.get(prefix + name)
            p = getattr(self, name)
            if saved is not None and saved.shape != p.shape:
                p.data = p.data.new_empty(saved.shape)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class SVDLinear(SVDLayer):
    """Linear layer trained in factored form: W = U diag(S) V^T of shape (out, in)."""

    def __init__(self, u, s, v, bias=None):
        super().__init__()
        self.out_features, self.in_features = u.shape[0], v.shape[0]
        self._init_factors(u, s, v, bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int | None = None) -> SVDLinear:
        return cls(*factor(linear.weight, rank), linear.bias)

    def forward(self, x):
        y = F.linear((x @ self.V) * self.S, self.U, self.bias)
        return self._finish(y)

    @property
    def weight(self) -> torch.Tensor:
        """The dense (out, in) weight U diag(S) V^T (computed; train U, S, V)."""
        return self.matrix()

    def to_dense(self) -> nn.Linear:
        dense = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                          device=self.S.device, dtype=self.S.dtype)
        with torch.no_grad():
            dense.weight.copy_(self.matrix())
            if self.bias is not None:
                dense.bias.copy_(self.bias)
        return dense

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


class SVDConv2d(SVDLayer):
    """Conv2d trained in factored form: a (kh x 1) convolution with V^T, a scaling by S and a
    (1 x kw) convolution with U (module docstring)."""

    def __init__(self, u, s, v, bias, in_channels, out_channels, kernel_size, stride, padding,
                 dilation):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride = tuple(kernel_size), tuple(stride)
        self.padding, self.dilation = tuple(padding), tuple(dilation)
        self._init_factors(u, s, v, bias)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, rank: int | None = None) -> SVDConv2d:
        named = isinstance(conv.padding, str) and conv.padding != "valid"
        if conv.groups != 1 or conv.padding_mode != "zeros" or named:
            raise ValueError(
                f"rule 'ssa' factors Conv2d layers with groups=1 and zero padding given as "
                f"numbers; got groups={conv.groups}, padding={conv.padding!r}, "
                f"padding_mode={conv.padding_mode!r}: train that layer by another rule"
            )
        padding = (0, 0) if conv.padding == "valid" else conv.padding
        n, c, h, w = conv.weight.shape
        u, s, v = factor(conv.weight.permute(0, 3, 1, 2).reshape(n * w, c * h), rank)
        return cls(u, s, v, conv.bias, c, n, (h, w), conv.stride, padding, conv.dilation)

    def _kernels(self, u, v):
        """(first, second) kernels for factors u (N W, r) and v (C H, r)."""
        n, c, (h, w), r = self.out_channels, self.in_channels, self.kernel_size, u.shape[1]
        first = v.t().reshape(r, c, h, 1)
        second = u.reshape(n, w, r).permute(0, 2, 1).unsqueeze(2)
        return first, second

    def _convolve(self, x, first, second, bias, scale=None):
        (sh, sw), (ph, pw), (dh, dw) = self.stride, self.padding, self.dilation
        z = F.conv2d(x, first, stride=(sh, 1), padding=(ph, 0), dilation=(dh, 1))
        if scale is not None:
            z = z * scale.view(1, -1, 1, 1)
        return F.conv2d(z, second, bias, stride=(1, sw), padding=(0, pw), dilation=(1, dw))

    def forward(self, x):
        first, second = self._kernels(self.U, self.V)
        return self._finish(self._convolve(x, first, second, self.bias, self.S))

    def split_kernels(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The paper's (K1, K2): K1 = U sqrt(S) of shape (N, r, 1, kw) and K2 = sqrt(S) V^T of
        shape (r, C, kh, 1); conv(conv(x, K2), K1) is the layer (a negative singular value's sign
        goes to K1)."""
        root = self.S.detach().abs().sqrt()
        first, second = self._kernels(self.U.detach() * root * torch.sign(self.S.detach()),
                                      self.V.detach() * root)
        return second, first

    @property
    def weight(self) -> torch.Tensor:
        """The dense (N, C, kh, kw) kernel (computed; train U, S, V)."""
        return self.dense_kernel()

    def dense_kernel(self) -> torch.Tensor:
        """The (N, C, kh, kw) kernel U diag(S) V^T, reshaped back."""
        n, c, (h, w) = self.out_channels, self.in_channels, self.kernel_size
        return self.matrix().reshape(n, w, c, h).permute(0, 2, 3, 1)

    def to_dense(self) -> nn.Conv2d:
        dense = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride,
                          self.padding, self.dilation, bias=self.bias is not None,
                          device=self.S.device, dtype=self.S.dtype)
        with torch.no_grad():
            dense.weight.copy_(self.dense_kernel())
            if self.bias is not None:
                dense.bias.copy_(self.bias)
        return dense

    def extra_repr(self):
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, rank={self.rank}")


def _linear_cost(module: SVDLinear, in_shape, out_shape) -> Work:
    positions = 1
    for size in in_shape[:-1]:
        positions *= size
    r = module.rank
    forward = positions * r * (module.in_features + module.out_features)
    # update: the gradients of U, of x V (through U) and of V
    return Work(forward, update=forward + positions * r * module.out_features)


def _conv_cost(module: SVDConv2d, in_shape, out_shape) -> Work:
    (h, w), r = module.kernel_size, module.rank
    rows, width = out_shape[-2], in_shape[-1]
    first = r * module.in_channels * h * rows * width  # z = conv(x, V^T): full width
    second = module.out_channels * r * w * out_shape[-2] * out_shape[-1]
    return Work(first + second, update=first + 2 * second)


register_layer(SVDLinear, cost=_linear_cost)
register_layer(SVDConv2d, cost=_conv_cost)
