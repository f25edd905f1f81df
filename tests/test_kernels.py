import os
import shutil
import subprocess
import sys
import sysconfig
from dataclasses import replace

import pytest
import torch
from torch import nn
from torch.utils.cpp_extension import include_paths

from asqpost import QATConfig, calibrate, cpp, prepare_qat
from asqpost.config import recipe_names
from asqpost.export import convert_to_packed, integer_lut
from asqpost.kernels import Ineligible, backends, current_kernel, extension, get_backend, native, use_kernel
from asqpost.kernels.reference import exact_dtype, exact_run, integer_accumulators, reference_plan
from asqpost.levels import GRIDS, make_levels
from tiny_bert import tiny_bert_config

pytestmark = pytest.mark.numerics

needs_native = pytest.mark.skipif(not extension.available(), reason="native LUT kernel could not be built here")
NATIVE = get_backend("native")


def _prepare(packed):
    """The layer's native plan, or ``None`` where the native kernel does not take it."""
    plan = packed.plans.plan("native")
    return None if isinstance(plan, Ineligible) else plan


def _run(packed, x, plan, backend=NATIVE):
    """``packed`` computed by ``backend`` with ``plan`` (for the native backend: a variant of the layer's plan,
    another path or another copy of the weights)."""
    x = packed.folded(x)
    return backend.run(plan, x, None if packed.input_quant is None else packed.input_quant.step_of(x))


def _run_on(name, packed, x):
    """``packed`` computed by the backend ``name`` with the layer's own plan for it."""
    return _run(packed, x, packed.plans.plan(name), get_backend(name))


def _ref_plan(packed):
    return reference_plan(packed.spec(), torch.device("cpu"))


def test_native_kernel_builds_where_a_compiler_exists():
    """Native tests skip when the extension is unavailable; this one makes a broken build fail the suite."""
    if shutil.which(os.environ.get("CXX", "c++")) is None or shutil.which("ninja") is None:
        pytest.skip("no C++ compiler or ninja: the reference path is the expected fallback")
    if os.environ.get("ASQPOST_KERNEL") == "reference":
        pytest.skip("native kernel switched off")
    assert extension.available(), "the native LUT kernel failed to build (its error is in the log)"


def test_kernel_source_compiles_for_aarch64():
    """Off x86 the scalar path alone must build: compile the source with Debian's aarch64 cross-compiler.

    Compile only (-fsyntax-only, no linking), against this machine's torch and Python headers: they are the
    host's, which is fine here because both targets are LP64 Linux and none of those headers holds x86 code.
    The flags are those torch's extension build passes (C++20, the extension-name macros)."""
    cxx = shutil.which("aarch64-linux-gnu-g++")
    if cxx is None:
        pytest.skip("no aarch64 cross-compiler (Debian package g++-aarch64-linux-gnu)")
    source = cpp.SOURCE
    includes = [*include_paths(), sysconfig.get_paths()["include"]]
    command = [cxx, "-std=c++20", "-fsyntax-only", "-Wall", "-Werror"]
    command += ["-DTORCH_EXTENSION_NAME=asqpost_lut_kernel", "-DTORCH_API_INCLUDE_EXTENSION_H"]
    command += [f"-isystem{path}" for path in includes] + [str(source)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]


@needs_native
@pytest.mark.parametrize("grid", sorted(GRIDS))
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize(
    ("m", "k", "n"),
    [(1, 1, 1), (1, 5, 3), (1, 300, 80), (2, 9, 16), (3, 127, 5), (5, 129, 17), (7, 8, 31), (9, 64, 48), (64, 300, 33)],
)
def test_native_accumulators_equal_reference_exactly(grid, bits, m, k, n):
    levels = make_levels(grid, bits)
    lut = integer_lut(levels.table(dtype=torch.float64))
    if lut is None or max(lut.even.abs().max(), lut.odd.abs().max()) > 127:
        pytest.skip("table has no int8 form")
    codes = torch.randint(0, len(levels), (n, k))
    zero = int(((lut.even == 0) & (lut.odd == 0)).nonzero()[0])
    table_even, table_odd = torch.zeros(16, dtype=torch.int8), torch.zeros(16, dtype=torch.int8)
    table_even[: len(levels)], table_odd[: len(levels)] = lut.even.to(torch.int8), lut.odd.to(torch.int8)
    plan = native.NativePlan(
        weights=native.kernel_weights(codes, zero),
        lut_even=table_even,
        lut_odd=table_odd,
        has_odd=True,
        n=n,
        col_scale=torch.ones(n, dtype=torch.float64),
        bias=torch.zeros(0, dtype=torch.float64),
    )
    x = torch.randint(0, 256, (m, k)).to(torch.uint8)
    expected_even, expected_odd = x.long() @ lut.even[codes].T, x.long() @ lut.odd[codes].T
    for path in extension.available_paths():
        even, odd = native.lut_matmul(x, replace(plan, path=path))
        assert torch.equal(even.long(), expected_even), path
        assert torch.equal(odd.long(), expected_odd), path


def _plan_of(lut_even: torch.Tensor, codes: torch.Tensor, path: str = "auto") -> native.NativePlan:
    """A plan for ``codes`` (N, K) through a 16-entry even table (no odd levels), unit rescale."""
    n = codes.shape[0]
    return native.NativePlan(
        weights=native.kernel_weights(codes, 0),
        lut_even=lut_even.to(torch.int8),
        lut_odd=torch.zeros(16, dtype=torch.int8),
        has_odd=False,
        n=n,
        col_scale=torch.ones(n, dtype=torch.float64),
        bias=torch.zeros(0, dtype=torch.float64),
        path=path,
    )


@needs_native
def test_paths_are_reported_once_fastest_first():
    paths = extension.available_paths()
    assert paths[-1] == "scalar" and set(paths) <= {"avx512_vnni", "avx2", "scalar"}
    assert extension.capability() == paths[0]
    plan = _plan_of(torch.arange(16), torch.randint(0, 16, (3, 8)))
    assert native.kernel_path(plan) == paths[0]
    for path in paths:
        assert native.kernel_path(replace(plan, path=path)) == path
    with pytest.raises(RuntimeError, match="not one this CPU runs"):
        native.lut_matmul(torch.zeros(1, 8, dtype=torch.uint8), replace(plan, path="neon"))


@needs_native
@pytest.mark.parametrize("biggest", [64, 65, 96, 127, -128])
def test_avx2_sums_every_int8_table_exactly(biggest):
    """AVX2 adds u8 x s8 products in int16 pairs, which saturate once 2 * 255 * max|lut| > 32767: a table beyond
    [-64, 64] runs split in two narrow ones (POST on the int8 lattice reaches 96), still on AVX2."""
    if "avx2" not in extension.available_paths():
        pytest.skip("this CPU has no AVX2")
    table = torch.full((16,), biggest)
    table[::3] = -biggest // 2  # mixed signs
    codes = torch.randint(0, 16, (21, 40))
    x = torch.full((3, 40), 255, dtype=torch.uint8)  # the largest pairs: 2 * 255 * biggest
    x[1] = torch.randint(0, 256, (40,), dtype=torch.uint8)
    plan = _plan_of(table, codes, "avx2")
    assert native.kernel_path(plan) == "avx2"
    even, odd = native.lut_matmul(x, plan)
    assert odd is None
    assert torch.equal(even.long(), x.long() @ table[codes].T)


@needs_native
@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("lut_even", torch.zeros(16, dtype=torch.int32), "luts must be int8"),
        ("n", 40, r"ceil\(n / 16\) tiles"),
        ("col_scale", torch.ones(4, dtype=torch.float64), r"col_scale must be float64 \(n,\)"),
        ("bias", torch.zeros(3, dtype=torch.float64), "bias must be float64"),
    ],
)
def test_native_refuses_a_malformed_plan(field, value, message):
    plan = _plan_of(torch.zeros(16), torch.zeros(5, 8, dtype=torch.long))
    x = torch.ones(2, 8, dtype=torch.uint8)
    assert torch.equal(native.lut_matmul(x, plan)[0], torch.zeros(2, 5, dtype=torch.int32))
    with pytest.raises(RuntimeError, match=message):
        native.lut_matmul(x, replace(plan, **{field: value}))


def _layer(kind):
    if kind == "linear":
        return nn.Linear(37, 11), torch.rand(4, 37) * 2
    if kind == "tokens":
        return nn.Linear(24, 9), torch.rand(2, 5, 24) * 2
    return nn.Conv2d(5, 7, 3, stride=2, padding=1, dilation=1), torch.rand(3, 5, 9, 11) * 2


@needs_native
@pytest.mark.parametrize("kind", ["linear", "tokens", "conv"])
@pytest.mark.parametrize("recipe", recipe_names())  # every registered weight x activation method
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_native_layer_equals_reference_layer(kind, recipe, bits, monkeypatch):
    layer, x = _layer(kind)
    q = prepare_qat(nn.Sequential(layer), QATConfig.recipe(recipe, bits, first=None, last=None)).eval()
    calibrate(q, [x])
    packed = convert_to_packed(q)[0]
    plan = _prepare(packed)
    assert plan is not None, "unsigned-input <= 4-bit linear and conv layers take the native kernel"
    _assert_native_equals_reference(packed, plan, kind, x, monkeypatch)


@needs_native
@pytest.mark.parametrize("kind", ["linear", "tokens", "conv"])
@pytest.mark.parametrize("recipe", ["lsq-lsq", "lsq-asq", "post-asq"])
@pytest.mark.parametrize("signed", [False, True])
def test_8_bit_weights_run_natively_as_direct_int8(kind, recipe, signed, monkeypatch):
    layer, x = _layer(kind)
    x = x - 1 if signed else x
    q = prepare_qat(nn.Sequential(layer), QATConfig.recipe(recipe, 8, first=None, last=None)).eval()
    calibrate(q, [x])
    packed = convert_to_packed(q, single_sum=True)[0]  # 8-bit POST: int8 levels, one sum
    plan = _prepare(packed)
    assert plan is not None and plan.direct and not plan.has_odd
    for path in extension.available_paths():  # AVX2 splits the int8 weights: its int16 pairs cannot saturate
        assert native.kernel_path(replace(plan, path=path)) == path
    _assert_native_equals_reference(packed, plan, kind, x, monkeypatch)  # on every path
    if recipe == "post-asq":  # exact 8-bit POST (two sums, integers beyond int8) is not taken
        assert _prepare(convert_to_packed(q)[0]) is None


@needs_native
@pytest.mark.parametrize("direct", [False, True])
@pytest.mark.parametrize(("m", "n"), [(8, 16), (9, 33), (17, 48), (520, 33), (1100, 80)])
def test_batched_tile_pairs_equal_reference_exactly(direct, m, n):
    """Batched rows serve two tiles at once (even-only grids, direct int8): odd tile counts, partial row groups
    and several row blocks, at one and two threads, all exact."""
    k = 72
    if direct:
        weights = torch.randint(-128, 128, (n, k))
        plan = replace(_plan_of(torch.zeros(16), torch.zeros(n, k, dtype=torch.long)), direct=True)
        plan = replace(plan, weights=native.direct_weights(weights))
    else:
        table = torch.tensor([0, -8, -7, -6, -5, -4, -3, -2, -1, 1, 2, 3, 4, 5, 6, 7])
        codes = torch.randint(0, 16, (n, k))
        weights, plan = table[codes], _plan_of(table, codes)
    x = torch.randint(0, 256, (m, k)).to(torch.uint8)
    expected = x.long() @ weights.long().T
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            for path in extension.available_paths():
                even, _ = native.lut_matmul(x, replace(plan, path=path))
                assert torch.equal(even.long(), expected), (path, threads)
    finally:
        torch.set_num_threads(before)


def test_direct_weights_layout():
    w = torch.arange(-60, 60).reshape(3, 40) % 127  # 3 rows (padded to 16), 40 k (padded to 40: 5 blocks)
    tiles = native.direct_weights(w)
    assert tiles.shape == (1, 40 * 16) and tiles.dtype == torch.int8
    for r, k in [(0, 0), (2, 5), (1, 39), (2, 36)]:
        b, i = divmod(k, 8)
        byte = 128 * b + (64 if i >= 4 else 0) + 4 * r + i % 4
        assert int(tiles[0, byte]) == int(w[r, k])
    assert int(tiles[0, 4 * 5 + 0]) == 0, "padded rows hold zeros"


def _assert_native_equals_reference(packed, plan, kind, x, monkeypatch):
    if kind != "conv":
        x_int, _ = packed.input_quant(x)
        x_int = x_int.detach()
        rows = (x_int.reshape(-1, x_int.shape[-1]) + plan.offset).to(torch.uint8)  # codes + offset, as the kernel
        nat_even, nat_odd = native.lut_matmul(rows, plan)
        ref_even, ref_odd = integer_accumulators(_ref_plan(packed), x_int)
        assert torch.equal(nat_even.double(), ref_even.reshape(rows.shape[0], -1).double())
        assert (nat_odd is None) == (ref_odd is None)
        if ref_odd is not None:
            assert torch.equal(nat_odd.double(), ref_odd.reshape(rows.shape[0], -1).double())
    monkeypatch.setattr(backends, "DEFAULT_KERNEL", "reference")
    with torch.no_grad():
        ref = packed(x)
    monkeypatch.setattr(backends, "DEFAULT_KERNEL", "native")
    for path in extension.available_paths():  # every CPU path, quantize and rescale included
        with torch.no_grad():
            out = _run(packed, x, replace(plan, path=path))
        assert torch.equal(out, ref), path


def test_reference_sums_are_exact_in_either_float_format():
    layer, x = _layer("conv")
    q = prepare_qat(nn.Sequential(layer), QATConfig.recipe("post-asq", 4, first=None, last=None)).eval()
    calibrate(q, [x])
    packed = convert_to_packed(q)[0]
    assert exact_dtype(packed.spec()) == torch.float32
    x_int, _ = packed.input_quant(x)
    acc32, _ = integer_accumulators(_ref_plan(packed), x_int)
    even, _ = packed.spec().weight.integer_weights()
    acc64 = packed.geometry.apply(x_int.double(), even.double())
    assert torch.equal(acc32.double(), acc64)


@pytest.mark.parametrize("fan_in", [1536, 1100])
def test_wide_linear_sums_run_exactly_in_float32_pieces(fan_in):
    torch.manual_seed(0)  # 8-bit codes into a wide linear: whole float32 sums could pass 2^24
    layer = nn.Linear(fan_in, 5)
    with torch.no_grad():
        layer.weight.copy_(torch.sign(torch.randn(5, fan_in)) * (0.9 + 0.1 * torch.rand(5, fan_in)))
    x = torch.randn(3, 4, fan_in)
    q = prepare_qat(nn.Sequential(layer), QATConfig.recipe("lsq-lsq", 8, first=None, last=None)).eval()
    calibrate(q, [x])
    packed = convert_to_packed(q)[0]
    assert exact_dtype(packed.spec()) == torch.float64
    run = exact_run(packed.spec())
    assert run is not None and run < fan_in
    weights, _ = packed.spec().weight.integer_weights()
    x_int = torch.sign(weights[:1].double()).expand(3, fan_in) * packed.input_quant.qmax  # row 0's largest sum
    even, _ = integer_accumulators(_ref_plan(packed), x_int.float())
    assert even.dtype == torch.float64
    assert torch.equal(even, packed.geometry.apply(x_int, weights.double()))
    assert even[:, 0].min() >= 2**24, "the sums really pass float32's exact range"


@needs_native
def test_layer_without_integer_table_takes_the_float_path():
    layer, x = _layer("linear")
    x = x - 1  # signed inputs, 8-bit POST codes (no small-integer table): not for the u8 x 4-bit kernel
    q = prepare_qat(nn.Sequential(layer), QATConfig.recipe("post-lsq", 8, first=None, last=None)).eval()
    calibrate(q, [x])
    packed = convert_to_packed(q)[0]
    assert _prepare(packed) is None
    with torch.no_grad():
        out = packed(x)
        assert packed.weight.lut() is None
        assert torch.equal(out, _run_on("float", packed, x)), "the decoded-float path runs instead"
        assert torch.allclose(out, q(x), rtol=1e-4, atol=1e-5)


def test_kernel_choice_is_validated():
    layer, x = _layer("linear")
    q = prepare_qat(nn.Sequential(layer), QATConfig.recipe("post-asq", 4, first=None, last=None)).eval()
    calibrate(q, [x])
    packed = convert_to_packed(q)[0]
    with pytest.raises(ValueError, match="kernel must be one of auto, native, triton, reference"):
        packed(x, kernel="fastest")
    with pytest.raises(ValueError, match="kernel must be one of"), use_kernel("fastest"):
        pass
    env = {**os.environ, "ASQPOST_KERNEL": "fastest"}  # read once, when asqpost.kernels is imported
    result = subprocess.run(
        [sys.executable, "-c", "import asqpost.kernels"], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode != 0 and "ASQPOST_KERNEL must be one of" in result.stderr


def test_the_selection_is_an_argument_a_block_or_the_default(monkeypatch):
    layer, x = _layer("linear")
    q = prepare_qat(nn.Sequential(layer), QATConfig.recipe("post-asq", 4, first=None, last=None)).eval()
    calibrate(q, [x])
    packed = convert_to_packed(q)[0]
    seen = []
    reference = get_backend("reference")
    monkeypatch.setattr(reference, "run", lambda plan, x, step: seen.append(current_kernel()) or x.new_zeros(1))
    monkeypatch.setattr(backends, "DEFAULT_KERNEL", "reference")
    packed(x)
    with use_kernel("auto"), use_kernel("reference"):
        packed(x)
        assert current_kernel() == "reference"
    assert current_kernel() == "reference" and seen == ["reference", "reference"]
    monkeypatch.setattr(backends, "DEFAULT_KERNEL", "auto")
    with use_kernel("native"):
        packed(x, kernel="reference")  # the argument wins over the block
    assert len(seen) == 3
    assert backends.list_backends() == ["triton", "native", "torch sums", "reference", "float", "onnx"]
    with pytest.raises(ValueError, match="already registered"):
        backends.register_backend(reference)


@needs_native
def test_native_linear_propagates_nan_rows_like_the_reference(monkeypatch):
    layer, x = _layer("linear")
    q = prepare_qat(nn.Sequential(layer), QATConfig.recipe("post-lsq", 4, first=None, last=None)).eval()
    calibrate(q, [x])
    packed = convert_to_packed(q)[0]
    x = x.clone()
    x[1, 3] = float("nan")
    outs = {}
    for kernel in ("reference", "native"):
        monkeypatch.setattr(backends, "DEFAULT_KERNEL", kernel)
        with torch.no_grad():
            outs[kernel] = packed(x)
    for out in outs.values():
        assert torch.isnan(out[1]).all() and torch.isfinite(out[[0, 2, 3]]).all()
    assert torch.equal(outs["native"][[0, 2, 3]], outs["reference"][[0, 2, 3]])


@needs_native
@pytest.mark.parametrize(
    ("channels", "kernel", "stride", "padding", "dilation", "size"),
    [
        (5, 3, 1, 1, 1, (9, 11)),
        (16, 3, 2, 1, 1, (8, 8)),
        (3, (3, 2), (2, 1), (0, 2), (2, 1), (10, 7)),
        (24, 1, 1, 0, 1, (4, 5)),
        (9, 5, 3, 2, 1, (6, 6)),
    ],
)
@pytest.mark.parametrize("recipe", ["post-asq", "lsq-lsq"])
def test_native_conv_equals_reference(channels, kernel, stride, padding, dilation, size, recipe, monkeypatch):
    layer = nn.Conv2d(channels, 19, kernel, stride=stride, padding=padding, dilation=dilation)
    x = torch.rand(3, channels, *size) * 2
    q = prepare_qat(nn.Sequential(layer), QATConfig.recipe(recipe, 4, first=None, last=None)).eval()
    calibrate(q, [x])
    packed = convert_to_packed(q)[0]
    with torch.no_grad():
        assert _run(packed, x, _prepare(packed)) is not None, "the native conv ran"
    # The adapter's means are reduced in memory order, so a channels_last input may round its beta differently:
    # each layout is compared with the reference on that same tensor.
    x_cl = x.contiguous(memory_format=torch.channels_last)
    monkeypatch.setattr(backends, "DEFAULT_KERNEL", "reference")
    with torch.no_grad():
        ref, ref_cl = packed(x), packed(x_cl)
    monkeypatch.setattr(backends, "DEFAULT_KERNEL", "native")
    for path in extension.available_paths():
        plan = replace(_prepare(packed), path=path)
        with torch.no_grad():
            out = _run(packed, x, plan)
            channels_last = _run(packed, x_cl, plan)
        assert out.shape == ref.shape
        assert torch.equal(out, ref), path
        assert torch.equal(channels_last, ref_cl), path


@needs_native
def test_native_conv_with_nan_input_matches_reference(monkeypatch):
    layer = nn.Conv2d(4, 6, 3, padding=1)
    x = torch.rand(2, 4, 7, 7)
    q = prepare_qat(nn.Sequential(layer), QATConfig.recipe("post-lsq", 4, first=None, last=None)).eval()
    calibrate(q, [x])
    packed = convert_to_packed(q)[0]
    x[1, 2, 3, 3] = float("nan")
    with torch.no_grad():
        assert torch.isnan(_run(packed, x, _prepare(packed))).any(), "the native conv marks the NaN windows itself"
    outs = {}
    for kernel_choice in ("reference", "native"):
        monkeypatch.setattr(backends, "DEFAULT_KERNEL", kernel_choice)
        with torch.no_grad():
            outs[kernel_choice] = packed(x)
    nan = torch.isnan(outs["reference"])
    assert nan[1, :, 2:5, 2:5].all() and not nan[0].any(), "NaN reaches exactly the outputs that see it"
    assert torch.equal(torch.isnan(outs["native"]), nan)
    assert torch.equal(outs["native"][~nan], outs["reference"][~nan])


@needs_native
def test_grouped_conv_takes_the_reference_path():
    layer = nn.Conv2d(8, 8, 3, padding=1, groups=4)
    q = prepare_qat(nn.Sequential(layer), QATConfig.recipe("post-asq", 4, first=None, last=None)).eval()
    x = torch.rand(2, 8, 5, 5)
    calibrate(q, [x])
    packed = convert_to_packed(q)[0]
    assert _prepare(packed) is None
    with torch.no_grad():
        assert torch.allclose(packed(x), q(x), rtol=1e-4, atol=1e-5)


@needs_native
@pytest.mark.parametrize(
    ("layer", "shape", "recipe", "bits"),
    [
        # 8-bit codes whose integer levels pass int8 (8-bit LSQ and single-sum POST run direct int8 natively)
        (nn.Conv2d(1, 8, 3, padding=1), (3, 1, 6, 6), "apot-lsq", 8),
        (nn.Conv2d(8, 8, 3, padding=1, groups=4), (2, 8, 5, 5), "post-asq", 4),  # grouped
        (nn.Linear(12, 5), (4, 12), "uniform-lsq", 8),
    ],
)
def test_ineligible_layers_take_torch_sums_with_native_rescale(layer, shape, recipe, bits, monkeypatch):
    q = prepare_qat(nn.Sequential(layer), QATConfig.recipe(recipe, bits, first=None, last=None)).eval()
    x = torch.randn(*shape)
    calibrate(q, [x])
    packed = convert_to_packed(q)[0]
    assert _prepare(packed) is None
    assert native.ineligible_reason(packed.spec()) in (
        "8-bit weight levels span integers beyond int8",
        "grouped conv (groups=4)",
    )
    x[0].view(-1)[1] = float("nan")
    with torch.no_grad():
        ref = packed(x, kernel="reference")
        out = _run_on("torch sums", packed, x)
        monkeypatch.setattr(backends, "DEFAULT_KERNEL", "auto")
        auto = packed(x)
    nan = torch.isnan(ref)
    assert nan.any() and not nan.all()
    for y in (out, auto):
        assert y.shape == ref.shape
        assert torch.equal(torch.isnan(y), nan)
        assert torch.equal(y[~nan], ref[~nan])


@needs_native
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("recipe", ["post-lsq", "post-asq"])
def test_non_float32_inputs_match_the_reference_exactly(dtype, kind, recipe, monkeypatch):
    """Native code rounds y to float32 once; other dtypes take the reference so no double rounding creeps in."""
    layer, x = _layer(kind)
    q = prepare_qat(nn.Sequential(layer), QATConfig.recipe(recipe, 4, first=None, last=None)).eval()
    calibrate(q, [x])
    packed = convert_to_packed(q)[0]
    x = x.to(dtype)
    with torch.no_grad():
        ref = packed(x, kernel="reference")
        monkeypatch.setattr(backends, "DEFAULT_KERNEL", "native")
        out = packed(x)
    assert out.dtype == dtype
    assert torch.equal(out, ref)


@needs_native
@pytest.mark.parametrize(
    ("kind", "per_token"), [("linear", False), ("tokens", False), ("tokens", True), ("conv", False)]
)
@pytest.mark.parametrize("bits", [2, 4])
def test_native_equals_reference_with_the_scale_following_adapter(kind, per_token, bits, monkeypatch):
    """The native kernel takes the steps from ``input_quant.step_of`` in Python: any adapter form is exact."""
    layer, x = _layer(kind)
    x = x * torch.logspace(-2, 2, x.shape[0], base=2).reshape((-1,) + (1,) * (x.dim() - 1))
    act = {"adapter_form": "scale", "per_token": per_token}
    config = QATConfig.recipe("post-asq", bits, act=act, first=None, last=None)
    q = prepare_qat(nn.Sequential(layer), config).eval()
    calibrate(q, [x])
    with torch.no_grad():
        q[0].input_quantizer.adapter.gamma.fill_(1.2)
    packed = convert_to_packed(q)[0]
    assert packed.input_quant.adapter.form == "scale"
    assert _prepare(packed) is not None, "the native kernel takes this layer"
    outs = {}
    for kernel in ("reference", "native"):
        monkeypatch.setattr(backends, "DEFAULT_KERNEL", kernel)
        with torch.no_grad():
            outs[kernel] = packed(x)
    assert torch.equal(outs["native"], outs["reference"])
    with torch.no_grad():
        assert torch.allclose(outs["native"], q(x), rtol=1e-4, atol=1e-4)


def _signed_plan(codes: torch.Tensor, lut, zero: int, offset: int) -> native.NativePlan:
    """A plan for ``codes`` (N, K) through ``lut`` whose activation codes enter offset by ``offset``."""
    n = codes.shape[0]
    table_even, table_odd = torch.zeros(16, dtype=torch.int8), torch.zeros(16, dtype=torch.int8)
    table_even[: lut.even.numel()], table_odd[: lut.odd.numel()] = lut.even.to(torch.int8), lut.odd.to(torch.int8)
    plan = native.NativePlan(
        weights=native.kernel_weights(codes, zero),
        lut_even=table_even,
        lut_odd=table_odd,
        has_odd=True,
        n=n,
        col_scale=torch.ones(n, dtype=torch.float64),
        bias=torch.zeros(0, dtype=torch.float64),
    )
    return native.with_offset(plan, offset, lut.even[codes], lut.odd[codes])


@needs_native
@pytest.mark.parametrize("grid", ["post", "uniform"])
@pytest.mark.parametrize("act_bits", [2, 3, 4, 5, 8])
@pytest.mark.parametrize(("m", "k", "n"), [(1, 5, 3), (1, 300, 80), (3, 127, 5), (9, 64, 48), (64, 129, 33)])
def test_native_signed_accumulators_equal_reference_exactly(grid, act_bits, m, k, n):
    """Signed codes in [-2^(b-1), 2^(b-1) - 1] enter as code + 2^(b-1); the kernel subtracts the offset's share."""
    levels = make_levels(grid, 4)
    lut = integer_lut(levels.table(dtype=torch.float64))
    codes = torch.randint(0, len(levels), (n, k))
    zero = int(((lut.even == 0) & (lut.odd == 0)).nonzero()[0])
    offset = 2 ** (act_bits - 1)
    plan = _signed_plan(codes, lut, zero, offset)
    x = torch.randint(-offset, offset, (m, k))
    x[0, :] = -offset  # the extremes of the range in every product
    x[-1, : k // 2] = offset - 1
    expected_even, expected_odd = x @ lut.even[codes].T, x @ lut.odd[codes].T
    for path in extension.available_paths():
        even, odd = native.lut_matmul((x + offset).to(torch.uint8), replace(plan, path=path))
        assert torch.equal(even.long(), expected_even), path
        assert torch.equal(odd.long(), expected_odd), path


def _signed_layer(kind: str) -> tuple[nn.Module, torch.Tensor]:
    """A layer and a signed input with odd sizes (rows, features, channels not multiples of 8 or 16)."""
    if kind == "linear":
        return nn.Linear(37, 11), torch.randn(5, 37)
    if kind == "tokens":
        return nn.Linear(24, 19), torch.randn(3, 7, 24)
    return nn.Conv2d(5, 7, 3, stride=2, padding=1), torch.randn(3, 5, 9, 11)


def _packed(layer: nn.Module, x: torch.Tensor, recipe: str, act: dict, weight_bits: int = 4):
    config = QATConfig.recipe(recipe, weight_bits, act=act, first=None, last=None)
    q = prepare_qat(nn.Sequential(layer), config).eval()
    calibrate(q, [x])
    return q, convert_to_packed(q)[0]


def _outputs_on_every_path(packed, x, monkeypatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The reference output and the native one on every CPU path (the layer's plan, each path in turn)."""
    monkeypatch.setattr(backends, "DEFAULT_KERNEL", "reference")
    with torch.no_grad():
        ref = packed(x)
    monkeypatch.setattr(backends, "DEFAULT_KERNEL", "native")
    outs = {}
    for path in extension.available_paths():
        with torch.no_grad():
            outs[path] = _run(packed, x, replace(_prepare(packed), path=path))
    return ref, outs


SIGNED_CASES = [
    (kind, recipe, act)
    for kind in ("linear", "tokens", "conv")
    for recipe, act in [
        ("lsq-lsq", {}),
        ("post-lsq", {}),
        ("post-asq", {}),  # one step per sample
        ("uniform-asq", {"adapter_form": "paper"}),
    ]
] + [("tokens", "post-asq", {"per_token": True})]  # one step per token


@needs_native
@pytest.mark.parametrize(("kind", "recipe", "act"), SIGNED_CASES)
@pytest.mark.parametrize("act_bits", [2, 3, 4, 6, 8])
def test_native_signed_input_layer_equals_reference(kind, recipe, act, act_bits, monkeypatch):
    layer, x = _signed_layer(kind)
    q, packed = _packed(layer, x, recipe, {**act, "bits": act_bits, "signed": True})
    assert packed.input_quant.qmin == -(2 ** (act_bits - 1)) and packed.input_quant.qmax == 2 ** (act_bits - 1) - 1
    plan = _prepare(packed)
    assert plan is not None, packed.plans.describe(torch.device("cpu"))
    assert plan.offset == 2 ** (act_bits - 1)
    ref, outs = _outputs_on_every_path(packed, x, monkeypatch)
    for path, out in outs.items():
        assert out.shape == ref.shape
        assert torch.equal(out, ref), path
    with torch.no_grad():
        assert torch.allclose(ref, q(x), rtol=1e-4, atol=1e-4), "and the packed layer is the fake-quant one"


@needs_native
@pytest.mark.parametrize("kind", ["linear", "tokens"])
def test_native_signed_input_propagates_nan_rows_like_the_reference(kind, monkeypatch):
    layer, x = _signed_layer(kind)
    _, packed = _packed(layer, x, "post-asq", {"per_token": kind == "tokens"})
    assert _prepare(packed).offset > 0
    x = x.clone()
    x.view(-1, x.shape[-1])[1, 3] = float("nan")
    ref, outs = _outputs_on_every_path(packed, x, monkeypatch)
    nan = torch.isnan(ref)
    assert nan.any() and not nan.all()
    for path, out in outs.items():
        assert torch.equal(torch.isnan(out), nan), path
        assert torch.equal(out[~nan], ref[~nan]), path


@needs_native
def test_native_takes_a_token_input_without_copying_it(monkeypatch):
    """(N, T, C) float32 rows reach the kernel as the input itself (the kernel reads its storage in place)."""
    layer, x = _signed_layer("tokens")
    _, packed = _packed(layer, x, "post-asq", {"per_token": True})
    module, seen = extension.extension(), []
    kernel = module.lut_linear_forward

    def spy(x, step, qmin, qmax, *plan):
        seen.append((x.data_ptr(), tuple(x.shape), step.numel()))
        return kernel(x, step, qmin, qmax, *plan)

    monkeypatch.setattr(module, "lut_linear_forward", spy)
    with torch.no_grad():
        y = _run(packed, x, _prepare(packed))
    assert seen == [(x.data_ptr(), (3, 7, 24), 21)], "one call, on the input's own storage, one step per token"
    assert y.shape == (3, 7, 19)


@needs_native
def test_kernel_results_do_not_depend_on_the_thread_count(monkeypatch):
    """The kernel splits rows and tiles over torch's intra-op threads; every split gives the same bits. (The ASQ
    steps come from the adapter, a torch matmul whose BLAS may split its sums by the thread count: computed once
    here, so the kernel alone is under test.)"""
    layer, x = nn.Linear(512, 1024), torch.randn(2, 300, 512)  # one row: 64 tiles, enough to split
    _, packed = _packed(layer, x[:, :8], "post-asq", {"per_token": True})
    conv, xc = nn.Conv2d(24, 40, 3, padding=1), torch.randn(2, 24, 20, 20)
    _, packed_conv = _packed(conv, xc, "post-lsq", {})
    row, rows = x[:1, :1], x
    with torch.no_grad():
        steps = {id(t): packed.input_quant.step_of(t) for t in (row, rows)}
    monkeypatch.setattr(packed.input_quant, "step_of", lambda t: steps[id(t)])
    before = torch.get_num_threads()
    outs = {}
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            assert extension.threads() == threads, "the kernel reads torch's thread count"
            with torch.no_grad():
                outs[threads] = [
                    _run(packed, row, _prepare(packed)),  # one row: tiles split
                    _run(packed, rows, _prepare(packed)),  # 600 rows: row blocks split too
                    _run(packed_conv, xc, _prepare(packed_conv)),
                ]
    finally:
        torch.set_num_threads(before)
    for one, two in zip(outs[1], outs[2], strict=True):
        assert torch.equal(one, two)


def _mixed_float() -> nn.Module:
    model = nn.Sequential(nn.Conv2d(4, 4, 1, groups=2), nn.Flatten(), nn.Linear(36, 20), nn.Linear(20, 16))
    return model.append(nn.ReLU()).append(nn.Linear(16, 3))


def _mixed_model() -> tuple[nn.Module, torch.Tensor]:
    """A packed model whose layers take every path: a signed-input 4-bit linear (native), an 8-bit POST linear
    (float), a grouped conv (torch sums) and a float-weight linear."""
    model = _mixed_float()
    overrides = (("3", 8), ("5", {"weight": "float"}))
    config = QATConfig.recipe("post-asq", 4, first=None, last=None, overrides=overrides)
    q = prepare_qat(model, config).eval()
    x = torch.randn(6, 4, 3, 3)
    calibrate(q, [x])
    return convert_to_packed(q), x


@needs_native
def test_kernel_report_names_each_layers_path_and_reason(monkeypatch):
    from asqpost.export import kernel_report, kernel_summary

    packed, x = _mixed_model()
    report = {entry.name: entry for entry in kernel_report(packed)}
    assert list(report) == ["0", "2", "3", "5"]
    fastest = f"native {extension.capability()}"
    assert (report["2"].kind, report["2"].path, report["2"].reason) == ("linear", fastest, "signed input, offset codes")
    assert report["0"].path == "torch sums" and "grouped conv" in report["0"].reason
    assert report["3"].path == "float" and "no small-integer form" in report["3"].reason  # 8-bit POST
    assert report["5"].path == "float" and report["5"].reason == "float weight"
    summary = kernel_summary(list(report.values()))
    assert summary.startswith("4 packed layers: ") and f"1 {fastest} (signed input" in summary
    monkeypatch.setattr(backends, "DEFAULT_KERNEL", "reference")
    assert kernel_report(packed)[1].path == "reference"
    # the report is what runs: the native layer's output is the native kernel's
    monkeypatch.setattr(backends, "DEFAULT_KERNEL", "auto")
    layer = packed[2]
    with torch.no_grad():
        h = packed[1](packed[0](x))
        assert torch.equal(layer(h), _run(layer, h, _prepare(layer)))


@needs_native
def test_one_log_line_per_packed_model(tmp_path, caplog):
    from asqpost.export import load_packed, save_packed

    model, _ = _mixed_model()
    path = tmp_path / "m.safetensors"
    save_packed(model, path)
    with caplog.at_level("INFO", logger="asqpost.export.modules"):
        load_packed(path, _mixed_float())
    lines = [r.getMessage() for r in caplog.records if r.name == "asqpost.export.modules"]
    assert len(lines) == 1 and lines[0].startswith(f"{path}: 4 packed layers: "), lines


@needs_native
def test_cli_run_prints_the_kernel_plan(tmp_path, capsys):
    import json

    from asqpost.cli import main
    from asqpost.export import save_packed
    from asqpost.models import create_model

    model = create_model("smallcnn", 4, (1, 16, 16))
    q = prepare_qat(model, QATConfig.recipe("post-asq", 4)).eval()
    calibrate(q, [torch.rand(8, 1, 16, 16)])
    spec = {"name": "smallcnn", "num_classes": 4, "input_shape": [1, 16, 16], "kwargs": {}}
    save_packed(convert_to_packed(q), tmp_path / "m.safetensors", spec)
    assert main(["run", str(tmp_path / "m.safetensors"), "--data", "synthetic", "--kernels"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == ["layer", "kind", "path", "reason"]
    assert "native" in out and "accuracy" in out
    assert main(["run", str(tmp_path / "m.safetensors"), "--data", "synthetic", "--kernels", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert {"name", "kind", "path", "reason"} == set(result["kernels"][0])


@needs_native
@pytest.mark.parametrize("per_token", [False, True])
def test_tiny_bert_runs_every_linear_layer_natively_and_exactly(per_token, monkeypatch):
    """A transformer's Linear inputs are signed: all of them take the native kernel, bit-identical to the
    reference, and the packed model is the fake-quant one within float rounding."""
    transformers = pytest.importorskip("transformers")
    from asqpost.export import kernel_report

    config = tiny_bert_config(transformers)
    model = transformers.BertModel(config).eval()
    qat = QATConfig.recipe("post-asq", 4, act={"per_token": per_token}, first=None, last=None)
    q = prepare_qat(model, qat).eval()
    ids = torch.randint(0, 64, (2, 9))
    calibrate(q, [ids])
    packed = convert_to_packed(q)
    report = kernel_report(packed)
    # 13 Linear layers; the pooler, unused by a token-embedding forward, stays float
    assert len(report) == 12 and {e.path for e in report} == {f"native {extension.capability()}"}
    outs = {}
    for kernel in ("reference", "native"):
        monkeypatch.setattr(backends, "DEFAULT_KERNEL", kernel)
        with torch.no_grad():
            outs[kernel] = packed(ids).last_hidden_state
    assert torch.equal(outs["native"], outs["reference"])
    with torch.no_grad():
        assert torch.allclose(outs["native"], q(ids).last_hidden_state, rtol=1e-4, atol=1e-4)
