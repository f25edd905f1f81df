"""The device check: everything about the GPU path that needs a GPU, measured in one run on one card.

    python benchmarks/gpu_check.py --out results/gpu-h100          # on a GPU: at most ~8 minutes on one H100
    python benchmarks/gpu_check.py --out /tmp/gpu-dry --dry-run     # the same code paths on the CPU, tiny sizes

Writes ``gpu_check.json`` (every number) and ``gpu_check.md`` (the tables, with the card's name) into ``--out``:

1. ``cuda_tests``: ``pytest -m cuda`` in a subprocess (pass / fail / skip counts);
2. ``qat_step``: one QAT training step (forward, backward, SGD) of ResNet-18 at 224x224, batch 128, synthetic data,
   float vs LSQ vs ASQ + POST, eager and ``torch.compile``d, bf16 autocast (compile time reported apart); the repo's
   ResNet-20 stands in when torchvision is missing;
3. ``packed_layer``: the packed 4-bit POST + ASQ linear layer at 4096x4096 and 11008x4096, batch 1 / 16 / 64: the
   Triton LUT kernel vs ``F.linear`` in fp16 vs torch's int4 ``_weight_int4pack_mm`` (where the build has it),
   and a copy of the packed codes (the memory floor of reading them: half a copy's time, which reads and writes);
4. ``end_to_end``: the packed ResNet-18 vs its fp16 float model at batch 1 and 64.

Times are medians over repeats, taken with CUDA events on a GPU (``perf_counter`` around synchronised calls in the
dry run). ``--dry-run`` uses tiny sizes, Triton's interpreter, and the ``eager`` compile backend (Dynamo only, no
codegen), so it checks the plumbing, not the speed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Sizes:
    """What each section measures: the full check, or the dry run's tiny stand-ins."""

    image: int
    batch: int
    layers: tuple[tuple[int, int], ...]  # (out features, in features)
    layer_batches: tuple[int, ...]
    e2e_batches: tuple[int, ...]
    repeats: int
    warmup: int
    test_paths: tuple[str, ...]
    compile_backend: str
    test_timeout_s: int


FULL = Sizes(224, 128, ((4096, 4096), (11008, 4096)), (1, 16, 64), (1, 64), 20, 3, ("tests",), "inductor", 180)
DRY = Sizes(16, 4, ((64, 128), (96, 128)), (1, 4), (1, 2), 2, 0, ("tests/test_gpu_path.py",), "eager", 120)


def _args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for gpu_check.json and gpu_check.md")
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU: the same code paths")
    parser.add_argument(
        "--skip", nargs="*", default=[], choices=["cuda_tests", "qat_step", "packed_layer", "end_to_end"]
    )
    parser.add_argument("--budget-s", type=float, default=420.0, help="sections left when this is spent are skipped")
    return parser.parse_args()


def main() -> None:
    args = _args()
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("gpu_check needs a CUDA device; use --dry-run to check the script on the CPU")
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the Triton kernel is jitted (first use)
    sizes = DRY if args.dry_run else FULL
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"dry_run": args.dry_run, "device": _device_name(device), "env": _environment()}
    start = time.perf_counter()
    deadline = start + args.budget_s
    sections: dict[str, Callable[[], Any]] = {  # the compile-heavy QAT step last: the budget trims its rows
        "cuda_tests": lambda: cuda_tests(sizes),
        "packed_layer": lambda: packed_layer(sizes, device),
        "end_to_end": lambda: end_to_end(sizes, device),
        "qat_step": lambda: qat_step(sizes, device, deadline),
    }
    for name, run in sections.items():
        report[name] = []
        if name in args.skip:
            continue
        if time.perf_counter() > deadline:
            report.setdefault("skipped", []).append(f"{name}: over the {args.budget_s:.0f} s budget")
            continue
        began = time.perf_counter()
        try:
            report[name] = run()
        except Exception as err:  # one failing section must not cost the others' numbers on a GPU run
            report.setdefault("errors", {})[name] = "".join(traceback.format_exception(err))[-3000:]
        report.setdefault("section_s", {})[name] = round(time.perf_counter() - began, 1)
        _write(out, report)  # what is measured survives a later crash
    report["total_s"] = round(time.perf_counter() - start, 1)
    _write(out, report)
    print((out / "gpu_check.md").read_text())
    if report.get("errors"):
        raise SystemExit(f"sections failed: {', '.join(report['errors'])} (tracebacks in gpu_check.json)")


def _device_name(device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, dry run)"


def _environment() -> dict[str, Any]:
    import torch

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton_version,
        "python": platform.python_version(),
    }


# ---------------------------------------------------------------------------------------------------------- timing


def median_ms(fn: Callable[[], object], device, repeats: int, warmup: int) -> float:
    """Median milliseconds per call: CUDA events around each call on a GPU, ``perf_counter`` on the CPU."""
    import torch

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(begin.elapsed_time(end))
        else:
            began = time.perf_counter()
            fn()
            times.append((time.perf_counter() - began) * 1e3)
    return statistics.median(times)


# ------------------------------------------------------------------------------------------------------ cuda tests


KINDS = ("passed", "failed", "skipped", "deselected", "error")
PROGRESS = {".": "passed", "F": "failed", "s": "skipped", "E": "error"}  # pytest -q's progress characters


def cuda_tests(sizes: Sizes) -> list[dict[str, Any]]:
    """``pytest -m cuda`` in a subprocess: the counts from its summary line, or, when it runs past its time, from
    its progress characters so far (``timed_out`` then says so)."""
    command = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider", *sizes.test_paths]
    began = time.perf_counter()
    try:
        done = subprocess.run(
            command, cwd=ROOT, capture_output=True, text=True, timeout=sizes.test_timeout_s, env=_test_env()
        )
        output, returncode, counts = done.stdout, done.returncode, summary_counts(done.stdout)
    except subprocess.TimeoutExpired as err:
        output = err.stdout.decode(errors="replace") if isinstance(err.stdout, bytes) else err.stdout or ""
        returncode, counts = None, progress_counts(output)
    return [
        {
            "command": " ".join(command[1:]),
            "returncode": returncode,
            "timed_out": returncode is None,
            "seconds": round(time.perf_counter() - began, 1),
            **counts,
            "tail": output[-1500:],
        }
    ]


def summary_counts(output: str) -> dict[str, int]:
    """``{"passed": n, ...}`` from pytest's last summary line (``3 passed, 1 skipped in 2.0s``)."""
    lines = [line for line in output.splitlines() if re.search(r"\d+ (passed|failed|skipped|deselected)", line)]
    found = (
        dict((kind, int(n)) for n, kind in re.findall(rf"(\d+) ({'|'.join(KINDS)})s?\b", lines[-1])) if lines else {}
    )
    return {kind: found.get(kind, 0) for kind in KINDS}


def progress_counts(output: str) -> dict[str, int]:
    """Counts from pytest -q's progress lines (``..s.F  [ 40%]``) of a run that did not finish."""
    counts = dict.fromkeys(KINDS, 0)
    for line in output.splitlines():
        if re.fullmatch(r"[.FsExX]+\s*(\[\s*\d+%\])?", line.strip()):
            for char in line.split("[")[0].strip():
                if char in PROGRESS:
                    counts[PROGRESS[char]] += 1
    return counts


def _test_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), env.get("PYTHONPATH")]))
    return env


# -------------------------------------------------------------------------------------------------------- QAT step


def _image_model(name_hint: str, image: int, dry_run: bool):
    """torchvision's ResNet-18 (1000 classes), or the repo's ResNet-20 when torchvision is missing (or dry run)."""
    from asqpost.models import create_model

    if not dry_run:
        try:
            return "resnet18", create_model("resnet18", num_classes=1000, input_shape=(3, image, image)), 1000
        except ValueError:  # not registered: torchvision is missing
            pass
    width, classes = (4, 10) if dry_run else (16, 1000)
    model = create_model("resnet20", num_classes=classes, input_shape=(3, image, image), width=width)
    return f"resnet20 (width {width}, stand-in for {name_hint})", model, classes


def _qat_models(base, sample) -> dict[str, Any]:
    import copy

    from asqpost import QATConfig, calibrate, prepare_qat

    models = {"float": copy.deepcopy(base)}
    for label, recipe in (("LSQ (W+A)", "lsq-lsq"), ("ASQ + POST", "post-asq")):
        model = prepare_qat(base, QATConfig.recipe(recipe, 4))
        calibrate(model, [sample])
        models[label] = model
    return models


def qat_step(sizes: Sizes, device, deadline: float = float("inf")) -> list[dict[str, Any]]:
    """Step time of float, LSQ and ASQ + POST, eager then compiled, under bf16 autocast; compiled rows that would
    start after ``deadline`` (``perf_counter``) are left out with a note."""
    import torch

    torch.manual_seed(0)
    name, base, classes = _image_model("resnet18", sizes.image, sizes is DRY)
    x = torch.randn(sizes.batch, 3, sizes.image, sizes.image, device=device)
    y = torch.randint(0, classes, (sizes.batch,), device=device)
    models = _qat_models(base.to(device), x[:16])
    rows = []
    for compiled in (False, True):
        for label, model in models.items():
            row = {"model": name, "method": label, "compiled": compiled}
            if compiled and time.perf_counter() > deadline:
                rows.append({**row, "ms": None, "img_s": None, "first_call_s": None, "note": "over the budget"})
                continue
            rows.append({**row, **_time_step(model, x, y, compiled, sizes, device)})
            torch._dynamo.reset()
    floats = {r["compiled"]: r["ms"] for r in rows if r["method"] == "float"}
    for row in rows:
        ref = floats.get(row["compiled"])
        row["vs_float"] = row["ms"] / ref if row["ms"] and ref else None
    return rows


def _time_step(model, x, y, compiled: bool, sizes: Sizes, device) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F

    model.train()
    runner = torch.compile(model, backend=sizes.compile_backend) if compiled else model
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = F.cross_entropy(runner(x), y)
        loss.backward()
        opt.step()

    began = time.perf_counter()
    step()  # the first call compiles
    _sync(device)
    first_s = time.perf_counter() - began
    ms = median_ms(step, device, sizes.repeats, sizes.warmup)
    return {"ms": ms, "img_s": x.shape[0] / ms * 1e3, "first_call_s": round(first_s, 2)}


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------------------- packed layer


def _packed_linear(out_features: int, in_features: int, device):
    """A packed 4-bit POST + ASQ linear layer (calibrated on random inputs) and its float weight."""
    import torch
    from torch import nn

    from asqpost import QATConfig, calibrate, prepare_qat
    from asqpost.export import convert_to_packed

    torch.manual_seed(0)
    linear = nn.Linear(in_features, out_features, bias=False).to(device)
    qat = prepare_qat(nn.Sequential(linear), QATConfig.recipe("post-asq", 4, first=None, last=None)).eval()
    calibrate(qat, [torch.randn(64, in_features, device=device)])
    packed = convert_to_packed(qat)[0]
    return packed, qat[0].quantized_weight().detach()


def _int4pack(w_float, device) -> Callable[[Any], Any]:
    """torch's int4 matmul for a weight like ``w_float`` (asymmetric, group 128 or less); raises where absent."""
    import torch

    n, k = w_float.shape
    group = min(128, k)
    groups = w_float.reshape(n, k // group, group)
    lo, hi = groups.amin(dim=2), groups.amax(dim=2)
    scale = ((hi - lo) / 15).clamp_min(1e-8)
    q = torch.clamp(torch.round((groups - lo[..., None]) / scale[..., None]), 0, 15).reshape(n, k).to(torch.int32)
    zeros = lo + 8 * scale  # torch's int4 form: w = (q - 8) * scale + zero
    scales_zeros = torch.stack([scale, zeros], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)
    if device.type == "cuda":
        packed = torch._convert_weight_to_int4pack((q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8), 8)
        return lambda x: torch._weight_int4pack_mm(x, packed, group, scales_zeros)
    packed = torch._convert_weight_to_int4pack_for_cpu(q, 2)
    return lambda x: torch._weight_int4pack_mm_for_cpu(x, packed, group, scales_zeros)


def packed_layer(sizes: Sizes, device) -> list[dict[str, Any]]:
    """The Triton kernel vs fp16 ``F.linear`` vs torch int4 vs the code-read floor, per layer and batch."""
    rows = []
    for n, k in sizes.layers:
        rows += _layer_rows(n, k, sizes, device)
    _layer_ratios(rows)
    return rows


def _layer_rows(n: int, k: int, sizes: Sizes, device) -> list[dict[str, Any]]:
    import torch

    from asqpost.kernels import Ineligible

    packed, w = _packed_linear(n, k, device)
    plan = packed.plans.plan("triton", device, torch.float16)
    if isinstance(plan, Ineligible):
        raise RuntimeError(f"the Triton kernel does not take the {n}x{k} packed layer: {plan.reason}")
    copy_dst = torch.empty_like(plan.words)
    copy_ms = median_ms(lambda: copy_dst.copy_(plan.words), device, sizes.repeats, sizes.warmup)
    try:
        int4 = _int4pack(w, device)
        int4_error = None
    except (RuntimeError, AttributeError, TypeError) as err:
        int4, int4_error = None, f"{type(err).__name__}: {str(err).splitlines()[0][:120]}"
    rows = []
    for batch in sizes.layer_batches:
        times = _layer_times(packed, w.half(), int4, batch, sizes, device)
        times["code copy (read+write)"] = copy_ms
        times["code read floor"] = copy_ms / 2
        rows += [{"layer": f"{n}x{k}", "batch": batch, "kernel": kernel, "ms": ms} for kernel, ms in times.items()]
        if int4_error is not None:
            rows.append(
                {"layer": f"{n}x{k}", "batch": batch, "kernel": "torch int4pack", "ms": None, "note": int4_error}
            )
    code_bytes = plan.words.numel() * plan.words.element_size()
    return [{**row, "code_bytes": code_bytes} for row in rows]


def _layer_times(packed, w16, int4, batch: int, sizes: Sizes, device) -> dict[str, float]:
    import torch
    import torch.nn.functional as F

    x = torch.randn(batch, w16.shape[1], device=device)
    x16, xbf = x.half(), x.bfloat16()
    with torch.no_grad():
        times = {
            "triton LUT": median_ms(lambda: packed(x16, kernel="triton"), device, sizes.repeats, sizes.warmup),
            "fp16 F.linear": median_ms(lambda: F.linear(x16, w16), device, sizes.repeats, sizes.warmup),
        }
        if int4 is not None:
            times["torch int4pack"] = median_ms(lambda: int4(xbf), device, sizes.repeats, sizes.warmup)
    return times


def _layer_ratios(rows: list[dict[str, Any]]) -> None:
    by_key = {(r["layer"], r["batch"], r["kernel"]): r["ms"] for r in rows}
    for row in rows:
        if row["kernel"] == "triton LUT":
            fp16 = by_key[(row["layer"], row["batch"], "fp16 F.linear")]
            floor = by_key[(row["layer"], row["batch"], "code read floor")]
            row["speedup_vs_fp16"] = fp16 / row["ms"]
            row["vs_read_floor"] = row["ms"] / floor


# ------------------------------------------------------------------------------------------------------ end to end


def end_to_end(sizes: Sizes, device) -> list[dict[str, Any]]:
    """The packed ResNet (Triton kernel on CUDA) vs its float model in fp16, per batch."""
    import copy

    import torch

    from asqpost import QATConfig, calibrate, prepare_qat
    from asqpost.export import convert_to_packed
    from asqpost.kernels import use_kernel

    torch.manual_seed(0)
    name, base, _ = _image_model("resnet18", sizes.image, sizes is DRY)
    base = base.to(device).eval()
    qat = prepare_qat(copy.deepcopy(base), QATConfig.recipe("post-asq", 4)).eval()
    calibrate(qat, [torch.randn(8, 3, sizes.image, sizes.image, device=device)])
    packed = convert_to_packed(qat).eval()
    half = copy.deepcopy(base).half()
    rows = []
    for batch in sizes.e2e_batches:
        x = torch.randn(batch, 3, sizes.image, sizes.image, device=device)
        x16 = x.half()
        with torch.no_grad(), use_kernel("triton"):  # what auto picks on CUDA; the dry run takes the same path
            packed_ms = median_ms(lambda x=x: packed(x), device, sizes.repeats, sizes.warmup)
            half_ms = median_ms(lambda x16=x16: half(x16), device, sizes.repeats, sizes.warmup)
        rows.append({"model": name, "batch": batch, "variant": "packed 4-bit (POST + ASQ)", "ms": packed_ms})
        rows.append({"model": name, "batch": batch, "variant": "fp16 float", "ms": half_ms})
    for row in rows:
        fp16 = next(r["ms"] for r in rows if r["batch"] == row["batch"] and r["variant"] == "fp16 float")
        row["vs_fp16"] = row["ms"] / fp16
    return rows


# -------------------------------------------------------------------------------------------------------- reports


def _write(out: Path, report: dict[str, Any]) -> None:
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str))
    (out / "gpu_check.md").write_text(markdown(report))


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows])


def markdown(report: dict[str, Any]) -> str:
    """The report's tables (the card's name on top)."""
    parts = [f"## gpu_check on {report['device']}" + (" (DRY RUN: plumbing only)" if report["dry_run"] else "")]
    env = report["env"]
    parts.append(f"torch {env['torch']}, CUDA {env['cuda']}, triton {env['triton']}, python {env['python']}")
    tests = report.get("cuda_tests") or []
    if tests:
        t = tests[0]
        header = ["command", "passed", "failed", "skipped", "error", "s"]
        row = [t["command"], t.get("passed"), t.get("failed"), t.get("skipped"), t.get("error"), t.get("seconds")]
        parts.append("### pytest -m cuda\n\n" + _table(header, [row]))
    if report.get("qat_step"):
        rows = [
            [
                r["model"],
                r["method"],
                "yes" if r["compiled"] else "no",
                r["ms"],
                r["img_s"],
                r["vs_float"],
                r["first_call_s"],
            ]
            for r in report["qat_step"]
        ]
        header = ["model", "method", "compiled", "step ms", "img/s", "vs float", "first call s (compile)", "note"]
        parts.append("### QAT training step, bf16 autocast\n\n" + _table(header, rows))
    if report.get("packed_layer"):
        rows = [
            [
                r["layer"],
                r["batch"],
                r["kernel"],
                r["ms"],
                r.get("speedup_vs_fp16"),
                r.get("vs_read_floor"),
                r.get("note"),
            ]
            for r in report["packed_layer"]
        ]
        header = ["layer (out x in)", "batch", "kernel", "ms", "fp16 / this", "this / read floor", "note"]
        parts.append("### Packed 4-bit linear layer\n\n" + _table(header, rows))
    if report.get("end_to_end"):
        rows = [[r["model"], r["batch"], r["variant"], r["ms"], r["vs_fp16"]] for r in report["end_to_end"]]
        parts.append("### End to end\n\n" + _table(["model", "batch", "variant", "ms", "vs fp16"], rows))
    for line in report.get("skipped", []):
        parts.append(f"skipped: {line}")
    for name, error in report.get("errors", {}).items():
        parts.append(f"**{name} failed**: `{error.strip().splitlines()[-1]}` (traceback in gpu_check.json)")
    return "\n\n".join(parts) + "\n"


if __name__ == "__main__":
    main()
