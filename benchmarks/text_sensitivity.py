"""Which quantizers cost a calibrated MiniLM its fidelity: the held-out cosine to float with one group of
quantizers switched off at a time.

all-MiniLM-L6-v2 calibrated as ``text_quality.py``'s PTQ rows (same 64 calibration texts, same 400 held-out
fortunes, same recipe fields), then evaluated as it is, with every input quantizer off (weights only), with every
weight quantizer off (activations only), and with the input or the weight quantizers of one layer kind off
(Q/K/V, which share one input quantizer; the attention output; the FFN up- and down-projections), and with the
inputs of one encoder layer off. Only a calibrated model is meaningful here: after distillation the weights have
adapted to their quantizers, and switching one off moves the model away from what it learned.

Usage: ``HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 python benchmarks/text_sensitivity.py --method post-asq --width 4/4``
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import logging
import os
from collections.abc import Callable, Iterator

import torch

from asqpost import calibrate, prepare_qat
from asqpost.cli import config_path
from asqpost.data import TextBatches, fortunes
from asqpost.nn import QuantLinear
from asqpost.runconfig import load_run_config
from asqpost.text import load_tokenizer, pretrained_encoder, text_model_spec
from common import machine, table
from text_quality import RECIPE, embed, methods, qat_config, subset

KINDS = {  # layer kind -> does a QuantLinear's name belong to it
    "Q/K/V (the LayerNorm output)": lambda name: ".attention.self." in name,
    "attention output": lambda name: name.endswith("attention.output.dense"),
    "FFN up-projection": lambda name: name.endswith("intermediate.dense"),
    "FFN down-projection (GELU output)": lambda name: name.endswith(".output.dense") and "attention" not in name,
}


@contextlib.contextmanager
def switched_off(layers: dict[str, QuantLinear], pick: Callable[[str], bool], what: str) -> Iterator[None]:
    """Within the block, the picked layers skip their input (``what="input"``) or weight quantizer."""
    picked = [layer for name, layer in layers.items() if pick(name)]
    attribute = "quantized_input" if what == "input" else "quantized_weight"
    for layer in picked:
        setattr(layer, attribute, (lambda x: x) if what == "input" else (lambda layer=layer: layer.weight))
    try:
        yield
    finally:
        for layer in picked:
            delattr(layer, attribute)  # back to the class's method


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="post-asq", help="a text_quality.py row name")
    parser.add_argument("--width", default="4/4", help="W/A bits")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    recipe = load_run_config(config_path(RECIPE), [])
    spec = text_model_spec(recipe.model, dict(recipe.model_args))
    tokenizer = load_tokenizer(spec)
    float_model = pretrained_encoder(spec).eval()
    held_out = subset(fortunes(recipe.data_root, "test"), 400, 1)
    calib = subset(fortunes(recipe.data_root, "train"), 64, 3)
    reference = embed(float_model, held_out, tokenizer, recipe.max_length)
    method = methods(0.5)[args.method]
    bits, act_bits = (int(b) for b in args.width.split("/"))
    torch.manual_seed(0)  # as text_quality.py's PTQ rows
    model = prepare_qat(copy.deepcopy(float_model), qat_config(method.recipe, bits, act_bits, method.act)).eval()
    calibrate(model, list(TextBatches(calib, tokenizer, batch_size=16, max_length=recipe.max_length)))
    layers = {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}

    def cosine() -> float:
        return float((embed(model, held_out, tokenizer, recipe.max_length) * reference).sum(dim=1).mean())

    cases: list[tuple[str, Callable[[str], bool], str]] = [
        ("nothing", lambda name: False, "input"),
        ("every input (weights only)", lambda name: True, "input"),
        ("every weight (activations only)", lambda name: True, "weight"),
    ]
    cases += [(f"{kind}: inputs", pick, "input") for kind, pick in KINDS.items()]
    cases += [(f"{kind}: weights", pick, "weight") for kind, pick in KINDS.items()]
    layer_count = len({name.split(".layer.")[1].split(".")[0] for name in layers if ".layer." in name})
    cases += [
        (f"encoder layer {i}: inputs", lambda name, i=i: f".layer.{i}." in name, "input") for i in range(layer_count)
    ]
    rows = []
    for label, pick, what in cases:
        with torch.no_grad(), switched_off(layers, pick, what):
            rows.append([label, f"{cosine():.4f}"])
        print(rows[-1], flush=True)
    print(f"\n{method.label} W{bits}A{act_bits}, calibrated; cosine to float on 400 held-out fortunes; {machine()}\n")
    print(table(["quantizers off", "cos mean"], rows))


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
