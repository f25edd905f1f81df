"""Time one QAT training step (forward, backward, SGD) of a CIFAR-style ResNet-20 on random data.

Float, LSQ (weights and activations) and ASQ + POST, eager and (unless ``--no-compile``) through
``torch.compile``, interleaved in one process; prints the median step time and the ratio to eager float. The
compiled rows' compile time (their first step) is reported apart, in its own column.
Usage: ``python benchmarks/train_step.py [--batch 128] [--repeats 20] [--threads 2] [--no-compile]``
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from asqpost import QATConfig, calibrate, prepare_qat
from asqpost.models import create_model
from common import interleaved_medians, machine, table


def step_fn(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, compiled: bool = False):
    """One training step of ``model`` (through ``torch.compile`` when ``compiled``); its optimizer is its own."""
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    model.train()
    runner = torch.compile(model) if compiled else model

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(runner(x), y).backward()
        opt.step()

    return step


def compile_seconds(steps: dict[str, object]) -> dict[str, float]:
    """The first call of each compiled step (where torch.compile traces and generates code), timed apart."""
    seconds = {}
    for name, step in steps.items():
        start = time.perf_counter()
        step()  # type: ignore[operator]
        seconds[name] = time.perf_counter() - start
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--no-compile", action="store_true", help="eager rows only")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, args.size, args.size)
    y = torch.randint(0, 10, (args.batch,))
    base = create_model("resnet20", input_shape=(3, args.size, args.size))
    models = {"float": base}
    for name, recipe in (("LSQ (W+A)", "lsq-lsq"), ("ASQ + POST", "post-asq")):
        model = prepare_qat(base, QATConfig.recipe(recipe, args.bits))
        calibrate(model, [x[:32]])
        models[name] = model
    steps = {k: step_fn(m, x, y) for k, m in models.items()}
    compiled = {} if args.no_compile else {f"{k}, compiled": step_fn(m, x, y, True) for k, m in models.items()}
    compile_s = compile_seconds(compiled)
    medians = interleaved_medians({**steps, **compiled}, args.repeats)
    ref = medians["float"]
    print(f"ResNet-20, batch {args.batch}, {args.size}x{args.size}, {args.bits} bits, median of {args.repeats}")
    print(f"machine: {machine()}\n")
    compile_cells = {k: f"{v:.1f}" for k, v in compile_s.items()}
    rows = [
        [k, f"{v * 1e3:.1f}", f"{args.batch / v:.0f}", f"{v / ref:.2f}x", compile_cells.get(k, "-")]
        for k, v in medians.items()
    ]
    print(table(["method", "step (ms)", "img/s", "vs eager float", "compile (s, first step)"], rows))


if __name__ == "__main__":
    main()
