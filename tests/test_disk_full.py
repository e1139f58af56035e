"""A full disk: checkpoints that cannot be written fail alone (the run trains on, the last
complete checkpoint stays intact and named by the manifest), and the run resumes from it once
there is room again, ending where an undisturbed locked run ends."""
from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import torch

from synthgrad.common.files import load_model_state
from tests.helpers import LOCKED, assert_states_equal, wait_for_line
from tests.zygote import launch

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


def _step_of(line: str, pattern: str) -> int:
    return int(re.search(pattern, line).group(1))


@pytest.mark.timeout(240)
def test_full_disk_fails_checkpoints_not_the_last_good_one_nor_the_run(tmp_path, locked_reference):
    """The disk fills after the first checkpoint: the next ones fail, training goes on (steps
    are counted after the first failure), the manifest keeps naming the last complete one, and
    once there is room again the next checkpoint succeeds and the run ends bitwise where the
    undisturbed locked run ends. Each link takes 5 ms (>= 30 ms a locked step, >= 5.8 s for the
    192 steps; the story needs about 2.5 s of it), which leaves time for every part of it."""
    disk = tmp_path / "disk"
    if os.geteuid() != 0 or not _tmpfs(disk, "16m"):
        pytest.skip("needs root to mount a small tmpfs")
    try:
        run_dir = disk / "run"
        proc = launch("train", *LOCKED, "--checkpoint-every", "0.3", "--link-delay-ms", "5",
                      "--progress-every", "0.1", "--out", str(run_dir))
        try:
            first, seen = wait_for_line(proc, "checkpoint: step", timeout=90)
            good = _step_of(first, r"checkpoint: step (\d+) saved")
            filler = _fill(disk)
            failed, more = wait_for_line(proc, "] checkpoint at step", timeout=60)
            seen += more
            failed_step = _step_of(failed, r"checkpoint at step (\d+) failed")
            assert "No space left on device" in failed, failed
            manifest = json.loads((run_dir / "checkpoints" / "manifest.json").read_text())
            assert manifest["step"] == good  # still the last complete one, whole and loadable
            for where in manifest["stages"].values():
                assert torch.load(where["path"], weights_only=True)["step"] == good
            # training goes on past the failure: progress of at least 20 more steps
            line, more = wait_for_line(proc, "train step", timeout=60)
            seen += more
            while _step_of(line, r"train step (\d+)/") < failed_step + 20:
                line, more = wait_for_line(proc, "train step", timeout=60)
                seen += more
            filler.unlink()  # room again: the next checkpoint is written
            saved, more = wait_for_line(proc, "checkpoint: step", timeout=60)
            seen += more
            assert _step_of(saved, r"checkpoint: step (\d+) saved") > failed_step
            out, _ = proc.communicate(timeout=150)
            out = "".join(seen) + out
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        assert proc.returncode == 0, out[-3000:]
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["status"] == "done" and summary["checkpoint_failures"] >= 1, summary
        assert_states_equal(locked_reference, load_model_state(run_dir), "after the full disk")
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True, timeout=30)
