"""The IDX reader against files this test writes itself, and the data-set loader's errors."""
from __future__ import annotations

import gzip
import json
import struct

import numpy as np
import pytest
import torch

from synthgrad.common.config import RunConfig
from synthgrad.common.data import FASHION_MNIST_DIR, DataError, DataSpec, _cifar_records, read_idx, train_batches
from synthgrad.common.datasets import check_dataset, data_spec, load_dataset


def write_idx(path, array: np.ndarray, code: int = 0x08, compress: bool = False) -> None:
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    big = array.astype(array.dtype.newbyteorder(">"))
    data = header + big.tobytes()
    path.write_bytes(gzip.compress(data) if compress else data)


@pytest.mark.parametrize("compress", [False, True], ids=["raw", "gz"])
def test_read_idx_round_trip(tmp_path, compress):
    images = np.arange(3 * 28 * 28, dtype=np.uint8).reshape(3, 28, 28)
    write_idx(tmp_path / "a", images, compress=compress)
    assert np.array_equal(read_idx(tmp_path / "a"), images)


def test_read_idx_other_types(tmp_path):
    floats = np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4)
    write_idx(tmp_path / "f", floats, code=0x0D)
    assert np.array_equal(read_idx(tmp_path / "f"), floats)
    ints = np.array([1, -2, 300000], dtype=np.int32)
    write_idx(tmp_path / "i", ints, code=0x0C)
    assert np.array_equal(read_idx(tmp_path / "i"), ints)


def test_wrong_magic_fails_clearly(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x12\x34\x08\x01" + b"\x00" * 8)
    with pytest.raises(DataError, match="bad IDX magic number 0x12340801"):
        read_idx(tmp_path / "bad")


def test_truncated_file_fails_clearly(tmp_path):
    write_idx(tmp_path / "t", np.zeros((4, 28, 28), np.uint8))
    data = (tmp_path / "t").read_bytes()
    (tmp_path / "t").write_bytes(data[:-10])
    with pytest.raises(DataError, match="holds"):
        read_idx(tmp_path / "t")


def make_mnist_folder(folder, n_train=40, n_test=20, compress=True, names="standard", size=(28, 28),
                      classes=10):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    sep = "-" if names == "standard" else "."
    suffix = ".gz" if compress else ""
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, classes, n, dtype=np.uint8)
        labels[0] = classes - 1  # every class count is visible in the labels
        write_idx(folder / f"{prefix}-images{sep}idx3-ubyte{suffix}",
                  rng.integers(0, 256, (n, *size), dtype=np.uint8), compress=compress)
        write_idx(folder / f"{prefix}-labels{sep}idx1-ubyte{suffix}", labels, compress=compress)


@pytest.mark.parametrize("compress,names", [(True, "standard"), (False, "dotted")])
def test_mnist_folder_loads(tmp_path, compress, names):
    make_mnist_folder(tmp_path / "mnist", compress=compress, names=names)
    check_dataset("mnist", str(tmp_path / "mnist"))
    ds = load_dataset("mnist", str(tmp_path / "mnist"))
    assert ds.train.images.shape == (40, 1, 28, 28) and ds.test.images.shape == (20, 1, 28, 28)
    assert ds.train.labels.dtype == torch.int64
    assert abs(float(ds.train.images.mean())) < 1e-4  # normalised with the training set's mean


def test_built_in_sets_keep_bytes_and_normalise_a_batch_at_a_time(tmp_path):
    """An uncompressed IDX folder and CIFAR-10 files are memory-mapped (nothing read before a
    batch asks); a gzipped folder is held as bytes, not floats. Statistics summed in float64 over
    8-bit values are exact, so they do not depend on how the set is chunked."""
    from synthgrad.common.data import RecordPixels, pixel_statistics
    make_mnist_folder(tmp_path / "raw", compress=False)
    make_mnist_folder(tmp_path / "gz", compress=True)
    make_cifar_folder(tmp_path / "c")
    raw, gz = load_dataset("mnist", str(tmp_path / "raw")), load_dataset("mnist", str(tmp_path / "gz"))
    assert isinstance(raw.train.pixels, np.memmap) and isinstance(raw.test.pixels, np.memmap)
    assert gz.train.pixels.dtype == np.uint8
    cifar = load_dataset("cifar10", str(tmp_path / "c"))
    assert isinstance(cifar.train.pixels, RecordPixels) and all(isinstance(m, np.memmap) for m in cifar.train.pixels.maps)
    idx = torch.tensor([39, 0, 17, 3])
    x, y = raw.train.take(idx)
    expected = (torch.from_numpy(np.asarray(raw.train.pixels)[idx.numpy()].astype(np.float32) / 255.0)
                - raw.train.mean) / raw.train.std
    assert torch.equal(x, expected) and torch.equal(y, raw.train.labels[idx])
    assert torch.equal(gz.train.take(idx)[0], x)  # the same bytes, compressed or not
    for per_channel, pixels in ((False, raw.train.pixels), (True, cifar.train.pixels)):
        whole = pixel_statistics(pixels, per_channel)
        chunked = pixel_statistics(pixels, per_channel, chunk=7)
        assert all(torch.equal(a, b) for a, b in zip(whole, chunked))


def test_any_image_size_and_number_of_classes(tmp_path):
    """An IDX folder of 14x20 images in 5 classes: the header and the labels say so, and a run
    on it builds its models from them (config.json keeps them)."""
    make_mnist_folder(tmp_path / "small", n_train=64, n_test=16, size=(14, 20), classes=5)
    assert data_spec("mnist", str(tmp_path / "small")) == DataSpec((1, 14, 20), 5)
    ds = load_dataset("mnist", str(tmp_path / "small"))
    assert ds.train.images.shape == (64, 1, 14, 20) and ds.num_classes == 5
    import synthgrad
    base = RunConfig(mode="backprop", dataset="mnist", data_dir=str(tmp_path / "small"), batch_size=8,
                     steps=4, epochs=1, backprop_threads=1)
    with pytest.raises(synthgrad.ConfigError, match=r"--layers must start with 280 \(the mnist samples' 1x14x20"):
        synthgrad.train(base.replace(out=str(tmp_path / "r0")), log=lambda *_: None)
    for model in ("mlp", "cnn"):
        cfg = base.replace(model=model, layers=(280, 16, 5), out=str(tmp_path / model))
        _, summary = synthgrad.train(cfg, log=lambda *_: None)
        assert summary["status"] == "done" and summary["steps"] == 4
        saved = json.loads((tmp_path / model / "config.json").read_text())
        assert saved["input_shape"] == [1, 14, 20] and saved["num_classes"] == 5


def test_labels_and_sizes_that_do_not_fit_are_refused(tmp_path):
    make_mnist_folder(tmp_path / "d", n_train=16, n_test=8, classes=3)
    write_idx(tmp_path / "d" / "t10k-labels-idx1-ubyte.gz", np.array([0, 1, 7, 1, 0, 2, 1, 0], np.uint8),
              compress=True)
    with pytest.raises(DataError, match="outside the training labels' classes 0..2"):
        load_dataset("mnist", str(tmp_path / "d"))
    make_mnist_folder(tmp_path / "e", n_train=16, n_test=8)
    write_idx(tmp_path / "e" / "t10k-images-idx3-ubyte.gz", np.zeros((8, 14, 14), np.uint8), compress=True)
    with pytest.raises(DataError, match="must be the same size"):
        load_dataset("mnist", str(tmp_path / "e"))


def test_missing_data_says_how_to_get_it(tmp_path):
    with pytest.raises(DataError, match="--data-dir"):
        check_dataset("mnist", None)
    with pytest.raises(DataError, match="does not exist.*--data-dir"):
        check_dataset("mnist", str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no train-images.*torchvision"):
        check_dataset("mnist", str(tmp_path / "empty"))
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        check_dataset("fashion-mnist", str(tmp_path / "nowhere"))


def test_batch_order_depends_only_on_seed_and_epoch():
    ds = load_dataset("synthetic", None, 512, 64)
    a = [y for _, y in train_batches(ds.train, 64, seed=3, epoch=1)]
    b = [y for _, y in train_batches(ds.train, 64, seed=3, epoch=1)]
    c = [y for _, y in train_batches(ds.train, 64, seed=3, epoch=2)]
    assert len(a) == 8 and all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


@pytest.mark.skipif(not __import__("os").path.isdir(FASHION_MNIST_DIR),
                    reason="Debian package dataset-fashion-mnist not installed")
def test_real_fashion_mnist_loads():
    ds = load_dataset("fashion-mnist", None)
    assert len(ds.train) == 60000 and len(ds.test) == 10000
    assert sorted(ds.train.labels.unique().tolist()) == list(range(10))


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_locked_equals_backprop_on_data_of_another_shape(tmp_path):
    """The built-in CNN on single-channel 14x20 images in 5 classes, split over two stage
    processes: locked still reproduces one-thread backprop (tolerance: tests/helpers.py)."""
    from synthgrad.common.files import load_model_state
    from tests.helpers import EXACT_SGD, LOCKED_EQUALS_BACKPROP, assert_states_close, run
    make_mnist_folder(tmp_path / "small", n_train=256, n_test=32, size=(14, 20), classes=5)
    cfg = RunConfig(dataset="mnist", data_dir=str(tmp_path / "small"), model="cnn", batch_size=32, epochs=2,
                    backprop_threads=1, start_timeout=60, stall_timeout=30, **EXACT_SGD)
    ref_dir, _ = run(cfg, mode="backprop", out=str(tmp_path / "bp"))
    got_dir, summary = run(cfg, mode="locked", stages=2, out=str(tmp_path / "locked"))
    assert summary["steps"] == 16
    assert_states_close(load_model_state(ref_dir), load_model_state(got_dir), **LOCKED_EQUALS_BACKPROP)


def make_cifar_folder(folder, per_batch=20, batches=2, n_test=10, classes=10):
    """CIFAR-10's binary format, written here: per record a label byte, then 3x32x32 pixels."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)

    def records(n):
        labels = rng.integers(0, classes, n, dtype=np.uint8)
        labels[0] = classes - 1
        pixels = rng.integers(0, 256, (n, 3 * 32 * 32), dtype=np.uint8)
        pixels[:, :1024] //= 2  # a red plane darker than the others: channels are normalised apart
        return np.concatenate([labels[:, None], pixels], axis=1).tobytes()
    for b in range(1, batches + 1):
        (folder / f"data_batch_{b}.bin").write_bytes(records(per_batch))
    (folder / "test_batch.bin").write_bytes(records(n_test))


def test_cifar10_binary_batches_load_without_pickle(tmp_path):
    make_cifar_folder(tmp_path / "c")
    check_dataset("cifar10", str(tmp_path / "c"))
    assert data_spec("cifar10", str(tmp_path / "c")) == DataSpec((3, 32, 32), 10)
    ds = load_dataset("cifar10", str(tmp_path / "c"))
    assert ds.train.images.shape == (40, 3, 32, 32) and ds.test.images.shape == (10, 3, 32, 32)
    assert ds.train.labels[0] == 9 and ds.train.labels.dtype == torch.int64
    means = ds.train.images.mean(dim=(0, 2, 3))
    assert torch.allclose(means, torch.zeros(3), atol=1e-4)  # per channel, the red one included
    raw = (tmp_path / "c" / "data_batch_1.bin").read_bytes()
    images, labels = _cifar_records([tmp_path / "c" / "data_batch_1.bin"])  # planes, row by row
    assert labels[0] == raw[0] and images[0, 0, 0, 0] == raw[1] and images[0, 1, 0, 0] == raw[1 + 1024]
    assert images[0, 2, 31, 31] == raw[3072] and images[1, 0, 0, 1] == raw[3073 + 2]
    import synthgrad  # a run on it: the CNN takes 3 channels, the MLP 3072 inputs
    for model, layers in (("cnn", (784, 10)), ("mlp", (3072, 32, 10))):
        cfg = RunConfig(mode="backprop", dataset="cifar10", data_dir=str(tmp_path / "c"), model=model,
                        layers=layers, batch_size=8, steps=3, backprop_threads=1, out=str(tmp_path / model))
        assert synthgrad.train(cfg, log=lambda *_: None)[1]["status"] == "done"
    (tmp_path / "c" / "data_batch_2.bin").write_bytes(raw[:100])  # a torn file
    with pytest.raises(DataError, match="not a whole number of 3073-byte CIFAR-10 records"):
        check_dataset("cifar10", str(tmp_path / "c"))
    with pytest.raises(DataError, match="needs --data-dir"):
        check_dataset("cifar10", None)
    with pytest.raises(DataError, match="no data_batch"):
        check_dataset("cifar10", str(tmp_path))
