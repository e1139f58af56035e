"""The datasets a run can name, one source object each: how to check its files before anything
starts, what one sample looks like and how many classes there are (from headers and labels,
without loading images), how many training samples it has (for the run's length), and how to
load it in stage 0. Built-in sets are entries of BUILTIN; a user's set is its import path
(`package.module:function` returning (train, test) map-style datasets). Readers and splits are
in common/data.py.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from synthgrad.common.data import (CIFAR_ADVICE, CIFAR_RECORD, CIFAR_SHAPE, FASHION_MNIST_DIR, IDX_ADVICE,
                                   DataError, Dataset, DataSpec, UserSplit, _cifar_files, _classes, _find,
                                   _sample as sample_of, idx_dims, load_cifar10, load_idx_folder, read_idx,
                                   synthetic)
from synthgrad.common.imports import ImportPathError, import_object, is_import_path


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
    """A user's factory by import path (given data_dir if it takes it)."""
    name: str

    def check(self, data_dir):
        return None  # spec(), which every new run calls next, reads and checks it

    def spec(self, data_dir):
        return user_spec(self.name, *user_datasets(self.name, data_dir))

    def count_train(self, data_dir, n_synthetic):
        return len(user_datasets(self.name, data_dir)[0])

    def load(self, data_dir, n_train, n_test):
        train, test = user_datasets(self.name, data_dir)
        spec = user_spec(self.name, train, test)
        return Dataset(self.name, UserSplit(train, f"{self.name} train", spec.sample_shape, spec.num_classes),
                       UserSplit(test, f"{self.name} test", spec.sample_shape, spec.num_classes), spec.num_classes)


FASHION_ADVICE = ("install it with `apt-get install dataset-fashion-mnist` (files land in "
                  f"{FASHION_MNIST_DIR}) or pass --data-dir with a folder of its IDX files")
# the built-in datasets, by the name --dataset takes (the config's choice list is read from here)
BUILTIN: dict[str, Source] = {s.name: s for s in (
    IdxFolder("fashion-mnist", FASHION_MNIST_DIR, FASHION_ADVICE),
    IdxFolder("mnist"),
    Cifar10(),
    Synthetic(),
)}


def source(name: str) -> Source:
    """The source --dataset NAME names: a built-in one, or a user's by import path."""
    if name in BUILTIN:
        return BUILTIN[name]
    if is_import_path(name):
        return UserDataset(name)
    raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(BUILTIN)}, or give your own as "
                    f"package.module:function")


def check_dataset(name: str, data_dir: Optional[str]) -> None:
    """Fail fast, before any process starts, when the files are not there."""
    source(name).check(data_dir)


def data_spec(name: str, data_dir: Optional[str]) -> DataSpec:
    """One sample's shape and the number of classes, without loading the images."""
    return source(name).spec(data_dir)


def count_train(name: str, data_dir: Optional[str], n_synthetic: int) -> int:
    """Training-set size from headers alone (the coordinator loads no data)."""
    return source(name).count_train(data_dir, n_synthetic)


def load_dataset(name: str, data_dir: Optional[str], n_train: int = 12800, n_test: int = 2560) -> Dataset:
    return source(name).load(data_dir, n_train, n_test)


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
            hasattr(d, "__getitem__") and hasattr(d, "__len__") for d in pair):
        raise DataError(f"--dataset {path} returned {type(pair).__name__}; it must return (train, test): two "
                        f"map-style datasets (dataset[i] -> (sample, class index), len(dataset))")
    for d, what in zip(pair, ("training", "test")):
        if len(d) == 0:
            raise DataError(f"--dataset {path}: the {what} set is empty")
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
