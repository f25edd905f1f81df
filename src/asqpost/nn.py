"""Quantized layers that *are* ``nn.Conv2d`` / ``nn.Linear`` / ``nn.Embedding``: same parameters, plus quantizers.

``input_quantizer`` fake-quantizes the layer input (LSQ or ASQ), ``weight_quantizer`` the weight; either may
be ``None`` (float). ``from_float`` builds one from a float layer (same device, dtype and values);
``to_float`` gives the float layer back with the latent weights.

SmoothQuant (``act.smooth``): a layer with the buffer ``smooth_scale`` ``s`` (one per input channel, 1 until
calibration sets it from the real tokens' channel maxima) quantizes ``x / s`` and ``W * s`` instead of ``x``
and ``W``; in float the product is unchanged. Several layers may hold the same ``s`` tensor (Q, K and V sharing
one input quantizer).

Rotation (``act.rotate``, Linear layers): the layer quantizes ``x R`` and ``W R`` with ``R`` a block-diagonal
Hadamard rotation of the input channels (:mod:`asqpost.rotation`), after SmoothQuant's ``1 / s`` and ``s`` when
both are on. :meth:`folded_input` and :meth:`folded_weight` are what the quantizers see.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import LayerQuant, QuantizerConfig
from .masking import valid_tokens
from .quantizers import Quantizer, build_quantizer
from .rotation import rotate_channels, rotation_block

SMOOTH_FLOOR = 1e-5  # channel maxima below this count as this (an all-zero channel or weight column)


def _build_quantizers(layer: nn.Module, spec: LayerQuant, in_channels: int) -> None:
    weight_q: Quantizer | None = None
    input_q: Quantizer | None = None
    if spec.weight is not None:
        weight_q = build_quantizer(spec.weight, "weight", weight_shape=layer.weight.shape)
    if spec.act is not None:
        input_q = build_quantizer(spec.act, "act", channels=in_channels)
    layer.weight_quantizer = weight_q
    layer.input_quantizer = input_q
    smooth = None if spec.act is None else spec.act.smooth
    if smooth is not None and getattr(layer, "groups", 1) != 1:
        raise ValueError("smooth (SmoothQuant) applies to Linear and ungrouped Conv2d layers, not grouped convs")
    layer.smooth_alpha = smooth
    layer.register_buffer("smooth_scale", None if smooth is None else torch.ones(in_channels))
    layer.smooth_observing = False
    layer.smooth_max = None
    layer.rotate_block = _rotate_block(layer, spec, in_channels)
    layer.to(layer.weight.device)


def _rotate_block(layer: nn.Module, spec: LayerQuant, in_channels: int) -> int | None:
    rotate = None if spec.act is None else spec.act.rotate
    if rotate is None:
        return None
    if not isinstance(layer, nn.Linear):
        raise ValueError("rotate (the Hadamard rotation of input channels) applies to Linear layers, not convs")
    block = rotation_block(in_channels, rotate)
    return block if block > 1 else None  # an odd width has no power-of-two block: left unrotated


def check_conv_input(x: torch.Tensor, in_channels: int, who: str) -> None:
    """A clear error for inputs a conv layer cannot take (instead of a failure deep inside torch)."""
    if x.dim() != 4 or x.shape[1] != in_channels:
        raise ValueError(f"{who} expects input (N, C, H, W) with {in_channels} channels, got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"{who} got an empty batch (shape {tuple(x.shape)})")


def check_linear_input(x: torch.Tensor, in_features: int, who: str) -> None:
    if x.dim() < 1 or x.shape[-1] != in_features:
        raise ValueError(f"{who} expects inputs (..., {in_features}) features, got shape {tuple(x.shape)}")
    if x.numel() == 0:
        raise ValueError(f"{who} got an empty batch (shape {tuple(x.shape)})")


class _QuantMixin:
    weight: nn.Parameter
    weight_quantizer: Quantizer | None
    input_quantizer: Quantizer | None
    smooth_scale: torch.Tensor | None
    smooth_alpha: float | None
    smooth_observing: bool
    smooth_max: torch.Tensor | None
    rotate_block: int | None

    def _channel_view(self, s: torch.Tensor, dims: int) -> torch.Tensor:
        """``s`` shaped to broadcast along the input-channel dimension of a ``dims``-d input (conv: dim 1)."""
        if isinstance(self, nn.Conv2d):
            return s.reshape((1, -1) + (1,) * (dims - 2))
        return s

    def smoothed_input(self, x: torch.Tensor) -> torch.Tensor:
        """``x / s`` (SmoothQuant), or ``x``; while observing for smoothing, records max ``|x|`` per channel."""
        if self.smooth_scale is None:
            return x
        if self.smooth_observing:  # padded tokens (asqpost.masking) do not count
            with torch.no_grad():
                seen = x.detach() if isinstance(self, nn.Conv2d) else valid_tokens(x.detach())
                dims = [d for d in range(seen.dim()) if d != (1 if isinstance(self, nn.Conv2d) else seen.dim() - 1)]
                peak = seen.abs().amax(dim=dims).float()
                self.smooth_max = peak if self.smooth_max is None else torch.maximum(self.smooth_max, peak)
        return x / self._channel_view(self.smooth_scale, x.dim()).to(x.dtype)

    def smoothed_weight(self) -> torch.Tensor:
        """``W * s`` along the input channels (what the weight quantizer sees), or ``W``."""
        if self.smooth_scale is None:
            return self.weight
        return self.weight * self._channel_view(self.smooth_scale, self.weight.dim()).to(self.weight.dtype)

    def weight_channel_max(self) -> torch.Tensor:
        """max ``|W|`` per input channel, over outputs and kernel positions (float32)."""
        w = self.weight.detach().abs().float()
        return w.transpose(0, 1).reshape(w.shape[1], -1).amax(dim=1)

    def folded_input(self, x: torch.Tensor) -> torch.Tensor:
        """What the input quantizer sees: :meth:`smoothed_input`, then rotated when ``rotate_block`` is set."""
        x = self.smoothed_input(x)
        return x if self.rotate_block is None else rotate_channels(x, self.rotate_block)

    def folded_weight(self) -> torch.Tensor:
        """What the weight quantizer sees: :meth:`smoothed_weight`, rotated along the input channels like the
        input, so that ``F.linear(folded_input(x), folded_weight())`` is the float layer's product."""
        w = self.smoothed_weight()
        return w if self.rotate_block is None else rotate_channels(w, self.rotate_block)

    def quantized_input(self, x: torch.Tensor) -> torch.Tensor:
        x = self.folded_input(x)
        return x if self.input_quantizer is None else self.input_quantizer(x)

    def quantized_weight(self) -> torch.Tensor:
        w = self.folded_weight()
        return w if self.weight_quantizer is None else self.weight_quantizer(w)


@torch.no_grad()
def smoothing_factors(x_max: torch.Tensor, w_max: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothQuant's ``s_j = max|x_j|^alpha / max|W_:,j|^(1 - alpha)`` (maxima floored at ``SMOOTH_FLOOR``)."""
    x_max, w_max = x_max.float().clamp_min(SMOOTH_FLOOR), w_max.float().clamp_min(SMOOTH_FLOOR)
    return (x_max.pow(alpha) / w_max.pow(1 - alpha)).clamp_min(SMOOTH_FLOOR)


class QuantConv2d(_QuantMixin, nn.Conv2d):
    """``nn.Conv2d`` with fake-quantized input and weight (grouped and depthwise included)."""

    def __init__(self, *args, spec: LayerQuant, **kwargs):
        super().__init__(*args, **kwargs)
        _build_quantizers(self, spec, self.in_channels)

    @classmethod
    def from_float(cls, conv: nn.Conv2d, spec: LayerQuant) -> QuantConv2d:
        layer = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            groups=conv.groups,
            bias=conv.bias is not None,
            padding_mode=conv.padding_mode,
            device=conv.weight.device,
            dtype=conv.weight.dtype,
            spec=spec,
        )
        layer.load_state_dict(conv.state_dict(), strict=False)
        return layer

    def to_float(self) -> nn.Conv2d:
        conv = nn.Conv2d(
            self.in_channels,
            self.out_channels,
            self.kernel_size,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            groups=self.groups,
            bias=self.bias is not None,
            padding_mode=self.padding_mode,
            device=self.weight.device,
            dtype=self.weight.dtype,
        )
        conv.load_state_dict({k: v for k, v in self.state_dict().items() if k in ("weight", "bias")})
        return conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_conv_input(x, self.in_channels, "QuantConv2d")
        return self._conv_forward(self.quantized_input(x), self.quantized_weight(), self.bias)


class QuantLinear(_QuantMixin, nn.Linear):
    """``nn.Linear`` with fake-quantized input (``(N, C)`` or ``(N, T, C)``) and weight."""

    def __init__(self, *args, spec: LayerQuant, **kwargs):
        super().__init__(*args, **kwargs)
        _build_quantizers(self, spec, self.in_features)

    @classmethod
    def from_float(cls, linear: nn.Linear, spec: LayerQuant) -> QuantLinear:
        layer = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            device=linear.weight.device,
            dtype=linear.weight.dtype,
            spec=spec,
        )
        layer.load_state_dict(linear.state_dict(), strict=False)
        return layer

    def to_float(self) -> nn.Linear:
        linear = nn.Linear(
            self.in_features,
            self.out_features,
            bias=self.bias is not None,
            device=self.weight.device,
            dtype=self.weight.dtype,
        )
        linear.load_state_dict({k: v for k, v in self.state_dict().items() if k in ("weight", "bias")})
        return linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_linear_input(x, self.in_features, "QuantLinear")
        return F.linear(self.quantized_input(x), self.quantized_weight(), self.bias)


def _embedding_options(embedding: nn.Embedding) -> dict:
    """The lookup options of an embedding (what ``nn.Embedding`` takes besides its sizes and table)."""
    names = ("padding_idx", "max_norm", "norm_type", "scale_grad_by_freq", "sparse")
    return {name: getattr(embedding, name) for name in names}


class QuantEmbedding(nn.Embedding):
    """``nn.Embedding`` whose table is fake-quantized with one scale per row (per token vector).

    The row ``i`` of the table becomes ``weight_quantizer(W)[i]``: at ``bits`` with LSQ's uniform grid, each
    row is an integer multiple of its own step. The layer keeps the float layer's ``weight`` parameter itself
    (so a table tied to an output head stays tied), and initialises its quantizer from it at construction:
    a table needs no data to calibrate.
    """

    weight_quantizer: Quantizer

    @classmethod
    def from_float(cls, embedding: nn.Embedding, quant: QuantizerConfig) -> QuantEmbedding:
        layer = cls(
            embedding.num_embeddings,
            embedding.embedding_dim,
            **_embedding_options(embedding),
            _weight=embedding.weight,
            _freeze=not embedding.weight.requires_grad,
        )
        layer.weight = embedding.weight
        layer.weight_quantizer = build_quantizer(quant, "weight", weight_shape=layer.weight.shape)
        layer.weight_quantizer.to(layer.weight.device).calibrate_(layer.weight.detach())
        return layer

    def quantized_weight(self) -> torch.Tensor:
        return self.weight_quantizer(self.weight)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(
            ids, self.quantized_weight(), self.padding_idx, self.max_norm, self.norm_type, self.scale_grad_by_freq,
            self.sparse,
        )  # fmt: skip

    def _float_copy(self, weight: torch.Tensor) -> nn.Embedding:
        return nn.Embedding(
            self.num_embeddings,
            self.embedding_dim,
            **_embedding_options(self),
            _weight=weight.detach().clone(),
            _freeze=not self.weight.requires_grad,
        )

    def to_float(self) -> nn.Embedding:
        """The float layer with the latent table."""
        return self._float_copy(self.weight)

    @torch.no_grad()
    def to_dequantized(self) -> nn.Embedding:
        """A float ``nn.Embedding`` holding the quantized table: the same outputs as this layer."""
        return self._float_copy(self.quantized_weight())


QUANT_LAYERS: dict[type[nn.Module], type[nn.Module]] = {nn.Conv2d: QuantConv2d, nn.Linear: QuantLinear}
