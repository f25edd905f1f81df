"""The GPU training path, checked on the CPU: devices, mixed precision, torch.compile, the ImageNet recipes'
plumbing, and the device check's dry run. The same tests with ``@pytest.mark.cuda`` run on a GPU."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from asqpost import QATConfig, calibrate, prepare_qat
from asqpost.cli import config_path, main
from asqpost.devices import resolve_device
from asqpost.models import create_model
from asqpost.runconfig import RunConfig, load_run_config
from asqpost.train.accel import autocast, grad_scaler, graph_breaks, host_to_device
from asqpost.train.checkpoint import CheckpointError, load_checkpoint
from asqpost.train.evaluation import evaluate_checkpoint
from asqpost.train.run import fit

ROOT = Path(__file__).resolve().parents[1]
TINY = {
    "data": "synthetic",
    "model": "smallcnn",
    "model_args": {"width": 8},
    "batch_size": 64,
    "train_subset": 128,
    "test_subset": 64,
    "epochs": 1,
    "progress": False,
    "threads": 1,
    "quant": {"recipe": "post-asq", "bits": 4},
}


def _qat_net(recipe: str = "post-asq", bits: int = 4) -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.Flatten()
    )
    net.append(nn.Linear(16 * 8 * 8, 10))
    model = prepare_qat(net, QATConfig.recipe(recipe, bits))
    calibrate(model, [torch.randn(16, 3, 8, 8)])
    return model.train()


def _codes(quantizer, x: torch.Tensor) -> torch.Tensor:
    """Integer codes ``x_hat / s_a`` of an activation quantizer's output (ASQ: the per-sample step)."""
    with torch.no_grad():
        step = quantizer.step * quantizer.beta(x.float())
        return torch.round(quantizer(x).float() / step)


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def _device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    return torch.device(name)


@pytest.mark.numerics
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bf16_autocast_keeps_the_codes_and_the_adapter_in_float32(dtype, device):
    device = _device(device)
    model = _qat_net().to(device)
    layer = model[2]  # QuantConv2d with ASQ activations and POST weights
    x = torch.relu(torch.randn(8, 16, 8, 8, device=device)).to(dtype)
    reference = _codes(layer.input_quantizer, x.float())
    with torch.autocast(device.type, dtype=torch.bfloat16):
        assert torch.equal(_codes(layer.input_quantizer, x), reference)  # the same codes, bit for bit
        beta = layer.input_quantizer.beta(x)
        y = layer(x)
        w_hat = layer.quantized_weight()
    assert beta.dtype == torch.float32  # the adapter ran in float32 (inside the quantizer's region)
    assert w_hat.dtype == torch.float32 and torch.equal(w_hat, layer.quantized_weight())
    assert y.dtype == torch.bfloat16  # the convolution itself ran in bf16
    y32 = layer(x.float())
    assert (y.float() - y32).abs().max() <= 2e-2 * y32.abs().max()  # bf16 matmul tolerance


@pytest.mark.numerics
def test_bf16_autocast_training_step_matches_float32_gradients():
    model = _qat_net()
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 10, (8,))
    F.cross_entropy(model(x), y).backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    got = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert got.keys() == ref.keys() and all(torch.isfinite(g).all() for g in got.values())
    flat = torch.cat([g.flatten() for g in got.values()]), torch.cat([g.flatten() for g in ref.values()])
    assert F.cosine_similarity(*flat, dim=0) > 0.99  # bf16 convolutions in the backward: a stated tolerance
    for name, grad in ref.items():  # per tensor: not the adapters' (~1e-7, below the bf16 noise upstream of them)
        if "adapter" not in name:
            assert F.cosine_similarity(got[name].flatten(), grad.flatten(), dim=0) > 0.95, name


@pytest.mark.numerics
def test_half_inputs_without_autocast_come_back_in_their_dtype():
    layer = _qat_net()[0]
    x = torch.randn(2, 3, 8, 8)
    out = layer.input_quantizer(x.half())
    assert out.dtype == torch.float16
    assert torch.equal(out, layer.input_quantizer(x.half().float()).half())


def test_amp_settings():
    assert grad_scaler(torch.device("cpu"), "bf16") is None
    assert isinstance(grad_scaler(torch.device("cpu"), "fp16"), torch.amp.GradScaler)
    with autocast(torch.device("cpu"), "off"):
        assert not torch.is_autocast_enabled("cpu")
    with pytest.raises(ValueError, match="amp must be one of"):
        autocast(torch.device("cpu"), "fp32")
    with pytest.raises(ValueError, match="amp must be one of"):
        RunConfig(amp="fp8")
    with pytest.raises(ValueError, match="not both"):
        RunConfig(init="a.pt", pretrained="b.pt")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without CUDA")
def test_cuda_without_cuda_is_a_clear_error(tmp_path, capsys):
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ValueError, match=r"CUDA is not available.*device=cpu"):
        resolve_device("cuda:0")
    assert main(["train", "--set", "data=synthetic", "--device", "cuda", "--out", str(tmp_path)]) == 2
    assert "CUDA is not available" in capsys.readouterr().err


def test_host_to_device_keeps_cpu_batches_as_they_are():
    batch = {"x": torch.ones(2), "n": 3}
    assert host_to_device(batch, torch.device("cpu"))["x"] is batch["x"]


@pytest.mark.cuda
def test_host_to_device_moves_nested_batches_to_cuda():
    batch = {"x": torch.arange(6.0).reshape(2, 3), "pair": (torch.ones(2), 5)}
    moved = host_to_device(batch, _device("cuda"))
    assert moved["x"].is_cuda and moved["pair"][0].is_cuda and moved["pair"][1] == 5
    assert torch.equal(moved["x"].cpu(), batch["x"])


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_amp_training_run_and_resume(tmp_path, amp):
    config = RunConfig(**{**TINY, "epochs": 2, "amp": amp})
    fit(config.replace(stop_after=1), tmp_path)
    payload = load_checkpoint(tmp_path / "checkpoint.pt")
    assert (payload["scaler"] is not None) == (amp == "fp16")
    final = fit(config, tmp_path, resume=True)
    assert [row["epoch"] for row in final.history] == [1, 2]
    assert all(torch.isfinite(torch.tensor(row["train_loss"])) for row in final.history)
    assert 0.0 <= final.metrics.test_acc <= 1.0


@pytest.mark.numerics
def test_compiled_qat_matches_eager_without_graph_breaks():
    model = _qat_net()
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 10, (4,))
    breaks = graph_breaks(model, x)
    assert breaks.breaks == 0 and breaks.graphs == 1, breaks.reasons
    assert set(breaks.per_layer) == {"0", "2", "5"} and set(breaks.per_layer.values()) == {0}
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the float32 region under autocast traces too
        assert graph_breaks(model, x).breaks == 0
    F.cross_entropy(model(x), y).backward()
    eager = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    compiled = torch.compile(model)
    loss = F.cross_entropy(compiled(x), y)
    loss.backward()
    assert torch.allclose(loss, F.cross_entropy(model(x), y), rtol=1e-5, atol=1e-6)
    for name, param in model.named_parameters():
        assert torch.allclose(param.grad, eager[name], rtol=1e-3, atol=1e-5), name


def test_compile_run_reports_graph_breaks_and_resumes(tmp_path, monkeypatch):
    """``compile: true`` through fit: the plumbing (Dynamo's ``eager`` backend in place of inductor, whose codegen
    the compiled-vs-eager test above covers)."""
    import asqpost.train.run as run

    compiled = []
    monkeypatch.setattr(run, "compile_model", lambda m: compiled.append(m) or torch.compile(m, backend="eager"))
    config = RunConfig(**{**TINY, "epochs": 2, "compile": True, "amp": "bf16", "train_subset": 64})
    fit(config.replace(stop_after=1), tmp_path)
    report = json.loads((tmp_path / "compile.json").read_text())
    assert report["breaks"] == 0 and report["graphs"] == 1 and len(report["per_layer"]) == 5  # smallcnn
    assert set(report["per_layer"].values()) == {0}
    final = fit(config, tmp_path, resume=True)
    assert len(compiled) == 2 and [row["epoch"] for row in final.history] == [1, 2]


def _write_image_folder(root: Path, classes: int = 2, per_class: int = 4, size: int = 24) -> None:
    from PIL import Image

    gen = torch.Generator().manual_seed(0)
    for split in ("train", "val"):
        for c in range(classes):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(per_class):
                pixels = (torch.rand(size, size, 3, generator=gen) * 255).to(torch.uint8).numpy()
                Image.fromarray(pixels).save(folder / f"{i}.png")


@pytest.mark.parametrize("recipe", ["imagenet-resnet18-post-asq", "imagenet-mobilenetv2-post-asq"])
def test_imagenet_recipes_hold_the_papers_settings(recipe):
    config = load_run_config(config_path(recipe), ["quant.bits=3"])
    assert (config.lr, config.momentum, config.weight_decay, config.batch_size) == (0.01, 0.9, 1e-4, 256)
    assert config.optimizer == "sgd" and config.data == "imagefolder" and config.amp == "bf16"
    assert config.quant == {"recipe": "post-asq", "bits": 3, "first": 8, "last": 8}


def test_imagenet_recipe_plumbing_on_a_tiny_image_folder_with_pretrained_weights_and_resume(tmp_path):
    """The ResNet-18 recipe with the repo's ResNet-20 in its place (torchvision may be missing): image folder,
    pretrained state dict, 8-bit first/last, bf16 autocast, 2 steps over 2 epochs with a resume between them."""
    _write_image_folder(tmp_path / "data")
    float_model = create_model("resnet20", num_classes=2, input_shape=(3, 224, 224), width=4)
    torch.save({"state_dict": float_model.state_dict()}, tmp_path / "weights.pth")
    sets = [
        f"data_root={tmp_path / 'data'}",
        f"pretrained={tmp_path / 'weights.pth'}",
        "model=resnet20",
        "model_args={width: 4}",
        "epochs=2",
        "batch_size=8",
        "eval_batch_size=8",
        "calib_batches=1",
        "stop_after=1",
        "progress=false",
        "threads=1",
    ]
    out = tmp_path / "run"
    args = ["train", "-c", "imagenet-resnet18-post-asq", "--device", "cpu", "--out", str(out)]
    assert main([*args, *(f"--set={s}" for s in sets)]) == 0
    first = load_checkpoint(out / "checkpoint.pt")
    assert first["epoch"] == 1 and first["run"]["amp"] == "bf16"
    assert not torch.equal(first["state_dict"]["conv1.weight"], float_model.state_dict()["conv1.weight"])
    assert main([*args, "--resume", *(f"--set={s}" for s in sets[:-3]), "--set=progress=false"]) == 0
    final = json.loads((out / "final.json").read_text())
    assert [row["epoch"] for row in final["history"]] == [1, 2]
    layers = json.loads(load_checkpoint(out / "checkpoint.pt")["qat"])
    assert (layers["first"], layers["last"], layers["weight"]["method"]) == (8, 8, "post")


def test_pretrained_weights_that_do_not_fit_are_an_error(tmp_path):
    torch.save({"fc.weight": torch.zeros(3)}, tmp_path / "bad.pth")
    config = RunConfig(**{**TINY, "quant": None, "pretrained": str(tmp_path / "bad.pth")})
    with pytest.raises(CheckpointError, match="do not fit the model"):
        fit(config, tmp_path / "run")


@pytest.mark.cuda
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_cuda_compiled_amp_run_and_checkpoint_on_cpu(tmp_path, amp):
    _device("cuda")
    config = RunConfig(**{**TINY, "epochs": 2, "amp": amp, "compile": True, "device": "cuda"})
    fit(config.replace(stop_after=1), tmp_path)
    assert json.loads((tmp_path / "compile.json").read_text())["breaks"] == 0
    final = fit(config, tmp_path, resume=True)
    assert [row["epoch"] for row in final.history] == [1, 2]
    on_cpu = evaluate_checkpoint(tmp_path / "checkpoint.pt", "synthetic", device="cpu", subset=64)
    assert abs(on_cpu.accuracy - final.metrics.test_acc) <= 0.05  # bf16/fp16 on the GPU vs float32 on the CPU


def test_gpu_check_reads_pytest_counts_finished_or_cut_short(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import gpu_check

    summary = "..sF\n=== short test summary info ===\n3 passed, 1 failed, 1 skipped, 2 deselected, 2 errors in 2.0s"
    assert gpu_check.summary_counts(summary) == {"passed": 3, "failed": 1, "skipped": 1, "deselected": 2, "error": 2}
    cut = "..s.F                                  [ 40%]\n..E\nlog line with F and s"
    assert gpu_check.progress_counts(cut) == {"passed": 5, "failed": 1, "skipped": 1, "deselected": 0, "error": 1}


def test_gpu_check_dry_run(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--dry-run", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["dry_run"] is True
    assert {"cuda_tests", "qat_step", "packed_layer", "end_to_end"} <= set(report)
    assert all(row["ms"] > 0 for row in report["qat_step"] + report["packed_layer"] + report["end_to_end"])
    assert "| " in (tmp_path / "gpu_check.md").read_text()
