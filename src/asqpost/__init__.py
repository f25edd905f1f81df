"""asq-post: ASQ activations and POST weights for low-bit quantization-aware training (arXiv 2504.17263)."""

from .adapters import StepAdapter
from .config import LayerQuant, QATConfig, QuantizerConfig, pattern_matches
from .convert import (
    calibrate,
    calibrate_smoothing,
    dequantize,
    load_quantized,
    prepare_qat,
    quant_layers,
    quantizable_layers,
    quantized_state,
    resolve_layer_specs,
)
from .levels import LevelSet, make_levels
from .masking import install_mask_hooks, token_mask
from .nn import QuantConv2d, QuantEmbedding, QuantLinear
from .policy import LayerPlan, plan_layers
from .quantizers import NotCalibratedError, Quantizer, build_quantizer
from .registry import methods_for, register_quantizer
from .version import __version__

__all__ = [
    "LayerPlan",
    "LayerQuant",
    "LevelSet",
    "NotCalibratedError",
    "QATConfig",
    "QuantConv2d",
    "QuantEmbedding",
    "QuantLinear",
    "Quantizer",
    "QuantizerConfig",
    "StepAdapter",
    "__version__",
    "build_quantizer",
    "calibrate",
    "calibrate_smoothing",
    "dequantize",
    "install_mask_hooks",
    "load_quantized",
    "make_levels",
    "methods_for",
    "pattern_matches",
    "plan_layers",
    "prepare_qat",
    "quant_layers",
    "quantizable_layers",
    "quantized_state",
    "register_quantizer",
    "resolve_layer_specs",
    "token_mask",
]
