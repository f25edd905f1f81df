"""Where packed all-MiniLM-L6-v2 departs from its fake-quant model ("packed == fake quant").

For one W4A8 recipe, runs the fake-quant model and its packed export on the same sentences and, for each
quantized layer: (a) fed the *same* input, whether both quantize it to the same codes (and the same step
``s * beta``) and how far their outputs are apart (float rounding: the packed sums are exact, the fake-quant
``F.linear`` rounds in float32); (b) in the two runs, how far the layer's inputs have drifted and how many
activation codes differ ("flips"). A control shows what float rounding alone does to the end result: the same
fake-quant model in float64 against float32 (no packed code involved).

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 python benchmarks/packed_fidelity.py post-asq --per-token
"""

from __future__ import annotations

import argparse
import copy

import torch
import torch.nn.functional as F

from asqpost.convert import quant_layers
from asqpost.export import convert_to_packed
from asqpost.export.modules import PackedLayer
from asqpost.masking import token_mask
from common import machine, table
from transformer_latency import load_minilm, mean_pooled, quantized, sentences


def capture(modules: dict[str, torch.nn.Module], store: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> list:
    def hook(name):
        return lambda m, inputs, out: store.__setitem__(name, (inputs[0].detach().clone(), out.detach().clone()))

    return [m.register_forward_hook(hook(name)) for name, m in modules.items()]


def codes_and_step(quant_layer: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The fake-quant layer's activation codes and step for ``x`` (what its quantizer rounds)."""
    q = quant_layer.input_quantizer
    step = q.scaled_step(x) * q.beta(x) if hasattr(q, "adapter") else q.scaled_step(x)
    return torch.clamp(torch.round(x / step), *q.qrange), step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe", nargs="?", default="post-asq")
    parser.add_argument("--per-token", action="store_true")
    parser.add_argument("--sentences", type=int, default=32)
    args = parser.parse_args()
    torch.manual_seed(0)
    model, tokenizer = load_minilm()
    texts = sentences(64 + args.sentences)
    calib = [dict(tokenizer(texts[i : i + 16], padding=True, return_tensors="pt")) for i in range(0, 32, 16)]
    held = dict(tokenizer(texts[64:], padding=True, truncation=True, max_length=128, return_tensors="pt"))
    act = {"per_token": True} if args.per_token else {}
    qat = quantized(model, args.recipe, 4, 8, act, calib)
    packed = convert_to_packed(qat)
    fake64 = copy.deepcopy(qat).double()  # before any hook: deepcopy would copy them
    qmods = dict(quant_layers(qat))
    pmods = {n: m for n, m in packed.named_modules() if isinstance(m, PackedLayer)}
    seen_q: dict = {}
    seen_p: dict = {}
    hooks = capture(qmods, seen_q) + capture(pmods, seen_p)
    fake, out = mean_pooled(qat, held), mean_pooled(packed, held)
    for h in hooks:
        h.remove()
    with torch.no_grad():
        tokens64 = fake64(**held).last_hidden_state.float()
    mask = held["attention_mask"].unsqueeze(-1).float()
    fake_f64 = F.normalize((tokens64 * mask).sum(1) / mask.sum(1), dim=-1)
    rows = []
    real_tokens = held["attention_mask"].bool()
    with torch.no_grad(), token_mask(held["attention_mask"]):
        for name, p in pmods.items():
            q = qmods[name]
            (x_p, y_p), (x_q, y_q) = seen_p[name], seen_q[name]
            real = real_tokens if x_p.dim() == 3 else torch.ones(x_p.shape[0], dtype=torch.bool)
            codes_p, step_p = p.input_quant(x_p)  # (a) the same input into both layers
            codes_q, step_q = codes_and_step(q, x_p)
            same_rel = (p(x_p) - q(x_p))[real].abs().max() / q(x_p)[real].abs().max()
            codes_q_run, _ = codes_and_step(q, x_q)  # (b) each run's own input
            rows.append(
                [
                    name,
                    p.plans.describe(torch.device("cpu"))[0],
                    int((codes_p != codes_q)[real].sum()),
                    bool(torch.equal(step_p.expand_as(step_q), step_q)),
                    f"{same_rel:.1e}",
                    f"{(x_p - x_q)[real].abs().max() / x_q[real].abs().max():.1e}",
                    f"{int((codes_p != codes_q_run)[real].sum())} / {codes_p[real].numel()}",
                    f"{(y_p - y_q)[real].abs().max() / y_q[real].abs().max():.1e}",
                ]
            )
    mode = " per token" if args.per_token else ""
    print(f"machine: {machine()}; {args.recipe}{mode}, W4A8, {len(texts) - 64} sentences")
    cosine = {
        "packed vs fake quant (float32)": F.cosine_similarity(out, fake).mean(),
        "control, float rounding alone: fake quant float64 vs float32": F.cosine_similarity(fake_f64, fake).mean(),
        "packed vs fake quant float64": F.cosine_similarity(fake_f64, out).mean(),
    }
    for what, value in cosine.items():
        print(f"cosine {what}: {value:.6f}")
    header = ["layer", "path", "same input: code flips", "same step", "output rel diff"]
    print(table([*header, "run: input rel drift", "run: code flips", "run: output rel diff"], rows))


if __name__ == "__main__":
    main()
