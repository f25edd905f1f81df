"""What a test may assert when its two sides are float computations of different shapes (docs/numerics.md).

Bit for bit on every CPU (``torch.equal``):

- the same operations on tensors of the same shapes, in one process: a round trip of stored values, a cache
  against a recomputation, two copies of one module, a resumed run against a straight one;
- integer arithmetic, and float sums of integers that stay below 2**24 (float32) or 2**53 (float64): the packed
  kernels' accumulators, whatever the order of the additions; then a float64 rescale in a fixed order;
- correctly rounded elementwise operations (``+ - * /``, ``sqrt``, ``round``, ``clamp``, ``abs``, ``where``,
  gathers), which give the same bits wherever an element sits in its tensor.

Within float rounding only: anything that goes through a matrix product, a convolution or a reduction of another
shape (a padded batch against the unpadded one, a sentence alone against the same sentence in a batch) or
through an elementwise transcendental (``softplus``, ``sigmoid``, GELU, ``exp``, ``log``, ``pow``): BLAS picks
its kernel by the shape and by the CPU, and torch's vectorised loops compute the body of a tensor and its tail
with different approximations, so an element's bits depend on where it sits. ``ATEN_CPU_CAPABILITY=avx2``
(another dispatch of torch's kernels) shows such differences on any x86 CPU.

Quantization codes round such values. Two computations then give identical codes except at rounding ties: a
code may differ by one where the value before rounding lies within float rounding of a rounding boundary
``k + 1/2``. :func:`assert_codes_match` checks exactly that.
"""

from __future__ import annotations

import torch

# float32 results of a short chain of operations (a few matrix products, a reduction, a transcendental) computed
# with other shapes or another kernel: a few units in the last place of each step, far below this
FLOAT32_RTOL = 1e-5
# codes: a value x / s within this distance (relative to max(1, |x / s|)) of k + 1/2 is a rounding tie (x / s moves
# by up to ~1e-6 of itself through the tests' two-layer transformers when the shapes change)
TIE_WINDOW = 1e-5


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``max |actual - expected| / max |expected|`` over the tensors (0 for two empty or all-zero tensors)."""
    actual, expected = actual.detach().double(), expected.detach().double()
    assert actual.shape == expected.shape, (tuple(actual.shape), tuple(expected.shape))
    if actual.numel() == 0:
        return 0.0
    scale = float(expected.abs().max())
    diff = float((actual - expected).abs().max())
    return diff / scale if scale > 0 else diff


def assert_float32_close(
    actual: torch.Tensor, expected: torch.Tensor, rtol: float = FLOAT32_RTOL, what: str = "values"
) -> None:
    """``actual`` equals ``expected`` within float32 rounding: ``max |a - e| <= rtol * max |e|``.

    The bound is relative to the largest magnitude of ``expected`` (a dot product's rounding scales with the sum
    of its terms' magnitudes, not with the result, so an elementwise relative bound would fail on cancellation).
    """
    error = relative_error(actual, expected)
    assert error <= rtol, f"{what}: relative error {error:.3g} beyond float32 rounding ({rtol:g})"


def assert_beyond_rounding(
    actual: torch.Tensor, expected: torch.Tensor, factor: float = 100.0, rtol: float = FLOAT32_RTOL, what: str = ""
) -> None:
    """The negative control: ``actual`` differs from ``expected`` by more than ``factor`` times the float32 bound
    (what a leak, a missing mask or a wrong step does), so the bound of :func:`assert_float32_close` can fail."""
    error = relative_error(actual, expected)
    assert error > factor * rtol, f"{what}: relative error {error:.3g} is within {factor:g} x the rounding bound"


def tie_distance(values: torch.Tensor) -> torch.Tensor:
    """How far each value ``x / s`` lies from the nearest rounding boundary ``k + 1/2``, relative to
    ``max(1, |x / s|)`` (the scale of its float rounding)."""
    values = values.detach().double()
    return (values - values.floor() - 0.5).abs() / values.abs().clamp_min(1.0)


def codes_beyond_ties(
    codes: torch.Tensor, other: torch.Tensor, values: torch.Tensor, window: float = TIE_WINDOW
) -> int:
    """How many of two computations' codes differ other than at a rounding tie: by more than one, or where
    ``values`` (the values ``codes`` rounds) lie farther than ``window`` from a boundary."""
    assert codes.shape == other.shape == values.shape, (tuple(codes.shape), tuple(other.shape), tuple(values.shape))
    step = (codes.double() - other.double()).abs()
    return int(((step > 1) | ((step > 0) & (tie_distance(values) > window))).sum())


def assert_codes_match(
    codes: torch.Tensor, other: torch.Tensor, values: torch.Tensor, window: float = TIE_WINDOW, what: str = "codes"
) -> int:
    """Integer codes of two computations are identical except at rounding ties; returns how many differ (ties).

    ``codes`` rounds ``values`` (``clamp(round(values), qmin, qmax)``, ``values = x / s``); ``other`` is the same
    quantity computed another way (another batch shape, another kernel). Where they differ, they differ by one and
    ``values`` lies within ``window * max(1, |values|)`` of a rounding boundary ``k + 1/2``.
    """
    beyond = codes_beyond_ties(codes, other, values, window)
    differ = int((codes != other).sum())
    assert beyond == 0, f"{what}: {beyond} of {differ} differing codes are not rounding ties"
    return differ
