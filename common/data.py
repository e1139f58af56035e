"""Data: an IDX reader (the MNIST file format), the data sets, and the one batch order.

Stage 0 and the single-process reference both draw batches from ``train_batches``, so for a
given seed every mode sees exactly the same batches in the same order.

Nothing holds a whole training set as float tensors: the built-in image sets keep their pixels
as bytes (a read-only memory map of an uncompressed file, so the operating system pages in what
a batch reads; a gzipped file is decompressed once into bytes, a quarter of its float size) and
are normalised a batch at a time; a user's dataset is read a batch at a time.
"""
from __future__ import annotations

import gzip
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch


FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
              0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


class DataError(ValueError):
    """Missing or malformed data files; the message says how to get them."""


def read_idx(path: str | Path) -> np.ndarray:
    """Read one IDX file (gzipped or raw, detected from its first bytes) into an array."""
    path = Path(path)
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise DataError(f"{path}: corrupt gzip data ({exc})") from None
    if len(raw) < 4:
        raise DataError(f"{path}: too short to be an IDX file ({len(raw)} bytes)")
    zero, code, ndim = raw[0:2], raw[2], raw[3]
    if zero != b"\x00\x00" or code not in IDX_DTYPES or not 1 <= ndim <= 4:
        raise DataError(f"{path}: bad IDX magic number 0x{raw[:4].hex()} "
                        f"(expected 0x0000 then a type code in {sorted(IDX_DTYPES)} and 1-4 dims)")
    if len(raw) < 4 + 4 * ndim:
        raise DataError(f"{path}: truncated IDX header")
    dims = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    dtype = np.dtype(IDX_DTYPES[code])
    need = int(np.prod(dims)) * dtype.itemsize
    body = memoryview(raw)[4 + 4 * ndim:]  # a view: the data is not copied
    if len(body) != need:
        raise DataError(f"{path}: IDX header says {list(dims)} ({need} bytes of data) "
                        f"but the file holds {len(body)} bytes")
    array = np.frombuffer(body, dtype=dtype).reshape(dims)
    return array if dtype.isnative else array.astype(dtype.newbyteorder("="))


def _find(folder: Path, prefix: str, idx: str) -> Path:
    """Find e.g. train-images-idx3-ubyte(.gz) or train-images.idx3-ubyte in a folder."""
    hits = sorted(p for p in folder.iterdir()
                  if p.name.startswith(prefix) and idx in p.name and p.is_file())
    if not hits:
        raise DataError(f"no {prefix}*{idx}* file in {folder}")
    hits.sort(key=lambda p: p.suffix == ".gz")  # prefer the uncompressed file when both exist
    return hits[0]


@dataclass
class Split:
    """A split of float tensors in memory (the generated set, and tests)."""
    images: torch.Tensor  # float32 [N, C, H, W]
    labels: torch.Tensor  # int64 [N]

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def take(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The samples at `idx`, as one batch."""
        return self.images[idx], self.labels[idx]


@dataclass
class PixelSplit:
    """A built-in image split: its pixels stay as stored (bytes; memory-mapped when the file
    is uncompressed) and each batch is scaled to [0, 1] and normalised as it is taken."""
    pixels: "np.ndarray | RecordPixels"  # [N, C, H, W], indexable by an array of sample numbers
    labels: torch.Tensor  # int64 [N] (small: kept in memory)
    mean: torch.Tensor  # of the training set's scaled pixels: a number, or [1, C, 1, 1] per channel
    std: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def take(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows = np.asarray(self.pixels[idx.numpy()])
        x = torch.from_numpy(rows.astype(np.float32) / 255.0)
        return (x - self.mean) / self.std, self.labels[idx]

    @property
    def images(self) -> torch.Tensor:
        """Every sample, normalised (for small sets and tests; a run takes batches)."""
        return self.take(torch.arange(len(self)))[0]


def pixel_statistics(pixels, per_channel: bool, chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and (unbiased) standard deviation of pixels / 255, over the whole training set, a
    chunk at a time. Sums of 8-bit values in float64 are exact integers (below 2^53 for any set
    under ~10^11 pixels), so the figures do not depend on the chunking."""
    axes = (0, 2, 3) if per_channel else None
    s1 = s2 = 0.0
    n = 0
    for start in range(0, len(pixels), chunk):
        x = np.asarray(pixels[np.arange(start, min(start + chunk, len(pixels)))]).astype(np.float64)
        s1 = s1 + x.sum(axis=axes)
        s2 = s2 + (x * x).sum(axis=axes)
        n += x.size // (x.shape[1] if per_channel else 1)
    mean = np.asarray(s1) / n
    var = (np.asarray(s2) - n * mean * mean) / max(n - 1, 1)
    mean_t = torch.tensor(mean / 255.0, dtype=torch.float32)
    std_t = torch.tensor(np.sqrt(np.maximum(var, 0.0)) / 255.0, dtype=torch.float32).clamp_min(1e-6)
    if per_channel:
        return mean_t.reshape(1, -1, 1, 1), std_t.reshape(1, -1, 1, 1)
    return mean_t, std_t


class UserSplit:
    """A split that is a user's map-style dataset (`dataset[i]` -> (sample, class index)): read
    a batch at a time, so the data need not fit in memory; every sample is checked as it comes."""

    def __init__(self, data, what: str, sample_shape: tuple[int, ...], num_classes: int):
        self.data = data
        self.what = what
        self.sample_shape = sample_shape
        self.num_classes = num_classes

    def __len__(self) -> int:
        return len(self.data)

    def take(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        xs, ys = [], []
        for i in idx.tolist():
            x, y = _sample(self.data, i, self.what)
            if tuple(x.shape) != self.sample_shape:
                raise DataError(f"{self.what}[{i}] is a sample of shape {tuple(x.shape)}; sample 0 was "
                                f"{self.sample_shape}: every sample must have one shape")
            if not 0 <= y < self.num_classes:
                raise DataError(f"{self.what}[{i}] has label {y}, outside the classes 0..{self.num_classes - 1}")
            xs.append(x)
            ys.append(y)
        return torch.stack(xs), torch.tensor(ys, dtype=torch.int64)


def _sample(data, i: int, what: str) -> tuple[torch.Tensor, int]:
    """One (sample, label) of a user's dataset, checked for type."""
    try:
        item = data[i]
    except Exception as exc:
        raise DataError(f"{what}[{i}] failed: {type(exc).__name__}: {exc}") from None
    if not isinstance(item, (tuple, list)) or len(item) != 2:
        raise DataError(f"{what}[{i}] is {type(item).__name__}; a dataset item must be (sample, label)")
    x, y = item
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise DataError(f"{what}[{i}]: the sample is {type(x).__name__}"
                        f"{f' of {x.dtype}' if isinstance(x, torch.Tensor) else ''}; it must be a float tensor")
    if isinstance(y, torch.Tensor) and y.numel() == 1 and not y.is_floating_point():
        y = int(y)
    if isinstance(y, bool) or not isinstance(y, int):
        raise DataError(f"{what}[{i}]: the label is {type(y).__name__}; it must be a class index (int)")
    return x.float(), y


@dataclass
class Dataset:
    name: str
    train: "Split | PixelSplit | UserSplit"
    test: "Split | PixelSplit | UserSplit"
    num_classes: int = 10


IDX_ADVICE = ("pass --data-dir with a folder holding train-images-idx3-ubyte, "
              "train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte "
              "(gzipped or not; torchvision's MNIST/raw folder works)")
CIFAR_ADVICE = ("pass --data-dir with the folder of CIFAR-10's binary version (cifar-10-batches-bin: "
                "data_batch_1.bin ... data_batch_5.bin and test_batch.bin)")


def open_idx(path: str | Path) -> np.ndarray:
    """An IDX file's array without reading it: a read-only memory map of an uncompressed file
    (checked against its header), or the decompressed array of a gzipped one (read_idx)."""
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(4 + 4 * 4)
    if head[:2] == b"\x1f\x8b":
        return read_idx(path)
    dims = idx_dims(path)
    dtype = np.dtype(IDX_DTYPES[head[2]])
    offset = 4 + 4 * len(dims)
    need = int(np.prod(dims)) * dtype.itemsize
    if path.stat().st_size - offset != need:
        raise DataError(f"{path}: IDX header says {list(dims)} ({need} bytes of data) "
                        f"but the file holds {path.stat().st_size - offset} bytes")
    if need == 0:
        return np.zeros(dims, dtype=dtype.newbyteorder("="))
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=tuple(dims))


def load_idx_folder(folder: str | Path, name: str, advice: str = IDX_ADVICE) -> Dataset:
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{name} data folder {folder} does not exist; {advice}")
    try:
        arrays = {key: open_idx(_find(folder, prefix, idx)) for key, prefix, idx in (
            ("xtr", "train-images", "idx3"), ("ytr", "train-labels", "idx1"),
            ("xte", "t10k-images", "idx3"), ("yte", "t10k-labels", "idx1"))}
    except DataError as exc:
        raise DataError(f"{exc}; {advice}") from None
    for x, y in (("xtr", "ytr"), ("xte", "yte")):
        if arrays[x].ndim != 3 or arrays[y].ndim != 1 or arrays[x].shape[0] != arrays[y].shape[0]:
            raise DataError(f"{folder}: {x} has shape {arrays[x].shape} but labels "
                            f"{arrays[y].shape}; expected [N, H, W] images and [N] labels")
    if arrays["xte"].shape[1:] != arrays["xtr"].shape[1:]:
        raise DataError(f"{folder}: test images are {arrays['xte'].shape[1:]}, training images "
                        f"{arrays['xtr'].shape[1:]}: they must be the same size")
    ytr, yte = np.asarray(arrays["ytr"]), np.asarray(arrays["yte"])
    classes = _classes(ytr, yte, folder)
    # [N, H, W] -> [N, 1, H, W] without reading: a view of the map (or of the array)
    xtr, xte = arrays["xtr"][:, None], arrays["xte"][:, None]
    mean, std = pixel_statistics(xtr, per_channel=False)

    def split(x: np.ndarray, y: np.ndarray) -> PixelSplit:
        return PixelSplit(x, torch.from_numpy(y.astype(np.int64)), mean, std)
    return Dataset(name, split(xtr, ytr), split(xte, yte), classes)


def _classes(train_labels: np.ndarray, test_labels: np.ndarray, where: Path) -> int:
    """Classes 0..K-1, K from the training labels; a test label outside them is an error."""
    if train_labels.size == 0 or int(train_labels.min()) < 0:
        raise DataError(f"{where}: training labels must be class indices 0, 1, ... (got none, or negatives)")
    classes = int(train_labels.max()) + 1
    if classes < 2:
        raise DataError(f"{where}: the training labels hold a single class")
    if test_labels.size and (int(test_labels.min()) < 0 or int(test_labels.max()) >= classes):
        raise DataError(f"{where}: test labels run from {int(test_labels.min())} to {int(test_labels.max())}, "
                        f"outside the training labels' classes 0..{classes - 1}")
    return classes


@dataclass(frozen=True)
class DataSpec:
    """What the model needs to know about the data before any process loads it."""
    sample_shape: tuple[int, ...]
    num_classes: int
    label_shape: tuple[int, ...] = ()  # (T,): a class at every position of a stream's window


def idx_dims(path: Path) -> tuple[int, ...]:
    """An IDX file's dimensions from its header alone."""
    with open(path, "rb") as f:
        head = f.read(2)
    opener = gzip.open if head == b"\x1f\x8b" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read(4 + 4 * 4)
    except (OSError, EOFError) as exc:
        raise DataError(f"{path}: cannot read its header ({exc})") from None
    if len(raw) < 4 or raw[:2] != b"\x00\x00" or raw[2] not in IDX_DTYPES or not 1 <= raw[3] <= 4 \
            or len(raw) < 4 + 4 * raw[3]:
        raise DataError(f"{path}: not an IDX file (header 0x{raw[:4].hex()})")
    return struct.unpack(f">{raw[3]}I", raw[4:4 + 4 * raw[3]])


CIFAR_SHAPE = (3, 32, 32)
CIFAR_RECORD = 1 + 3 * 32 * 32  # one label byte, then the red, green and blue planes, row by row


def _cifar_files(folder: Path) -> tuple[list[Path], Path]:
    """data_batch_*.bin (in order) and test_batch.bin; checked for the record size."""
    if not folder.is_dir():
        raise DataError(f"cifar10 data folder {folder} does not exist; {CIFAR_ADVICE}")
    train = sorted(folder.glob("data_batch_*.bin"))
    test = folder / "test_batch.bin"
    if not train or not test.is_file():
        raise DataError(f"no data_batch_*.bin or test_batch.bin in {folder}; {CIFAR_ADVICE}")
    for f in [*train, test]:
        size = f.stat().st_size
        if size == 0 or size % CIFAR_RECORD:
            raise DataError(f"{f}: {size} bytes is not a whole number of {CIFAR_RECORD}-byte CIFAR-10 "
                            f"records (a label byte and 3x32x32 pixels)")
    return train, test


class RecordPixels:
    """The images of CIFAR-10 binary files, memory-mapped: sample i is found in its file and
    record when a batch asks for it (nothing is read before)."""

    def __init__(self, files: list[Path]):
        self.maps = [np.memmap(f, dtype=np.uint8, mode="r").reshape(-1, CIFAR_RECORD) for f in files]
        self.starts = np.cumsum([0] + [len(m) for m in self.maps])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def labels(self) -> np.ndarray:
        return np.concatenate([np.asarray(m[:, 0]) for m in self.maps]).astype(np.int64)

    def __getitem__(self, idx: np.ndarray) -> np.ndarray:
        idx = np.asarray(idx, dtype=np.int64)
        which = np.searchsorted(self.starts, idx, side="right") - 1
        out = np.empty((len(idx), CIFAR_RECORD - 1), dtype=np.uint8)
        for f in np.unique(which):
            rows = which == f
            out[rows] = self.maps[f][idx[rows] - self.starts[f], 1:]
        return out.reshape(-1, *CIFAR_SHAPE)


def _cifar_records(files: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    """(images [N, 3, 32, 32] uint8, labels [N]) from binary batch files (no pickle involved)."""
    pixels = RecordPixels(files)
    return pixels[np.arange(len(pixels))], pixels.labels()


def load_cifar10(folder: str | Path) -> Dataset:
    """CIFAR-10's binary version, normalised per channel with the training set's mean and std."""
    train_files, test_file = _cifar_files(Path(folder))
    train, test = RecordPixels(train_files), RecordPixels([test_file])
    ytr, yte = train.labels(), test.labels()
    classes = _classes(ytr, yte, Path(folder))
    mean, std = pixel_statistics(train, per_channel=True)
    return Dataset("cifar10", PixelSplit(train, torch.from_numpy(ytr), mean, std),
                   PixelSplit(test, torch.from_numpy(yte), mean, std), classes)


def synthetic(n_train: int, n_test: int, seed: int = 1234) -> Dataset:
    """Ten classes, each a fixed random 28x28 pattern plus noise: learnable in a few hundred steps."""
    g = torch.Generator().manual_seed(seed)
    templates = torch.randn(10, 1, 28, 28, generator=g)
    def split(n: int) -> Split:
        labels = torch.randint(0, 10, (n,), generator=g)
        images = 0.15 * templates[labels] + torch.randn(n, 1, 28, 28, generator=g)
        return Split(images.contiguous(), labels)
    return Dataset("synthetic", split(n_train), split(n_test))


def steps_per_epoch(n_train: int, batch_size: int) -> int:
    return n_train // batch_size  # the last partial batch is dropped so every step has one shape


def total_steps(n_train: int, batch_size: int, epochs: int, steps: Optional[int]) -> int:
    """The run's length in steps: every epoch, or --steps if that comes first."""
    full = steps_per_epoch(n_train, batch_size) * epochs
    return full if steps is None else min(steps, full)


def train_batches(split: Split, batch_size: int, seed: int, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch of shuffled training batches; the order depends only on (seed, epoch). A stream
    (common/streams.py) is read in order instead: batch w is window w of each of its
    `batch_size` parts."""
    if getattr(split, "ordered", False):
        from synthgrad.common.streams import window_batches
        for idx in window_batches(len(split), batch_size):
            yield split.take(idx)
        return
    g = torch.Generator().manual_seed(seed * 1000003 + epoch)
    order = torch.randperm(len(split), generator=g)
    for b in range(steps_per_epoch(len(split), batch_size)):
        idx = order[b * batch_size:(b + 1) * batch_size]
        yield split.take(idx)


def eval_batches(split: Split, batch_size: int, limit: Optional[int] = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The first `limit` test samples (all when None) in order, in batches of at most
    `batch_size`. A stream's first `limit` windows are cut into min(batch_size, windows)
    parts read side by side, as in training (the windows past the last whole batch are left
    out)."""
    n = len(split) if limit is None else min(limit, len(split))
    if getattr(split, "ordered", False):
        from synthgrad.common.streams import window_batches
        for idx in window_batches(n, min(batch_size, n)):
            yield split.take(idx)
        return
    for start in range(0, n, batch_size):
        end = min(start + batch_size, n)
        yield split.take(torch.arange(start, end))
