"""The same job under torchrun: rank 0 coordinates, ranks 1..K run the stages, rendezvous from
torchrun's environment. Locked training under torchrun must still equal single-process backprop."""
from __future__ import annotations

import subprocess
import sys

import pytest

from synthgrad.common.files import load_model_state
from synthgrad.common.security import make_keys
from tests.helpers import EXACT_SGD, LOCKED_EQUALS_BACKPROP, ROOT, assert_states_close, quiet

pytestmark = pytest.mark.slow  # every test here starts processes

TINY = ["--dataset", "synthetic", "--layers", "784,64,64,64,10", "--batch-size", "64",
        "--synthetic-train", "2048", "--synthetic-test", "512", "--epochs", "1", "--steps", "20",
        "--start-timeout", "60", "--stall-timeout", "30"]


def torchrun(nproc: int, *args: str) -> subprocess.CompletedProcess:
    """torchrun as this interpreter's module (what the `torchrun` script runs), so the test
    needs no activated environment and no script on PATH."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           str(ROOT / "launch.py"), "train", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=150)


@pytest.mark.timeout(200)
def test_locked_under_torchrun_reproduces_backprop(tiny_cfg, tmp_path):
    from synthgrad.coordinator.train import train
    ref_dir, ref = train(tiny_cfg.replace(mode="backprop", backprop_threads=1, out=str(tmp_path / "bp"),
                                          **EXACT_SGD), log=quiet)
    sgd = ["--optimizer", "sgd", "--lr", str(EXACT_SGD["lr"]), "--momentum", str(EXACT_SGD["momentum"]),
           "--threads", "1"]
    make_keys(tmp_path / "keys")  # torchrun's ranks are started by torchrun: they share a keys folder
    done = torchrun(5, *TINY, *sgd, "--mode", "locked", "--keys", str(tmp_path / "keys"),
                    "--out", str(tmp_path / "trun"))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "CURVE-encrypted and authenticated with the keys in" in done.stdout
    assert "mode locked: 20 steps" in done.stdout
    a, b = load_model_state(ref_dir), load_model_state(tmp_path / "trun")
    assert sorted(a) == [0, 1, 2, 3]
    assert_states_close(a, b, **LOCKED_EQUALS_BACKPROP)


@pytest.mark.timeout(120)
def test_torchrun_world_size_must_be_stages_plus_one(tmp_path):
    done = torchrun(3, *TINY, "--mode", "unlocked", "--no-secure", "--out", str(tmp_path / "trun"))
    assert done.returncode != 0
    assert "torchrun started 3 processes, but this run needs 5" in done.stdout + done.stderr


@pytest.mark.timeout(120)
def test_torchrun_without_keys_says_how_to_make_them(tmp_path):
    done = torchrun(5, *TINY, "--mode", "unlocked", "--out", str(tmp_path / "trun"))
    assert done.returncode != 0
    assert "tcp links are CURVE-encrypted and authenticated: make keys with" in done.stdout + done.stderr
