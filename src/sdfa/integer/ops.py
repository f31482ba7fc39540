"""The integer operations of TIFeD-style training, each a formula on integer tensors.

Values live in int32, as on a microcontroller. Products and sums are computed in int64 and
checked to fit int32 before they are stored (:func:`checked`): an int32 accumulator on the
device computes the same result modulo 2**32, so a result that fits int32 is exactly what the
device gets, and one that does not is an :class:`IntegerOverflow` here instead of a silent
wrap-around there. Division is floor division, as the reference notebook's ``//``.
"""

from __future__ import annotations

import torch

INT8_MIN, INT8_MAX = -128, 127
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
SHRT_MAX = 32767

# The piecewise-linear tanh of the TIFeD notebook, on v = pre-activation // (256 * fan_in):
# piece i holds for lower[i] <= v < lower[i-1]; y = v * num // den + offset there, and the
# derivative is applied as d // inverse_slope. The inverse slopes are the notebook's: twice the
# true inverse slope of each sloped piece (1 for y = 2v, 2 for y = v + 32, 8 for y = v // 4 + 88),
# so the derivative used is half the true slope, and 128 (not infinity) on the flat ends.
#           (lower bound, num, den, offset, inverse slope), from the top piece down
PLA_PIECES = (
    (128, 0, 1, 128, 128),
    (75, 1, 4, 88, 8),
    (32, 1, 1, 32, 2),
    (-31, 2, 1, 0, 1),
    (-74, 1, 1, -32, 2),
    (-127, 1, 4, -88, 8),
    (None, 0, 1, -127, 128),
)


class IntegerOverflow(OverflowError):
    """An integer result left the int32 range (the device would have wrapped around)."""


def isqrt(n: int) -> int:
    """The integer square root: the largest r with r * r <= n (Newton's method on integers)."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise ValueError(f"isqrt needs a non-negative integer; got {n!r}")
    x, y = n, (n + 1) // 2
    while y < x:
        x, y = y, (y + n // y) // 2
    return x


def require_integer(t: torch.Tensor, what: str) -> None:
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise ValueError(f"{what} must be an integer tensor; got {t.dtype}")


def checked(t: torch.Tensor, what: str) -> torch.Tensor:
    """``t`` (any integer dtype) as int32, or :class:`IntegerOverflow` naming ``what``."""
    if t.numel():
        low, high = int(t.min()), int(t.max())
        if low < INT32_MIN or high > INT32_MAX:
            raise IntegerOverflow(
                f"{what} left the int32 range ({low} .. {high}): use a larger learning-rate "
                "divisor lr_inv, smaller inputs or fewer inputs per neuron"
            )
    return t.to(torch.int32)


def matmul(a: torch.Tensor, b: torch.Tensor, what: str = "a matrix product") -> torch.Tensor:
    """``a @ b`` of integer matrices, accumulated exactly, checked to fit int32."""
    return checked(a.to(torch.int64) @ b.to(torch.int64), what)


def floor_div(a: torch.Tensor, d) -> torch.Tensor:
    """``a // d`` (rounding towards minus infinity), ``d`` a positive int or integer tensor."""
    return torch.div(a, d, rounding_mode="floor")


def pla_tanh(pre: torch.Tensor, fan_in: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The integer tanh of the pre-activation ``pre`` of a layer with ``fan_in`` inputs.

    Returns (y, inverse slope), both int32: y in [-127, 128] and the divisor that applies the
    derivative (:data:`PLA_PIECES`).
    """
    v = floor_div(pre.to(torch.int64), 256 * fan_in)
    y = torch.zeros_like(v)
    inv = torch.zeros_like(v)
    for inside, (_, num, den, offset, inverse) in pla_pieces(v):
        y = torch.where(inside, floor_div(v * num, den) + offset, y)
        inv = torch.where(inside, inverse, inv)
    return y.to(torch.int32), inv.to(torch.int32)


def pla_pieces(v: torch.Tensor):
    """(mask of the entries of ``v`` on the piece, the piece of :data:`PLA_PIECES`), per piece."""
    upper = None
    for piece in PLA_PIECES:
        lower = piece[0]
        inside = torch.ones_like(v, dtype=torch.bool) if lower is None else v >= lower
        if upper is not None:
            inside &= v < upper
        yield inside, piece
        upper = lower


def average(total: torch.Tensor, count: int) -> torch.Tensor:
    """The integer mean of ``count`` models from their exact sum: truncated towards zero, as
    the notebook's ``np.mean(...).astype(int)``."""
    return torch.div(total, count, rounding_mode="trunc").to(torch.int32)
