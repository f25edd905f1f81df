"""The Hadamard rotation of Linear inputs (``act.rotate``, an outlier remedy): the matrix, the float
identity it keeps, what it does to outlier channels at 4 bits, and its way through state, export and loading."""

import math

import pytest
import torch
from torch import nn

from asqpost import QATConfig, QuantizerConfig, calibrate, load_quantized, prepare_qat, quantized_state
from asqpost.export import convert_to_packed, link_inputs, load_packed, save_packed
from asqpost.rotation import hadamard, rotate_channels, rotation_block, walsh_hadamard
from tiny_bert import tiny_bert_config

pytestmark = pytest.mark.numerics


def _bert(outliers=False):
    transformers = pytest.importorskip("transformers")  # imported late: see tests/test_policy.py
    torch.manual_seed(0)
    model = transformers.BertModel(tiny_bert_config(transformers)).eval()
    if outliers:  # a few large channels in the inputs of layer 0's FFN, as in real encoders
        with torch.no_grad():
            model.encoder.layer[0].attention.output.LayerNorm.weight[:3] = 20.0
    return model


def _ids(seed, n=3, t=7):
    return torch.randint(0, 64, (n, t), generator=torch.Generator().manual_seed(seed))


def _tokens(model, ids):
    return model(input_ids=ids).last_hidden_state


@pytest.mark.parametrize("block", [2, 8, 128])
def test_hadamard_is_orthonormal_symmetric_and_its_own_inverse(block):
    h = hadamard(block, dtype=torch.float64)
    assert torch.equal(h, h.T)
    assert torch.equal(h.abs(), torch.full((block, block), 1 / math.sqrt(block), dtype=torch.float64))
    assert torch.allclose(h @ h, torch.eye(block, dtype=torch.float64), atol=1e-12)
    x = torch.randn(4, 5, 3 * block, dtype=torch.float64)
    rotated = rotate_channels(x, block)
    assert torch.allclose(rotate_channels(rotated, block), x, atol=1e-12)
    # block diagonal: each block of channels is rotated on its own
    assert torch.allclose(rotated[..., block : 2 * block], x[..., block : 2 * block] @ h, atol=1e-12)


def test_bad_blocks_are_refused():
    for bad in (0, 1, 3, 96, 2.0, True):
        with pytest.raises(ValueError, match="power of two"):
            QuantizerConfig("lsq", 4, rotate=bad)
    with pytest.raises(ValueError, match="in blocks of"):
        rotate_channels(torch.randn(2, 12), 8)
    with pytest.raises(ValueError, match="rotate is an activation setting"):
        QATConfig.recipe("post-asq", 4, weight={"rotate": 8})
    with pytest.raises(ValueError, match="Linear layers"):
        prepare_qat(nn.Sequential(nn.Conv2d(4, 4, 3)), QATConfig.recipe("lsq", 4, act={"rotate": 4}, first=None))


def test_block_is_the_largest_power_of_two_dividing_the_width():
    assert [rotation_block(c, 128) for c in (384, 1536, 32, 48, 7)] == [128, 128, 32, 16, 1]
    q = prepare_qat(nn.Sequential(nn.Linear(7, 12), nn.Linear(12, 3)), QATConfig.recipe("lsq", 4, act={"rotate": 8}))
    assert (q[0].rotate_block, q[1].rotate_block) == (None, 4)  # 7 inputs: no block, left as it is


def test_rotation_keeps_the_float_product_and_composes_with_smoothing():
    for act in ({"rotate": 128}, {"rotate": 16, "smooth": 0.5}):
        q = prepare_qat(_bert(outliers=True), QATConfig(None, QuantizerConfig("lsq", 8, **act), first=None, last=None))
        calibrate(q, [_ids(2)], forward=_tokens)
        for layer in (q.encoder.layer[0].intermediate.dense, q.encoder.layer[1].output.dense):
            tokens = torch.randn(2, 5, layer.in_features)
            with torch.no_grad():
                folded = nn.functional.linear(layer.folded_input(tokens), layer.folded_weight(), layer.bias)
                assert torch.allclose(folded, nn.functional.linear(tokens, layer.weight, layer.bias), atol=1e-5)
            assert layer.rotate_block == min(act["rotate"], layer.in_features)


def test_rotation_spreads_outlier_channels_at_4_bits():
    """With a few large channels, a 4-bit per-tensor input step leaves the rest near zero; rotated, the same
    step quantizes the input with less error."""
    x = _ids(2)
    errors = {}
    for name, act in (("plain", {}), ("rotated", {"rotate": 32})):
        cfg = QATConfig(None, QuantizerConfig("lsq", 4, **act), first=None, last=None)
        q = prepare_qat(_bert(outliers=True), cfg)
        calibrate(q, [x], forward=_tokens)
        layer = q.encoder.layer[0].intermediate.dense
        captured: dict = {}
        handle = layer.register_forward_pre_hook(lambda m, a, seen=captured: seen.setdefault("x", a[0]))
        with torch.no_grad():
            _tokens(q.eval(), _ids(3))
            handle.remove()
            xq = layer.quantized_input(captured["x"])
            if layer.rotate_block:
                xq = rotate_channels(xq, layer.rotate_block)  # back to the input's channels
            errors[name] = (xq - captured["x"]).pow(2).mean().item()
    assert errors["rotated"] < 0.5 * errors["plain"]


def test_rotation_survives_state_export_and_loading(tmp_path):
    cfg = QATConfig.recipe("post-asq", 4, act={"rotate": 16, "smooth": 0.5})
    q = prepare_qat(_bert(outliers=True), cfg)
    calibrate(q, [_ids(2)], forward=_tokens)
    q.eval()
    x = _ids(3)
    restored = load_quantized(_bert(outliers=True), quantized_state(q)).eval()
    with torch.no_grad():
        ref = _tokens(q, x)
        assert torch.equal(_tokens(restored, x), ref)
        packed = convert_to_packed(q)
        out = _tokens(packed, x)
    assert packed.encoder.layer[0].intermediate.dense.rotate == 16
    assert packed.encoder.layer[0].intermediate.dense.meta()["rotate"] == 16
    assert torch.allclose(out, ref, atol=1e-4 * ref.abs().max())
    save_packed(packed, tmp_path / "m.safetensors")
    with torch.no_grad():
        loaded = load_packed(tmp_path / "m.safetensors", model=_bert(outliers=True))
        assert torch.equal(_tokens(loaded, x), out)


def test_weight_gradient_flows_through_the_rotation():
    """The latent weight's gradient is the rotated-space gradient rotated back (R is symmetric and orthogonal)."""
    layer = prepare_qat(nn.Sequential(nn.Linear(16, 4)), QATConfig(None, QuantizerConfig("lsq", 8, rotate=8)))[0]
    layer.weight_quantizer = layer.input_quantizer = None  # float: only the rotation stands between
    x = torch.randn(5, 16)
    layer(x).square().sum().backward()
    reference = nn.Linear(16, 4)
    reference.load_state_dict(layer.to_float().state_dict())
    reference(x).square().sum().backward()
    assert torch.allclose(layer.weight.grad, reference.weight.grad, atol=1e-5)


def test_packed_q_k_v_rotate_their_common_input_once():
    q = prepare_qat(_bert(outliers=True), QATConfig.recipe("post-asq", 4, act={"rotate": 32}))
    calibrate(q, [_ids(2)], forward=_tokens)
    packed = convert_to_packed(q.eval())
    attention = packed.encoder.layer[0].attention.self
    folds = []
    for layer in (attention.query, attention.key, attention.value):
        fold = layer._fold
        layer._fold = lambda x, fold=fold: folds.append(x) or fold(x)
    x = _ids(3)
    with torch.no_grad():
        out = _tokens(packed, x)
        assert len(folds) == 1
        for layer in (attention.query, attention.key, attention.value):
            del layer._fold
        assert torch.equal(_tokens(packed, x), out)
    # a link between layers that fold their input differently is refused
    attention.key.rotate = 16
    with pytest.raises(ValueError, match="rotate"):
        link_inputs(packed, [[f"encoder.layer.0.attention.self.{n}" for n in ("query", "key")]])


@pytest.mark.parametrize("block", [2, 16, 128])
def test_native_rotation_gives_the_same_bits(block):
    from asqpost.kernels import extension as native

    if not native.available():
        pytest.skip("the native extension cannot be built here")
    x = torch.randn(3, 5, 3 * block) * torch.logspace(-3, 3, 3 * block)
    ours = native.hadamard_rows(x, block)
    assert torch.equal(ours, walsh_hadamard(x, block))
    exact = x.double() @ torch.block_diag(*[hadamard(block, dtype=torch.float64)] * 3)
    assert torch.allclose(ours.double(), exact, rtol=0, atol=1e-6 * x.abs().max().item())
    assert torch.equal(native.hadamard_rows(x[:, 1], block), walsh_hadamard(x[:, 1], block))  # a strided view


def test_rotation_gradient_is_the_rotated_gradient():
    x = torch.randn(2, 3, 16, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: rotate_channels(t, 8), (x,))
    x32 = x.detach().float().requires_grad_()
    grad = torch.randn(2, 3, 16)
    rotate_channels(x32, 8).backward(grad)
    assert torch.equal(x32.grad, walsh_hadamard(grad, 8))


def test_without_the_native_pass_the_packed_model_gives_the_same_bits(monkeypatch):
    """The torch transform and the native one-pass rotation agree bit for bit, so whether the packed layers
    rotate natively (kernel selection auto) or in torch (reference) changes nothing but speed."""
    from asqpost.kernels import use_kernel

    q = prepare_qat(_bert(outliers=True), QATConfig.recipe("post-asq", 4, act={"rotate": 32}))
    calibrate(q, [_ids(2)], forward=_tokens)
    packed = convert_to_packed(q.eval())
    x = _ids(3)
    with torch.no_grad():
        fake, out = _tokens(q, x), _tokens(packed, x)
        with use_kernel("reference"):
            assert torch.equal(_tokens(q, x), fake)
            assert torch.equal(_tokens(packed, x), out)
