"""Atomic writes leave files with the permissions a plain write would: 0o666 less the umask, or the old mode."""

import os
import stat

import pytest
import torch
from torch import nn

from asqpost import QATConfig, calibrate, prepare_qat
from asqpost.export import convert_to_packed, save_packed
from asqpost.files import atomic_write_bytes
from asqpost.train.checkpoint import save_checkpoint

pytestmark = pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")


@pytest.fixture(params=[0o022, 0o077, 0o002, 0o027])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def _mode(path):
    return stat.S_IMODE(path.stat().st_mode)


def _plain_write_mode(path):
    with open(path, "wb") as f:
        f.write(b"x")
    return _mode(path)


def _packed_model():
    q = prepare_qat(nn.Sequential(nn.Linear(4, 3)), QATConfig.recipe("post-asq", 4, first=None, last=None))
    calibrate(q, [torch.rand(2, 4)])
    return convert_to_packed(q)


def test_new_files_get_the_umask_mode_like_a_plain_write(tmp_path, umask):
    expected = _plain_write_mode(tmp_path / "plain")
    assert expected == 0o666 & ~umask
    atomic_write_bytes(tmp_path / "atomic", b"data")
    save_checkpoint(tmp_path / "ckpt.pt", {"model": None, "qat": None, "state_dict": {}, "epoch": 0})
    save_packed(_packed_model(), tmp_path / "m.safetensors")
    for name in ("atomic", "ckpt.pt", "m.safetensors"):
        assert _mode(tmp_path / name) == expected, name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["atomic", "ckpt.pt", "m.safetensors", "plain"]


def test_an_existing_file_keeps_its_mode(tmp_path, umask):
    path = tmp_path / "file"
    for mode in (0o640, 0o604, 0o600):
        path.write_bytes(b"old")
        path.chmod(mode)
        atomic_write_bytes(path, b"new")
        assert path.read_bytes() == b"new" and _mode(path) == mode
