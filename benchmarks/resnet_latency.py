"""End-to-end latency of an exported (packed) ResNet-20 against its float and fake-quant versions.

POST 4-bit weights with ASQ activations (first and last layer 8-bit), 28x28 single-channel inputs, batch 1
and 64, medians of interleaved runs, each timed call after an untimed one of the same model (threads awake).
Usage: ``python benchmarks/resnet_latency.py [--repeats 30]``
"""

from __future__ import annotations

import argparse

import torch

from asqpost import QATConfig, calibrate, prepare_qat
from asqpost.export import convert_to_packed
from asqpost.kernels import extension, use_kernel
from asqpost.models import create_model
from common import interleaved_medians, machine, table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--recipe", default="post-asq")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    shape = (1, 28, 28)
    model = create_model("resnet20", 10, shape).eval()
    qat = prepare_qat(model, QATConfig.recipe(args.recipe, 4)).eval()
    calibrate(qat, [torch.randn(64, *shape)])
    packed = convert_to_packed(qat)

    def run(m, kernel="auto"):
        with torch.no_grad(), use_kernel(kernel):
            return m(x)

    print(f"ResNet-20 on {shape}, {args.recipe} 4-bit, native path: {extension.capability()}")
    print(f"machine: {machine()}\n")
    rows = []
    for batch in (1, 64):
        x = torch.randn(batch, *shape)
        medians = interleaved_medians(
            {
                "float": lambda: run(model),
                "fake quant (QAT model)": lambda: run(qat),
                "packed, native kernel": lambda: run(packed, "native" if extension.available() else "reference"),
                "packed, reference": lambda: run(packed, "reference"),
            },
            args.repeats,
            lead_in=True,
        )
        for name, t in medians.items():
            rows.append([batch, name, f"{t * 1e3:.2f}", f"{t / medians['float']:.2f}x"])
    print(table(["batch", "model", "latency (ms)", "vs float"], rows))


if __name__ == "__main__":
    main()
