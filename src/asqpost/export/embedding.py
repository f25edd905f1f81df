"""Packed embeddings: an ``nn.Embedding`` table as b-bit codes, a level table and one scale per row.

Row ``i`` of the table is ``table[codes[i, :]] * scale[i]`` (a :class:`~asqpost.export.modules.PackedWeight` of
shape ``(num_embeddings, embedding_dim)``). A lookup reads only the codes of the rows it needs, straight from
the packed byte stream: code ``j`` of row ``i`` starts at bit ``p = (i * dim + j) * bits`` and is
``((byte[p // 8] | byte[p // 8 + 1] << 8) >> p % 8) & (2**bits - 1)`` (a code of at most 8 bits spans at most
two bytes; with 1, 2, 4 or 8 bits and whole-byte rows, a row's bytes are gathered and each byte looks up its
levels in a 256-entry table instead; int64 ids on the CPU take that lookup in one native pass,
:func:`asqpost.kernels.extension.embedding_rows`). No float table of the embedding is ever built, and the rows
equal the dequantized table's bit for bit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import EmbeddingPlan, current_kernel, embedding_rows, extension
from ..nn import QuantEmbedding
from .modules import PackedWeight

_BY_SIZE = {4: torch.int32, 8: torch.int64, 16: torch.complex128}  # dtypes that carry a byte's levels as one


class PackedEmbedding(nn.Module):
    """Inference form of a :class:`~asqpost.nn.QuantEmbedding`; built from :meth:`meta` alone, filled by loading.

    ``weight`` is the :class:`PackedWeight` (buffers ``weight.codes``, ``weight.table``, ``weight.scale``).
    ``padding_idx``, ``max_norm`` and ``norm_type`` are ``nn.Embedding``'s (``max_norm`` renormalises the
    looked-up rows, as ``nn.Embedding`` does, without touching the stored codes).
    """

    def __init__(self, meta: dict):
        super().__init__()
        self.num_embeddings = int(meta["num_embeddings"])
        self.embedding_dim = int(meta["embedding_dim"])
        if self.num_embeddings < 1 or self.embedding_dim < 1:
            raise ValueError(f"an embedding needs at least one row and column, got {self.shape}")
        self.padding_idx = meta.get("padding_idx")
        self.max_norm = meta.get("max_norm")
        self.norm_type = float(meta.get("norm_type", 2.0))
        self.weight = PackedWeight(self.shape, int(meta["bits"]), int(meta["table_size"]))
        self._byte_levels_by_dtype: dict[torch.dtype, torch.Tensor] = {}  # cleared when the tensors change
        self._native_lookup_args: tuple[torch.Tensor, torch.Tensor] | None = None

    def _apply(self, fn, recurse=True):
        self._forget_lookups()
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs):
        self._forget_lookups()
        super()._load_from_state_dict(*args, **kwargs)

    def _forget_lookups(self) -> None:
        self._byte_levels_by_dtype.clear()
        self._native_lookup_args = None

    @property
    def shape(self) -> tuple[int, int]:
        return (self.num_embeddings, self.embedding_dim)

    @classmethod
    def from_quant(cls, embedding: QuantEmbedding) -> PackedEmbedding:
        weight = PackedWeight.from_quantizer(embedding.weight.detach(), embedding.weight_quantizer)
        meta = {
            "num_embeddings": embedding.num_embeddings,
            "embedding_dim": embedding.embedding_dim,
            "bits": weight.bits,
            "table_size": weight.table.numel(),
            "padding_idx": embedding.padding_idx,
            "max_norm": embedding.max_norm,
            "norm_type": embedding.norm_type,
        }
        packed = cls(meta).to(embedding.weight.device)
        packed.weight.load_state_dict(weight.state_dict())
        return packed

    @staticmethod
    def geometry_of(embedding: nn.Module) -> dict:
        """The sizes a float ``nn.Embedding`` must have to take this packed table."""
        if not isinstance(embedding, nn.Embedding):
            raise ValueError(f"a packed embedding replaces an nn.Embedding, found {type(embedding).__name__}")
        return {"num_embeddings": embedding.num_embeddings, "embedding_dim": embedding.embedding_dim}

    def meta(self) -> dict:
        return {
            "num_embeddings": self.num_embeddings,
            "embedding_dim": self.embedding_dim,
            "bits": self.weight.bits,
            "table_size": self.weight.table.numel(),
            "padding_idx": self.padding_idx,
            "max_norm": self.max_norm,
            "norm_type": self.norm_type,
        }

    def check_ids(self, ids: torch.Tensor) -> None:
        """A clear error for ids ``nn.Embedding`` would not take: not integers, or outside ``[0, num_embeddings)``."""
        if not isinstance(ids, torch.Tensor) or ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            what = ids.dtype if isinstance(ids, torch.Tensor) else type(ids).__name__
            raise ValueError(f"PackedEmbedding expects integer token ids, got {what}")
        if ids.numel():
            low, high = (int(v) for v in torch.aminmax(ids))
            if low < 0 or high >= self.num_embeddings:
                raise ValueError(
                    f"PackedEmbedding ids must lie in [0, {self.num_embeddings}), got ids from {low} to {high}"
                )

    def row_codes(self, rows: torch.Tensor) -> torch.Tensor:
        """The int64 codes ``(n, dim)`` of the 1-D ``rows``, read from the packed bytes (nothing else decoded)."""
        bits, data = self.weight.bits, self.weight.codes
        rows = rows.to(device=data.device, dtype=torch.int64)
        if self._whole_byte_rows():  # whole rows of whole bytes: gather, then split
            row_bytes = data.view(self.num_embeddings, -1)[rows]
            if bits == 8:
                return row_bytes.to(torch.int64)
            mask = 2**bits - 1
            parts = [(row_bytes >> shift) & mask for shift in range(0, 8, bits)]
            return torch.stack(parts, dim=-1).reshape(rows.numel(), self.embedding_dim).to(torch.int64)
        columns = torch.arange(self.embedding_dim, device=data.device, dtype=torch.int64)
        position = (rows[:, None] * self.embedding_dim + columns) * bits
        first = position >> 3
        second = torch.clamp(first + 1, max=data.numel() - 1)
        pair = data[first].to(torch.int64) | (data[second].to(torch.int64) << 8)
        return (pair >> (position & 7)) & (2**bits - 1)

    def rows(self, rows: torch.Tensor) -> torch.Tensor:
        """The table's rows ``(n, dim)``: ``table[codes] * scale[row]``, :meth:`PackedWeight.dequantize`'s
        arithmetic (so bit for bit its rows)."""
        scale = self.weight.scale
        rows = rows.to(device=scale.device, dtype=torch.int64)
        byte_levels = self._byte_levels(scale.dtype) if self._whole_byte_rows() else None
        if byte_levels is not None:  # each byte straight to the levels of its codes, one entry of a 256-entry table
            row_bytes = torch.index_select(self.weight.codes.view(self.num_embeddings, -1), 0, rows)
            levels = torch.index_select(byte_levels, 0, row_bytes.reshape(-1).to(torch.int64)).view(scale.dtype)
        else:
            codes = self.row_codes(rows).reshape(-1)
            levels = torch.index_select(self.weight.table.to(scale.dtype), 0, codes.to(scale.device))
        return levels.reshape(-1, self.embedding_dim) * torch.index_select(scale, 0, rows).reshape(-1, 1)

    def _whole_byte_rows(self) -> bool:
        bits = self.weight.bits
        return 8 % bits == 0 and self.embedding_dim * bits % 8 == 0

    def _byte_levels(self, dtype: torch.dtype) -> torch.Tensor | None:
        """``(256,)``: for each byte value, the levels (in ``dtype``) of the ``8 / bits`` codes it holds, lowest
        bits first, reinterpreted as one element of a wider dtype (one gather per byte, a fast 1-D one); ``None``
        when no dtype is that wide. Kept per dtype until the tensors change."""
        per_byte = 8 // self.weight.bits
        wide = _BY_SIZE.get(torch.empty((), dtype=dtype).element_size() * per_byte)
        if wide is None:
            return None
        cache = self._byte_levels_by_dtype
        if dtype not in cache:
            bits = self.weight.bits
            byte = torch.arange(256, device=self.weight.table.device)
            codes = torch.stack([(byte >> shift) & (2**bits - 1) for shift in range(0, 8, bits)], dim=1)
            table = self.weight.table.to(dtype)
            levels = table[codes.clamp_max(table.numel() - 1)]  # codes past the table never occur
            cache[dtype] = levels.contiguous().view(wide).reshape(256)
        return cache[dtype]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if current_kernel() == "onnx":
            return self._onnx_rows(ids)
        out = self._native_rows(ids) if self.max_norm is None else None
        if out is not None:
            return out.reshape(*ids.shape, self.embedding_dim)
        self.check_ids(ids)
        flat = ids.reshape(-1)
        if self.max_norm is None:
            out = self.rows(flat)
        else:  # nn.Embedding renormalises each looked-up row on its own: the same on a table of the used rows
            used, where = torch.unique(flat, return_inverse=True)
            out = F.embedding(where, self.rows(used), max_norm=self.max_norm, norm_type=self.norm_type)
        return out.reshape(*ids.shape, self.embedding_dim)

    def _native_rows(self, ids: torch.Tensor) -> torch.Tensor | None:
        """The rows of int64 CPU ``ids`` in one native pass (the same arithmetic as :meth:`rows`), or ``None`` where
        that does not apply (other ids or tables, no extension, inside ``torch.compile``, an id out of range: the
        Python path says why)."""
        if not (isinstance(ids, torch.Tensor) and ids.dtype == torch.int64 and ids.is_cpu):
            return None
        if torch.compiler.is_compiling() or current_kernel() not in ("auto", "native") or not extension.available():
            return None
        if self._native_lookup_args is None:  # built once per loaded (or moved) table
            scale = self.weight.scale
            usable = scale.is_cpu and scale.dtype == torch.float32 and self._whole_byte_rows()
            levels = self._byte_levels(torch.float32) if usable else None
            if levels is None:
                return None
            codes = self.weight.codes.view(self.num_embeddings, -1)
            self._native_lookup_args = (codes, levels.view(torch.float32).reshape(256, -1))
        return extension.embedding_rows(*self._native_lookup_args, self.weight.scale, ids)

    def _onnx_rows(self, ids: torch.Tensor) -> torch.Tensor:
        """The rows in ONNX's standard operators (the ``onnx`` kernel selection, which ONNX export traces): the
        same arithmetic as :meth:`rows`, so the same bits."""
        if self.max_norm is not None:
            raise ValueError("ONNX export of a PackedEmbedding with max_norm is not supported (its rows renormalise)")
        weight = self.weight
        codes = weight.code_tensor().to(torch.uint8)
        return embedding_rows(ids, EmbeddingPlan(codes, weight.table.cpu().float(), weight.scale.cpu().float()))

    def dequantize(self) -> torch.Tensor:
        """The whole float table (for inspection; lookups never build it)."""
        return self.rows(torch.arange(self.num_embeddings))

    def extra_repr(self) -> str:
        extra = "" if self.padding_idx is None else f", padding_idx={self.padding_idx}"
        extra += "" if self.max_norm is None else f", max_norm={self.max_norm}"
        return f"{self.num_embeddings}, {self.embedding_dim}, bits={self.weight.bits}{extra}"
