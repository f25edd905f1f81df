import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from asqpost.levels import (
    GRIDS,
    apot,
    check_bits,
    lattice_ints,
    lattice_size,
    make_levels,
    post,
    post_int8,
    pot,
    uniform,
)
from asqpost.packed.lut import integer_lut

ALL = [(g, b, s) for g in GRIDS for b in range(2, 9) for s in (True, False)]


@pytest.mark.parametrize(("grid", "bits", "signed"), ALL)
def test_invariants(grid, bits, signed):
    levels = make_levels(grid, bits, signed)
    values = levels.values
    assert len(values) <= 2**bits
    assert list(values) == sorted(set(values))
    assert max(abs(v) for v in values) == 1.0
    assert 0.0 in values
    if signed:
        assert values == tuple(-v for v in reversed(values))
    else:
        assert min(values) == 0.0


@pytest.mark.parametrize("bits", range(2, 9))
def test_post_is_powers_of_sqrt2(bits):
    positive = [v for v in post(bits).values if v > 0]
    assert len(positive) == 2 ** (bits - 1) - 1
    assert len(post(bits)) == 2**bits - 1
    ratios = [b / a for a, b in itertools.pairwise(positive)]
    assert all(abs(r - math.sqrt(2)) <= 4e-16 for r in ratios)
    # every second level is an exact power of two (a shift in the LUT path)
    for k, v in enumerate(reversed(positive)):
        if k % 2 == 0:
            assert v == 2.0 ** -(k // 2)


def test_documented_grids():
    r = lambda ls: [round(v, 3) for v in ls.values if v >= 0]  # noqa: E731
    assert r(post(4)) == [0.0, 0.125, 0.177, 0.25, 0.354, 0.5, 0.707, 1.0]
    assert r(post(3)) == [0.0, 0.5, 0.707, 1.0]
    assert r(post(2)) == [0.0, 1.0]
    assert r(pot(4)) == [0.0, 0.016, 0.031, 0.062, 0.125, 0.25, 0.5, 1.0]
    assert r(apot(4)) == [0.0, 0.1, 0.2, 0.3, 0.4, 0.6, 0.8, 1.0]
    assert len(uniform(4, signed=False)) == 16
    # APoT's published 4-bit magnitude set (Li et al. 2020, b = 5 signed): sums of {0, 2^-1, 2^-3, 2^-5}
    # and {0, 2^-2, 2^-4, 2^-6}, normalised.
    terms = {a + b for a in (0, 2**-1, 2**-3, 2**-5) for b in (0, 2**-2, 2**-4, 2**-6)}
    expected = sorted(t / max(terms) for t in terms)
    assert [v for v in apot(5).values if v >= 0] == pytest.approx(expected)


@pytest.mark.parametrize("bad", [0, 1, 9, 2.5, "4", True, None])
def test_bad_bits(bad):
    with pytest.raises(ValueError, match="bits"):
        check_bits(bad)
    with pytest.raises(ValueError, match="bits"):
        make_levels("post", bad)


def test_unknown_grid():
    with pytest.raises(ValueError, match="unknown grid 'pow3'"):
        make_levels("pow3", 4)


@pytest.mark.parametrize(("grid", "bits", "signed"), ALL)
def test_levels_are_fixed_points_and_codes_round_trip(grid, bits, signed):
    levels = make_levels(grid, bits, signed)
    table = levels.table(dtype=torch.float64)
    codes = levels.encode(table)
    assert torch.equal(codes, torch.arange(len(levels)))
    assert torch.equal(levels.decode(codes, torch.float64), table)
    assert torch.equal(levels.project(table), table)
    # uint8 codes must index, not mask
    assert torch.equal(levels.decode(codes.to(torch.uint8), torch.float64), table)


@settings(max_examples=60, deadline=None)
@given(
    grid=st.sampled_from(sorted(GRIDS)),
    bits=st.integers(2, 8),
    signed=st.booleans(),
    xs=st.lists(st.floats(-2, 2, allow_nan=False, width=32), min_size=1, max_size=64),
)
def test_project_is_nearest_and_idempotent(grid, bits, signed, xs):
    levels = make_levels(grid, bits, signed)
    x = torch.tensor(xs, dtype=torch.float64)
    p = levels.project(x)
    assert torch.equal(levels.project(p), p)
    table = levels.table(dtype=torch.float64)
    nearest = (x[:, None] - table[None, :]).abs().min(dim=1).values
    assert torch.allclose((x - p).abs(), nearest, rtol=0, atol=1e-12)


# ---------------------------------------------------------------- POST on an int8 lattice

# the published table (docs/method.md): bits -> (L, the lattice integers of the magnitudes, largest first)
LATTICE = {3: (58, [58, 41, 29]), 4: (96, [96, 68, 48, 34, 24, 17, 12])}


@pytest.mark.parametrize("bits", sorted(LATTICE))
def test_post_int8_levels_are_the_published_lattice_integers(bits):
    size, ints = LATTICE[bits]
    levels = post_int8(bits)
    assert lattice_size(len(ints)) == size and lattice_ints(size, len(ints)) == ints
    assert [round(v * size) for v in levels.values] == sorted([0, *ints, *(-n for n in ints)])
    assert all(v == round(v * size) * (1.0 / size) for v in levels.values)  # built as n * (1 / L): exact LUT
    exact = [v for v in post(bits).values if v > 0]
    worst = max(abs(a - b) / b for a, b in zip([v for v in levels.values if v > 0], exact, strict=True))
    assert worst < {3: 3.1e-4, 4: 1.8e-3}[bits]  # within 0.03% and 0.18% of the powers of sqrt 2
    lut = integer_lut(levels.table(dtype=torch.float64))
    assert lut.unit == 1.0 / size and not lut.has_odd and lut.peak == size <= 127  # one int8 sum per weight


def test_the_lattice_size_is_the_best_int8_one():
    """No other L in 1..127 keeps the 4-bit levels distinct with a smaller worst relative error."""

    def worst(size):
        ints = lattice_ints(size, 7)
        if len(set(ints)) < 7 or min(ints) < 1:
            return math.inf
        return max(abs(n / size - math.sqrt(0.5) ** k) / math.sqrt(0.5) ** k for k, n in enumerate(ints))

    assert min(range(1, 128), key=worst) == lattice_size(7) == 96
    assert lattice_size(15) is None  # 5 bits: 1/128 below the lattice's reach


@pytest.mark.parametrize("bits", [2, 5, 8])
def test_post_int8_keeps_the_exact_grid_where_no_lattice_is_needed_or_possible(bits):
    assert post_int8(bits).values == post(bits).values and post_int8(bits).name == "post_int8"
