"""Integer look-up tables: each level written as ``unit * (even + odd / sqrt 2)`` with small integers.

This is what lets a packed layer accumulate exactly in integers (docs/method.md, LUT): with integer activations
``x_int``, ``sum_k x_int[k] * level[code[n, k]] = unit * (acc_even[n] + acc_odd[n] / sqrt 2)`` where
``acc_even = x_int @ even[codes]^T`` and ``acc_odd = x_int @ odd[codes]^T`` are exact integer sums, combined
once per output.

* POST: ``sqrt(2)^-k = 2^-m (1/sqrt 2)^r`` with ``k = 2m + r``: even k go to ``even``, odd k to ``odd``.
* Uniform, POT, APoT and LSQ's integer grid: ``odd = 0``; ``even`` is the level over the grid's unit.

:func:`single_sum_table` is the opt-in approximation for speed: a grid with odd levels (two sums per weight)
rounded onto the int8 grid ``k / 128``, ``|k| <= 127`` (one sum per weight, one VNNI lane).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..levels import SQRT1_2

INT8_PEAK = 127  # single-sum mode: the largest level becomes this integer
MAX_INT = 2**15  # keeps |x_int * level| * K inside int32 for K up to 2^8 at 8-bit x; int64/float64 otherwise


@dataclass(frozen=True)
class IntegerLUT:
    """``table[i] == unit * (even[i] + odd[i] * SQRT1_2)`` exactly (checked on construction)."""

    even: torch.Tensor  # int64, (L,)
    odd: torch.Tensor  # int64, (L,)
    unit: float

    @property
    def has_odd(self) -> bool:
        return bool(self.odd.any())

    @property
    def peak(self) -> int:
        """The largest integer magnitude in either table."""
        return int(max(self.even.abs().max(), self.odd.abs().max()))

    def values(self) -> torch.Tensor:
        return self.unit * (self.even.double() + self.odd.double() * SQRT1_2)


def _power_split(v: float) -> tuple[int, int, int]:
    """``|v| = 2^-m (1/sqrt 2)^r``: returns ``(sign, m, r)``; raises if ``v`` is no power of sqrt 2."""
    sign = 1 if v > 0 else -1
    k = round(-2 * math.log2(abs(v)))
    m, r = divmod(k, 2)
    if math.ldexp(1.0, -m) * (SQRT1_2 if r else 1.0) != abs(v):
        raise ValueError(f"{v} is not a power of sqrt 2")
    return sign, m, r


def integer_lut(table: torch.Tensor) -> IntegerLUT | None:
    """Decompose a level table into an :class:`IntegerLUT`, or ``None`` if its integers would be too large."""
    values = [float(v) for v in table.double()]
    nonzero = [v for v in values if v != 0]
    if not nonzero:
        return None
    try:  # powers of sqrt 2 (POST, and POT as its even half)
        splits = [(0, 0, 0) if v == 0 else _power_split(v) for v in values]
        deepest = max(m for v, (_, m, _) in zip(values, splits, strict=True) if v != 0)
        if deepest - min(m for v, (_, m, _) in zip(values, splits, strict=True) if v != 0) > 15:
            return None
        ints = [0 if v == 0 else s * 2 ** (deepest - m) for v, (s, m, _) in zip(values, splits, strict=True)]
        odd_mask = [v != 0 and r == 1 for v, (_, _, r) in zip(values, splits, strict=True)]
        even = [0 if o else i for i, o in zip(ints, odd_mask, strict=True)]
        odd = [i if o else 0 for i, o in zip(ints, odd_mask, strict=True)]
        lut = IntegerLUT(torch.tensor(even), torch.tensor(odd), math.ldexp(1.0, -deepest))
    except ValueError:  # a rational grid: the smallest unit that makes every level an integer
        lut = _rational_lut(values)
        if lut is None:
            return None
    if lut.peak > MAX_INT or not torch.equal(lut.values(), table.double()):
        return None
    return lut


def _rational_lut(values: list[float]) -> IntegerLUT | None:
    smallest = min(abs(v) for v in values if v != 0)
    for denominator in range(1, MAX_INT + 1):
        unit = smallest / denominator
        ints = [round(v / unit) for v in values]
        if max(abs(i) for i in ints) > MAX_INT:
            return None
        if all(i * unit == v for i, v in zip(ints, values, strict=True)):
            return IntegerLUT(torch.tensor(ints), torch.zeros(len(values), dtype=torch.int64), unit)
        if denominator > 64:
            break
    return None


def needs_single_sum(table: torch.Tensor) -> bool:
    """Whether single-sum mode changes ``table``: it has odd levels (two sums) or no small-integer form."""
    lut = integer_lut(table)
    return lut is None or lut.has_odd


def single_sum_table(table: torch.Tensor) -> tuple[torch.Tensor, float]:
    """``(grid, factor)``: ``table`` rounded onto an int8 grid, ``table ~= grid * factor``.

    ``grid = round(127 * table / peak) / 128`` (exact in float64; ``integer_lut(grid)`` has unit ``1/128``,
    ``|even| <= 127`` and ``odd = 0``) and ``factor = peak * 128 / 127``, with ``peak = max |table|``: each
    level moves by at most half of ``peak / 127``. The factor is folded into the per-channel scales.
    """
    peak = float(table.double().abs().max())
    if not math.isfinite(peak) or peak == 0:
        raise ValueError("single-sum mode needs a finite level table with a non-zero level")
    grid = torch.round(table.double() * (INT8_PEAK / peak)) / (INT8_PEAK + 1)
    return grid, peak * (INT8_PEAK + 1) / INT8_PEAK
