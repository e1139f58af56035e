"""--on-failure restart: a stage killed mid-run is noticed, every stage restarts from the last
complete checkpoint, and a locked run still ends exactly where an undisturbed one does."""
from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from synthgrad.common.files import load_model_state
from tests.helpers import LOCKED, ROOT, assert_states_equal, kill_after, worker_pids

pytestmark = pytest.mark.slow  # every test here starts processes


@pytest.mark.timeout(240)
def test_killed_stage_restarts_from_the_checkpoint_and_the_result_is_unchanged(tmp_path, locked_reference):
    run_dir = tmp_path / "restarted"
    cmd = [sys.executable, "-u", str(ROOT / "launch.py"), "train", *LOCKED, "--checkpoint-every", "0.5",
           "--on-failure", "restart", "--link-delay-ms", "3", "--out", str(run_dir)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out, victim = kill_after(proc, "checkpoint: step", lambda seen: worker_pids(proc)[2])
    assert proc.returncode == 0, out[-3000:]
    assert f"stage 2 (pid {victim}) killed by SIGKILL" in out and "restarting every stage from the checkpoint" in out
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["restarts"] == 1
    failure = summary["failures"][0]
    assert "killed by SIGKILL" in failure["error"]
    # it restarted from the last checkpoint the log called complete before the failure
    before = out.split("run failed:")[0]
    saved = [int(x) for x in re.findall(r"checkpoint: step (\d+) saved", before)]
    assert saved and failure["restarted_from_step"] == saved[-1], (saved, failure)
    assert f"restarting every stage from the checkpoint at step {saved[-1]}" in out
    # the steps lost are those the last stage had reported past that checkpoint (its reports
    # come every 0.2 s, so the checkpoint may be ahead of the latest: then none were lost)
    reported = [int(x) - 1 for x in re.findall(r"train step (\d+)/", before)]
    assert reported and failure["reached_step"] >= max(reported)
    assert failure["steps_lost"] == max(failure["reached_step"] - saved[-1], 0)
    # restart time: stopping the survivors, then starting every stage again
    assert 0 < failure["shutdown_s"] < 15 and failure["restart_s"] == pytest.approx(
        failure["shutdown_s"] + summary["startup_s"])
    a, b = locked_reference, load_model_state(run_dir)
    assert_states_equal(a, b, "after the restart")
    print(json.dumps(failure))  # the figures the README reports (pytest -s)
