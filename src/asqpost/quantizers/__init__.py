"""Quantizers: one interface (:class:`Quantizer`), one registry (method name -> class)."""

from .asq import ASQQuantizer
from .base import QUANTIZERS, NotCalibratedError, Quantizer, build_quantizer, register_quantizer
from .levelset import LevelSetQuantizer
from .lsq import LSQQuantizer, integer_range

__all__ = [
    "QUANTIZERS",
    "ASQQuantizer",
    "LSQQuantizer",
    "LevelSetQuantizer",
    "NotCalibratedError",
    "Quantizer",
    "build_quantizer",
    "integer_range",
    "register_quantizer",
]
