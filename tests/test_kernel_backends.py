"""The kernel registry and the plan cache: backends plug in, plans follow the module's tensors, and a packed model
compiles through the kernels' custom ops without graph breaks."""

import copy

import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters

from asqpost import QATConfig, calibrate, prepare_qat
from asqpost.export import convert_to_packed
from asqpost.kernels import Backend, backends, extension, get_backend
from asqpost.models import create_model
from asqpost.packed import LayerSpec
from numerics import assert_float32_close, relative_error
from tiny_bert import tiny_bert_config

pytestmark = pytest.mark.numerics


def _packed_cnn(recipe: str = "post-asq", seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(seed)
    model = create_model("resnet20", 10, (1, 12, 12)).eval()
    q = prepare_qat(model, QATConfig.recipe(recipe, 4)).eval()
    x = torch.randn(4, 1, 12, 12)
    calibrate(q, [x])
    return convert_to_packed(q), x


def _layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if hasattr(m, "plans")]


class _Counting(Backend):
    """A backend that takes linear layers only, computes them with the reference's plan, and counts its runs."""

    name = "counting"
    modes = frozenset({"auto", "reference"})

    def __init__(self) -> None:
        self.runs = 0
        self.reference = get_backend("reference")

    def eligible(self, spec: LayerSpec) -> str | None:
        return None if spec.kind == "linear" and spec.lut is not None else "linear integer layers only"

    def prepare(self, spec, device, dtype):
        return self.reference.prepare(spec, device, dtype)

    def run(self, plan, x, step):
        self.runs += 1
        return self.reference.run(plan, x, step)


def test_a_registered_backend_runs_where_it_is_eligible_and_reports_itself(monkeypatch):
    from asqpost.export import kernel_report

    packed, x = _packed_cnn()
    with torch.no_grad():
        native_fc = packed(x)
    monkeypatch.setattr(backends, "_REGISTRY", list(backends._REGISTRY))
    counting = backends.register_backend(_Counting(), before="triton")
    assert backends.list_backends()[0] == "counting"
    report = {e.name: e.path for e in kernel_report(packed)}
    assert report["fc"] == "counting" and all(p != "counting" for n, p in report.items() if n != "fc")
    with torch.no_grad():
        y = packed(x)
    assert counting.runs == 1, "one linear layer (the classifier) per forward"
    assert torch.equal(y, native_fc), "the reference's maths: the native kernel's bits"
    other = _Counting()
    other.name = "other"
    with pytest.raises(ValueError, match="unknown kernel backend"):
        backends.register_backend(other, before="nope")
    with pytest.raises(ValueError, match="already registered"):
        backends.register_backend(_Counting())


def test_plans_are_kept_per_backend_device_and_dtype_and_reused():
    packed, x = _packed_cnn()
    layer = packed.fc
    with torch.no_grad():
        packed(x)
        plans = dict(layer.plans._plans)
        packed(x)
    assert dict(layer.plans._plans) == plans, "the second forward builds nothing"
    assert all(key.device == torch.device("cpu") and key.dtype == torch.float32 for key in plans)
    with torch.no_grad():
        packed.double()(x.double())
    assert {key.dtype for key in layer.plans._plans} == {torch.float64}, ".double() dropped the float32 plans"


def test_a_dtype_round_trip_after_a_forward_rebuilds_the_plans():
    """``.half().float()`` rounds every scale to half precision: a plan kept from before would rescale with the
    old scales. The packed model must equal one converted the same way that never ran."""
    packed, x = _packed_cnn()
    fresh = copy.deepcopy(packed).half().float()
    with torch.no_grad():
        before = packed(x)
        packed.half().float()
        assert all(not layer.plans._plans for layer in _layers(packed))
        after, expected = packed(x), fresh(x)
    assert torch.equal(after, expected)
    assert not torch.equal(after, before), "the scales really moved"


def test_loading_a_state_after_a_forward_runs_the_loaded_codes():
    packed, x = _packed_cnn()
    other, _ = _packed_cnn(seed=1)  # other weights: other codes and scales
    with torch.no_grad():
        before = packed(x)
        packed.load_state_dict(other.state_dict())
        assert torch.equal(packed(x), other(x)) and not torch.equal(packed(x), before)


@pytest.mark.cuda
def test_device_moves_after_a_forward_rebuild_the_plans():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    packed, x = _packed_cnn()
    with torch.no_grad():
        cpu = packed(x)
        on_cuda = packed.cuda()(x.cuda())
        back = packed.cpu()(x)
    assert torch.equal(back, cpu)
    assert_float32_close(on_cuda.cpu(), cpu)


def _traced(model: nn.Module, *args, **kwargs) -> tuple[object, int]:
    """``model`` run through ``torch.compile`` with the aot_eager backend (the traced ops, run as eager runs them):
    its output and the graph breaks dynamo counted (``fullgraph=True`` raises on any)."""
    torch._dynamo.reset()
    counters.clear()
    out = torch.compile(model, backend="aot_eager", fullgraph=True)(*args, **kwargs)
    return out, sum(counters["graph_break"].values())


@pytest.mark.skipif(not extension.available(), reason="native LUT kernel could not be built here")
def test_a_packed_cnn_compiles_without_graph_breaks_through_the_native_ops():
    packed, x = _packed_cnn()
    with torch.no_grad():
        eager = packed(x)
        traced, breaks = _traced(packed, x)
    assert breaks == 0
    assert torch.equal(traced, eager)


@pytest.mark.skipif(not extension.available(), reason="native LUT kernel could not be built here")
def test_a_packed_encoder_with_linked_inputs_and_padding_compiles_without_graph_breaks():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.BertModel(tiny_bert_config(transformers)).eval()
    q = prepare_qat(model, QATConfig.recipe("post-asq", 4, first=None, last=None)).eval()
    ids = torch.randint(0, 64, (2, 9))
    calibrate(q, [ids])
    packed = convert_to_packed(q)
    assert any(m.input_quant.lead is not None for m in _layers(packed)), "Q, K and V share one step"
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:] = 0
    with torch.no_grad():
        eager = packed(ids, attention_mask=mask).last_hidden_state
        traced, breaks = _traced(packed, ids, attention_mask=mask)
    assert breaks == 0
    assert torch.equal(traced.last_hidden_state, eager)


@pytest.mark.skipif(not extension.available(), reason="native LUT kernel could not be built here")
def test_inductor_compiles_a_packed_cnn_to_the_same_predictions():
    """Inductor fuses the float ops around the kernels (the adapter, BatchNorm, the residual adds), which may
    round differently in the last bits; the integer ops are the same calls. A last-bit difference can flip a 4-bit
    activation code that sits on a rounding tie (on some CPUs it does: a 2% move of that sample's logits), so the
    bound is a code flip's, far below what a wrong kernel, scale or step gives (order 1); ``aot_eager``, which
    keeps torch's float ops, is bit-identical (the tests above)."""
    packed, x = _packed_cnn()
    with torch.no_grad():
        eager = packed(x)
        torch._dynamo.reset()
        compiled = torch.compile(packed, fullgraph=True)(x)
    assert relative_error(compiled, eager) <= 0.1
    assert torch.equal(compiled.argmax(1), eager.argmax(1))
