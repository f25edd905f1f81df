"""Quantizers: one interface (:class:`Quantizer`); each method registers itself in :mod:`asqpost.registry`."""

from ..registry import register_quantizer
from .asq import ASQQuantizer
from .base import ActExport, NotCalibratedError, Quantizer, WeightExport, build_quantizer
from .levelset import LevelSetQuantizer
from .lsq import LSQQuantizer, integer_range

__all__ = [
    "ASQQuantizer",
    "ActExport",
    "LSQQuantizer",
    "LevelSetQuantizer",
    "NotCalibratedError",
    "Quantizer",
    "WeightExport",
    "build_quantizer",
    "integer_range",
    "register_quantizer",
]
