import re

import pytest
import torch
from torch import nn

from asqpost import (
    NotCalibratedError,
    QATConfig,
    QuantConv2d,
    QuantizerConfig,
    QuantLinear,
    calibrate,
    dequantize,
    load_quantized,
    prepare_qat,
    quant_layers,
    quantized_state,
    resolve_layer_specs,
)
from asqpost.config import parse_setting, recipe_names
from asqpost.models import create_model

RECIPES = ["lsq", *recipe_names()]  # the one-name form, and every registered weight x activation method


def _resnet():
    return create_model("resnet20", num_classes=10, input_shape=(3, 16, 16), width=8)


def _depthwise_net():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=8),
        nn.ReLU(),
        nn.Conv2d(8, 16, 1, stride=2, groups=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16 * 8 * 8, 5),
    )


def _data(n=16, shape=(3, 16, 16)):
    return [torch.randn(n, *shape) for _ in range(2)]


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_parameter_gets_a_finite_gradient(recipe):
    model = _resnet()
    q = prepare_qat(model, QATConfig.recipe(recipe, 3))
    assert sum(1 for _ in quant_layers(q)) == sum(isinstance(m, nn.Conv2d | nn.Linear) for m in model.modules())
    calibrate(q, _data())
    q.train()
    out = q(torch.randn(8, 3, 16, 16))
    nn.functional.cross_entropy(out, torch.randint(0, 10, (8,))).backward()
    for name, p in q.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        if "weight_quantizer" in name or "input_quantizer.raw_scale" in name:
            assert p.grad.abs().sum() > 0, name


def test_grouped_depthwise_dilated_and_linear_swapped():
    model = _depthwise_net()
    q = prepare_qat(model, QATConfig.recipe("post-asq", 4, first=None, last=None))
    kinds = [type(m) for m in q.children() if isinstance(m, nn.Conv2d | nn.Linear)]
    assert kinds == [QuantConv2d, QuantConv2d, QuantConv2d, QuantLinear]
    assert q[2].groups == 8 and q[2].dilation == (2, 2) and isinstance(q[2], nn.Conv2d)
    x = torch.randn(4, 3, 16, 16)
    calibrate(q, [x])
    assert q(x).shape == (4, 5)


@pytest.mark.parametrize("weight", ["lsq", "uniform"])
def test_eight_bits_stays_close_to_float(weight):
    model = _resnet().eval()
    cfg = QATConfig(QuantizerConfig(weight, 8), QuantizerConfig("asq", 8, init="mse"))
    q = prepare_qat(model, cfg).eval()
    data = _data(32, (3, 16, 16))
    calibrate(q, data)
    with torch.no_grad():
        ref, out = model(data[0]), q(data[0])
    rel = (out - ref).norm() / ref.norm()
    assert rel < 0.05, rel


def test_layer_policy():
    model = _resnet()
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    cfg = QATConfig.recipe(
        "post-asq", 2, first="float", overrides=(("layer3.*", 4), ("layer2.0.conv1", {"act": "float"}))
    )
    specs = resolve_layer_specs(model, cfg)
    assert specs[names[0]].is_float
    assert specs["fc"].weight == QuantizerConfig("lsq", 8) and specs["fc"].act.bits == 8
    assert specs["fc"].act.method == "asq"
    assert specs["layer3.0.conv1"].weight.bits == 4 and specs["layer3.0.conv1"].weight.method == "post"
    assert specs["layer2.0.conv1"].act is None and specs["layer2.0.conv1"].weight.bits == 2
    assert specs["layer1.0.conv1"].weight.bits == 2
    q = prepare_qat(model, cfg)
    assert type(q.conv1) is nn.Conv2d


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"overrides": (("nope.*", 4),)}, "matches no Conv2d/Linear"),
        ({"overrides": (("layer1.*", 9),)}, "bits"),
        ({"overrides": (("layer1.*", {"act": {"method": "post"}}),)}, "cannot quantize acts"),
        ({"first": 1}, "bits"),
    ],
)
def test_bad_policy_is_a_clear_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        prepare_qat(_resnet(), QATConfig.recipe("post-asq", 4, **kwargs))


def test_forward_before_calibration_and_bad_calibration():
    q = prepare_qat(_resnet(), QATConfig.recipe("post-asq", 4))
    with pytest.raises(NotCalibratedError):
        q(torch.randn(2, 3, 16, 16))
    with pytest.raises(ValueError, match="no batches"):
        calibrate(q, [])
    with pytest.raises(ValueError, match="empty"):
        calibrate(q, [torch.zeros(0, 3, 16, 16)])
    with pytest.raises(ValueError, match="NaN or inf"):
        calibrate(q, [torch.full((2, 3, 16, 16), float("nan"))])
    with pytest.raises(ValueError, match="no quantized layers"):
        calibrate(_resnet(), [torch.randn(2, 3, 16, 16)])


def test_calibration_leaves_batchnorm_and_mode_alone():
    q = prepare_qat(_resnet(), QATConfig.recipe("lsq", 4)).train()
    before = q.bn1.running_mean.clone()
    calibrate(q, _data())
    assert q.training and torch.equal(q.bn1.running_mean, before)


@pytest.mark.parametrize("form", ["paper", "scale"])
def test_state_round_trip_rebuilds_model(form):
    model = _resnet()
    q = prepare_qat(model, QATConfig.recipe("post-asq", 3, act={"adapter_form": form}, overrides=(("layer3.*", 4),)))
    data = _data()
    calibrate(q, data)
    q.eval()
    state = quantized_state(q)
    buffer = __import__("io").BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    restored = load_quantized(_resnet(), torch.load(buffer, weights_only=True)).eval()
    with torch.no_grad():
        assert torch.equal(q(data[0]), restored(data[0]))
    forms = {m.adapter.form for m in restored.modules() if hasattr(m, "adapter")}
    assert forms == {form}
    if form == "scale":  # calibration's r_ref travels in the state
        r_refs = [k for k in state["state_dict"] if k.endswith("adapter.r_ref")]
        assert r_refs and all(state["state_dict"][k] != 1.0 for k in r_refs)
    with pytest.raises(ValueError, match="does not match"):
        load_quantized(create_model("resnet20", input_shape=(3, 16, 16), width=16), state)


def test_dequantize_and_double_prepare():
    model = _resnet()
    q = prepare_qat(model, QATConfig.recipe("lsq", 4))
    with pytest.raises(ValueError, match="already prepared"):
        prepare_qat(q, QATConfig.recipe("lsq", 4))
    back = dequantize(q)
    assert not any(isinstance(m, QuantConv2d | QuantLinear) for m in back.modules())
    for (n1, p1), (n2, p2) in zip(model.state_dict().items(), back.state_dict().items(), strict=True):
        assert n1 == n2 and torch.equal(p1, p2)


def test_transformer_tokens():
    model = create_model("transformer", num_classes=4, input_shape=(6, 5), dim=32)
    q = prepare_qat(model, QATConfig.recipe("post-asq", 4))
    x = torch.randn(3, 6, 5)
    calibrate(q, [x])
    assert q(x).shape == (3, 4)
    beta = q.blocks[0].fc1.input_quantizer.beta(torch.randn(3, 6, 32))
    assert beta.shape == (3, 1, 1)


def test_config_json_round_trip_and_unknown_keys():
    cfg = QATConfig.recipe("post-asq", 3, overrides=(("a*", {"weight": {"bits": 4}}), ("b", "float")))
    assert QATConfig.from_json(cfg.to_json()) == cfg
    with pytest.raises(ValueError, match="unknown QAT config key"):
        QATConfig.from_dict({**cfg.to_dict(), "lr": 1})
    with pytest.raises(ValueError, match="unknown quantizer key"):
        QATConfig.from_dict({**cfg.to_dict(), "weight": {"method": "post", "bits": 4, "bitz": 3}})
    with pytest.raises(ValueError, match="version"):
        QATConfig.from_dict({**cfg.to_dict(), "version": 99})
    with pytest.raises(ValueError, match="unknown recipe"):
        QATConfig.recipe("post-post", 4)
    with pytest.raises(ValueError, match="unknown quantization method"):
        QuantizerConfig("pact", 4)


def test_recipe_sets_quantizer_fields():
    qat = QATConfig.recipe("lsq-asq", 3, act={"init": "percentile", "adapter_form": "scale"}, weight={"init": "mse"})
    assert qat.act == QuantizerConfig("asq", 3, init="percentile", adapter_form="scale")
    assert qat.weight == QuantizerConfig("lsq", 3, init="mse")
    assert QATConfig.recipe("post-lsq", 4, act={"bits": 8}).act == QuantizerConfig("lsq", 8)
    assert QATConfig.from_json(qat.to_json()) == qat
    with pytest.raises(ValueError, match="names the weight method"):
        QATConfig.recipe("post-lsq", 4, weight={"method": "lsq"})
    with pytest.raises(ValueError, match="does not apply"):
        QATConfig.recipe("post-lsq", 4, weight={"init": "lsq"})


@pytest.mark.parametrize("value", [True, 2.5, "4", [4], ("weight", 4)])
def test_every_float_bits_or_mapping_setting_refuses_the_same_garbage_the_same_way(value):
    """Quantizer configs, layer overrides (whole and per role), first / last and embeddings read one grammar
    (``parse_setting``): the message names the setting and lists what it takes."""
    sites = {
        "quantizer config": lambda: QuantizerConfig.from_dict(value),
        "layer override": lambda: QATConfig.recipe("post-asq", 4, overrides=(("layer1.*", value),)),
        "act override": lambda: QATConfig.recipe("post-asq", 4, overrides=(("layer1.*", {"act": value}),)),
        "first/last": lambda: QATConfig.recipe("post-asq", 4, first=value),
        "embeddings": lambda: QATConfig.recipe("post-asq", 4, embeddings=value),
    }
    for what, build in sites.items():
        with pytest.raises(ValueError, match=f"{re.escape(what)} is .*'float', an integer bit width or a mapping"):
            build()


def test_the_settings_grammar_reads_float_bits_and_mappings_alike():
    assert parse_setting("float", "x") is None and parse_setting(None, "x", none_is_float=True) is None
    assert parse_setting(3, "x") == 3
    fields = {"method": "lsq", "bits": 4}
    assert parse_setting(fields, "x") == fields and parse_setting(fields, "x") is not fields  # a copy
    with pytest.raises(ValueError, match="x bits must be in"):
        parse_setting(9, "x")
    with pytest.raises(ValueError, match="x is 'float', an integer"):
        parse_setting(None, "x")  # null is float only where the setting says so
