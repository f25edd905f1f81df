"""The Triton LUT kernel against the float64 reference, bit for bit.

On a CPU-only machine the kernel runs in Triton's interpreter (``TRITON_INTERPRET=1``, set here before triton
loads): the same program, tile by tile, in numpy. The ``cuda`` variants (``pytest -m cuda``) run the same
checks compiled on a GPU, where the sums go through tensor cores. Without triton the module skips.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from asqpost import QATConfig, calibrate, prepare_qat
from asqpost.export import convert_to_packed, integer_lut
from asqpost.kernels import Ineligible, backends, get_backend, triton_lut
from asqpost.levels import make_levels
from asqpost.packed import pack_codes

pytestmark = pytest.mark.numerics

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the kernel is jitted (first use, after this)
pytest.importorskip("triton")
pytest.importorskip("numpy")  # the interpreter's arrays

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def _device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if name == "cpu" and not triton_lut.interpreted():
        pytest.skip("triton is compiled for CUDA here: CPU tensors need TRITON_INTERPRET=1")
    return torch.device(name)


def _packed(layer: nn.Module, x: torch.Tensor, recipe: str, bits: int, **act):
    q = prepare_qat(nn.Sequential(layer), QATConfig.recipe(recipe, bits, act=act or None, first=None, last=None))
    q.eval()
    calibrate(q, [x])
    return convert_to_packed(q)[0]


def _reference(packed, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad(), torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        return packed(x, kernel="reference")


TRITON = get_backend("triton")


def _on_triton(packed, x: torch.Tensor) -> torch.Tensor | None:
    """The layer on the Triton backend with its own plan, or ``None`` where the backend does not take it."""
    plan = packed.plans.plan(TRITON, x.device, x.dtype)
    if isinstance(plan, Ineligible):
        return None
    with torch.no_grad():
        folded = packed.folded(x)
        return TRITON.run(plan, folded, packed.input_quant.step_of(folded))


def _kernel(packed, x: torch.Tensor) -> torch.Tensor:
    y = _on_triton(packed, x)
    assert y is not None, "the Triton kernel takes this layer"
    return y


def _assert_same(y: torch.Tensor, ref: torch.Tensor) -> None:
    assert y.shape == ref.shape and y.dtype == ref.dtype
    nan = torch.isnan(ref)
    assert torch.equal(torch.isnan(y), nan)
    assert torch.equal(y[~nan], ref[~nan]), f"max diff {(y[~nan].double() - ref[~nan].double()).abs().max()}"


# (m, k, n): single elements, k and n off every block size, several k chunks, more rows than one tile
SHAPES = [(1, 1, 1), (3, 37, 19), (5, 130, 70), (17, 65, 33), (40, 200, 5), (2, 64, 16), (70, 129, 65)]
RECIPES = ["post-asq", "post-lsq", "lsq-lsq", "uniform-asq", "pot-lsq", "apot-asq"]
# tables with no small-integer form (POST at 7-8 bits, POT at 6-8) run the decoded-float path, no LUT kernel
NO_LUT = {("post", 7), ("post", 8), ("pot", 6), ("pot", 7), ("pot", 8)}
LUT_CASES = [(r, b) for r in RECIPES for b in range(2, 9) if (r.split("-")[0], b) not in NO_LUT]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("signed", [False, True], ids=["unsigned", "signed"])
@pytest.mark.parametrize(("recipe", "bits"), LUT_CASES)
def test_linear_equals_reference_exactly(recipe, bits, signed, device):
    m, k, n = SHAPES[(bits + RECIPES.index(recipe)) % len(SHAPES)]
    x = torch.randn(m, k) if signed else torch.rand(m, k) * 2
    x.view(-1)[0] = -1.0 if signed else 0.5  # the calibration sees a negative input: signed codes
    packed = _packed(nn.Linear(k, n), x, recipe, bits)
    assert packed.weight.lut() is not None
    on = _device(device)
    packed, x = packed.to(on), x.to(on)
    assert (packed.input_quant.qmin < 0) == signed
    _assert_same(_kernel(packed, x), _reference(packed, x))


def test_tables_without_integer_form_are_the_known_ones():
    for recipe in RECIPES:
        grid = recipe.split("-")[0]
        for bits in range(2, 9):
            table = None if grid == "lsq" else make_levels(grid, bits).table(dtype=torch.float64)
            assert (table is not None and integer_lut(table) is None) == ((grid, bits) in NO_LUT), (grid, bits)


def test_every_dot_form_is_exercised():
    """The parametrized test above covers int8 dots, fp16 dots, fp16 with split levels, and both table kinds."""
    forms = set()
    for recipe, bits in [("post-asq", 4), ("lsq-lsq", 6), ("lsq-lsq", 8), ("uniform-asq", 8), ("post-asq", 6)]:
        x = torch.rand(3, 20)
        plan = triton_lut.triton_plan(_packed(nn.Linear(20, 4), x, recipe, bits).spec(), x.device)
        forms.add((plan.dot_int8, plan.split, plan.register_table, plan.has_odd))
    assert forms == {
        (True, False, True, True),  # 4-bit POST: int8, odd levels, table in registers
        (True, False, False, False),  # 6-bit LSQ: int8, table in memory
        (False, False, False, False),  # 8-bit LSQ with unsigned 8-bit inputs: fp16
        (False, True, False, False),  # 8-bit uniform grid (levels up to 4191): fp16 in two digits
        (False, True, False, True),  # 6-bit POST (levels up to 2^15): both splits
    }


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("per_token", [False, True])
@pytest.mark.parametrize("bits", [3, 8])
def test_token_inputs_with_per_sample_and_per_token_steps(bits, per_token, device):
    x = torch.rand(3, 5, 70) * torch.logspace(-2, 2, 3, base=2).reshape(3, 1, 1)
    packed = _packed(nn.Linear(70, 21), x, "post-asq" if bits < 5 else "lsq-asq", bits, per_token=per_token)
    on = _device(device)
    packed, x = packed.to(on), x.to(on)
    step = packed.input_quant.step_of(x)
    assert step.shape == ((3, 5, 1) if per_token else (3, 1, 1))
    _assert_same(_kernel(packed, x), _reference(packed, x))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("recipe", ["post-lsq", "post-asq"])
def test_half_precision_inputs_quantize_as_the_reference(recipe, dtype, device):
    """``x / s_a`` rounds to the half dtype first (as torch computes it), then round and clamp."""
    x = torch.rand(6, 77) * 3
    packed = _packed(nn.Linear(77, 13), x, recipe, 4)
    on = _device(device)
    packed, x = packed.to(on), x.to(on, dtype)
    _assert_same(_kernel(packed, x), _reference(packed, x))


@pytest.mark.parametrize("device", DEVICES)
def test_ties_round_half_to_even_and_nan_rows_propagate(device):
    packed = _packed(nn.Linear(40, 9), torch.rand(4, 40), "lsq-lsq", 4)
    with torch.no_grad():
        packed.input_quant.step.fill_(0.25)
    x = torch.arange(4 * 40, dtype=torch.float32).reshape(4, 40) % 64 * 0.125 - 0.5  # every code, every half
    x[2, 7] = float("nan")
    on = _device(device)
    packed, x = packed.to(on), x.to(on)
    y, ref = _kernel(packed, x), _reference(packed, x)
    assert torch.isnan(ref[2]).all() and not torch.isnan(ref[[0, 1, 3]]).any()
    _assert_same(y, ref)


CONVS = [
    (nn.Conv2d(5, 7, 3, stride=2, padding=1), (3, 5, 9, 11)),
    (nn.Conv2d(3, 19, (3, 2), stride=(2, 1), padding=(0, 2), dilation=(2, 1)), (2, 3, 10, 7)),
    (nn.Conv2d(24, 6, 1, bias=False), (2, 24, 4, 5)),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("recipe", ["post-asq", "lsq-lsq"])
@pytest.mark.parametrize("conv", range(len(CONVS)))
def test_conv_via_im2col_equals_reference(conv, recipe, device):
    layer, shape = CONVS[conv]
    x = torch.rand(*shape) * 2
    packed = _packed(layer, x, recipe, 4)
    on = _device(device)
    packed, x = packed.to(on), x.to(on)
    _assert_same(_kernel(packed, x), _reference(packed, x))


@pytest.mark.parametrize(
    ("layer", "shape", "dtype"),
    [
        (nn.Conv2d(8, 8, 3, padding=1, groups=4), (2, 8, 5, 5), torch.float32),  # grouped conv
        (nn.Linear(12, 5), (4, 12), torch.float64),  # float64 input: x / s_a in float64
    ],
)
def test_layers_the_kernel_does_not_take_run_the_reference(layer, shape, dtype, monkeypatch):
    x = torch.rand(*shape)
    packed = _packed(layer, x, "post-asq", 4)
    _device("cpu")
    x = x.to(dtype)
    with torch.no_grad():
        assert _on_triton(packed, x) is None
        monkeypatch.setattr(backends, "DEFAULT_KERNEL", "triton")
        _assert_same(packed(x), _reference(packed, x))


def test_asqpost_kernel_triton_selects_the_kernel_and_auto_leaves_cpu_alone(monkeypatch):
    x = torch.rand(3, 30)
    packed = _packed(nn.Linear(30, 7), x, "post-asq", 4)
    _device("cpu")
    calls = []
    run = TRITON.run
    monkeypatch.setattr(TRITON, "run", lambda *args: calls.append(1) or run(*args))
    monkeypatch.setattr(backends, "DEFAULT_KERNEL", "triton")
    with torch.no_grad():
        y = packed(x)
    assert calls == [1]
    _assert_same(y, _reference(packed, x))
    monkeypatch.setattr(backends, "DEFAULT_KERNEL", "auto")
    with torch.no_grad():
        packed(x)
    assert len(calls) == 1, "auto never runs the Triton kernel on CPU tensors"


@pytest.mark.cuda
def test_auto_takes_the_triton_kernel_for_cuda_inputs(monkeypatch):
    x = torch.rand(3, 30)
    packed = _packed(nn.Linear(30, 7), x, "post-asq", 4)
    on = _device("cuda")
    packed, x = packed.to(on), x.to(on)
    calls = []
    run = TRITON.run
    monkeypatch.setattr(TRITON, "run", lambda *args: calls.append(1) or run(*args))
    monkeypatch.setattr(backends, "DEFAULT_KERNEL", "auto")
    with torch.no_grad():
        y = packed(x)
    assert calls == [1]
    _assert_same(y, _reference(packed, x))


def test_asqpost_kernel_triton_fails_loudly_where_it_cannot_run(monkeypatch):
    x = torch.rand(3, 30)
    packed = _packed(nn.Linear(30, 7), x, "post-asq", 4)
    monkeypatch.setattr(triton_lut, "available", lambda: False)
    monkeypatch.setattr(backends, "DEFAULT_KERNEL", "triton")
    with pytest.raises(RuntimeError, match="kernel=triton needs triton and a CUDA tensor"):
        packed(x)


@pytest.mark.parametrize("bits", range(2, 9))
def test_code_words_hold_every_code(bits):
    codes = torch.randint(0, 2**bits, (5, 23))
    words = triton_lut._code_words(codes, bits).long() & 0xFFFFFFFF
    per_word = 32 // bits
    k = torch.arange(23)
    unpacked = (words[k // per_word] >> ((k % per_word) * bits)[:, None]) & (2**bits - 1)
    assert torch.equal(unpacked.T, codes)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("recipe", "bits"), [("lsq-lsq", 8), ("uniform-asq", 8), ("post-asq", 6), ("post-asq", 4)])
def test_largest_sums_stay_exact(recipe, bits, device):
    """Every activation at qmax and every weight at the largest level: the chunk and total sums at their
    largest (on CUDA this checks the tensor cores' float32 chunk sums are exact up to the stated bound)."""
    k, n = 300, 24
    x = torch.rand(4, k) * 2
    packed = _packed(nn.Linear(k, n), x, recipe, bits)
    lut = packed.weight.lut()
    largest = int((lut.even.abs() + lut.odd.abs()).argmax())
    with torch.no_grad():
        packed.weight.codes.copy_(pack_codes(torch.full((n * k,), largest), bits))
    packed.plans.clear()  # the codes were changed in place
    x = torch.full((4, k), 1e4)
    on = _device(device)
    packed, x = packed.to(on), x.to(on)
    y, ref = _kernel(packed, x), _reference(packed, x)
    assert ref.abs().min() > 0
    _assert_same(y, ref)


COMPILE_FOR_SM90 = """
import json, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from asqpost.kernels import triton_lut
found = {}
forms = [(4, 1, 1, 0, "fp32", "fp32"), (8, 0, 0, 1, "bf16", "fp64")]
for bits, int8, odd, split, x, y in forms:
    table = "i64" if bits <= 4 else ("i8" if int8 else "i16")
    names = ["x", "step", "words", "table", "col_scale", "bias", "sqrt1_2", "y"]
    types = [x, "fp32", "i32", table, "fp64", "fp64", "fp64", y]
    signature = {f"{name}_ptr": f"*{t}" for name, t in zip(names, types)}
    signature.update({name: "i32" for name in ["m", "n", "k", "stride_xm", "stride_step", "qmin", "qmax"]})
    entry_bits = 8 if int8 else 16
    constants = dict(bits=bits, per_word=32 // bits, register_table=bits <= 4, entry_bits=entry_bits,
                     table_words=-(-(2**bits) // (64 // entry_bits)) if bits <= 4 else 0, table_stride=4,
                     dot_int8=bool(int8), has_odd=bool(odd), split=bool(split), has_bias=True,
                     quotient={"fp32": 0, "fp16": 1, "bf16": 2}[x], block_m=64, block_n=64, block_k=64)
    signature.update({name: "constexpr" for name in constants})
    source = ASTSource(fn=triton_lut._kernel(), signature=signature, constexprs=constants)
    ptx = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"enable_fp_fusion": False}).asm["ptx"]
    found[f"{bits}-{int8}-{split}"] = sorted({line.split()[0] for line in map(str.strip, ptx.splitlines())
                                              if line.startswith(("wgmma.mma_async", "div.", "fma.rn.f64"))})
print(json.dumps(found))
"""


def test_kernel_compiles_for_cuda_without_a_gpu(tmp_path):
    """The interpreter accepts programs the compiler rejects: compile two forms to sm_90 PTX (no GPU needed) and
    check the instructions the exactness claim rests on: tensor-core MMAs of the right types, IEEE division, and
    no fused float64 multiply-add in the rescale."""
    pytest.importorskip("triton.backends.nvidia")
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path), PYTHONPATH=os.pathsep.join(sys.path))
    result = subprocess.run(
        [sys.executable, "-c", COMPILE_FOR_SM90], env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads(result.stdout.splitlines()[-1])
    assert found == {
        "4-1-0": ["div.rn.f32", "wgmma.mma_async.sync.aligned.m64n64k32.s32.s8.s8"],
        "8-0-1": ["div.rn.f32", "wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16"],
    }


def test_importing_asqpost_does_not_import_triton():
    """triton loads on first use of the kernel: start-up stays fast and TRITON_INTERPRET may be set until then."""
    script = "import sys, asqpost, asqpost.export, asqpost.kernels; print('triton' in sys.modules)"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert result.stdout.split() == ["False"], result.stderr[-2000:]
