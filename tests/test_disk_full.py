"""A full disk: checkpoints that cannot be written fail alone (the run trains on, the last
complete checkpoint stays intact and named by the manifest), and the run resumes from it once
there is room again, ending where an undisturbed locked run ends."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from synthgrad.common.files import load_model_state
from tests.helpers import LOCKED, ROOT, assert_states_equal, wait_for_line

pytestmark = pytest.mark.slow  # every test here starts processes


def _tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True, timeout=30)
    return done.returncode == 0


def _fill(folder: Path) -> Path:
    """Write zeros until the file system is full."""
    filler = folder / "filler"
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(bytes(1 << 16))
                f.flush()
        except OSError:
            pass
    return filler


@pytest.mark.timeout(240)
def test_full_disk_fails_checkpoints_not_the_last_good_one(tmp_path, locked_reference):
    disk = tmp_path / "disk"
    if os.geteuid() != 0 or not _tmpfs(disk, "16m"):
        pytest.skip("needs root to mount a small tmpfs")
    try:
        run_dir = disk / "run"
        cmd = [sys.executable, "-u", str(ROOT / "launch.py"), "train", *LOCKED, "--checkpoint-every", "0.3",
               "--link-delay-ms", "3", "--out", str(run_dir)]
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            _, seen = wait_for_line(proc, "checkpoint: step", timeout=90)
            filler = _fill(disk)
            out, _ = proc.communicate(timeout=150)
            out = "".join(seen) + out
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        assert proc.returncode == 1, out[-3000:]  # the final save cannot be written either
        assert "No space left on device" in out and "failed" in out
        manifest = json.loads((run_dir / "checkpoints" / "manifest.json").read_text())
        step = manifest["step"]
        for where in manifest["stages"].values():  # the named checkpoint is whole and loadable
            assert torch.load(where["path"], weights_only=True)["step"] == step
        filler.unlink()  # room again: go on from there
        resumed = subprocess.run([sys.executable, str(ROOT / "launch.py"), "train", "--resume", str(run_dir)],
                                 cwd=ROOT, capture_output=True, text=True, timeout=150)
        assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
        assert f"resuming from the checkpoint at step {step}" in resumed.stdout
        a, b = locked_reference, load_model_state(run_dir)
        assert_states_equal(a, b, "after the full disk")
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True, timeout=30)
