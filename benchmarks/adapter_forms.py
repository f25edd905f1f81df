"""ASQ adapter forms: the default softplus against the paper's ReLU (clamped at 1e-8) and exp.

QAT (POST weights + ASQ activations) from one float model, the same budget for each form; reports clean and
shifted accuracy and the share of (sample, layer) pairs whose beta sits at the ReLU floor ("dead": that
layer's output is zero for that sample and its adapter gets no gradient). Usage:
``python benchmarks/adapter_forms.py [--data digits] [--bits 2] [--lr 0.05] [--out runs/adapters]``
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from asqpost.adapters import RELU_FLOOR, StepAdapter
from asqpost.data import TensorBatches
from asqpost.runconfig import RunConfig
from asqpost.train.checkpoint import build_from_checkpoint, load_checkpoint
from asqpost.train.loading import prepare
from asqpost.train.run import fit
from common import machine, table


def dead_share(model: torch.nn.Module, batches: TensorBatches) -> float:
    """Share of (sample, adapter) pairs with beta at the ReLU floor."""
    betas = []
    hooks = [
        m.register_forward_hook(lambda _m, _i, out: betas.append(out.flatten()))
        for m in model.modules()
        if isinstance(m, StepAdapter)
    ]
    with torch.no_grad():
        for x, _ in batches:
            model(x)
    for h in hooks:
        h.remove()
    values = torch.cat(betas)
    return float((values <= RELU_FLOOR * 1.01).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="digits")
    parser.add_argument("--model", default="smallcnn")
    parser.add_argument("--bits", type=int, default=2)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--out", default="runs/adapters")
    args = parser.parse_args()
    torch.set_num_threads(2)
    out = Path(args.out)
    base = RunConfig(model=args.model, data=args.data, epochs=args.epochs, batch_size=32, lr=0.05, progress=False)
    float_dir = out / "float"
    if not (float_dir / "final.json").is_file():
        fit(base, float_dir)
    rows = []
    for form in ("softplus", "relu", "exp"):
        quant = {
            "weight": {"method": "post", "bits": args.bits},
            "act": {"method": "asq", "bits": args.bits, "adapter": form},
        }
        config = base.replace(quant=quant, init=str(float_dir / "checkpoint.pt"), lr=args.lr)
        result = fit(config, out / form)
        model = build_from_checkpoint(load_checkpoint(out / form / "checkpoint.pt")).eval()
        prep = prepare(config)
        batches = TensorBatches(prep.test, 256, prep.normalizer)
        rows.append(
            [
                form,
                f"{result.metrics.test_acc * 100:.2f}",
                f"{result.metrics.shift_acc * 100:.2f}",
                f"{dead_share(model, batches) * 100:.2f}",
            ]
        )
    print(f"{args.model} on {args.data}, POST + ASQ at {args.bits} bits, QAT lr {args.lr}, {args.epochs} epochs")
    print(f"machine: {machine()}\n")
    print(table(["adapter", "test acc %", "shifted acc %", "dead betas %"], rows))


if __name__ == "__main__":
    main()
