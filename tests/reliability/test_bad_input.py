"""One row per bad input: each must raise the documented error type with a message naming the problem."""

import gzip
import io
import pickle
import random
import re
import struct
import traceback
import zipfile

import pytest
import torch
from torch import nn

from asqpost import NotCalibratedError, QATConfig, QuantizerConfig, calibrate, prepare_qat
from asqpost.data import DataNotFoundError, load_dataset
from asqpost.models import create_model, model_from_spec, model_spec
from asqpost.runconfig import RunConfig
from asqpost.train.checkpoint import CheckpointError, load_checkpoint

pytestmark = pytest.mark.reliability("bad input")


def _calibrated(recipe="post-asq", bits=4):
    model = create_model("smallcnn", 4, (1, 12, 12), width=8)
    q = prepare_qat(model, QATConfig.recipe(recipe, bits))
    calibrate(q, [torch.rand(8, 1, 12, 12)])
    return q


def _bad_idx(tmp_path):
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(b"\x01\x02\x03\x04garbage"))
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(struct.pack(">BBBBI", 0, 0, 8, 1, 0)))
    return tmp_path


CASES = {
    "bits 0": (lambda: QuantizerConfig("post", 0), ValueError, "bits"),
    "bits 1": (lambda: QuantizerConfig("lsq", 1), ValueError, "bits"),
    "bits 9": (lambda: QuantizerConfig("asq", 9), ValueError, "bits"),
    "bits 4.0": (lambda: QuantizerConfig("post", 4.0), ValueError, "bits"),
    "bits '4'": (lambda: QuantizerConfig("post", "4"), ValueError, "bits"),
    "recipe bits 9": (lambda: QATConfig.recipe("post-asq", 9), ValueError, "bits"),
    "unknown method": (lambda: QuantizerConfig("pact", 4), ValueError, "unknown quantization method 'pact'"),
    "unknown recipe": (lambda: QATConfig.recipe("post-pact", 4), ValueError, "unknown recipe"),
    "method in wrong role": (lambda: QATConfig(QuantizerConfig("asq", 4), None), ValueError, "cannot quantize weights"),
    "unknown adapter": (lambda: QuantizerConfig("asq", 4, adapter="tanh"), ValueError, "unknown adapter"),
    "unknown adapter form": (
        lambda: QuantizerConfig("asq", 4, adapter_form="rms"),
        ValueError,
        "unknown adapter_form 'rms'",
    ),
    "unknown model": (lambda: create_model("resnet1000"), ValueError, "unknown model 'resnet1000'"),
    "bad model args": (lambda: create_model("resnet20", 10, (3, 8, 8), depth=7), ValueError, "bad arguments"),
    "model for images given 1-D": (lambda: create_model("resnet20", 10, (1, 40)), ValueError, "takes images"),
    "model spec without kwargs": (lambda: model_from_spec({"name": "mlp"}), ValueError, "malformed model spec"),
    "model spec not a mapping": (lambda: model_from_spec(["mlp", 4]), ValueError, "malformed model spec"),
    "model spec with bad kwargs": (
        lambda: model_from_spec(model_spec("mlp", 4, (1, 4, 4), {"hiden": 8})),
        ValueError,
        "bad arguments",
    ),
    "unknown init for the method": (lambda: QuantizerConfig("post", 4, init="lsq"), ValueError, "does not apply"),
    "unknown dataset": (lambda: load_dataset("imagenet21k", "train"), ValueError, "unknown dataset"),
    "unknown config key": (lambda: RunConfig.from_dict({"lr": 0.1, "lrr": 1}), ValueError, "unknown config key"),
    "config wrong type": (lambda: RunConfig.from_dict({"batch_size": "big"}), ValueError, "'batch_size' must be"),
    "config bool for int": (lambda: RunConfig.from_dict({"epochs": True}), ValueError, "'epochs' must be"),
    "config negative lr": (lambda: RunConfig.from_dict({"lr": -1.0}), ValueError, "lr must be > 0"),
    "quant config unknown key": (
        lambda: QATConfig.from_dict({"weight": "float", "act": "float", "wieght": 1}),
        ValueError,
        "unknown QAT",
    ),
    "override pattern matches nothing": (
        lambda: prepare_qat(create_model("mlp", 4, (1, 4, 4)), QATConfig.recipe("lsq", 4, overrides=(("conv*", 2),))),
        ValueError,
        "matches no",
    ),
    "model without layers": (
        lambda: prepare_qat(nn.Sequential(nn.ReLU()), QATConfig.recipe("lsq", 4)),
        ValueError,
        "no nn.Conv2d or nn.Linear",
    ),
    "empty calibration batch": (
        lambda: calibrate(
            prepare_qat(create_model("mlp", 4, (1, 4, 4)), QATConfig.recipe("lsq", 4)), [torch.zeros(0, 1, 4, 4)]
        ),
        ValueError,
        "empty",
    ),
    "no calibration batches": (
        lambda: calibrate(prepare_qat(create_model("mlp", 4, (1, 4, 4)), QATConfig.recipe("lsq", 4)), []),
        ValueError,
        "no batches",
    ),
    "NaN calibration input": (
        lambda: calibrate(
            prepare_qat(create_model("mlp", 4, (1, 4, 4)), QATConfig.recipe("lsq", 4)),
            [torch.full((2, 1, 4, 4), float("nan"))],
        ),
        ValueError,
        "NaN or inf",
    ),
    "inf calibration input": (
        lambda: calibrate(
            prepare_qat(create_model("mlp", 4, (1, 4, 4)), QATConfig.recipe("post-asq", 4)),
            [torch.full((2, 1, 4, 4), float("inf"))],
        ),
        ValueError,
        "NaN or inf",
    ),
    "forward before calibration": (
        lambda: prepare_qat(create_model("mlp", 4, (1, 4, 4)), QATConfig.recipe("lsq", 4))(torch.rand(2, 1, 4, 4)),
        NotCalibratedError,
        "not calibrated",
    ),
    "wrong channel count (conv)": (lambda: _calibrated()(torch.rand(2, 3, 12, 12)), ValueError, "channels"),
    "wrong input rank (conv)": (lambda: _calibrated("lsq")(torch.rand(2, 12, 12)), ValueError, "(N, C, H, W)"),
    "wrong feature count (linear)": (
        lambda: _calibrated("lsq").get_submodule("15")(torch.rand(2, 7)),
        ValueError,
        "features",
    ),
    "empty batch in forward": (lambda: _calibrated()(torch.rand(0, 1, 12, 12)), ValueError, "empty"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_a_clear_error(case):
    fn, error, message = CASES[case]
    with pytest.raises(error, match=message.replace("(", r"\(").replace(")", r"\)")):
        fn()


def test_missing_data_path(tmp_path):
    with pytest.raises(DataNotFoundError, match="does not exist"):
        load_dataset("fashion-mnist", "train", tmp_path / "nowhere")


def test_data_path_with_wrong_files(tmp_path):
    (tmp_path / "readme.txt").write_text("not a dataset")
    with pytest.raises(DataNotFoundError, match="train-images-idx3-ubyte"):
        load_dataset("mnist", "train", tmp_path)
    with pytest.raises(ValueError, match="IDX"):
        load_dataset("mnist", "train", _bad_idx(tmp_path))


def _code_running_pickle(marker):
    """A protocol-0 pickle that calls ``open(marker, "w")`` when an ordinary unpickler loads it."""
    return b"cbuiltins\nopen\n(V" + str(marker).encode() + b"\nVw\ntR."


def _unloadable_checkpoints(tmp_path):
    """Garbage, truncated and code-running files, each as a (name, path) pair."""
    marker = tmp_path / "pwned"
    evil = _code_running_pickle(marker)
    pickle.loads(evil).close()  # it really runs code ...
    marker.unlink()  # ... so after load_checkpoint the marker must still be absent
    good = io.BytesIO()
    torch.save({"format": "asqpost-checkpoint", "version": 1, "state_dict": {"w": torch.zeros(64)}}, good)
    files = {
        "empty": b"",
        "truncated": good.getvalue()[: len(good.getvalue()) // 2],
        "evil pickle": evil,
        "evil in a torch zip": _with_data_pkl(good.getvalue(), evil),
        **{f"garbage {seed}": random.Random(seed).randbytes(4096) for seed in range(200)},
    }
    for name, data in files.items():
        path = tmp_path / f"{name}.pt"
        path.write_bytes(data)
        yield name, path


def _with_data_pkl(torch_file, pickle_bytes):
    """A torch.save zip whose pickle is replaced by ``pickle_bytes``."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(torch_file)) as src, zipfile.ZipFile(out, "w") as dst:
        for item in src.infolist():
            data = pickle_bytes if item.filename.endswith("/data.pkl") else src.read(item)
            dst.writestr(item, data)
    return out.getvalue()


def test_unloadable_checkpoints_say_so_and_never_advise_unsafe_loading(tmp_path):
    for name, path in _unloadable_checkpoints(tmp_path):
        with pytest.raises(CheckpointError) as info:
            load_checkpoint(path)
        shown = "".join(traceback.format_exception(info.value))  # the whole traceback a user could see
        assert "is not an asqpost checkpoint" in str(info.value), name
        for advice in ("weights_only", "trust", "safe_globals"):
            assert advice not in shown, (name, advice, shown)
        if name.startswith("evil"):
            assert re.search(r"holds objects that are not plain data \([\w.]*open\)", str(info.value)), name
    assert not (tmp_path / "pwned").exists()
