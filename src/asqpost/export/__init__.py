"""Export: packed b-bit codes + level tables (the LUT), a safetensors file format, and packed modules."""

from ..packed import IntegerLUT, integer_lut, pack_codes, packed_nbytes, unpack_codes
from .embedding import PackedEmbedding
from .format import ExportError, convert_to_packed, load_packed, read_export, read_packed, save_packed
from .modules import (
    LayerKernel,
    PackedConv2d,
    PackedInput,
    PackedLayer,
    PackedLinear,
    PackedWeight,
    format_kernel_report,
    input_links,
    kernel_report,
    kernel_summary,
    link_inputs,
    log_kernel_plan,
)
from .onnx import OnnxExport, read_onnx_metadata, to_onnx
from .onnx_runtime import OnnxRuntimeModel, session_options, u8s8_saturates

__all__ = [
    "ExportError",
    "IntegerLUT",
    "LayerKernel",
    "OnnxExport",
    "OnnxRuntimeModel",
    "PackedConv2d",
    "PackedEmbedding",
    "PackedInput",
    "PackedLayer",
    "PackedLinear",
    "PackedWeight",
    "convert_to_packed",
    "format_kernel_report",
    "input_links",
    "integer_lut",
    "kernel_report",
    "kernel_summary",
    "link_inputs",
    "load_packed",
    "log_kernel_plan",
    "pack_codes",
    "packed_nbytes",
    "read_export",
    "read_onnx_metadata",
    "read_packed",
    "save_packed",
    "session_options",
    "to_onnx",
    "u8s8_saturates",
    "unpack_codes",
]
