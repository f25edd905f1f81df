"""Packed embeddings: rows gathered from b-bit codes equal the fake-quant table bit for bit;
a tiny random BERT with quantized embeddings round-trips through the export file at its bits per row."""

import json
import math

import pytest
import safetensors.torch
import torch
from torch import nn

from asqpost import QATConfig, QuantEmbedding, QuantizerConfig, calibrate, prepare_qat
from asqpost.export import (
    ExportError,
    PackedEmbedding,
    PackedWeight,
    convert_to_packed,
    load_packed,
    pack_codes,
    read_export,
    save_packed,
    unpack_codes,
)
from asqpost.kernels import extension as native
from asqpost.text import SentenceEncoder
from test_export import _rewrite_meta
from tiny_bert import VOCAB, tiny_bert_config

pytestmark = pytest.mark.numerics

WORD = "auto_model.embeddings.word_embeddings"


def _quant_embedding(method, bits, dim, rows=50, **options):
    torch.manual_seed(bits * 100 + dim)
    return QuantEmbedding.from_float(nn.Embedding(rows, dim, **options), QuantizerConfig(method, bits)).eval()


@pytest.mark.parametrize(
    ("method", "bits", "dim"),
    [("lsq", 8, 16), ("lsq", 4, 16), ("lsq", 3, 7), ("post", 4, 16), ("post", 3, 7), ("apot", 5, 9)],
)
def test_packed_rows_equal_the_fake_quant_table_bit_for_bit(method, bits, dim):
    quant = _quant_embedding(method, bits, dim, padding_idx=2)
    packed = PackedEmbedding.from_quant(quant)
    assert (packed.num_embeddings, packed.embedding_dim, packed.padding_idx) == (50, dim, 2)
    assert packed.weight.codes.numel() == math.ceil(50 * dim * bits / 8)
    ids = torch.randint(0, 50, (3, 4, 5), generator=torch.Generator().manual_seed(bits))
    with torch.no_grad():
        table = quant.quantized_weight()
        out = packed(ids)
        assert out.shape == (3, 4, 5, dim) and out.dtype == torch.float32
        assert torch.equal(out, quant(ids))
        assert torch.equal(packed(torch.arange(50)), table)  # every row, the last (byte-clamped) one included
        assert torch.equal(packed.dequantize(), packed.weight.dequantize())
        assert torch.equal(packed(ids.to(torch.int32)), out)
        assert packed(torch.zeros(0, 3, dtype=torch.long)).shape == (0, 3, dim)


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("dim", [1, 3, 8, 13])
def test_row_codes_read_straight_from_the_packed_bytes(bits, dim):
    rows = 11
    codes = torch.randint(0, 2**bits, (rows, dim), generator=torch.Generator().manual_seed(bits * dim))
    packed = PackedEmbedding(
        {"num_embeddings": rows, "embedding_dim": dim, "bits": bits, "table_size": 2**bits, "padding_idx": None}
    )
    packed.weight.codes.copy_(pack_codes(codes, bits))
    wanted = torch.tensor([rows - 1, 0, 5, 5, rows - 1])
    got = packed.row_codes(wanted)
    assert got.dtype == torch.int64 and torch.equal(got, codes[wanted])
    assert torch.equal(unpack_codes(packed.weight.codes, bits, rows * dim).reshape(rows, dim), codes)
    packed.weight.table.copy_(torch.randn(2**bits, dtype=torch.float64))
    packed.weight.scale.copy_(torch.rand(rows) + 0.5)
    table = packed.weight.table.float()[codes] * packed.weight.scale[:, None]  # every lookup path: these rows
    assert torch.equal(packed.rows(wanted), table[wanted])


@pytest.mark.skipif(not native.available(), reason="native LUT kernel could not be built here")
@pytest.mark.parametrize(("method", "bits", "dim"), [("lsq", 8, 5), ("lsq", 4, 16), ("post", 4, 6), ("lsq", 2, 8)])
def test_int64_ids_take_the_native_lookup_with_the_same_rows(method, bits, dim, monkeypatch):
    packed = PackedEmbedding.from_quant(_quant_embedding(method, bits, dim))
    ids = torch.randint(0, 50, (4, 9), generator=torch.Generator().manual_seed(bits))
    expected = packed.rows(ids.reshape(-1)).reshape(4, 9, dim)  # the torch lookup
    calls = []
    lookup = native.embedding_rows
    monkeypatch.setattr(native, "embedding_rows", lambda *args: calls.append(1) or lookup(*args))
    assert torch.equal(packed(ids), expected) and calls == [1]
    levels = packed._byte_levels(torch.float32).view(torch.float32).reshape(256, -1)
    codes = packed.weight.codes.view(50, -1)
    assert native.embedding_rows(codes, levels, packed.weight.scale, torch.tensor([50])) is None, "out of range"


def test_lookups_decode_no_table(monkeypatch):
    packed = PackedEmbedding.from_quant(_quant_embedding("lsq", 4, 16))
    expected = packed.weight.dequantize()[torch.tensor([[1, 7], [49, 0]])].clone()

    def refuse(*args, **kwargs):
        raise AssertionError("a lookup decoded the whole table")

    monkeypatch.setattr(PackedWeight, "code_tensor", refuse)
    monkeypatch.setattr(PackedWeight, "dequantize", refuse)
    assert torch.equal(packed(torch.tensor([[1, 7], [49, 0]])), expected)
    cached = packed._byte_levels_by_dtype  # only the levels of each byte value: 256 x 2 float32 at 4 bits
    assert list(cached) == [torch.float32] and cached[torch.float32].numel() == 256
    if packed._native_lookup_args is not None:  # the native lookup: a view of the codes and those levels
        codes, levels = packed._native_lookup_args
        assert codes.data_ptr() == packed.weight.codes.data_ptr() and levels.numel() == 256 * 2


def test_max_norm_renormalises_the_looked_up_rows_as_nn_embedding_does():
    quant = _quant_embedding("lsq", 4, 16, max_norm=1.5)
    packed = PackedEmbedding.from_quant(quant)
    ids = torch.tensor([[3, 9, 3], [0, 49, 9]])
    with torch.no_grad():
        expected = quant(ids)
        assert (expected.norm(dim=-1) <= 1.5 + 1e-5).all()
        assert torch.equal(packed(ids), expected)
        assert torch.equal(packed(ids), expected)  # the stored codes are not renormalised


def test_bad_ids_are_refused():
    packed = PackedEmbedding.from_quant(_quant_embedding("lsq", 4, 8))
    for ids, message in [
        (torch.tensor([0, 50]), r"\[0, 50\).*to 50"),
        (torch.tensor([-1, 3]), r"\[0, 50\).*from -1"),
        (torch.tensor([1.0, 2.0]), "integer token ids.*float32"),
        (torch.tensor([True]), "integer token ids.*bool"),
        ([1, 2], "integer token ids.*list"),
    ]:
        with pytest.raises(ValueError, match=message):
            packed(ids)


def _bert():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = tiny_bert_config(transformers)
    return SentenceEncoder(transformers.BertModel(config, add_pooling_layer=False).eval())  # as load_packed builds


def _ids(seed=1):
    return torch.randint(0, VOCAB, (3, 7), generator=torch.Generator().manual_seed(seed))


def _calibrated(embeddings):
    q = prepare_qat(_bert(), QATConfig.recipe("lsq-lsq", 4, embeddings=embeddings))
    calibrate(q, [{"input_ids": _ids()}])
    return q.eval()


def _tensor_bytes(tensors, prefix=""):
    return sum(t.numel() * t.element_size() for name, t in tensors.items() if name.startswith(prefix))


@pytest.mark.parametrize("embeddings", [8, 4, {"method": "post", "bits": 3}])
def test_tiny_bert_round_trips_with_packed_embeddings(embeddings, tmp_path):
    q = _calibrated(embeddings)
    packed = convert_to_packed(q)
    names = ["word_embeddings", "position_embeddings", "token_type_embeddings"]
    modules = [packed.auto_model.embeddings.get_submodule(name) for name in names]
    assert all(isinstance(m, PackedEmbedding) for m in modules)
    x = _ids(seed=4)
    with torch.no_grad():
        ref, out = q(input_ids=x), packed(input_ids=x)
    assert torch.allclose(out, ref, atol=1e-4 * ref.abs().max())
    single_sum = convert_to_packed(q, single_sum=True).auto_model.embeddings.word_embeddings  # lookups stay exact
    assert torch.equal(single_sum.dequantize(), modules[0].dequantize())
    path = tmp_path / "m.safetensors"
    save_packed(packed, path)
    loaded = load_packed(path)  # no model=: the file records the transformers config
    assert isinstance(loaded.auto_model.embeddings.word_embeddings, PackedEmbedding)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=x), out)
    meta, tensors = read_export(path)
    bits = embeddings if isinstance(embeddings, int) else embeddings["bits"]
    expected = 0
    for short, module in zip(names, modules, strict=True):
        rows, dim = module.num_embeddings, module.embedding_dim
        name = f"auto_model.embeddings.{short}"
        assert meta["embeddings"][name] == module.meta()
        assert meta["embeddings"][name]["bits"] == bits
        table = module.weight.table.numel() * 8
        assert _tensor_bytes(tensors, name + ".") == math.ceil(rows * dim * bits / 8) + table + rows * 4
        expected += rows * dim * 4 - _tensor_bytes(tensors, name + ".")
    # against the same model exported with float embeddings: exactly the tables' float bytes less the packed ones
    float_path = tmp_path / "float.safetensors"
    save_packed(convert_to_packed(_calibrated(None)), float_path)
    float_tensors = read_export(float_path)[1]
    assert _tensor_bytes(float_tensors) - _tensor_bytes(tensors) == expected > 0
    assert path.stat().st_size < float_path.stat().st_size


@pytest.fixture(scope="module")
def bert_export(tmp_path_factory):
    path = tmp_path_factory.mktemp("embed") / "m.safetensors"
    save_packed(convert_to_packed(_calibrated(4)), path)
    return path


@pytest.fixture
def export_copy(bert_export, tmp_path):
    path = tmp_path / "m.safetensors"
    path.write_bytes(bert_export.read_bytes())
    return path


def test_a_flipped_code_byte_is_caught(export_copy):
    raw = export_copy.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    start, _ = json.loads(raw[8 : 8 + n])[f"{WORD}.weight.codes"]["data_offsets"]
    at = 8 + n + start + 5
    export_copy.write_bytes(raw[:at] + bytes([raw[at] ^ 0x10]) + raw[at + 1 :])
    with pytest.raises(ExportError, match="checksum"):
        load_packed(export_copy)


def test_embedding_metadata_edits_are_caught(export_copy):
    _rewrite_meta(export_copy, lambda m: m["embeddings"][WORD].update(bits=8), reseal=False)
    with pytest.raises(ExportError, match="checksum"):
        load_packed(export_copy)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: m["embeddings"][WORD].update(num_embeddings=VOCAB + 1), "embedding.*fit the model.*65"),
        (lambda m: m["embeddings"].update({"auto_model.encoder": m["embeddings"][WORD]}), "nn.Embedding"),
        (lambda m: m["embeddings"].update({"auto_model.nothing": m["embeddings"][WORD]}), "embedding.*fit"),
        (lambda m: m["embeddings"][WORD].update(bits=2), "embedding.*fit"),  # 16 levels do not fit 2 bits
        (lambda m: m["embeddings"][WORD].update(bits=8), "tensor.*codes"),  # codes of another size
        (lambda m: m.update(embeddings=[]), "mapping"),
    ],
)
def test_embedding_metadata_that_does_not_fit_is_refused(export_copy, edit, message):
    _rewrite_meta(export_copy, edit)
    with pytest.raises(ExportError, match=message):
        load_packed(export_copy)


def test_a_float_architecture_of_other_sizes_is_refused(bert_export):
    transformers = pytest.importorskip("transformers")
    config = tiny_bert_config(transformers)
    config.vocab_size = VOCAB + 8
    with pytest.raises(ExportError, match=r"embedding.*72"):
        load_packed(bert_export, model=SentenceEncoder(transformers.BertModel(config, add_pooling_layer=False)))


def test_exports_without_packed_embeddings_still_load(tmp_path):
    """Files written before packed embeddings hold the quantized tables as float nn.Embedding weights (what
    convert_to_packed made of a QuantEmbedding then: its ``to_dequantized()``)."""
    q = _calibrated(4)
    packed = convert_to_packed(q)
    for name, module in list(q.named_modules()):
        if isinstance(module, QuantEmbedding):
            parent, _, child = name.rpartition(".")
            setattr(packed.get_submodule(parent), child, module.to_dequantized())
    path = tmp_path / "old.safetensors"
    save_packed(packed, path)
    _rewrite_meta(path, lambda m: m.pop("embeddings"))
    loaded = load_packed(path)
    assert type(loaded.auto_model.embeddings.word_embeddings) is nn.Embedding
    x = _ids(seed=4)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=x), packed(input_ids=x))
        assert torch.equal(loaded(input_ids=x), convert_to_packed(q)(input_ids=x))
    assert safetensors.torch.load_file(path)[f"{WORD}.weight"].dtype == torch.float32


@pytest.mark.cuda
@pytest.mark.parametrize(("bits", "dim"), [(4, 16), (3, 7), (8, 5)])
def test_packed_rows_on_cuda_equal_the_fake_quant_table(bits, dim):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    quant = _quant_embedding("lsq", bits, dim).cuda()
    packed = PackedEmbedding.from_quant(quant)
    assert packed.weight.codes.is_cuda
    ids = torch.randint(0, 50, (4, 9), device="cuda")
    with torch.no_grad():
        out = packed(ids)
        assert out.is_cuda and torch.equal(out, quant(ids))
        assert torch.equal(out.cpu(), packed.cpu()(ids.cpu()))
