"""Block Hadamard rotation of a Linear layer's input channels: an outlier remedy for low-bit activations.

Transformer activations carry a few channels with values far larger than the rest; a per-tensor (or
per-token) step sized for them leaves the other channels a handful of levels at 4 bits. An orthogonal
rotation ``R`` of the input channels spreads each outlier over many channels, and a linear layer does not
notice it in float: ``x W^T = (x R)(W R)^T`` because ``R R^T = I``. The layer then quantizes ``x R`` and
``W R`` (QuaRot, Ashkboos et al. 2024, and SpinQuant use Hadamard rotations this way).

``R`` here is block diagonal with the normalised Sylvester-Hadamard matrix ``H_b`` (entries ``+-1/sqrt(b)``,
symmetric and orthogonal) on blocks of ``b`` consecutive channels; ``b`` is a power of two. A layer with
``act.rotate = m`` uses ``b = gcd(m, in_features)``: the largest power of two that divides its width, at most
``m`` (384 and 1536 wide MiniLM layers with ``m = 128``: 128). The packed layer rotates its input at run time
(``b`` multiply-adds per input value) and stores the rotated weight.
"""

from __future__ import annotations

import math

import torch


def check_rotation_block(value: object) -> int:
    """``value`` as a rotation block size: an integer power of two >= 2, else ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 2 or value & (value - 1):
        raise ValueError(f"rotate (the Hadamard block size) must be a power of two >= 2 or null, got {value!r}")
    return value


def rotation_block(in_features: int, max_block: int) -> int:
    """The block a layer with ``in_features`` inputs uses under ``rotate = max_block`` (1: no rotation)."""
    return math.gcd(in_features, check_rotation_block(max_block))


def hadamard(block: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The normalised ``block x block`` Sylvester-Hadamard matrix (symmetric, ``H @ H = I``): the map
    :func:`rotate_channels` applies per block, as a matrix (a reference; the layers never build it)."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < check_rotation_block(block):  # Sylvester: H_2n = [[H, H], [H, -H]]
        h = torch.cat([torch.cat([h, h], dim=1), torch.cat([h, -h], dim=1)], dim=0)
    return (h / math.sqrt(block)).to(dtype)


def rotate_channels(x: torch.Tensor, block: int) -> torch.Tensor:
    """``x`` with its last dimension multiplied by the block-diagonal Hadamard rotation of ``block`` channels.

    Applies to inputs ``(..., C)`` and to weights ``(out, C)`` alike; ``C`` must be a multiple of ``block``.
    The rotation is its own inverse (so its gradient is the rotated gradient). Computed as the fast
    Walsh-Hadamard transform (:func:`walsh_hadamard`). Packed layers rotate through
    :func:`asqpost.kernels.rotate`, whose native one-pass transform does the same float operations in the same
    order: the same bits in training, evaluation and the packed layer.
    """
    if x.shape[-1] % check_rotation_block(block):
        raise ValueError(f"cannot rotate {x.shape[-1]} channels in blocks of {block}")
    if torch.is_grad_enabled() and x.requires_grad:
        return _Rotate.apply(x, block)
    return walsh_hadamard(x, block)  # no graph to record: the autograd function's overhead shows at batch 1


def walsh_hadamard(x: torch.Tensor, block: int) -> torch.Tensor:
    """:func:`rotate_channels` in torch ops: ``log2(block)`` stages of ``(a, b) -> (a + b, a - b)`` on channels
    ``h = 1, 2, 4, ...`` apart within each block, then one multiply by ``1 / sqrt(block)`` in ``x``'s type."""
    lead, channels = x.shape[:-1], x.shape[-1]
    y = x.reshape(*lead, channels // block, block)
    h = 1
    while h < block:
        pairs = y.reshape(*lead, channels // block, block // (2 * h), 2, h)
        a, b = pairs.select(-2, 0), pairs.select(-2, 1)
        y = torch.stack((a + b, a - b), dim=-2)
        h *= 2
    return (y * (1 / math.sqrt(block))).reshape(x.shape)


class _Rotate(torch.autograd.Function):
    """``x R`` with the gradient ``g R`` (``R`` symmetric and orthogonal)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, block: int) -> torch.Tensor:
        ctx.block = block
        return walsh_hadamard(x, block)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return walsh_hadamard(grad, ctx.block), None
