"""The same job under torchrun: rank 0 coordinates, ranks 1..K run the stages, rendezvous from
torchrun's environment. Locked training under torchrun must still equal single-process backprop."""
from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
import torch

from common.files import load_model_state
from tests.conftest import ROOT
from tests.test_training import quiet

TINY = ["--dataset", "synthetic", "--layers", "784,64,64,64,10", "--batch-size", "64",
        "--synthetic-train", "2048", "--synthetic-test", "512", "--epochs", "1", "--steps", "20",
        "--start-timeout", "60", "--stall-timeout", "30"]


def torchrun(nproc: int, *args: str) -> subprocess.CompletedProcess:
    exe = shutil.which("torchrun") or sys.exit("torchrun not found")
    cmd = [exe, "--standalone", f"--nproc-per-node={nproc}", str(ROOT / "launch.py"), "train", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=150)


@pytest.mark.timeout(200)
def test_locked_under_torchrun_reproduces_backprop(tiny_cfg, tmp_path):
    from coordinator.train import train
    ref_dir, ref = train(tiny_cfg.replace(mode="backprop", backprop_threads=1, out=str(tmp_path / "bp")), log=quiet)
    done = torchrun(5, *TINY, "--mode", "locked", "--out", str(tmp_path / "trun"))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "mode locked: 20 steps" in done.stdout
    a, b = load_model_state(ref_dir), load_model_state(tmp_path / "trun")
    assert sorted(a) == sorted(b) == [0, 1, 2, 3]
    for unit in a:
        for name in a[unit]:
            torch.testing.assert_close(b[unit][name], a[unit][name], rtol=1e-5, atol=1e-6,
                                       msg=f"unit {unit} {name}")


@pytest.mark.timeout(120)
def test_torchrun_world_size_must_be_stages_plus_one(tmp_path):
    done = torchrun(3, *TINY, "--mode", "unlocked", "--out", str(tmp_path / "trun"))
    assert done.returncode != 0
    assert "torchrun started 3 processes, but this run needs 5" in done.stdout + done.stderr
