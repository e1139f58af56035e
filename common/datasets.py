"""The datasets a run can name, one source object each: how to check its files before anything
starts, what one sample looks like and how many classes there are (from headers and labels,
without loading images), how many training samples it has (for the run's length), and how to
load it in stage 0. Built-in sets are entries of BUILTIN; a user's set is its import path
(`package.module:function` returning (train, test) map-style datasets). Readers and splits are
in common/data.py.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from synthgrad.common.data import (CIFAR_ADVICE, CIFAR_RECORD, CIFAR_SHAPE, FASHION_MNIST_DIR, IDX_ADVICE,
                                   DataError, Dataset, DataSpec, UserSplit, _cifar_files, _classes, _find,
                                   _sample as sample_of, idx_dims, load_cifar10, load_idx_folder, read_idx,
                                   synthetic)
from synthgrad.common.imports import ImportPathError, import_object, is_import_path
from synthgrad.common.streams import Stream, StreamError, StreamSplit, copy_stream, stdlib_text, text_streams


@dataclass(frozen=True)
class StreamOptions:
    """What a stream dataset is read with (the run's --bptt, --copy-length, ...)."""
    window: int = 16
    copy_length: int = 8
    copy_repeats: int = 3
    text_chars: Optional[int] = None

    @classmethod
    def of(cls, cfg) -> "StreamOptions":
        return cls(cfg.bptt, cfg.copy_length, cfg.copy_repeats, cfg.text_chars)


class Source:
    """One dataset's four questions (see the module docstring)."""
    name: str

    def check(self, data_dir: Optional[str]) -> None:
        raise NotImplementedError

    def spec(self, data_dir: Optional[str]) -> DataSpec:
        raise NotImplementedError

    def count_train(self, data_dir: Optional[str], n_synthetic: int) -> int:
        raise NotImplementedError

    def load(self, data_dir: Optional[str], n_train: int, n_test: int) -> Dataset:
        raise NotImplementedError


@dataclass(frozen=True)
class Synthetic(Source):
    """Generated in memory: ten noisy 28x28 patterns (--synthetic-train/-test samples)."""
    name: str = "synthetic"

    def check(self, data_dir):
        return None

    def spec(self, data_dir):
        return DataSpec((1, 28, 28), 10)

    def count_train(self, data_dir, n_synthetic):
        return n_synthetic

    def load(self, data_dir, n_train, n_test):
        return synthetic(n_train, n_test)


@dataclass(frozen=True)
class IdxFolder(Source):
    """MNIST-format IDX files of any image size (gzipped or not), from --data-dir or a default
    folder; without either, --data-dir is required."""
    name: str
    default_dir: Optional[str] = None
    advice: str = IDX_ADVICE  # what to do when the files are missing

    def _folder(self, data_dir: Optional[str]) -> Path:
        if not data_dir and not self.default_dir:
            raise DataError(f"--dataset {self.name} needs --data-dir; {self.advice}")
        return Path(data_dir or self.default_dir or "")

    def check(self, data_dir):
        folder = self._folder(data_dir)
        if not folder.is_dir():
            raise DataError(f"{self.name} data folder {folder} does not exist; {self.advice}")
        for prefix, idx in (("train-images", "idx3"), ("train-labels", "idx1"),
                            ("t10k-images", "idx3"), ("t10k-labels", "idx1")):
            try:
                _find(folder, prefix, idx)
            except DataError as exc:
                raise DataError(f"{exc}; {self.advice}") from None

    def spec(self, data_dir):
        folder = self._folder(data_dir)
        dims = idx_dims(_find(folder, "train-images", "idx3"))
        if len(dims) != 3:
            raise DataError(f"{folder}: training images have {len(dims)} dimensions; expected [N, H, W]")
        labels = read_idx(_find(folder, "train-labels", "idx1"))
        test_labels = read_idx(_find(folder, "t10k-labels", "idx1"))
        return DataSpec((1, int(dims[1]), int(dims[2])), _classes(labels, test_labels, folder))

    def count_train(self, data_dir, n_synthetic):
        return int(read_idx(_find(self._folder(data_dir), "train-labels", "idx1")).shape[0])

    def load(self, data_dir, n_train, n_test):
        return load_idx_folder(self._folder(data_dir), self.name, self.advice)


@dataclass(frozen=True)
class Cifar10(Source):
    """CIFAR-10's binary version (data_batch_*.bin, test_batch.bin) in --data-dir."""
    name: str = "cifar10"

    def _folder(self, data_dir: Optional[str]) -> Path:
        if not data_dir:
            raise DataError(f"--dataset {self.name} needs --data-dir; {CIFAR_ADVICE}")
        return Path(data_dir)

    def check(self, data_dir):
        _cifar_files(self._folder(data_dir))

    def spec(self, data_dir):
        folder = self._folder(data_dir)
        train_files, test_file = _cifar_files(folder)
        labels = [np.memmap(f, dtype=np.uint8, mode="r").reshape(-1, CIFAR_RECORD)[:, 0] for f in train_files]
        test_labels = np.memmap(test_file, dtype=np.uint8, mode="r").reshape(-1, CIFAR_RECORD)[:, 0]
        return DataSpec(CIFAR_SHAPE, _classes(np.concatenate(labels), np.asarray(test_labels), folder))

    def count_train(self, data_dir, n_synthetic):
        return sum(f.stat().st_size // CIFAR_RECORD for f in _cifar_files(self._folder(data_dir))[0])

    def load(self, data_dir, n_train, n_test):
        return load_cifar10(self._folder(data_dir))


@dataclass(frozen=True)
class UserDataset(Source):
    """A user's factory by import path (given data_dir if it takes it): map-style datasets, or
    two Streams (common/streams.py) read in windows of --bptt."""
    name: str
    options: StreamOptions = StreamOptions()

    def check(self, data_dir):
        return None  # spec(), which every new run calls next, reads and checks it

    def spec(self, data_dir):
        train, test = user_datasets(self.name, data_dir)
        if isinstance(train, Stream):
            return _stream_spec(self.name, train, test, self.options.window)
        return user_spec(self.name, train, test)

    def count_train(self, data_dir, n_synthetic):
        train = user_datasets(self.name, data_dir)[0]
        return len(train) // self.options.window if isinstance(train, Stream) else len(train)

    def load(self, data_dir, n_train, n_test):
        train, test = user_datasets(self.name, data_dir)
        if isinstance(train, Stream):
            return _stream_dataset(self.name, train, test, self.options.window)
        spec = user_spec(self.name, train, test)
        return Dataset(self.name, UserSplit(train, f"{self.name} train", spec.sample_shape, spec.num_classes),
                       UserSplit(test, f"{self.name} test", spec.sample_shape, spec.num_classes), spec.num_classes)


def _stream_spec(name: str, train: Stream, test: Stream, window: int) -> DataSpec:
    """A window's shape; both streams hold a window at least and agree on their features."""
    for s, part in ((train, "training"), (test, "test")):
        if len(s) < window:
            raise DataError(f"--dataset {name}: the {part} stream has {len(s)} positions, fewer than one window "
                            f"of {window}: lower --bptt or give a longer stream")
    if train.features != test.features or train.num_classes != test.num_classes:
        raise DataError(f"--dataset {name}: the training and test streams differ (features {train.features} vs "
                        f"{test.features}, classes {train.num_classes} vs {test.num_classes})")
    return DataSpec((window, *train.features), train.num_classes, (window,))


def _stream_dataset(name: str, train: Stream, test: Stream, window: int) -> Dataset:
    try:
        return Dataset(name, StreamSplit(train, window, f"{name} training stream"),
                       StreamSplit(test, window, f"{name} test stream"), train.num_classes)
    except StreamError as exc:
        raise DataError(str(exc)) from None


@dataclass(frozen=True)
class CopyTask(Source):
    """The Copy task (repeats 1) or Repeat-Copy, generated: --synthetic-train / --synthetic-test
    windows of --bptt positions, sequences of --copy-length symbols (common/streams.py)."""
    name: str = "copy"
    repeat: bool = False
    options: StreamOptions = StreamOptions()

    def _streams(self, n_train: int, n_test: int) -> tuple[Stream, Stream]:
        o = self.options
        repeats = o.copy_repeats if self.repeat else 1
        return (copy_stream(n_train * o.window, o.copy_length, 1, repeats),
                copy_stream(n_test * o.window, o.copy_length, 2, repeats))

    def check(self, data_dir):
        return None

    def spec(self, data_dir):
        return _stream_spec(self.name, *self._streams(1, 1), self.options.window)

    def count_train(self, data_dir, n_synthetic):
        return n_synthetic

    def load(self, data_dir, n_train, n_test):
        return _stream_dataset(self.name, *self._streams(n_train, n_test), self.options.window)


@dataclass(frozen=True)
class TextTask(Source):
    """Next-character prediction on the Python standard library's source files (or the .py files
    in --data-dir): train and test are the first 90% and the last 5% of the text."""
    name: str = "text"
    options: StreamOptions = StreamOptions()

    def _streams(self, data_dir) -> tuple[Stream, Stream]:
        try:
            train, _, test = text_streams(stdlib_text(data_dir), self.options.text_chars)
        except StreamError as exc:
            raise DataError(str(exc)) from None
        return train, test

    def check(self, data_dir):
        self._streams(data_dir)

    def spec(self, data_dir):
        return _stream_spec(self.name, *self._streams(data_dir), self.options.window)

    def count_train(self, data_dir, n_synthetic):
        return len(self._streams(data_dir)[0]) // self.options.window

    def load(self, data_dir, n_train, n_test):
        return _stream_dataset(self.name, *self._streams(data_dir), self.options.window)


FASHION_ADVICE = ("install it with `apt-get install dataset-fashion-mnist` (files land in "
                  f"{FASHION_MNIST_DIR}) or pass --data-dir with a folder of its IDX files")
# the built-in datasets, by the name --dataset takes (the config's choice list is read from here)
BUILTIN: dict[str, Source] = {s.name: s for s in (
    IdxFolder("fashion-mnist", FASHION_MNIST_DIR, FASHION_ADVICE),
    IdxFolder("mnist"),
    Cifar10(),
    Synthetic(),
    CopyTask("copy"),
    CopyTask("repeat-copy", repeat=True),
    TextTask(),
)}


def source(name: str, stream: Optional[StreamOptions] = None) -> Source:
    """The source --dataset NAME names: a built-in one, or a user's by import path; a stream
    dataset is read with `stream` (the run's window and task options)."""
    if name in BUILTIN:
        found = BUILTIN[name]
        return dataclasses.replace(found, options=stream) if stream and hasattr(found, "options") else found
    if is_import_path(name):
        return UserDataset(name, stream or StreamOptions())
    raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(BUILTIN)}, or give your own as "
                    f"package.module:function")


def check_dataset(name: str, data_dir: Optional[str], stream: Optional[StreamOptions] = None) -> None:
    """Fail fast, before any process starts, when the files are not there."""
    source(name, stream).check(data_dir)


def data_spec(name: str, data_dir: Optional[str], stream: Optional[StreamOptions] = None) -> DataSpec:
    """One sample's shape and the number of classes, without loading the images."""
    return source(name, stream).spec(data_dir)


def count_train(name: str, data_dir: Optional[str], n_synthetic: int, stream: Optional[StreamOptions] = None) -> int:
    """Training-set size from headers alone (the coordinator loads no data); a stream's windows."""
    return source(name, stream).count_train(data_dir, n_synthetic)


def load_dataset(name: str, data_dir: Optional[str], n_train: int = 12800, n_test: int = 2560,
                 stream: Optional[StreamOptions] = None) -> Dataset:
    return source(name, stream).load(data_dir, n_train, n_test)


def run_dataset(cfg) -> Dataset:
    """The data of run `cfg` (a RunConfig), loaded where stage 0 runs."""
    return load_dataset(cfg.dataset, cfg.data_dir, cfg.synthetic_train, cfg.synthetic_test, StreamOptions.of(cfg))


def user_datasets(path: str, data_dir: Optional[str]):
    """Call the factory at `path` ('package.module:function'; given `data_dir` if it takes an
    argument named so) and return its (train, test) datasets."""
    import inspect
    try:
        factory = import_object(path)
    except ImportPathError as exc:
        raise DataError(f"--dataset {path}: {exc}") from None
    try:
        takes = inspect.signature(factory).parameters
        pair = factory(data_dir=data_dir) if "data_dir" in takes else factory()
    except Exception as exc:
        raise DataError(f"--dataset {path} failed: {type(exc).__name__}: {exc}") from None
    if not isinstance(pair, (tuple, list)) or len(pair) != 2 or not all(
            isinstance(d, Stream) or (hasattr(d, "__getitem__") and hasattr(d, "__len__")) for d in pair):
        raise DataError(f"--dataset {path} returned {type(pair).__name__}; it must return (train, test): two "
                        f"map-style datasets (dataset[i] -> (sample, class index), len(dataset)), or two "
                        f"synthgrad.Stream")
    for d, what in zip(pair, ("training", "test")):
        if len(d) == 0:
            raise DataError(f"--dataset {path}: the {what} set is empty")
    if isinstance(pair[0], Stream) != isinstance(pair[1], Stream):
        raise DataError(f"--dataset {path}: give two Streams or two map-style datasets, not one of each")
    return pair


def user_spec(path: str, train, test) -> DataSpec:
    """Shape from sample 0 (checked against the last sample of each split); classes from the
    dataset's `classes` (a list, as torchvision's) or `num_classes`, else from every label."""
    x0, _ = sample_of(train, 0, f"{path} train")
    shape = tuple(x0.shape)
    for d, what in ((train, "train"), (test, "test")):
        for i in (0, len(d) - 1):
            x, _ = sample_of(d, i, f"{path} {what}")
            if tuple(x.shape) != shape:
                raise DataError(f"{path} {what}[{i}] is a sample of shape {tuple(x.shape)}; "
                                f"train[0] is {shape}: every sample must have one shape")
    if hasattr(train, "classes"):
        classes = len(train.classes)
    elif hasattr(train, "num_classes"):
        classes = int(train.num_classes)
    else:  # reads every training label once
        classes = max(sample_of(train, i, f"{path} train")[1] for i in range(len(train))) + 1
    if classes < 2:
        raise DataError(f"--dataset {path}: {classes} class; a classifier needs at least two")
    return DataSpec(shape, classes)
