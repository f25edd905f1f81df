"""The registry is the one list of methods: a method registered in one place is usable everywhere."""

import pytest
import torch
from torch import nn

from asqpost import QATConfig, QuantizerConfig, calibrate, prepare_qat
from asqpost.compare import method_label
from asqpost.config import recipe_names, split_recipe
from asqpost.data import DATASETS, ImageSet, describe_dataset, list_datasets, load_dataset, register_dataset
from asqpost.export import convert_to_packed, load_packed, save_packed
from asqpost.functional import fake_quantize
from asqpost.levels import GRIDS
from asqpost.models import MODELS, create_model, list_models, register_model
from asqpost.quantizers import Quantizer, WeightExport, build_quantizer
from asqpost.registry import get_method, method_names, methods_for, register_quantizer, unregister_quantizer

pytestmark = pytest.mark.numerics


class TernaryQuantizer(Quantizer):
    """A toy weight method: ``{-1, 0, 1}`` times a per-channel scale, defined only here."""

    roles = ("weight",)
    label = "ternary"

    def __init__(self, config, role, *, weight_shape=None, **_):
        super().__init__(config, role, weight_shape)

    def grid(self):
        return torch.round, -1.0, 1.0

    def quantize(self, w):
        return fake_quantize(w, self.scale, -1.0, 1.0)

    def export_weight(self, w):
        codes = torch.round((w / self.scale).clamp(-1, 1)).long() + 1
        table = torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64)
        return WeightExport(codes, table, self.scale.detach().reshape(-1))


@pytest.fixture
def ternary():
    register_quantizer("ternary")(TernaryQuantizer)
    yield "ternary"
    unregister_quantizer("ternary")


def test_a_registered_method_is_usable_everywhere(ternary, tmp_path):
    assert ternary in methods_for("weight") and ternary not in methods_for("act")
    assert {"ternary-lsq", "ternary-asq"} <= set(recipe_names())
    assert split_recipe("ternary-asq") == ("ternary", "asq")
    assert method_label("ternary-asq") == "ternary (W) + ASQ (A)"
    assert QuantizerConfig(ternary, 2).init_for("weight") == "mse"
    with pytest.raises(ValueError, match="cannot quantize acts"):
        QATConfig(QuantizerConfig("lsq", 4), QuantizerConfig(ternary, 4))
    model = nn.Sequential(nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 3))
    q = prepare_qat(model, QATConfig.recipe("ternary-asq", 2, first=None, last=None)).eval()
    x = torch.randn(16, 12)
    calibrate(q, [x])
    assert isinstance(q[0].weight_quantizer, TernaryQuantizer)
    packed = convert_to_packed(q)
    with torch.no_grad():
        expected = q(x)
        assert torch.allclose(packed(x), expected, rtol=1e-5, atol=1e-6)
        save_packed(packed, tmp_path / "t.safetensors")
        assert torch.equal(load_packed(tmp_path / "t.safetensors", model=model)(x), packed(x))


def test_an_unregistered_method_is_gone(ternary):
    unregister_quantizer(ternary)
    try:
        with pytest.raises(ValueError, match="unknown quantization method 'ternary'"):
            QuantizerConfig(ternary, 4)
        with pytest.raises(ValueError, match="unknown recipe"):
            QATConfig.recipe("ternary-lsq", 4)
        assert ternary not in method_names()
    finally:
        register_quantizer(ternary)(TernaryQuantizer)


@pytest.mark.parametrize("name", ["ter-nary", "-x", "Ternary", "", "2bit", "float"])
def test_bad_method_names_are_refused(name):
    with pytest.raises(ValueError, match=r"not allowed|reserved"):
        register_quantizer(name)(TernaryQuantizer)
    assert name not in method_names()


def test_a_dashed_name_is_refused_with_the_reason():
    with pytest.raises(ValueError, match=r"no '-': recipes are '<weight>-<act>'"):
        register_quantizer("my-method")(TernaryQuantizer)


def test_duplicates_and_incomplete_classes_are_refused():
    with pytest.raises(ValueError, match="'post' is already registered"):
        register_quantizer("post")(TernaryQuantizer)
    with pytest.raises(ValueError, match="'lsq' is already registered"):  # all or nothing
        register_quantizer("fresh", "lsq")(TernaryQuantizer)
    assert "fresh" not in method_names()

    class NoRoles(TernaryQuantizer):
        roles = ()

    class NoLabel(TernaryQuantizer):
        label = ""

    with pytest.raises(ValueError, match="roles"):
        register_quantizer("noroles")(NoRoles)
    with pytest.raises(ValueError, match="label"):
        register_quantizer("nolabel")(NoLabel)


def test_builtin_methods_and_labels():
    assert methods_for("weight") == ("lsq", *GRIDS)
    assert methods_for("act") == ("lsq", "asq")
    assert {name: get_method(name).label for name in GRIDS} == {g: GRIDS[g].label for g in GRIDS}
    assert method_label("post-asq") == "POST (W) + ASQ (A)" and method_label("lsq") == "LSQ (W) + LSQ (A)"
    with pytest.raises(ValueError, match="unknown role"):
        methods_for("bias")


def test_recipes_cover_every_registered_method(ternary):
    used = {method for recipe in recipe_names() for method in split_recipe(recipe)}
    assert used == set(method_names())


@pytest.mark.parametrize("method", methods_for("weight"))
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_every_weight_method_exports_what_it_computes(method, bits):
    w = torch.randn(6, 5, 3, 3) * 0.1
    q = build_quantizer(QuantizerConfig(method, bits), "weight", weight_shape=w.shape).calibrate_(w)
    export = q.export_weight(w)
    assert export.codes.dtype == torch.int64 and export.codes.shape == w.shape
    assert export.table.dtype == torch.float64 and export.table.numel() <= 2**bits
    assert int(export.codes.min()) >= 0 and int(export.codes.max()) < export.table.numel()
    decoded = export.table.float()[export.codes] * export.scale.reshape(-1, 1, 1, 1)
    assert torch.equal(decoded, q(w))


@pytest.mark.parametrize("method", methods_for("act"))
@pytest.mark.parametrize("shape", [(4, 8, 3, 3), (4, 8), (4, 5, 8)])
def test_every_act_method_exports_what_it_computes(method, shape):
    x = torch.randn(shape) * torch.linspace(0.5, 3, shape[0]).reshape((-1,) + (1,) * (len(shape) - 1))
    q = build_quantizer(QuantizerConfig(method, 3), "act", channels=8).calibrate_(x)
    export = q.export_act()
    step = export.step if export.adapter is None else export.step * export.adapter(x)
    x_int = torch.clamp(torch.round(x / step), export.qmin, export.qmax)
    assert torch.equal(x_int * step, q(x))


# ---------------------------------------------------------------- models and datasets: the same registry style

INPUT_SHAPES = {"transformer": (6, 5)}  # (tokens, features); every other built-in model takes images


@pytest.mark.parametrize("name", list_models())
def test_every_registered_model_builds_quantizes_and_packs(name):
    """Driven by the registry: a model registered anywhere is built, prepared, calibrated and packed here."""
    torch.manual_seed(0)
    shape = INPUT_SHAPES.get(name, (3, 16, 16))
    model = create_model(name, 4, shape).eval()
    x = torch.randn(2, *shape)
    assert model(x).shape == (2, 4)
    qat = calibrate(prepare_qat(model, QATConfig.recipe("post-asq", 4)), [x])
    with torch.no_grad():
        assert qat(x).shape == (2, 4) and convert_to_packed(qat)(x).shape == (2, 4)


def test_models_and_datasets_register_once_and_name_the_choices():
    with pytest.raises(ValueError, match="model 'mlp' is already registered"):
        register_model("mlp")(lambda **kwargs: nn.Identity())
    with pytest.raises(ValueError, match="dataset 'digits' is already registered"):
        register_dataset("digits")(lambda root, split: None)
    with pytest.raises(ValueError, match=r"unknown model 'nope'; available: \[.*'mlp'"):
        create_model("nope")
    with pytest.raises(ValueError, match=r"unknown dataset 'nope'; available: \[.*'digits'"):
        load_dataset("nope", "train")
    assert "mnist5k" in list_datasets() and "resnet20" in list_models()


def test_a_model_and_a_dataset_registered_for_a_while_are_usable_then_gone():
    @register_model("tiny_linear")
    def tiny_linear(num_classes, input_shape, **kwargs):
        return nn.Sequential(nn.Flatten(), nn.Linear(int(torch.tensor(input_shape).prod()), num_classes))

    @register_dataset("tiny_images")
    def tiny_images(root, split):
        """Eight random 4x4 images of two classes (a test's own dataset)."""
        return ImageSet(torch.rand(8, 1, 4, 4), torch.arange(8) % 2, 2)

    try:
        assert create_model("tiny_linear", 2, (1, 4, 4))(torch.rand(3, 1, 4, 4)).shape == (3, 2)
        assert len(load_dataset("tiny_images", "test")) == 8
        assert describe_dataset("tiny_images") == "Eight random 4x4 images of two classes (a test's own dataset)."
    finally:
        MODELS.remove("tiny_linear")
        DATASETS.remove("tiny_images")
    assert "tiny_linear" not in list_models() and "tiny_images" not in list_datasets()
