"""Checkpoints on the coordinator's command: every stage saves right after the same step (a
marker follows that step down the stages), atomically, and a manifest names the step complete on
every stage. Ctrl-C saves one before stopping."""
from __future__ import annotations

import json
import os
import signal

import pytest
import torch

from tests.helpers import EXACT_SGD, LOCKED_EQUALS_BACKPROP, assert_all_gone, assert_states_close, run, training_launcher

pytestmark = pytest.mark.slow  # every test here starts processes


def _units(files) -> dict[int, dict[str, torch.Tensor]]:
    units = {}
    for f in files:
        units.update({int(k): v for k, v in torch.load(f, weights_only=True)["units"].items()})
    return units


@pytest.mark.timeout(240)
def test_periodic_checkpoint_holds_every_stage_after_the_same_step(tiny_cfg, tmp_path):
    """Locked is backprop split across processes, so the stages saved at step T must equal
    single-process backprop after T+1 steps (SGD, up to rounding: tests/helpers.py)."""
    tiny_cfg = tiny_cfg.replace(**EXACT_SGD)
    run_dir, s = run(tiny_cfg, mode="locked", steps=60, epochs=2, checkpoint_every=0.2,
                     link_delay_ms=4, out=str(tmp_path / "locked"))  # >= 1.4 s: several checkpoints
    assert len(s["checkpoints"]) >= 2, s["checkpoints"]
    manifest = json.loads((run_dir / "checkpoints" / "manifest.json").read_text())
    assert manifest["final"] and manifest["step"] == 59  # the end of the run is the last checkpoint
    # once a checkpoint is complete, the older ones are deleted: the last complete periodic one
    # is kept (and, at most, one newer that the end of the run overtook)
    step = s["checkpoints"][-1]["step"]
    folders = sorted((run_dir / "checkpoints").glob("step-*"))
    assert [int(f.name.split("-")[1]) for f in folders][0] == step and len(folders) <= 2 and 0 <= step < 59
    files = sorted(folders[0].glob("stage*.pt"))
    assert [f.name for f in files] == ["stage0.pt", "stage1.pt", "stage2.pt", "stage3.pt"]
    assert {torch.load(f, weights_only=True)["step"] for f in files} == {step}
    ref_dir, _ = run(tiny_cfg, mode="backprop", backprop_threads=1, steps=step + 1, epochs=2,
                     out=str(tmp_path / "bp"))
    a, b = _units(sorted(ref_dir.glob("stage*.pt"))), _units(files)
    assert sorted(a) == [0, 1, 2, 3]
    assert_states_close(a, b, **LOCKED_EQUALS_BACKPROP, what=f"at step {step}")


@pytest.mark.timeout(120)
def test_ctrl_c_saves_a_checkpoint_then_stops(tmp_path):
    with training_launcher(tmp_path, "--checkpoint-every", "0") as (proc, pids):
        os.kill(proc.pid, signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 130, out
        assert "saving every stage at the next step" in out and "stopped after the checkpoint at step" in out
        assert_all_gone(pids)
    manifest = json.loads((tmp_path / "run" / "checkpoints" / "manifest.json").read_text())
    assert not manifest["final"] and manifest["step"] > 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["last_checkpoint"]["step"] == manifest["step"]
    for stage, where in manifest["stages"].items():
        state = torch.load(where["path"], weights_only=True)
        assert state["step"] == manifest["step"] and state["stage"] == int(stage)
        assert {"module", "optimizer", "sg", "sg_optimizer"} <= set(state["state"]) or int(stage) == 3


@pytest.mark.timeout(120)
def test_sigterm_saves_a_checkpoint_too(tmp_path):
    with training_launcher(tmp_path, "--checkpoint-every", "0") as (proc, pids):
        os.kill(proc.pid, signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 130, out
        assert "SIGTERM: saving every stage" in out
        assert_all_gone(pids)
    assert (tmp_path / "run" / "checkpoints" / "manifest.json").exists()


@pytest.mark.timeout(120)
def test_sigterm_stops_a_backprop_run_with_its_summary(tmp_path):
    """Backprop trains in the launcher's own process, where no coordinator takes SIGTERM: it
    is taken as Ctrl-C, so the run still says how it ended (without it the process died where
    it stood and left no summary.json)."""
    with training_launcher(tmp_path, "--mode", "backprop") as (proc, _):
        os.kill(proc.pid, signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 130, out
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["error"] == "interrupted (Ctrl-C or SIGTERM)"


@pytest.mark.timeout(120)
def test_ctrl_c_twice_stops_at_once_and_leaves_no_orphans(tmp_path):
    """"At once" means without the checkpoint a single Ctrl-C waits for (that one:
    test_ctrl_c_saves_a_checkpoint_then_stops). Each link here takes 300 ms, so the checkpoint
    marker needs at least 0.9 s to pass stage 0's three links: the second Ctrl-C, 50 ms after the
    first, comes long before it could be complete, and no checkpoint may be written."""
    import time
    with training_launcher(tmp_path, "--checkpoint-every", "0", "--link-delay-ms", "300") as (proc, pids):
        os.kill(proc.pid, signal.SIGINT)
        time.sleep(0.05)
        os.kill(proc.pid, signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 130, out
        assert "interrupted" in out and "saving every stage at the next step" in out
        assert "checkpoint: step" not in out and "stopped after the checkpoint" not in out, out
        assert_all_gone(pids)
    assert not (tmp_path / "run" / "checkpoints" / "manifest.json").exists()
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary.get("last_checkpoint") is None


@pytest.mark.timeout(240)
def test_a_stage_whose_saves_fail_never_costs_the_last_complete_checkpoint(tmp_path, locked_reference):
    """Stage 2's saves fail after its first (as on a full disk) while the others go on saving:
    the others keep the last complete checkpoint (they delete only what is older than the last
    one the coordinator committed), so Ctrl-C and --resume continue from it, and the result is
    bitwise the undisturbed run's."""
    from synthgrad.common.files import load_model_state
    from tests.helpers import LOCKED, assert_states_equal, interrupt_after
    from tests.zygote import launch, run_launch
    run_dir = tmp_path / "run"
    first = launch("train", *LOCKED, "--out", str(run_dir), "--checkpoint-every", "0.2", "--link-delay-ms", "3",
                   "--fail-saves", "2,1")
    # one complete checkpoint, then three that failed on stage 2 (the others saved theirs)
    out = interrupt_after(first, "checkpoint: step", *["failed on stage 2"] * 3)
    assert first.returncode == 130, out
    manifest = json.loads((run_dir / "checkpoints" / "manifest.json").read_text())
    complete = [line for line in out.splitlines() if line.startswith("checkpoint: step")]
    assert len(complete) == 1 and complete[0].startswith(f"checkpoint: step {manifest['step']} saved"), out
    for where in manifest["stages"].values():
        assert torch.load(where["path"], weights_only=True)["step"] == manifest["step"]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["last_checkpoint"]["step"] == manifest["step"]
    resumed = run_launch("train", "--resume", str(run_dir), "--fail-saves", "2,1000", timeout=150)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"resuming from the checkpoint at step {manifest['step']}" in resumed.stdout
    assert_states_equal(locked_reference, load_model_state(run_dir), "after failed saves and a resume")
