"""The transformer layer policy on a tiny random BERT: first/last/unused layers, dotted
patterns and exclusion, Q/K/V sharing one input quantizer, recipes with activation bits and ASQ fields,
quantized embeddings, SmoothQuant factors and the ASQ adapter's size."""

import io

import pytest
import torch
from torch import nn

from asqpost import (
    QATConfig,
    QuantEmbedding,
    QuantizerConfig,
    QuantLinear,
    StepAdapter,
    calibrate,
    load_quantized,
    pattern_matches,
    plan_layers,
    prepare_qat,
    quantized_state,
    resolve_layer_specs,
)
from asqpost.export import PackedEmbedding, convert_to_packed, link_inputs, load_packed, save_packed
from asqpost.runconfig import load_run_config
from asqpost.size import adapter_parameters, model_size_bytes
from tiny_bert import tiny_bert_config

pytestmark = pytest.mark.numerics

QKV0 = tuple(f"encoder.layer.0.attention.self.{n}" for n in ("query", "key", "value"))
LAST = "encoder.layer.1.output.dense"


def _bert():
    # imported here, not at collection: transformers loads triton, which must first see TRITON_INTERPRET
    # (set when tests/test_triton_kernel.py is collected)
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = tiny_bert_config(transformers)
    return transformers.BertModel(config).eval()


def _batch(n=3, t=7, seed=1):
    """Token ids (no padding: masks are another test's subject)."""
    return torch.randint(0, 64, (n, t), generator=torch.Generator().manual_seed(seed))


def _tokens(model, ids):
    """A sentence encoder's forward: the token embeddings (mean pooling reads only these)."""
    return model(input_ids=ids).last_hidden_state


def _calibrated(config, seed=1, **prepare):
    q = prepare_qat(_bert(), config, **prepare)
    calibrate(q, [_batch(seed=seed)], forward=_tokens)
    return q.eval()


def test_plan_from_names_and_from_a_probe():
    model = _bert()
    by_names = plan_layers(model, QATConfig.recipe("post-asq", 4))
    assert by_names.first == QKV0 and by_names.last == (LAST,) and by_names.unused == ("pooler.dense",)
    assert len(by_names.shared) == 2 and by_names.shared[0] == QKV0
    probed = plan_layers(model, QATConfig.recipe("post-asq", 4), example_inputs=_batch(), forward=_tokens)
    assert probed.probed and (probed.first, probed.last, probed.unused) == (QKV0, (LAST,), ("pooler.dense",))
    assert probed.shared == by_names.shared
    # the whole BertModel output uses the pooler: then it is the last layer
    whole = plan_layers(model, QATConfig.recipe("post-asq", 4), example_inputs={"input_ids": _batch()})
    assert whole.last == ("pooler.dense",) and whole.unused == ()
    assert all(p.requires_grad for p in model.parameters())  # the probe put the grad flags back


def test_policy_quantizes_qkv_at_eight_bits_and_leaves_the_pooler_float():
    specs = resolve_layer_specs(_bert(), QATConfig.recipe("post-asq", 4))
    for name in (*QKV0, LAST):
        assert specs[name].weight.method == "lsq" and specs[name].weight.bits == 8 and specs[name].act.bits == 8
    assert specs["encoder.layer.0.attention.output.dense"].weight.bits == 4
    assert specs["pooler.dense"].is_float
    q = prepare_qat(_bert(), QATConfig.recipe("post-asq", 4))
    assert type(q.pooler.dense) is nn.Linear


def test_cnn_plan_is_what_it_was():
    from asqpost.models import create_model

    model = create_model("resnet20", 4, (3, 16, 16), width=8)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    plan = plan_layers(model, QATConfig.recipe("post-asq", 4))
    assert (plan.first, plan.last, plan.unused, plan.shared) == ((names[0],), ("fc",), (), ())
    probed = plan_layers(model, QATConfig.recipe("post-asq", 4), example_inputs=torch.randn(2, 3, 16, 16))
    assert (probed.first, probed.last) == ((names[0],), ("fc",))
    # a probe sees that a downsampling block's conv1 and shortcut read one tensor: they share its quantizer
    assert ("layer2.0.conv1", "layer2.0.shortcut.0") in probed.shared
    q = prepare_qat(model, QATConfig.recipe("post-asq", 4), plan=probed)
    assert q.layer2[0].conv1.input_quantizer is q.layer2[0].shortcut[0].input_quantizer


@pytest.mark.parametrize(
    ("pattern", "name", "expected"),
    [
        ("encoder.layer.*.output.dense", "encoder.layer.0.output.dense", True),
        ("encoder.layer.*.output.dense", "encoder.layer.0.attention.output.dense", False),
        ("encoder.layer.*.output", "encoder.layer.0.output.dense", True),  # a parent selects its layers
        ("**.dense", "encoder.layer.0.attention.output.dense", True),
        ("**.dense", "encoder.layer.0.attention.self.query", False),
        ("encoder.**.query", "encoder.layer.1.attention.self.query", True),
        ("*.dense", "encoder.layer.0.output.dense", False),
        ("layer3.*", "layer3.0.conv1", True),
        ("layer?.0.conv1", "layer3.0.conv1", True),
        ("layer3", "layer30.conv1", False),
    ],
)
def test_patterns_respect_dots(pattern, name, expected):
    assert pattern_matches(pattern, name) is expected


def test_overrides_and_exclusions_by_pattern():
    model = _bert()
    cfg = QATConfig.recipe(
        "post-asq",
        4,
        overrides=(("encoder.layer.*.output.dense", 3),),
        exclude=("encoder.layer.1.attention",),
    )
    specs = resolve_layer_specs(model, cfg)
    assert specs["encoder.layer.0.output.dense"].weight.bits == 3
    assert specs["encoder.layer.0.attention.output.dense"].weight.bits == 4
    assert all(specs[f"encoder.layer.1.attention.{n}"].is_float for n in ("self.query", "self.key", "output.dense"))
    # excluded layers do not count as first or last
    plan = plan_layers(model, QATConfig.recipe("post-asq", 4, exclude=("encoder.layer.0.attention.self",)))
    assert plan.first == ("encoder.layer.0.attention.output.dense",)
    with pytest.raises(ValueError, match="exclude pattern 'nope' matches no layer"):
        plan_layers(model, QATConfig.recipe("post-asq", 4, exclude=("nope",)))
    with pytest.raises(ValueError, match="matches no Conv2d/Linear"):
        resolve_layer_specs(model, QATConfig.recipe("post-asq", 4, overrides=(("*.query", 3),)))


def test_qkv_share_one_input_quantizer_through_training_state_and_export(tmp_path):
    q = _calibrated(QATConfig.recipe("post-asq", 4, act={"per_token": True}, first=None))
    layers = [q.get_submodule(n) for n in QKV0]
    assert layers[0].input_quantizer is layers[1].input_quantizer is layers[2].input_quantizer
    assert q.encoder.layer[0].attention.output.dense.input_quantizer is not layers[0].input_quantizer
    # training steps move one step and one adapter
    q.train()
    opt = torch.optim.SGD(q.parameters(), lr=0.05)
    for seed in range(3):
        opt.zero_grad()
        _tokens(q, _batch(seed=seed + 5)).pow(2).mean().backward()
        opt.step()
    q.eval()
    assert layers[0].input_quantizer is layers[2].input_quantizer
    steps = {float(layer.input_quantizer.step.detach()) for layer in layers}
    assert len(steps) == 1
    # a state round trip keeps the sharing and the values
    buffer = io.BytesIO()
    torch.save(quantized_state(q), buffer)
    buffer.seek(0)
    restored = load_quantized(_bert(), torch.load(buffer, weights_only=True)).eval()
    r_layers = [restored.get_submodule(n) for n in QKV0]
    assert r_layers[0].input_quantizer is r_layers[1].input_quantizer is r_layers[2].input_quantizer
    x = _batch(seed=9)
    with torch.no_grad():
        assert torch.equal(_tokens(restored, x), _tokens(q, x))
        # the packed model reproduces the fake-quant model, and its file too
        packed = convert_to_packed(q)
        ref, out = _tokens(q, x), _tokens(packed, x)
        assert torch.allclose(out, ref, atol=1e-4 * ref.abs().max())
        save_packed(packed, tmp_path / "m.safetensors")
        assert torch.equal(_tokens(load_packed(tmp_path / "m.safetensors", model=_bert()), x), out)


def test_sharing_can_be_switched_off_and_needs_equal_configs():
    q = prepare_qat(_bert(), QATConfig.recipe("post-asq", 4, share_inputs=False))
    assert q.get_submodule(QKV0[0]).input_quantizer is not q.get_submodule(QKV0[1]).input_quantizer
    q = prepare_qat(_bert(), QATConfig.recipe("post-asq", 4, overrides=((QKV0[0], {"act": {"bits": 6}}),)))
    query, key, value = (q.get_submodule(n) for n in QKV0)
    assert key.input_quantizer is value.input_quantizer and query.input_quantizer is not key.input_quantizer
    assert query.input_quantizer.bits == 6 and key.input_quantizer.bits == 8


@pytest.mark.parametrize("per_token", [False, True])
def test_packed_qkv_compute_their_shared_asq_step_once(per_token, tmp_path):
    q = _calibrated(QATConfig.recipe("post-asq", 4, act={"per_token": per_token}))
    packed = convert_to_packed(q)
    query, key, value = (packed.get_submodule(n).input_quant for n in QKV0)
    assert key.lead is query and value.lead is query and query.lead is None
    calls = []
    for name, module in packed.named_modules():
        if name.endswith("input_quant.adapter"):
            module.register_forward_hook(lambda m, i, o, name=name: calls.append(name))
    x = _batch(seed=9)
    with torch.no_grad():
        out = _tokens(packed, x)
        one_pass = len(calls)
        for name in QKV0[1:]:  # unlinked: K and V run their own (equal) adapters
            packed.get_submodule(name).input_quant.link_to(None)
        calls.clear()
        assert torch.equal(_tokens(packed, x), out)
    assert one_pass == len(calls) - 2 and sum(".attention.self." in c for c in calls) == 3 + 1  # layer 1: linked
    with torch.inference_mode():  # no version counters: the step is still reused within the forward only
        save_packed(convert_to_packed(q), tmp_path / "m.safetensors")
        loaded = load_packed(tmp_path / "m.safetensors", model=_bert())
        assert loaded.get_submodule(QKV0[2]).input_quant.lead is loaded.get_submodule(QKV0[0]).input_quant
        assert torch.equal(_tokens(loaded, x), out)
        assert torch.equal(_tokens(loaded, _batch(seed=3)), _tokens(packed, _batch(seed=3)))
        lead = loaded.get_submodule(QKV0[0]).input_quant
        assert lead in loaded.asqpost_forward_scoped and lead._last is None, "forgotten when the forward ends"


def test_linking_unequal_input_quantizers_is_refused():
    packed = convert_to_packed(_calibrated(QATConfig.recipe("post-asq", 4)))
    with pytest.raises(ValueError, match="same input quantizer"):
        link_inputs(packed, [[QKV0[0], LAST]])
    with pytest.raises(ValueError, match="not a packed layer"):
        link_inputs(packed, [[QKV0[0], "embeddings"]])


def test_a_probed_plan_travels_in_the_state():
    model = _bert()
    q = prepare_qat(model, QATConfig.recipe("lsq", 4), example_inputs={"input_ids": _batch()})  # pooler used
    calibrate(q, [_batch()], forward=lambda m, ids: m(input_ids=ids))
    assert isinstance(q.pooler.dense, QuantLinear) and q.pooler.dense.weight_quantizer.bits == 8
    state = quantized_state(q)
    restored = load_quantized(_bert(), state).eval()  # without the saved plan the pooler would be float
    assert isinstance(restored.pooler.dense, QuantLinear) and restored.asqpost_plan == q.asqpost_plan


def test_recipes_take_activation_bits_and_asq_fields(tmp_path):
    qat = QATConfig.recipe("post-asq", 4, act_bits=8, act={"per_token": True, "adapter_hidden": 8, "smooth": 0.5})
    assert (qat.weight.bits, qat.act.bits, qat.act.per_token, qat.act.smooth) == (4, 8, True, 0.5)
    with pytest.raises(ValueError, match="quantizer fields: pass them as act="):
        QATConfig.recipe("post-asq", 4, per_token=True)
    with pytest.raises(ValueError, match="smooth is an activation setting"):
        QATConfig.recipe("post-asq", 4, weight={"smooth": 0.5})
    with pytest.raises(ValueError, match="smooth"):
        QATConfig.recipe("post-asq", 4, act={"smooth": 1.5})
    assert QATConfig.from_json(qat.to_json()) == qat
    path = tmp_path / "run.yaml"
    path.write_text("quant:\n  recipe: post-asq\n  bits: 4\n  act:\n    per_token: true\n  exclude: [pooler]\n")
    run = load_run_config(path, ["quant.act_bits=8", "quant.embeddings=8"])
    got = run.qat_config()
    assert (got.weight.bits, got.act.bits, got.act.per_token, got.embeddings, got.exclude) == (
        4,
        8,
        True,
        8,
        ("pooler",),
    )
    # per-token ASQ runs on BERT: one beta per token
    q = _calibrated(QATConfig.recipe("post-asq", 4, act_bits=8, act={"per_token": True}))
    layer = q.encoder.layer[0].intermediate.dense
    assert layer.input_quantizer.bits == 8 and layer.weight_quantizer.bits == 4
    assert layer.input_quantizer.beta(torch.randn(2, 5, 32)).shape == (2, 5, 1)


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_embeddings_are_per_row_grids_and_export_packed(bits, tmp_path):
    cfg = QATConfig.recipe("post-asq", 4, embeddings=bits)
    q = _calibrated(cfg)
    emb = q.embeddings.word_embeddings
    assert isinstance(emb, QuantEmbedding) and isinstance(q.embeddings.position_embeddings, QuantEmbedding)
    with torch.no_grad():
        table = emb.quantized_weight()
        step = emb.weight_quantizer.step.reshape(-1, 1)
        codes = table / step
    assert step.numel() == 64 and len(set(step.reshape(-1).tolist())) > 1  # one step per row
    assert torch.allclose(codes, codes.round(), atol=1e-4)
    assert codes.round().min() >= -(2 ** (bits - 1)) and codes.round().max() <= 2 ** (bits - 1) - 1
    assert codes.round().max() == 2 ** (bits - 1) - 1 or codes.round().min() == -(2 ** (bits - 1))
    ids = torch.randint(0, 64, (2, 5))
    with torch.no_grad():
        assert torch.equal(emb(ids), table[ids])
    x = _batch(seed=4)
    packed = convert_to_packed(q)
    assert isinstance(packed.embeddings.word_embeddings, PackedEmbedding)
    assert packed.embeddings.word_embeddings.weight.bits == bits
    with torch.no_grad():
        assert torch.equal(packed.embeddings.word_embeddings.dequantize(), table)
        ref, out = _tokens(q, x), _tokens(packed, x)
    assert torch.allclose(out, ref, atol=1e-4 * ref.abs().max())
    save_packed(packed, tmp_path / "m.safetensors")
    loaded = load_packed(tmp_path / "m.safetensors", model=_bert())
    with torch.no_grad():
        assert torch.equal(_tokens(loaded, x), out)
    # size counts the table at its bits; the state round trip rebuilds it
    assert model_size_bytes(q) < model_size_bytes(_calibrated(QATConfig.recipe("post-asq", 4)))
    restored = load_quantized(_bert(), quantized_state(q)).eval()
    with torch.no_grad():
        assert torch.equal(_tokens(restored, x), ref)


def test_embeddings_default_to_float_and_take_a_grid_mapping():
    q = prepare_qat(_bert(), QATConfig.recipe("post-asq", 4))
    assert not any(isinstance(m, QuantEmbedding) for m in q.modules())
    q = prepare_qat(
        _bert(), QATConfig.recipe("post-asq", 4, embeddings={"method": "post", "bits": 4}, exclude=("**.position*",))
    )
    assert isinstance(q.embeddings.word_embeddings, QuantEmbedding)
    assert type(q.embeddings.position_embeddings) is nn.Embedding
    assert q.embeddings.word_embeddings.weight_quantizer.config.method == "post"
    with pytest.raises(ValueError, match="embeddings"):
        QATConfig.recipe("post-asq", 4, embeddings="eight")


def _outlier_bert():
    """A BERT whose layer-0 attention output has a few large channels: what SmoothQuant is for."""
    model = _bert()
    with torch.no_grad():
        model.encoder.layer[0].attention.output.LayerNorm.weight[:3] = 20.0
    return model


def test_smoothing_is_identity_in_float_and_helps_outlier_channels():
    alpha = 0.5
    cfg = QATConfig(None, QuantizerConfig("lsq", 8, smooth=alpha), first=None, last=None)  # a float pass calibrates
    q = prepare_qat(_outlier_bert(), cfg)
    x = _batch(seed=2)
    calibrate(q, [x], forward=_tokens)
    q.eval()
    layer = q.encoder.layer[0].intermediate.dense
    s = layer.smooth_scale
    assert s.shape == (32,) and not torch.allclose(s, torch.ones(32))
    # the factors are SmoothQuant's, from the channel maxima of the float model's input to the layer
    float_model = _outlier_bert()
    captured = {}
    float_model.encoder.layer[0].intermediate.register_forward_pre_hook(lambda m, a: captured.setdefault("x", a[0]))
    with torch.no_grad():
        _tokens(float_model, x)
    x_max = captured["x"].abs().amax(dim=(0, 1))
    w_max = layer.weight.abs().amax(dim=0)
    assert torch.allclose(s, x_max.pow(alpha) / w_max.pow(1 - alpha), rtol=1e-5)
    # in float, x / s times W * s is the layer itself
    tokens = torch.randn(2, 5, 32)
    with torch.no_grad():
        smoothed = nn.functional.linear(layer.smoothed_input(tokens), layer.smoothed_weight(), layer.bias)
        assert torch.allclose(smoothed, nn.functional.linear(tokens, layer.weight, layer.bias), atol=1e-5)
    # Q, K and V share one s (their input quantizer is shared too)
    query, key = q.get_submodule(QKV0[0]), q.get_submodule(QKV0[1])
    assert query.smooth_scale is key.smooth_scale
    # with the outliers, smoothing quantizes the layer's input with less error
    plain = prepare_qat(_outlier_bert(), QATConfig(None, QuantizerConfig("lsq", 8), first=None, last=None))
    calibrate(plain, [x], forward=_tokens)
    plain_layer = plain.encoder.layer[0].intermediate.dense
    with torch.no_grad():
        errors = []
        for m in (layer, plain_layer):
            xq = m.quantized_input(captured["x"])
            s_m = 1 if m.smooth_scale is None else m.smooth_scale
            errors.append((xq * s_m - captured["x"]).pow(2).mean())
    assert errors[0] < errors[1]


def test_smoothing_survives_state_and_export(tmp_path):
    cfg = QATConfig.recipe("post-asq", 4, act={"smooth": 0.5})
    q = prepare_qat(_outlier_bert(), cfg)
    calibrate(q, [_batch(seed=2)], forward=_tokens)
    q.eval()
    x = _batch(seed=3)
    restored = load_quantized(_outlier_bert(), quantized_state(q)).eval()
    with torch.no_grad():
        ref = _tokens(q, x)
        assert torch.equal(_tokens(restored, x), ref)
        packed = convert_to_packed(q)
        out = _tokens(packed, x)
        layer = packed.encoder.layer[0].intermediate.dense
        assert layer.smooth is not None and torch.equal(
            layer.smooth, q.encoder.layer[0].intermediate.dense.smooth_scale
        )
    assert torch.allclose(out, ref, atol=1e-4 * ref.abs().max())
    save_packed(packed, tmp_path / "m.safetensors")
    with torch.no_grad():
        assert torch.equal(_tokens(load_packed(tmp_path / "m.safetensors", model=_outlier_bert()), x), out)


def test_smoothing_on_a_conv_layer_matches_its_packed_form():
    model = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 5, 3))
    q = prepare_qat(model, QATConfig.recipe("post-lsq", 4, act={"smooth": 0.8}, first=None, last=None))
    x = torch.randn(3, 4, 8, 8) * torch.tensor([1.0, 10.0, 1.0, 0.1]).reshape(1, 4, 1, 1)
    calibrate(q, [x])
    q.eval()
    assert not torch.allclose(q[0].smooth_scale, torch.ones(4))
    with torch.no_grad():
        ref, out = q(x), convert_to_packed(q)(x)
    assert torch.allclose(out, ref, atol=1e-4 * ref.abs().max())
    with pytest.raises(ValueError, match="grouped"):
        prepare_qat(nn.Sequential(nn.Conv2d(4, 4, 3, groups=2)), QATConfig.recipe("lsq", 4, act={"smooth": 0.5}))


@pytest.mark.parametrize(("act", "hidden"), [({}, 8), ({"adapter_reduction": 8}, 4), ({"adapter_hidden": 2}, 2)])
def test_adapter_size_is_a_choice_and_its_cost_is_reported(act, hidden, tmp_path):
    q = _calibrated(QATConfig.recipe("post-asq", 4, act=act))
    adapters = {id(m): m for m in q.modules() if isinstance(m, StepAdapter)}
    widths = {a.hidden.out_features for a in adapters.values() if a.channels == 32}
    assert widths == {hidden}
    cost = adapter_parameters(q)
    hidden_64 = act.get("adapter_hidden", 64 // act.get("adapter_reduction", 4))

    def size(channels, width):  # hidden layer, output layer, gamma
        return channels * width + width + width + 1 + 1

    # per block: Q/K/V (one shared adapter), attention output and intermediate read 32 channels, output 64
    assert cost["adapters"] == 2 * (3 * size(32, hidden) + size(64, hidden_64))
    assert cost["model"] == sum(p.numel() for p in _bert().parameters())
    assert cost["share"] == cost["adapters"] / cost["model"]
    # the export records the size, so the packed file rebuilds it
    x = _batch(seed=4)
    packed = convert_to_packed(q)
    save_packed(packed, tmp_path / "m.safetensors")
    with torch.no_grad():
        assert torch.equal(_tokens(load_packed(tmp_path / "m.safetensors", model=_bert()), x), _tokens(packed, x))


def test_exports_made_before_adapter_size_and_smoothing_still_load(tmp_path):
    """Older exports have no ``reduction`` / ``hidden_size`` adapter fields and no ``smooth`` or ``rotate``
    layer field."""
    import json

    import safetensors.torch

    from asqpost.export.format import _digest
    from asqpost.models import create_model

    spec = {"name": "smallcnn", "num_classes": 4, "input_shape": [1, 12, 12], "kwargs": {"width": 8}}
    q = prepare_qat(create_model("smallcnn", 4, (1, 12, 12), width=8), QATConfig.recipe("post-asq", 3))
    calibrate(q, [torch.randn(8, 1, 12, 12)])
    path = tmp_path / "m.safetensors"
    save_packed(convert_to_packed(q.eval()), path, spec)
    before = load_packed(path)
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    meta = json.loads(header["__metadata__"]["asqpost"])
    for layer in meta["layers"].values():
        assert layer.pop("smooth") is False
        assert layer.pop("rotate") is None
        adapter = layer["input"] and layer["input"]["adapter"]
        if adapter:
            assert (adapter.pop("reduction"), adapter.pop("hidden_size")) == (4, None)
    meta["sha256"] = _digest(safetensors.torch.load(raw), meta)
    header["__metadata__"]["asqpost"] = json.dumps(meta)
    body = json.dumps(header).encode()
    body += b" " * ((-len(body)) % 8)
    path.write_bytes(len(body).to_bytes(8, "little") + body + raw[8 + n :])
    old = load_packed(path)
    x = torch.randn(4, 1, 12, 12)
    with torch.no_grad():
        assert torch.equal(old(x), before(x))


def test_a_plan_from_another_model_is_refused():
    from asqpost.models import create_model

    state = quantized_state(prepare_qat(_bert(), QATConfig.recipe("lsq", 4)))
    with pytest.raises(ValueError, match="layer plan names"):
        load_quantized(create_model("mlp", 4, (1, 4, 4)), state)
