"""Export: packed b-bit codes + level tables (the LUT), a safetensors file format, and packed modules."""

from .format import ExportError, convert_to_packed, load_packed, read_export, read_packed, save_packed
from .lut import IntegerLUT, integer_lut
from .modules import PackedConv2d, PackedInput, PackedLayer, PackedLinear, PackedWeight
from .packing import pack_codes, packed_nbytes, unpack_codes

__all__ = [
    "ExportError",
    "IntegerLUT",
    "PackedConv2d",
    "PackedInput",
    "PackedLayer",
    "PackedLinear",
    "PackedWeight",
    "convert_to_packed",
    "integer_lut",
    "load_packed",
    "pack_codes",
    "packed_nbytes",
    "read_export",
    "read_packed",
    "save_packed",
    "unpack_codes",
]
