"""Level sets: the grids that quantized values live on (pure maths, no nn).

A :class:`LevelSet` is a sorted tuple of level values normalised so that the largest magnitude is 1. A
quantizer multiplies it by a learned scale. The tuple *is* the look-up table (LUT) of an exported layer: a
b-bit code is an index into it, so every set holds at most ``2**bits`` levels.

Grids (``bits`` counts the sign when ``signed``):

* ``uniform``: evenly spaced; signed sets are symmetric with ``2**bits - 1`` levels.
* ``pot``: powers of two, ``{0} U {2**-k : k = 0 .. K}``.
* ``post``: powers of sqrt 2 (the paper's POST), ``{0} U {sqrt(2)**-k : k = 0 .. K}``. Signed (sign-magnitude)
  ``K = 2**(bits-1) - 2`` so the set has ``2**bits - 1`` levels; unsigned ``K = 2**bits - 2``.
* ``post_int8``: POST on an int8 lattice: the levels are the integers ``n_k = round(L * sqrt(2)**-k)`` over
  ``L`` (:func:`lattice_size`: the ``L <= 127`` that keeps the ``n_k`` distinct and makes the worst relative
  distance to the exact powers smallest; 3 bits ``L = 58``, 4 bits ``L = 96``), so a packed layer needs one
  integer sum per weight instead of POST's two. Sets of at most 2 magnitude bits are the exact grid already
  (ternary at 2 bits); wider ones (5-8 bits), whose deepest powers no int8 lattice separates, are exact POST.
* ``apot``: additive powers of two (Li et al., ICLR 2020): sums of ``n`` terms, term ``i`` taking
  ``{0} U {2**-(i + 1 + j*n)}``, with two bits per term (the last term gets one when the magnitude bits are
  odd), except that 3 magnitude bits use APoT's published set. At 3, 4 and 5 bits signed this is exactly
  APoT's published ``B = 2, 3, 4`` weight sets.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

MIN_BITS = 2
MAX_BITS = 8
SQRT1_2 = math.sqrt(0.5)  # 1 / sqrt 2: POST's odd powers, and the LUT's second accumulator


def check_bits(bits: object, what: str = "bits") -> int:
    """Return ``bits`` as an int, or raise ``ValueError`` unless it is an integer in [2, 8]."""
    if isinstance(bits, bool) or not isinstance(bits, int):
        raise ValueError(f"{what} must be an integer in [{MIN_BITS}, {MAX_BITS}], got {bits!r}")
    if not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"{what} must be in [{MIN_BITS}, {MAX_BITS}], got {bits}")
    return bits


@dataclass(frozen=True)
class LevelSet:
    """Sorted, unique, normalised levels (max magnitude 1) that ``bits``-bit codes index.

    ``encode`` maps values to the code of the nearest level (ties go to the lower level) in O(N log L)
    with ``torch.bucketize`` on the midpoints; ``decode`` maps codes back; ``project = decode . encode``.
    """

    name: str
    bits: int
    signed: bool
    values: tuple[float, ...]
    _cache: dict = field(default_factory=dict, init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        check_bits(self.bits)
        if len(self.values) > 2**self.bits:
            raise ValueError(f"{self.name}: {len(self.values)} levels do not fit {self.bits} bits")
        if list(self.values) != sorted(set(self.values)):
            raise ValueError(f"{self.name}: levels must be sorted and unique")
        if max(abs(v) for v in self.values) != 1.0:
            raise ValueError(f"{self.name}: levels must be normalised to max magnitude 1")

    @property
    def lo(self) -> float:
        return self.values[0]

    @property
    def hi(self) -> float:
        return self.values[-1]

    def __len__(self) -> int:
        return len(self.values)

    def table(self, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The levels as a 1-D tensor (cached per device and dtype)."""
        return self._tensors(torch.device(device or "cpu"), dtype)[0]

    def midpoints(self, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The ``len - 1`` boundaries between neighbouring levels (cached per device and dtype): a value goes to
        the level above a boundary only when it is greater than it (``torch.bucketize``)."""
        return self._tensors(torch.device(device or "cpu"), dtype)[1]

    def _tensors(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        key = (device, dtype)
        if key not in self._cache:
            table = torch.tensor(self.values, dtype=torch.float64)
            midpoints = (table[1:] + table[:-1]) / 2
            self._cache[key] = (table.to(device, dtype), midpoints.to(device, dtype))
        return self._cache[key]

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Codes (int64, same shape as ``x``) of the nearest level to each element of ``x``."""
        _, midpoints = self._tensors(x.device, x.dtype)
        return torch.bucketize(x, midpoints)

    def decode(self, codes: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Level values of ``codes`` (widened to int64: a uint8 index would act as a boolean mask)."""
        return self.table(codes.device, dtype)[codes.long()]

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """Nearest level to each element of ``x``."""
        table, midpoints = self._tensors(x.device, x.dtype)
        return table[torch.bucketize(x, midpoints)]


def _normalised(name: str, bits: int, signed: bool, magnitudes: set[float]) -> LevelSet:
    top = max(magnitudes)
    mags = {m / top for m in magnitudes}
    values = mags | {-m for m in mags} if signed else mags
    return LevelSet(name, bits, signed, tuple(sorted(values)))


def _magnitude_bits(bits: int, signed: bool) -> int:
    return bits - 1 if signed else bits


def uniform(bits: int, signed: bool = True) -> LevelSet:
    """Evenly spaced levels: ``k / qmax`` for integer ``k`` in the b-bit range (symmetric when signed)."""
    check_bits(bits)
    qmax = 2 ** _magnitude_bits(bits, signed) - 1
    return _normalised("uniform", bits, signed, {float(k) for k in range(qmax + 1)})


def _sqrt2_power(k: int) -> float:
    """``sqrt(2)**-k`` built from exact halvings: even k are exact powers of two (shifts in the LUT)."""
    return math.ldexp(1.0, -(k // 2)) * (SQRT1_2 if k % 2 else 1.0)


def _powers(bits: int, signed: bool, power: Callable[[int], float]) -> set[float]:
    count = 2 ** _magnitude_bits(bits, signed) - 1  # non-zero magnitudes; zero takes one code
    return {0.0} | {power(k) for k in range(count)}


def pot(bits: int, signed: bool = True) -> LevelSet:
    """Powers of two: ``{0} U {2**-k}``, ``2**bits - 1`` levels when signed."""
    check_bits(bits)
    return _normalised("pot", bits, signed, _powers(bits, signed, lambda k: math.ldexp(1.0, -k)))


def post(bits: int, signed: bool = True) -> LevelSet:
    """Powers of sqrt 2 (POST): ``{0} U {sqrt(2)**-k}``; at 4 bits 0, .125, .177, .25, .354, .5, .707, 1."""
    check_bits(bits)
    return _normalised("post", bits, signed, _powers(bits, signed, _sqrt2_power))


INT8_MAX = 127  # the largest lattice integer: an int8 weight


def lattice_size(count: int) -> int | None:
    """``L`` for ``count`` non-zero POST magnitudes on an int8 lattice: among ``1..127`` the one whose integers
    ``round(L * sqrt(2)**-k)``, ``k < count``, are distinct and non-zero with the smallest worst relative error
    (the smallest such ``L`` on a tie); ``None`` when no ``L`` keeps them distinct."""
    best: tuple[float, int] | None = None
    for size in range(1, INT8_MAX + 1):
        ints = lattice_ints(size, count)
        if len(set(ints)) < count or min(ints) < 1:
            continue
        error = max(abs(n / size - _sqrt2_power(k)) / _sqrt2_power(k) for k, n in enumerate(ints))
        if best is None or error < best[0]:
            best = (error, size)
    return None if best is None else best[1]


def lattice_ints(size: int, count: int) -> list[int]:
    """``round(size * sqrt(2)**-k)`` for ``k = 0 .. count - 1``."""
    return [round(size * _sqrt2_power(k)) for k in range(count)]


def post_int8(bits: int, signed: bool = True) -> LevelSet:
    """POST on an int8 lattice: ``{0} U {n_k / L}`` with ``n_k = round(L * sqrt(2)**-k)`` (module docstring).

    Each level is built as ``n_k * (1 / L)`` in float64, so the look-up table is exactly ``unit * n_k`` with
    ``unit = 1 / L``: one integer sum per weight in a packed layer. Where no int8 lattice separates the levels
    (5 bits and more), or the exact grid is integral already (2 bits), this is :func:`post`.
    """
    check_bits(bits)
    count = 2 ** _magnitude_bits(bits, signed) - 1
    size = lattice_size(count) if count > 1 else None
    if size is None:
        return dataclasses.replace(post(bits, signed), name="post_int8")
    unit = 1.0 / size
    mags = {0.0} | {n * unit for n in lattice_ints(size, count)}
    values = mags | {-m for m in mags} if signed else mags
    return LevelSet("post_int8", bits, signed, tuple(sorted(values)))


def apot(bits: int, signed: bool = True) -> LevelSet:
    """Additive powers of two (APoT): sums of one level from each of ``ceil(m / 2)`` two-bit terms."""
    check_bits(bits)
    mbits = _magnitude_bits(bits, signed)
    if mbits == 3:  # APoT's published 3-bit magnitude set: {0, 2^-1, 2^-2, 2^-4} + {0, 2^-3}
        terms = [[0.0, 2**-1, 2**-2, 2**-4], [0.0, 2**-3]]
    else:
        n_terms = math.ceil(mbits / 2)
        term_bits = [2] * (mbits // 2) + [1] * (mbits % 2)
        terms = [[0.0] + [2.0 ** -(i + 1 + j * n_terms) for j in range(2**tb - 1)] for i, tb in enumerate(term_bits)]
    sums = {0.0}
    for term in terms:
        sums = {s + t for s in sums for t in term}
    return _normalised("apot", bits, signed, sums)


@dataclass(frozen=True)
class Grid:
    """A named family of level sets: ``build(bits, signed)`` and the ``label`` reports show."""

    label: str
    build: Callable[[int, bool], LevelSet]


# One entry per grid: each is also a weight quantization method (asqpost.quantizers.levelset registers them all)
GRIDS: dict[str, Grid] = {
    "uniform": Grid("uniform", uniform),
    "pot": Grid("POT", pot),
    "post": Grid("POST", post),
    "post_int8": Grid("POST-int8", post_int8),
    "apot": Grid("APoT", apot),
}


def make_levels(grid: str, bits: int, signed: bool = True) -> LevelSet:
    """Build a level set by grid name (a key of :data:`GRIDS`)."""
    if grid not in GRIDS:
        raise ValueError(f"unknown grid {grid!r}; choose one of {sorted(GRIDS)}")
    return GRIDS[grid].build(bits, signed)
