"""`launch.py train --resume RUN_DIR`: a locked run stopped with Ctrl-C and resumed ends with the
same parameters as one never interrupted, and its records continue the old ones."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from synthgrad.common.config import ConfigError
from synthgrad.common.files import load_model_state
from tests.helpers import LOCKED, ROOT, assert_states_equal, interrupt_after

pytestmark = pytest.mark.slow  # every test here starts processes



def _launch(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-u", str(ROOT / "launch.py"), "train", *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.timeout(240)
def test_locked_run_resumed_after_ctrl_c_equals_an_uninterrupted_one(tmp_path, locked_reference):
    run_dir = tmp_path / "interrupted"
    first = _launch(*LOCKED, "--link-delay-ms", "3", "--out", str(run_dir))  # >= 3.5 s of training
    out = interrupt_after(first, "train step")
    assert first.returncode == 130, out
    stopped_at = json.loads((run_dir / "checkpoints" / "manifest.json").read_text())["step"]
    assert 0 <= stopped_at < 191, stopped_at
    resumed = _launch("--resume", str(run_dir))  # no delay this time: timing is not part of the result
    out, _ = resumed.communicate(timeout=150)
    assert resumed.returncode == 0, out
    assert f"resuming from the checkpoint at step {stopped_at}" in out
    a, b = locked_reference, load_model_state(run_dir)
    assert_states_equal(a, b, "after resume")
    summary = json.loads((run_dir / "summary.json").read_text())
    # the record covers the whole run: both invocations, each a segment
    assert summary["resumed_from_step"] == stopped_at and summary["steps"] == 192
    assert summary["status"] == "done" and summary["last_checkpoint"]["step"] == 191
    first, second = summary["segments"]
    assert first["status"] == "interrupted" and first["first_step"] == 0
    assert second == {**second, "status": "done", "first_step": stopped_at + 1, "steps": 191 - stopped_at}
    assert summary["wall_clock_s"] == pytest.approx(first["wall_clock_s"] + second["wall_clock_s"])
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in recs if r["event"] == "eval"]
    assert [r["step"] for r in evals] == sorted(r["step"] for r in evals)  # one curve, in order
    assert evals[-1]["step"] == 192 and all(b["wall_s"] >= a["wall_s"] for a, b in zip(evals, evals[1:]))


def test_resume_refuses_what_it_cannot_do(tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, str(ROOT / "launch.py"), "train", *args], cwd=ROOT,
                              capture_output=True, text=True, timeout=60)
    nothing = run("--resume", str(tmp_path))
    assert nothing.returncode == 2 and "not a run folder" in nothing.stderr
    (tmp_path / "config.json").write_text(json.dumps({"mode": "locked", "dataset": "synthetic"}))
    empty = run("--resume", str(tmp_path))
    assert empty.returncode == 2 and "nothing to resume" in empty.stderr
    changed = run("--resume", str(tmp_path), "--layers", "784,32,10")
    assert changed.returncode == 2 and "drop --layers" in changed.stderr


@pytest.mark.timeout(180)
def test_resume_auto_starts_a_run_then_continues_it(tmp_path):
    """What a job restarted by torchrun or Slurm does: the same command line, `--resume auto`:
    the first start begins the run in --out, a later start continues its last checkpoint."""
    import launch
    out = tmp_path / "job"
    args = ["train", *LOCKED, "--resume", "auto", "--out", str(out)]
    first = launch.config_from_args(launch.build_parser().parse_args([*args, "--steps", "20"]))
    assert first.resume is None and first.out == str(out)  # nothing there yet: a new run
    from synthgrad.coordinator.train import train
    train(first, log=lambda *_: None)
    again = launch.config_from_args(launch.build_parser().parse_args([*args, "--steps", "40"]))
    assert again.resume == str(out) and again.steps == 40
    _, summary = train(again, log=lambda *_: None)
    assert summary["resumed_from_step"] == 19 and summary["steps"] == 40
    with pytest.raises(ConfigError, match="--resume auto needs --out"):
        launch.config_from_args(launch.build_parser().parse_args(["train", "--resume", "auto"]))
