"""Quantized layers that *are* ``nn.Conv2d`` / ``nn.Linear``: same parameters, plus quantizer submodules.

``input_quantizer`` fake-quantizes the layer input (LSQ or ASQ), ``weight_quantizer`` the weight; either may
be ``None`` (float). ``from_float`` builds one from a float layer (same device, dtype and values);
``to_float`` gives the float layer back with the latent weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import LayerQuant
from .quantizers import Quantizer, build_quantizer


def _build_quantizers(layer: nn.Module, spec: LayerQuant, in_channels: int) -> None:
    weight_q: Quantizer | None = None
    input_q: Quantizer | None = None
    if spec.weight is not None:
        weight_q = build_quantizer(spec.weight, "weight", weight_shape=layer.weight.shape)
    if spec.act is not None:
        input_q = build_quantizer(spec.act, "act", channels=in_channels)
    layer.weight_quantizer = weight_q
    layer.input_quantizer = input_q
    layer.to(layer.weight.device)


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

    def quantized_input(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.input_quantizer is None else self.input_quantizer(x)

    def quantized_weight(self) -> torch.Tensor:
        return self.weight if self.weight_quantizer is None else self.weight_quantizer(self.weight)


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


QUANT_LAYERS: dict[type[nn.Module], type[nn.Module]] = {nn.Conv2d: QuantConv2d, nn.Linear: QuantLinear}
