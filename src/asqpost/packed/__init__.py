"""The packed data layer: b-bit code packing, integer level tables and the typed per-layer data that kernels read
(:class:`LayerSpec`). It sits below the kernels and the packed modules, and imports neither."""

from .lut import IntegerLUT, integer_lut, needs_single_sum, single_sum_table
from .packing import pack_codes, packed_nbytes, unpack_codes
from .spec import ConvGeometry, Geometry, InputSpec, LayerSpec, LinearGeometry, WeightSpec

__all__ = [
    "ConvGeometry",
    "Geometry",
    "InputSpec",
    "IntegerLUT",
    "LayerSpec",
    "LinearGeometry",
    "WeightSpec",
    "integer_lut",
    "needs_single_sum",
    "pack_codes",
    "packed_nbytes",
    "single_sum_table",
    "unpack_codes",
]
