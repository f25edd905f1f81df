"""Injected faults: killed and interrupted runs, failed writes, poisoned training, untrusted files."""

import json
import os
import pickle
import random
import select
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from asqpost import data as data_module
from asqpost.files import atomic_write_bytes
from asqpost.runconfig import RunConfig
from asqpost.train.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from asqpost.train.engine import TrainingDivergedError
from asqpost.train.run import fit

pytestmark = pytest.mark.reliability("injected fault")
PAUSED_RUN = Path(__file__).with_name("paused_run.py")

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


def _cli(out, **overrides):
    args = [sys.executable, "-m", "asqpost.cli", "train", "--out", str(out)]
    for key, value in {**TINY, **overrides}.items():
        args += ["--set", f"{key}={json.dumps(value)}"]
    return args


def _same_weights(a, b):
    sa, sb = load_checkpoint(a)["state_dict"], load_checkpoint(b)["state_dict"]
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa if isinstance(sa[k], torch.Tensor))


def _sigint_as_in_a_terminal():
    """SIGINT raises KeyboardInterrupt in the child, as for a foreground run, even if this pytest was started in
    the background (a shell's ``cmd &`` ignores SIGINT, children inherit that, and Python then leaves it ignored)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture
def start_paused():
    """Start ``asqpost train`` held (by the step hook of ``paused_run.py``) right after ``step`` of ``epoch``.

    ``start_paused(out, epoch, step, **config)`` returns the process, blocked at that step, and the record it
    wrote to a pipe there (the read blocks until the line arrives, or the pipe closes because the run ended);
    a process still alive when the test ends is killed.
    """
    procs = []

    def start(out, epoch, step, **overrides):
        read_end, write_end = os.pipe()
        runner = [sys.executable, str(PAUSED_RUN), str(epoch), str(step), str(write_end)]
        proc = subprocess.Popen(
            runner + _cli(out, **overrides)[3:],  # the CLI's arguments, run with the pause point's step hook
            env={**os.environ, "OMP_NUM_THREADS": "1"},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            pass_fds=(write_end,),
            preexec_fn=_sigint_as_in_a_terminal,
        )
        procs.append(proc)
        os.close(write_end)  # the child holds the only write end: end of file means it ended without pausing
        ready, _, _ = select.select([read_end], [], [], 300)
        with os.fdopen(read_end) as pipe:
            line = pipe.readline() if ready else ""
        if not line:
            proc.kill()
            raise AssertionError(f"training did not reach the pause point: {proc.communicate()[1][-2000:]}")
        return proc, json.loads(line)

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


@pytest.mark.numerics
def test_sigkill_mid_epoch_then_resume_matches_uninterrupted(tmp_path, start_paused):
    config = RunConfig(**{**TINY, "epochs": 2})
    fit(config, tmp_path / "straight")
    killed = tmp_path / "killed"
    proc, paused = start_paused(killed, epoch=2, step=9, epochs=2)
    # mid-epoch by construction: the run is held after 9 of the 32 steps of epoch 2, with epoch 1's checkpoint
    assert paused == {"epoch": 2, "step": 9, "steps_in_epoch": 32, "pid": proc.pid}
    assert load_checkpoint(killed / "checkpoint.pt")["epoch"] == 1 and proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    survived = load_checkpoint(killed / "checkpoint.pt")
    assert survived["epoch"] == 1 and len(survived["metrics"]) == 1
    fit(config, killed, resume=True)
    assert load_checkpoint(killed / "checkpoint.pt")["epoch"] == 2
    assert _same_weights(tmp_path / "straight" / "checkpoint.pt", killed / "checkpoint.pt")


def test_ctrl_c_stops_cleanly(tmp_path, start_paused):
    out = tmp_path / "run"
    proc, paused = start_paused(out, epoch=2, step=3)
    assert paused["epoch"] == 2 and paused["step"] == 3 and proc.poll() is None  # training, not finished
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert "interrupted" in err and "--resume" in err
    assert load_checkpoint(out / "checkpoint.pt")["epoch"] == 1
    assert not (out / "final.json").exists()


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

    monkeypatch.setitem(data_module.DATASETS._items, "synthetic", poisoned)  # restored after the test
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
