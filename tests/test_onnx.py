"""ONNX export: the integer graph that ONNX Runtime runs, against asqpost's packed model.

The sessions are built as :class:`~asqpost.export.OnnxRuntimeModel` builds them (:func:`session_options`), so
the integer sums are exact on every CPU, 8-bit first and last layers included, and outputs are compared to float
rounding everywhere.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from asqpost import QATConfig, calibrate, prepare_qat
from asqpost.export import (
    ExportError,
    OnnxRuntimeModel,
    convert_to_packed,
    read_onnx_metadata,
    session_options,
    to_onnx,
)
from asqpost.kernels import onnx_graph, use_kernel
from tiny_bert import VOCAB, tiny_bert_config

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), session_options(1), providers=["CPUExecutionProvider"])


def _ort_codes(path: Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """The uint8 activation codes of every integer product, in graph order (the graph's inputs to each
    ``MatMulInteger`` / ``ConvInteger``, added as outputs)."""
    model = onnx.load(str(path))
    names = list(dict.fromkeys(n.input[0] for n in model.graph.node if n.op_type in ("MatMulInteger", "ConvInteger")))
    for name in names:
        model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.UINT8, None))
    session = ort.InferenceSession(model.SerializeToString(), session_options(), providers=["CPUExecutionProvider"])
    return session.run(names, feeds)


def _torch_codes(model: nn.Module, monkeypatch, *args, **kwargs) -> list[np.ndarray]:
    """The activation codes the ``onnx`` kernel selection computes in torch, layer by layer."""
    seen = []
    forward = onnx_graph._IntegerSum.forward

    def recording(ctx, x_u8, plan):
        seen.append(x_u8.numpy().copy())
        return forward(ctx, x_u8, plan)

    monkeypatch.setattr(onnx_graph._IntegerSum, "forward", staticmethod(recording))
    with torch.no_grad(), use_kernel("onnx"):
        model(*args, **kwargs)
    return seen


def _two_layers(kind: str, recipe: str, bits: int = 4, **fields) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    if kind == "conv":
        model = nn.Sequential(nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1))
        x = torch.randn(4, 6, 9, 9)  # signed input: codes shifted by the zero point, padding at the zero point
    else:
        model = nn.Sequential(nn.Linear(24, 32), nn.ReLU(), nn.Linear(32, 16))
        x = torch.randn(4, 5, 24)
    q = prepare_qat(model, QATConfig.recipe(recipe, bits, first=None, last=None, **fields)).eval()
    calibrate(q, [x])
    return convert_to_packed(q), x


@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("recipe", ["lsq-lsq", "post-asq", "post-lsq", "apot-asq"])
def test_layer_codes_and_outputs_match_onnxruntime(kind, recipe, tmp_path, monkeypatch):
    packed, x = _two_layers(kind, recipe)
    path = tmp_path / "m.onnx"
    info = to_onnx(packed, path, x[:2])
    assert (info.integer_layers, info.float_layers) == (2, 0)
    nodes = onnx.load(str(path)).graph.node
    products = [n for n in nodes if n.op_type in ("MatMulInteger", "ConvInteger")]
    assert {n.op_type for n in products} == {"ConvInteger" if kind == "conv" else "MatMulInteger"}
    assert len(products) == (4 if recipe.startswith("post") else 2)  # POST's exact grid: even and odd sums
    float_products = [n.name for n in nodes if n.op_type in ("MatMul", "Gemm", "Conv", "DequantizeLinear")]
    assert all("/adapter/" in name for name in float_products)  # only the ASQ adapters compute in float
    got = _session(path).run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        expected = packed(x)
    ort_codes, torch_codes = _ort_codes(path, {"input": x.numpy()}), _torch_codes(packed, monkeypatch, x)
    assert len(ort_codes) == len(torch_codes) == 2
    for a, b in zip(ort_codes, torch_codes, strict=True):
        assert a.shape == b.shape and (a == b).mean() >= 0.9999
    torch.testing.assert_close(torch.from_numpy(got), expected, atol=2e-6 * expected.abs().max().item(), rtol=0)


def test_the_onnx_selection_computes_the_packed_model_in_torch():
    """The traced path, run in torch, is the packed model to float32 rounding: what the graph encodes."""
    for kind, recipe in [("linear", "post-asq"), ("conv", "post-asq"), ("conv", "lsq-lsq")]:
        packed, x = _two_layers(kind, recipe)
        with torch.no_grad():
            expected = packed(x)
            with use_kernel("onnx"):
                got = packed(x)
        torch.testing.assert_close(got, expected, atol=2e-6 * expected.abs().max().item(), rtol=0)


def test_layers_without_an_integer_form_run_decoded_float_weights(tmp_path):
    packed, x = _two_layers("linear", "post-lsq", bits=5)  # 5-bit POST levels span more than int8
    path = tmp_path / "m.onnx"
    info = to_onnx(packed, path, x[:2])
    assert (info.integer_layers, info.float_layers) == (0, 2)
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert "MatMulInteger" not in ops and "Gather" in ops and "MatMul" in ops
    with torch.no_grad():
        expected = packed(x)
    got = torch.from_numpy(_session(path).run(None, {"input": x.numpy()})[0])
    torch.testing.assert_close(got, expected, atol=1e-5 * expected.abs().max().item(), rtol=0)


def test_weight_codes_are_stored_as_uint4(tmp_path):
    packed, x = _two_layers("linear", "lsq-lsq")
    path = tmp_path / "m.onnx"
    to_onnx(packed, path, x[:2])
    constants = [n.attribute[0].t for n in onnx.load(str(path)).graph.node if n.op_type == "Constant"]
    uint4 = [t for t in constants if t.data_type == onnx.TensorProto.UINT4]
    assert sorted(tuple(t.dims) for t in uint4) == [(24, 32), (32, 16)]  # (K, C_out): the MatMulInteger layout
    assert [len(t.raw_data) for t in uint4] == [24 * 32 // 2, 32 * 16 // 2]
    int8 = [t for t in constants if t.data_type == onnx.TensorProto.INT8]
    assert all(int(np.prod(t.dims)) <= 256 for t in int8)  # level tables only: no decoded weights in the file


def _resnet(recipe: str):
    from asqpost.models import create_model

    torch.manual_seed(0)
    model = create_model("resnet20", 10, (1, 16, 16))
    q = prepare_qat(model, QATConfig.recipe(recipe, 4)).eval()
    calibrate(q, [torch.randn(32, 1, 16, 16)])
    return convert_to_packed(q)


@pytest.mark.parametrize("recipe", ["post-asq", "lsq-lsq"])
def test_resnet20_predicts_the_same_classes_in_onnxruntime(recipe, tmp_path):
    packed = _resnet(recipe)
    path = tmp_path / "r20.onnx"
    info = to_onnx(packed, path, torch.randn(2, 1, 16, 16), model_spec={"name": "resnet20"})
    assert (info.integer_layers, info.float_layers) == (22, 0)
    x = torch.randn(128, 1, 16, 16, generator=torch.Generator().manual_seed(5))  # another batch size: dynamic
    got = torch.from_numpy(_session(path).run(None, {"input": x.numpy()})[0])
    with torch.no_grad():
        expected = packed(x)
    assert (got.argmax(1) == expected.argmax(1)).float().mean() >= 0.99
    torch.testing.assert_close(got, expected, atol=1e-5 * expected.abs().max().item(), rtol=0)


def _encoder(recipe: str, **fields):
    transformers = pytest.importorskip("transformers")
    from asqpost.text import SentenceEncoder

    torch.manual_seed(0)
    bert = transformers.BertModel(tiny_bert_config(transformers), add_pooling_layer=False).eval()
    config = QATConfig.recipe(recipe, 4, embeddings=4, **fields)
    q = prepare_qat(SentenceEncoder(bert, normalize=True), config).eval()
    calibrate(q, [_tokens(4, 9, seed=1)])
    return convert_to_packed(q)


def _tokens(batch: int, length: int, seed: int, padded: bool = True) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    for row in range(batch if padded else 0):
        mask[row, int(torch.randint(1, length + 1, (1,), generator=g)) :] = 0
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize(("recipe", "padded_example"), [("post-asq", True), ("lsq-lsq", False)])
def test_tiny_bert_runs_at_any_batch_and_length_with_its_mask(recipe, padded_example, tmp_path):
    packed = _encoder(recipe)
    path = tmp_path / "bert.onnx"
    info = to_onnx(packed, path, _tokens(2, 5, seed=2, padded=padded_example))  # unpadded: padded for the trace
    assert info.inputs == ("input_ids", "attention_mask") and info.float_layers == 0
    model = OnnxRuntimeModel(path, threads=1)
    assert model.meta["model"]["hf_config"]["num_hidden_layers"] == 2
    for batch, length in [(1, 3), (3, 11), (5, 17)]:
        tokens = _tokens(batch, length, seed=10 + batch)
        with torch.no_grad():
            expected = packed(**tokens)
        got = model(**tokens)
        assert got.shape == expected.shape
        assert torch.nn.functional.cosine_similarity(got, expected).min() >= 0.9999
    graph = onnx.load(str(path)).graph
    codes = {n.name.split("/")[-2]: n.attribute[0].t for n in graph.node if n.name.endswith("_embeddings/Constant")}
    assert {name: tuple(t.dims) for name, t in codes.items()} == {
        "word_embeddings": (VOCAB, 32),
        "position_embeddings": (64, 32),
        "token_type_embeddings": (2, 32),
    }
    assert all(t.data_type == onnx.TensorProto.UINT4 for t in codes.values())  # 4-bit rows, two per byte


def test_constants_are_stored_once_and_linked_layers_share_their_codes(tmp_path):
    """Equal constants are stored once and intermediate values get short names, so ONNX Runtime's
    common-subexpression pass computes the codes of Q, K and V (one linked quantizer) once per block."""
    packed = _encoder("post-asq")
    path = tmp_path / "bert.onnx"
    to_onnx(packed, path, _tokens(2, 5, seed=2))
    graph = onnx.load(str(path)).graph
    tensors = [n.attribute[0].t for n in graph.node if n.op_type == "Constant"] + list(graph.initializer)
    contents = [(t.data_type, tuple(t.dims), t.raw_data or onnx.numpy_helper.to_array(t).tobytes()) for t in tensors]
    assert len(set(contents)) == len(contents)
    io = {v.name for v in [*graph.input, *graph.output]}
    assert all(re.fullmatch(r"v\d+", o) for n in graph.node for o in n.output if o not in io)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    optimized = onnx.load(str(tmp_path / "optimized.onnx")).graph
    ops = [n.op_type for n in optimized.node]
    blocks = 2  # per block: one code tensor for Q / K / V, one each for the attention output and the two FFN layers
    assert ops.count("QuantizeLinear") == 4 * blocks
    assert ops.count("MatMulInteger") == sum(n.op_type == "MatMulInteger" for n in graph.node) > 6 * blocks


@pytest.mark.parametrize("act", [{"rotate": 32}, {"smooth": 0.5, "per_token": True}])
def test_rotated_smoothed_and_per_token_inputs_export(act, tmp_path):
    """Hadamard rotations and SmoothQuant factors are folded into the graph as in the packed layer; per-token
    ASQ steps are computed per row of the sequence."""
    packed = _encoder("post-asq", act_bits=4, act=act)
    to_onnx(packed, tmp_path / "m.onnx", _tokens(2, 6, seed=3))
    tokens = _tokens(3, 13, seed=4)
    with torch.no_grad():
        expected = packed(**tokens)
    got = OnnxRuntimeModel(tmp_path / "m.onnx")(**tokens)
    assert torch.nn.functional.cosine_similarity(got, expected).min() >= 0.9999


def test_what_the_graph_cannot_express_is_refused_by_name(tmp_path):
    with pytest.raises(ValueError, match="no packed or quantized layers"):
        to_onnx(nn.Sequential(nn.Linear(4, 4)), tmp_path / "m.onnx", torch.randn(2, 4))
    model = nn.Sequential(nn.Embedding(10, 8, max_norm=1.0), nn.Linear(8, 8))
    q = prepare_qat(model, QATConfig.recipe("lsq-lsq", 4, first=None, last=None, embeddings=4)).eval()
    ids = torch.randint(0, 10, (2, 3))
    calibrate(q, [ids])
    with pytest.raises(ValueError, match=r"embedding '0' renormalises its rows \(max_norm\)"):
        to_onnx(q, tmp_path / "m.onnx", ids)
    packed, _ = _two_layers("linear", "lsq-lsq")
    with pytest.raises(ValueError, match="sequence or a mapping of tensors"):
        to_onnx(packed, tmp_path / "m.onnx", 3)
    assert not (tmp_path / "m.onnx").exists()


def test_a_failed_export_leaves_the_previous_file(tmp_path, monkeypatch):
    packed, x = _two_layers("linear", "lsq-lsq")
    path = tmp_path / "m.onnx"
    to_onnx(packed, path, x[:2])
    before = path.read_bytes()

    def broken(proto):
        raise onnx.checker.ValidationError("checker says no")

    monkeypatch.setattr(onnx.checker, "check_model", broken)
    with pytest.raises(onnx.checker.ValidationError):
        to_onnx(_two_layers("linear", "post-asq")[0], path, x[:2])
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["m.onnx"]


def test_corrupt_edited_and_foreign_files_are_refused(tmp_path):
    packed, x = _two_layers("linear", "lsq-lsq")
    path = tmp_path / "m.onnx"
    to_onnx(packed, path, x[:2], normalizer={"mean": [0.5], "std": [0.25]})
    meta, _ = read_onnx_metadata(path)
    assert meta["format"] == "asqpost-onnx" and meta["normalizer"] == {"mean": [0.5], "std": [0.25]}
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(path.read_bytes()[:-200])
    with pytest.raises(ExportError, match=r"truncated or corrupt|checksum"):
        read_onnx_metadata(truncated)
    proto = onnx.load(str(path))
    bias = next(n for n in proto.graph.node if n.op_type == "Constant" and n.attribute[0].t.data_type == 1)
    bias.attribute[0].t.raw_data = bytes(len(bias.attribute[0].t.raw_data))
    onnx.save(proto, str(tmp_path / "edited.onnx"))
    with pytest.raises(ExportError, match="does not match the recorded checksum"):
        OnnxRuntimeModel(tmp_path / "edited.onnx")
    del proto.metadata_props[:]
    onnx.save(proto, str(tmp_path / "foreign.onnx"))
    with pytest.raises(ExportError, match="not a readable asqpost ONNX export"):
        read_onnx_metadata(tmp_path / "foreign.onnx")
    with pytest.raises(ExportError, match="does not exist"):
        read_onnx_metadata(tmp_path / "missing.onnx")
    model = OnnxRuntimeModel(path)
    with pytest.raises(ValueError, match=r"inputs are \['input'\]; missing \[\], not in the graph \['mask'\]"):
        model(x, mask=x)
    assert torch.equal(model(x), model(input=x))


def test_cli_exports_onnx_and_runs_it_like_the_safetensors_file(tmp_path, capsys):
    from asqpost.cli import main
    from asqpost.runconfig import RunConfig
    from asqpost.train.run import fit

    config = {"data": "synthetic", "model": "smallcnn", "model_args": {"width": 8}, "batch_size": 64}
    quant = {"recipe": "post-asq", "bits": 4}
    fit(RunConfig(**config, epochs=1, lr=0.05, progress=False, threads=1, quant=quant), tmp_path / "run")
    checkpoint = str(tmp_path / "run" / "checkpoint.pt")
    assert main(["export", checkpoint, str(tmp_path / "m.onnx")]) == 0
    assert main(["export", checkpoint, str(tmp_path / "m.bin"), "--format", "onnx"]) == 0
    assert main(["export", checkpoint, str(tmp_path / "m.safetensors")]) == 0
    assert "ONNX, inputs input;" in capsys.readouterr().out
    meta, _ = read_onnx_metadata(tmp_path / "m.bin")
    assert meta["model"]["input_shape"] == [1, 16, 16] and meta["normalizer"] is not None
    results = []
    for name in ("m.onnx", "m.safetensors"):
        assert main(["run", str(tmp_path / name), "--data", "synthetic", "--json"]) == 0
        results.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1]))
    assert results[0]["samples"] == results[1]["samples"] > 0
    assert abs(results[0]["accuracy"] - results[1]["accuracy"]) <= 2 / results[0]["samples"]
    assert main(["run", str(tmp_path / "m.onnx"), "--data", "synthetic"]) == 0
    assert capsys.readouterr().out.strip().endswith("(ONNX Runtime)")
    assert main(["run", str(tmp_path / "m.onnx"), "--data", "synthetic", "--kernels"]) == 2
    assert "ONNX Runtime" in capsys.readouterr().err


def test_sessions_multiply_exactly_where_the_fast_kernel_saturates():
    """uint8 255 x int8 127 summed over 64 terms: 2,072,640 exactly. On x86 without VNNI ONNX Runtime's default
    kernel adds product pairs in 16 bits and gets 32 x 32767; the asqpost session options sum exactly."""
    from asqpost.export import u8s8_saturates

    helper = onnx.helper
    weights = onnx.numpy_helper.from_array(np.full((64, 1), 127, dtype=np.int8), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["x", "w"], ["y"])],
        "product",
        [helper.make_tensor_value_info("x", onnx.TensorProto.UINT8, [1, 64])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.INT32, [1, 1])],
        [weights],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]).SerializeToString()
    x = {"x": np.full((1, 64), 255, dtype=np.uint8)}
    exact = ort.InferenceSession(model, session_options(1), providers=["CPUExecutionProvider"])
    assert int(exact.run(None, x)[0][0, 0]) == 255 * 127 * 64
    plain = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    expected = 32 * 32767 if u8s8_saturates() else 255 * 127 * 64
    assert int(plain.run(None, x)[0][0, 0]) == expected
    with pytest.raises(ValueError, match="threads must be at least 1"):
        session_options(0)
