"""Each example in examples/ runs, briefly, as a user would run it, so that none of them rots."""
from __future__ import annotations

import sys

import numpy as np
import pytest

from tests.helpers import ROOT
from tests.test_data import make_cifar_folder

pytestmark = pytest.mark.slow  # every example starts stage processes

sys.path.insert(0, str(ROOT))


@pytest.mark.timeout(120)
def test_cifar_cnn(tmp_path):
    from examples import cifar_cnn
    make_cifar_folder(tmp_path / "cifar", per_batch=64, batches=2, n_test=32)
    summary = cifar_cnn.main(["--data-dir", str(tmp_path / "cifar"), "--steps", "6", "--batch-size", "16",
                              "--precision", "bf16", "--out", str(tmp_path / "run")])  # convs in bf16 too
    assert summary["status"] == "done" and summary["steps"] == 6 and summary["mode"] == "local"
    assert summary["config"]["precision"] == "bf16"
    assert summary["layout"]["groups"] in ([1, 3], [2, 2], [3, 1])


@pytest.mark.timeout(120)
def test_sequence_model_unlocks_stages_that_pass_sequences(tmp_path):
    from examples import sequence_model
    summary = sequence_model.main(["--epochs", "2", "--out", str(tmp_path / "run")])
    assert summary["status"] == "done" and summary["num_stages"] == 3
    assert summary["test_accuracy"] > 0.6  # three classes: chance is a third
    assert summary["true_gradient_steps"] == summary["steps"]  # unlocked, N=1


@pytest.mark.timeout(120)
def test_csv_dataset(tmp_path):
    from examples import csv_dataset
    rng = np.random.default_rng(0)
    for name, n in (("train", 256), ("test", 64)):
        labels = rng.integers(0, 4, n)
        features = rng.normal(size=(n, 6)) + 3.0 * labels[:, None]  # separable by the feature means
        rows = [",".join([str(y), *map(str, x)]) for y, x in zip(labels, features)]
        (tmp_path / f"{name}.csv").write_text("\n".join(rows) + "\n")
    summary = csv_dataset.main(["--data-dir", str(tmp_path), "--epochs", "8", "--out", str(tmp_path / "run")])
    assert summary["status"] == "done" and summary["test_accuracy"] > 0.5  # four classes


@pytest.mark.timeout(120)
def test_two_timescales(tmp_path):
    from examples import two_timescales
    summary = two_timescales.main(["--steps", "4", "--text-chars", "20000", "--out", str(tmp_path / "run")])
    assert summary["status"] == "done" and summary["steps"] == 4 and summary["num_stages"] == 2
    assert summary["layout"]["groups"] == [1, 2]  # the fast core alone; the slow one with the read-out
