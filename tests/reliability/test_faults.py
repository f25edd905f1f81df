"""Injected faults: killed and interrupted runs, failed writes, poisoned training, untrusted files."""

import json
import os
import pickle
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from asqpost import data as data_module
from asqpost.runconfig import RunConfig
from asqpost.train.checkpoint import CheckpointError, atomic_write_bytes, load_checkpoint, save_checkpoint
from asqpost.train.engine import TrainingDivergedError
from asqpost.train.run import fit

pytestmark = pytest.mark.reliability("injected fault")

TINY = {
    "data": "synthetic",
    "model": "smallcnn",
    "model_args": {"width": 8},
    "batch_size": 16,
    "epochs": 3,
    "lr": 0.05,
    "progress": False,
    "threads": 1,
}


def _cli(out, *extra, batch_size=16):
    args = [sys.executable, "-m", "asqpost.cli", "train", "--out", str(out)]
    for key, value in {**TINY, "batch_size": batch_size}.items():
        args += ["--set", f"{key}={json.dumps(value)}"]
    return args + list(extra)


def _same_weights(a, b):
    sa, sb = load_checkpoint(a)["state_dict"], load_checkpoint(b)["state_dict"]
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa if isinstance(sa[k], torch.Tensor))


def _wait_for_epoch(path, epoch, proc, timeout=120):
    start = time.time()
    while time.time() - start < timeout:
        if proc.poll() is not None:
            raise AssertionError(f"training ended early: {proc.stderr.read()[-2000:]}")
        if path.is_file():
            try:
                if load_checkpoint(path)["epoch"] >= epoch:
                    return
            except CheckpointError:
                pass  # never expected: writes are atomic, so a reader sees old or new
        time.sleep(0.05)
    raise AssertionError("timed out waiting for a checkpoint")


def test_sigkill_mid_epoch_then_resume_matches_uninterrupted(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    straight = tmp_path / "straight"
    subprocess.run(_cli(straight, batch_size=4), env=env, check=True, capture_output=True, timeout=300)
    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        _cli(killed, batch_size=4), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    _wait_for_epoch(killed / "checkpoint.pt", 1, proc)
    time.sleep(0.2)  # inside epoch 2 (an epoch is 128 steps)
    assert proc.poll() is None, "training finished before the kill; make the epochs longer"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    survived = load_checkpoint(killed / "checkpoint.pt")  # intact, whatever moment the kill hit
    assert survived["epoch"] in (1, 2)
    subprocess.run([*_cli(killed, batch_size=4), "--resume"], env=env, check=True, capture_output=True, timeout=300)
    assert load_checkpoint(killed / "checkpoint.pt")["epoch"] == 3
    assert _same_weights(straight / "checkpoint.pt", killed / "checkpoint.pt")


def test_ctrl_c_stops_cleanly(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = tmp_path / "run"
    proc = subprocess.Popen(_cli(out), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_epoch(out / "checkpoint.pt", 1, proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert "interrupted" in err and "--resume" in err
    assert load_checkpoint(out / "checkpoint.pt")["epoch"] >= 1


def test_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "file.bin"
    atomic_write_bytes(path, b"old")

    def broken_replace(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_bytes(path, b"new" * 1000)
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["file.bin"]  # no temp file left behind


def test_nan_in_training_stops_without_a_poisoned_checkpoint(tmp_path, monkeypatch):
    config = RunConfig(**{**TINY, "batch_size": 64, "stop_after": 1})
    fit(config, tmp_path)
    good = load_checkpoint(tmp_path / "checkpoint.pt")
    original = data_module.DATASETS["synthetic"]

    def poisoned(root, split):
        data = original(root, split)
        data.images[5] = float("nan")
        return data

    monkeypatch.setitem(data_module.DATASETS, "synthetic", poisoned)
    with pytest.raises(TrainingDivergedError, match="loss is nan"):
        fit(config.replace(stop_after=None), tmp_path, resume=True)
    after = load_checkpoint(tmp_path / "checkpoint.pt")
    assert after["epoch"] == good["epoch"] == 1
    assert all(torch.isfinite(t).all() for t in after["state_dict"].values() if t.is_floating_point())


def test_checkpoint_with_non_finite_weights_is_refused(tmp_path):
    config = RunConfig(**{**TINY, "batch_size": 64, "epochs": 1})
    fit(config, tmp_path)
    payload = load_checkpoint(tmp_path / "checkpoint.pt")
    key = next(k for k, v in payload["state_dict"].items() if v.is_floating_point())
    payload["state_dict"][key] = payload["state_dict"][key] * float("nan")
    save_checkpoint(tmp_path / "bad.pt", {k: v for k, v in payload.items() if k not in ("format", "version")})
    with pytest.raises(CheckpointError, match=f"non-finite.*{key}"):
        load_checkpoint(tmp_path / "bad.pt")


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"format": "asqpost-checkpoint", "payload": _RunsCode(str(marker))}, f)
    with pytest.raises(CheckpointError):
        load_checkpoint(path)
    torch.save({"format": "asqpost-checkpoint", "version": 1, "x": _RunsCode(str(marker))}, tmp_path / "evil2.pt")
    with pytest.raises(CheckpointError, match="not plain data"):
        load_checkpoint(tmp_path / "evil2.pt")
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty", "not a checkpoint", "wrong version"])
def test_corrupt_checkpoints_are_refused(tmp_path, damage):
    config = RunConfig(**{**TINY, "batch_size": 64, "epochs": 1})
    fit(config, tmp_path)
    path = tmp_path / "checkpoint.pt"
    raw = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(raw[: len(raw) // 3])
    elif damage == "garbage":  # many draws: about 7% of random files once escaped as IndexError / KeyError
        for seed in range(200):
            path.write_bytes(random.Random(seed).randbytes(4096))
            with pytest.raises(CheckpointError):
                load_checkpoint(path)
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "not a checkpoint":
        torch.save({"weights": torch.zeros(3)}, path)
    else:
        payload = load_checkpoint(path)
        payload["version"] = 99
        torch.save(payload, path)
    with pytest.raises(CheckpointError):
        load_checkpoint(path)


def test_checkpoint_from_another_model_or_config(tmp_path):
    config = RunConfig(**{**TINY, "batch_size": 64, "epochs": 2, "stop_after": 1})
    fit(config, tmp_path)
    with pytest.raises(CheckpointError, match="different"):
        fit(config.replace(model_args={"width": 16}), tmp_path, resume=True)
    with pytest.raises(CheckpointError, match="different"):
        fit(config.replace(quant={"recipe": "lsq", "bits": 4}), tmp_path, resume=True)
    payload = load_checkpoint(tmp_path / "checkpoint.pt")
    payload["model"]["kwargs"] = {"width": 16}
    from asqpost.train.checkpoint import build_from_checkpoint

    with pytest.raises(CheckpointError, match="do not match"):
        build_from_checkpoint(payload)
