import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from asqpost.adapters import StepAdapter
from asqpost.cli import main
from asqpost.config import QATConfig
from asqpost.data import Normalizer, TensorBatches, load_dataset
from asqpost.runconfig import RunConfig, load_run_config, parse_set
from asqpost.train.checkpoint import CheckpointError, build_from_checkpoint, load_checkpoint, save_checkpoint
from asqpost.train.engine import evaluate, register_step_hook, train_one_epoch
from asqpost.train.evaluation import evaluate_checkpoint
from asqpost.train.loading import prepare
from asqpost.train.run import fit, param_groups

TINY = {
    "data": "synthetic",
    "model": "smallcnn",
    "model_args": {"width": 8},
    "batch_size": 64,
    "epochs": 2,
    "lr": 0.05,
    "progress": False,
    "threads": 1,
}


@pytest.fixture(scope="module")
def float_ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("float")
    fit(RunConfig(**TINY), out)
    return out / "checkpoint.pt"


def _weights(path):
    return load_checkpoint(path)["state_dict"]


def test_cli_train_eval_compare_end_to_end(tmp_path, float_ckpt, capsys):
    sets = [f"--set={k}={json.dumps(v)}" for k, v in TINY.items()]
    qat_dir = tmp_path / "qat"
    assert (
        main(
            [
                "train",
                *sets,
                f"--set=init={float_ckpt}",
                "--set=quant.recipe=post-asq",
                "--set=quant.bits=3",
                "--set=epochs=1",
                "--out",
                str(qat_dir),
            ]
        )
        == 0
    )
    payload = load_checkpoint(qat_dir / "checkpoint.pt")
    assert json.loads(payload["qat"])["weight"]["method"] == "post"
    assert payload["epoch"] == 1 and payload["run"]["quant"]["bits"] == 3
    assert (qat_dir / "config.yaml").is_file() and (qat_dir / "metrics.csv").read_text().startswith("epoch,")
    assert main(["eval", str(qat_dir / "checkpoint.pt"), "--data", "synthetic", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    final = json.loads((qat_dir / "final.json").read_text())
    assert result["accuracy"] == pytest.approx(final["test_acc"])
    assert main(["eval", str(qat_dir / "checkpoint.pt"), "--data", "synthetic", "--shift", "--json"]) == 0
    shifted = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert shifted["accuracy"] == pytest.approx(final["shift_acc"])
    assert main(["eval", str(qat_dir / "checkpoint.pt"), "--data", "synthetic", "--shift", "noise", "--json"]) == 0
    noisy = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert noisy["accuracy"] == pytest.approx(final["noise_acc"]) and noisy["shift"] == "noise"
    cmp_dir = tmp_path / "cmp"
    args = [
        "compare",
        *sets,
        "--set=epochs=1",
        "--init",
        str(float_ckpt),
        "--out",
        str(cmp_dir),
        "--methods",
        "float",
        "lsq",
        "post-asq",
        "--bits",
        "2",
        "4",
        "--seeds",
        "0",
    ]
    assert main(args) == 0
    table = (cmp_dir / "results.md").read_text()
    assert "POST (W) + ASQ (A) | 2/2" in table and "LSQ (W) + LSQ (A) | 4/4" in table
    assert "| shifted acc % | noise acc % | size (KiB) |" in table
    assert (cmp_dir / "accuracy.png").stat().st_size > 1000
    records = json.loads((cmp_dir / "results.json").read_text())
    assert len(records) == 5
    sizes = {(r["method"], r["bits"]): r["size_bytes"] for r in records}
    assert sizes[("lsq", 2)] < sizes[("lsq", 4)] < sizes[("float", None)]
    # a rerun reuses every finished cell
    mtime = (cmp_dir / "cells" / "lsq-w2-s0" / "final.json").stat().st_mtime
    assert main(args) == 0
    assert (cmp_dir / "cells" / "lsq-w2-s0" / "final.json").stat().st_mtime == mtime


@pytest.mark.numerics
def test_resume_gives_the_same_weights(tmp_path, float_ckpt):
    config = RunConfig(**{**TINY, "epochs": 3, "init": str(float_ckpt), "quant": {"recipe": "post-asq", "bits": 2}})
    fit(config, tmp_path / "straight")
    partial = fit(config.replace(stop_after=1), tmp_path / "stopped")
    assert partial.stopped_after_epoch == 1 and partial.metrics is None
    assert load_checkpoint(tmp_path / "stopped" / "checkpoint.pt")["epoch"] == 1
    fit(config, tmp_path / "stopped", resume=True)
    a, b = _weights(tmp_path / "straight" / "checkpoint.pt"), _weights(tmp_path / "stopped" / "checkpoint.pt")
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), key
    with pytest.raises(CheckpointError, match="different"):
        fit(config.replace(seed=5), tmp_path / "stopped", resume=True)


def test_resume_from_a_version_1_checkpoint(tmp_path, float_ckpt):
    """Version-1 configs (no adapter_form, init null) meant the paper adapter and LSQ's act init."""
    v1_defaults = {"adapter_form": "paper", "init": "lsq"}
    quant = {"recipe": "post-asq", "bits": 2}
    config = RunConfig(**{**TINY, "epochs": 2, "init": str(float_ckpt), "quant": quant})
    as_v1 = config.replace(quant={**quant, "act": v1_defaults})
    fit(as_v1.replace(stop_after=1), tmp_path)
    payload = load_checkpoint(tmp_path / "checkpoint.pt")
    qat = json.loads(payload["qat"])
    assert qat["version"] == 2 and {k: qat["act"][k] for k in v1_defaults} == v1_defaults
    del qat["act"]["adapter_form"]
    qat["act"]["init"], qat["version"] = None, 1
    run = {**payload["run"], "quant": quant}
    save_checkpoint(tmp_path / "checkpoint.pt", {**payload, "run": run, "qat": json.dumps(qat, sort_keys=True)})
    with pytest.raises(CheckpointError, match=re.escape("quant.act.adapter_form=paper --set quant.act.init=lsq")):
        fit(config, tmp_path, resume=True)
    assert fit(as_v1, tmp_path, resume=True).metrics is not None  # resumed and finished


def test_post_asq_defaults_to_the_scale_adapter_and_mse_init():
    qat = QATConfig.recipe("post-asq", 4)
    assert (qat.act.adapter_form, qat.act.init_for("act"), qat.weight.init_for("weight")) == ("scale", "mse", "mse")
    assert QATConfig.recipe("lsq", 4).act.init_for("act") == "mse"


SCALE_ASQ = {"recipe": "post-asq", "bits": 4, "act": {"adapter_form": "scale", "init": "mse"}}


def test_adapter_lr_mult_puts_the_adapters_in_their_own_group(float_ckpt):
    model = prepare(RunConfig(**{**TINY, "init": str(float_ckpt), "quant": SCALE_ASQ})).model
    adapter_params = [p for m in model.modules() if isinstance(m, StepAdapter) for p in m.parameters()]
    assert any(p.dim() == 0 for p in adapter_params), "gamma is an adapter parameter"
    [only] = param_groups(model, 0.1)  # mult 1: today's single group, in the model's parameter order
    assert only.keys() == {"params"} and only["params"] == list(model.parameters())
    rest, adapters = param_groups(model, 0.1, 5.0)
    assert "lr" not in rest and adapters["lr"] == pytest.approx(0.5)
    assert {id(p) for p in adapters["params"]} == {id(p) for p in adapter_params}
    assert len(rest["params"]) + len(adapters["params"]) == len(list(model.parameters()))
    optimizer = torch.optim.SGD([rest, adapters], lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=10)
    for _ in range(4):
        optimizer.step()
        scheduler.step()
        low, high = (g["lr"] for g in optimizer.param_groups)
        assert 0 < low < 0.1 and high == pytest.approx(5 * low)
    lsq = prepare(RunConfig(**{**TINY, "init": str(float_ckpt), "quant": {"recipe": "lsq", "bits": 4}})).model
    assert len(param_groups(lsq, 0.1, 5.0)) == 1  # no adapters: no second group


@pytest.mark.numerics
def test_scale_adapter_training_with_gain_augment_and_adapter_lr(tmp_path, float_ckpt):
    config = RunConfig(
        **{**TINY, "epochs": 1, "init": str(float_ckpt), "quant": SCALE_ASQ},
        gain_augment=2.0,
        adapter_lr_mult=10.0,
    )
    final = fit(config, tmp_path / "run")
    payload = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    low, high = (g["initial_lr"] for g in payload["optimizer"]["param_groups"])
    assert (low, high) == (pytest.approx(0.05), pytest.approx(0.5))
    gammas = [v for k, v in payload["state_dict"].items() if k.endswith("adapter.gamma")]
    assert gammas and all(g != 1.0 for g in gammas), "training reached gamma"
    # the run's test batches (eval_batch_size, 500, is evaluate_checkpoint's batch size): the same bits, exactly
    assert evaluate_checkpoint(tmp_path / "run" / "checkpoint.pt", "synthetic").accuracy == final.metrics.test_acc
    with pytest.raises(CheckpointError, match="adapter_lr_mult"):
        fit(config.replace(adapter_lr_mult=1.0, epochs=1), tmp_path / "run", resume=True)


def test_qat_init_must_be_a_float_checkpoint(tmp_path, float_ckpt):
    config = RunConfig(**{**TINY, "epochs": 1, "init": str(float_ckpt), "quant": {"recipe": "lsq", "bits": 4}})
    fit(config, tmp_path / "q")
    with pytest.raises(CheckpointError, match="already quantized"):
        fit(config.replace(init=str(tmp_path / "q" / "checkpoint.pt")), tmp_path / "q2")
    with pytest.raises(CheckpointError, match="classes"):
        fit(config.replace(data="digits"), tmp_path / "q3")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"bogus": 1}, "unknown config key"),
        ({"epochs": "ten"}, "'epochs' must be"),
        ({"epochs": 0}, "epochs must be >= 1"),
        ({"lr": True}, "'lr' must be"),
        ({"augment": "mixup"}, "unknown augment"),
        ({"quant": {"recipe": "post-asq"}}, "needs quant.bits"),
        ({"quant": {"recipe": "post-asq", "bits": 1}}, "bits"),
        ({"quant": {"recipe": "post-asq", "bits": 4, "frist": 8}}, "unknown quant key"),
        ({"device": "tpu"}, "device"),
        ({"gain_augment": 0.5}, "gain_augment is the largest gain"),
        ({"adapter_lr_mult": 0}, "adapter_lr_mult must be > 0"),
        ({"quant": {"recipe": "post-asq", "bits": 4, "act": {"init": "median"}}}, "unknown init 'median'"),
        ({"quant": {"recipe": "post-asq", "bits": 4, "act": {"adapter_form": "rms"}}}, "unknown adapter_form"),
        (
            {"quant": {"recipe": "post-asq", "bits": 4, "act": {"inti": "mse"}}},
            r"unknown recipe act key\(s\) \['inti'\]",
        ),
        ({"quant": {"recipe": "post-asq", "bits": 4, "act": "mse"}}, "recipe act settings are a mapping"),
        ({"quant": {"recipe": "post-asq", "bits": 4, "act": {"method": "lsq"}}}, "the recipe names the act method"),
        ({"quant": {"recipe": "post-asq", "bits": 4, "weight": {"init": "lsq"}}}, "does not apply to 'post'"),
    ],
)
def test_bad_run_configs(data, message):
    with pytest.raises(ValueError, match=message):
        RunConfig.from_dict(data)


def test_yaml_then_set_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: mlp\nquant:\n  recipe: lsq\n  bits: 4\n")
    config = load_run_config(path, ["quant.bits=2", "lr=0.5", "train_subset=null"])
    assert config.model == "mlp" and config.quant == {"recipe": "lsq", "bits": 2} and config.lr == 0.5
    assert parse_set(["a.b=[1, 2]"]) == {"a": {"b": [1, 2]}}
    with pytest.raises(ValueError, match="key=value"):
        parse_set(["novalue"])


def test_set_reaches_the_recipes_quantizer_fields(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: mlp\nquant:\n  recipe: post-asq\n  bits: 4\n")
    sets = ["quant.act.init=percentile", "quant.act.adapter_form=paper", "quant.weight.init=percentile"]
    qat = load_run_config(path, sets).qat_config()
    assert (qat.act.method, qat.act.bits, qat.act.init, qat.act.adapter_form) == ("asq", 4, "percentile", "paper")
    assert (qat.weight.method, qat.weight.bits, qat.weight.init) == ("post", 4, "percentile")
    plain = load_run_config(path).qat_config()
    assert (plain.act.init, plain.act.adapter_form, plain.weight.init) == (None, "scale", None)


def test_cli_reports_user_errors(tmp_path, capsys):
    assert main(["train", "--set", "model=resnet1000", "--set", "data=synthetic", "--out", str(tmp_path)]) == 2
    assert "unknown model 'resnet1000'" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "missing.pt"), "--data", "synthetic"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["train", "-c", "no-such-recipe", "--out", str(tmp_path)]) == 2
    assert "packaged recipe" in capsys.readouterr().err


@pytest.mark.numerics
def test_torchrun_two_cpu_processes(tmp_path, float_ckpt):
    out, record = tmp_path / "ddp", tmp_path / "ranks"
    record.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    settings = {
        **TINY,
        "epochs": 1,
        "batch_size": 32,
        "init": str(float_ckpt),
        "quant": {"recipe": "post-asq", "bits": 4},
    }
    probe = Path(__file__).with_name("ddp_rank_probe.py")  # the CLI, with each rank saving its steps and weights
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(probe)]
    cmd += [str(record), "train", "--out", str(out)]
    cmd += [f"--set={key}={json.dumps(value)}" for key, value in settings.items()]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    final = json.loads((out / "final.json").read_text())
    assert [row["epoch"] for row in final["history"]] == [1]
    payload = load_checkpoint(out / "checkpoint.pt")
    assert payload["qat"] is not None
    ranks = [torch.load(record / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    # each rank trained on its half of the data: 512 samples / (2 ranks x 32) = 8 optimizer steps
    assert [r["steps_per_epoch"] for r in ranks] == [[8], [8]]
    saved = {k: v for k, v in payload["state_dict"].items() if isinstance(v, torch.Tensor)}
    for r, rank in enumerate(ranks):  # both ranks end where rank 0's checkpoint is, bit for bit
        assert rank["state_dict"].keys() == saved.keys()
        for key, value in saved.items():
            assert torch.equal(rank["state_dict"][key], value), (r, key)
    # the accuracy the two ranks measured together is the saved model's on the two halves of the test split: one
    # process running the saved model on the same shards (the same batches, so the same shapes and the same bits)
    # counts the same samples right. (Over the whole split in other batches each logit agrees within float32
    # rounding only, so a prediction that sits on a tie between two classes could go either way.)
    model = build_from_checkpoint(payload)
    test = load_dataset("synthetic", "test")
    norm = Normalizer.from_dict(payload["normalizer"])
    shards = [
        evaluate(model, TensorBatches(test, 500, norm, rank=r, world_size=2), torch.device("cpu")) for r in (0, 1)
    ]
    correct, samples = sum(round(s.accuracy * s.samples) for s in shards), sum(s.samples for s in shards)
    assert samples == 2 * (len(test) // 2) and correct / samples == final["test_acc"]


def test_compare_cells_keep_the_quantizer_settings(tmp_path, monkeypatch):
    """``compare --set quant.act.init=mse`` reaches every cell's recipe, like first/last/overrides."""
    from asqpost import compare

    seen = []

    def fake_fit(config, out):
        seen.append(config.qat_config())
        out.mkdir(parents=True)
        (out / "final.json").write_text(
            json.dumps({"test_acc": 0.5, "shift_acc": 0.4, "size_bytes": 1024, "float_size_bytes": 4096})
        )

    monkeypatch.setattr(compare, "fit", fake_fit)
    quant = {"recipe": "lsq", "bits": 8, "last": "float", "act": {"init": "percentile", "adapter_form": "scale"}}
    base = RunConfig(**{**TINY, "quant": quant})
    compare.run_grid(base, "float.pt", tmp_path, methods=("lsq-lsq", "post-asq"), bits=(3,), seeds=(0,))
    assert [(q.act.method, q.act.bits, q.act.init, q.act.adapter_form, q.last) for q in seen] == [
        ("lsq", 3, "percentile", "scale", "float"),
        ("asq", 3, "percentile", "scale", "float"),
    ]


def test_step_hooks_see_every_optimizer_step_in_order_until_removed():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    batches = [(torch.randn(4, 1, 4, 4), torch.randint(0, 3, (4,))) for _ in range(3)]
    calls, weights = [], []
    first = register_step_hook(lambda epoch, step, steps: calls.append(("first", epoch, step, steps)))
    second = register_step_hook(lambda *args: weights.append(model[1].weight.detach().clone()))
    try:
        train_one_epoch(model, batches, optimizer, scheduler, torch.device("cpu"), 0, progress=False)
        train_one_epoch(model, iter(batches), optimizer, scheduler, torch.device("cpu"), 1, progress=False)
        first.remove()
        train_one_epoch(model, batches, optimizer, scheduler, torch.device("cpu"), 2, progress=False)
    finally:
        first.remove()
        second.remove()
    # epoch and step count from 1; batches without a length have no step count
    assert calls == [("first", 1, s, 3) for s in (1, 2, 3)] + [("first", 2, s, None) for s in (1, 2, 3)]
    assert len(weights) == 9 and not torch.equal(weights[0], weights[1])  # after each step: the new weights
    train_one_epoch(model, batches, optimizer, scheduler, torch.device("cpu"), 3, progress=False)
    assert len(weights) == 9  # removed: no longer called
