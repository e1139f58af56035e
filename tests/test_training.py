"""Real runs with real processes (spawned workers, ZeroMQ links), each under a hard timeout."""
from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import psutil
import pytest
import torch

from synthgrad.common.files import load_model_state
from synthgrad.common.procs import OPENMP_WAIT_SETTINGS, cpu_priority
from tests.helpers import (
    EXACT_SGD,
    LOCKED_EQUALS_BACKPROP,
    assert_all_gone,
    assert_same_evaluation,
    assert_states_close,
    assert_states_equal,
    SG_COSINE_BAR,
    late_cosine,
    run,
    sg_cosines,
    training_launcher,
)

pytestmark = pytest.mark.slow  # every test here starts processes


@pytest.mark.timeout(180)
@pytest.mark.parametrize("groups", [None, (1, 3)], ids=["4-stages", "2-stages-1-3"])
def test_locked_workers_reproduce_backprop(tiny_cfg, tmp_path, groups):
    """Same seed, same batches, one torch thread each: after 20 steps of SGD with momentum every
    parameter and BN statistic equals the single-process result up to float32 rounding
    (LOCKED_EQUALS_BACKPROP; tests/helpers.py says why SGD and why that tolerance)."""
    cfg = tiny_cfg.replace(**EXACT_SGD)
    ref_dir, ref = run(cfg, mode="backprop", backprop_threads=1, out=str(tmp_path / "bp"))
    got_dir, got = run(cfg, mode="locked", groups=groups, out=str(tmp_path / "locked"))
    assert ref["steps"] == got["steps"] == 20
    assert got["true_gradient_steps"] == 20
    a, b = load_model_state(ref_dir), load_model_state(got_dir)
    assert sorted(a) == [0, 1, 2, 3]
    assert_states_close(a, b, **LOCKED_EQUALS_BACKPROP)
    assert_same_evaluation(ref, got)



@pytest.mark.timeout(180)
def test_unlocked_learns_and_counts_true_gradients(tiny_cfg):
    """The synthetic gradients train the stages below the last: the same run with those stages
    frozen (--sg-update-lr-scale 0: only the last stage, which always has its exact gradient,
    learns) ends clearly worse (here 0.18 against 0.45-0.50 over three seeds), and every
    predictor agrees with the true gradient better than chance by the end. Both runs follow the
    DNI paper's rule (full steps on the predictor from the start; true gradients only train the
    predictors), so only the predicted steps differ. The defaults (steps scaled by the
    predictor's running cosine, true gradients applied too) learn at least as clearly."""
    n = 5
    paper = dict(sg_true_updates=False, sg_trust_scale=False)
    run_dir, s = run(tiny_cfg, mode="unlocked", steps=120, epochs=4, true_grad_every=n, lr=5e-3, metrics_every=0.05,
                     **paper)
    assert s["steps"] == 120
    assert s["true_gradient_steps"] == 120 // n
    # each stage but the last got exactly one true gradient per true-gradient step
    assert s["true_gradients_relayed"] == [120 // n] * 3 + [0]
    assert all(w["true_grads_received"] == 120 // n for w in s["workers"][:-1])
    _, frozen = run(tiny_cfg, mode="unlocked", steps=120, epochs=4, true_grad_every=n, lr=5e-3,
                    sg_update_lr_scale=0.0, out=str(Path(tiny_cfg.out).parent / "frozen"), **paper)
    assert s["test_accuracy"] > 0.35 and s["test_accuracy"] >= frozen["test_accuracy"] + 0.15, \
        (s["evals"], frozen["evals"])
    _, default = run(tiny_cfg, mode="unlocked", steps=120, epochs=4, true_grad_every=n, lr=5e-3,
                     out=str(Path(tiny_cfg.out).parent / "default"))
    assert default["test_accuracy"] >= frozen["test_accuracy"] + 0.15, (default["evals"], frozen["evals"])
    cosines = sg_cosines(run_dir)
    assert sorted(cosines) == [0, 1, 2], cosines  # the last stage has no predictor
    for stage, series in cosines.items():
        assert late_cosine(series) > SG_COSINE_BAR, (stage, series)
    assert len(s["evals"]) == 4  # after each epoch (32 steps each)
    for key in ("mode", "steps", "samples", "wall_clock_s", "samples_per_s", "test_accuracy",
                "true_gradient_steps"):
        assert s[key] is not None, key
    for w in s["workers"]:
        assert {"stage", "pid", "samples_per_s", "busy_fraction"} <= set(w)
        assert 0 < w["busy_fraction"] <= 1


@pytest.mark.timeout(180)
@pytest.mark.parametrize("changes", [
    {"mode": "stale", "true_grad_every": 4},
    {"mode": "unlocked", "conditioned": True, "bootstrap": True, "sg_model": "mlp", "sg_hidden": 32,
     "true_grad_every": 4, "stages": 2},
    # the CNN's stages together; with --threads 2,1 on two cores its second stage yields
    {"mode": "unlocked", "model": "cnn", "true_grad_every": 2, "stages": 2, "transport": "tcp",
     "sg_model": "lowrank", "sg_hidden": 8},
    {"mode": "local", "model": "cnn", "stages": 2, "true_grad_every": 10 ** 6, "threads": (2, 1)},
    {"mode": "delayed", "model": "cnn", "stages": 2, "true_grad_every": 1},
    {"mode": "corrected", "model": "cnn", "stages": 2, "true_grad_every": 4},
    # one thread per stage: nobody yields, so the workers start with OpenMP's defaults again
    # (the fork server restarted without the passive wait the runs before had)
    {"mode": "delayed", "true_grad_every": 1, "threads": (1,)},
], ids=["stale", "cdni-bootstrap-mlp-sg", "cnn-tcp-lowrank", "local-cnn", "delayed-cnn", "corrected-cnn",
        "delayed"])
def test_other_modes_run_to_the_end(tiny_cfg, changes):
    """Every rule through the stage processes; `true_grad_every` here is what the rule sends
    back (local: nothing, delayed: every step)."""
    run_dir, s = run(tiny_cfg, **changes)
    assert s["steps"] == 20 and s["true_gradient_steps"] == 20 // changes["true_grad_every"]
    if changes["mode"] == "delayed":  # the gradient of step s arrives while later steps run
        delays = [w["gradient_delay_max"] for w in s["workers"][:-1]]
        assert s["workers"][-1]["gradient_delay_max"] is None and all(d is not None for d in delays)
        # stage 0 never waits: some gradient finds it steps ahead, never more than its queues hold
        q, k = tiny_cfg.queue_depth, len(s["workers"])
        assert 1 <= delays[0] <= 4 * (q + 1) * (k - 1), delays
    if changes["mode"] in ("local", "corrected"):
        sent_back = 0 if changes["mode"] == "local" else 20 // changes["true_grad_every"]
        assert all(w["true_grads_received"] == sent_back for w in s["workers"][:-1])
        assert s["workers"][0]["head_share_of_compute"] > 0
    if changes.get("bootstrap"):
        assert s["bootstrap_gradients_relayed"][0] == 20 - 20 // changes["true_grad_every"]
    # each stage ran with the threads its layout gave it (auto: by cost; or --threads)
    assert [w["threads"] for w in s["workers"]] == s["layout"]["threads"]
    if "threads" in changes:
        given = list(changes["threads"])  # one count: every stage
        assert s["layout"]["threads"] == (given * len(s["workers"]) if len(given) == 1 else given)
    # a stage the layout says yields runs at nice 19, the others as this process does; with one
    # yielding, every stage's OpenMP threads sleep when idle (unless this environment says otherwise)
    users = any(k in os.environ for k in OPENMP_WAIT_SETTINGS)
    policy = "PASSIVE" if any(s["layout"]["yields"]) and not users else os.environ.get("OMP_WAIT_POLICY")
    assert {w["omp_wait_policy"] for w in s["workers"]} == {policy}
    own, sleeps = cpu_priority(), (policy or "").upper() == "PASSIVE"  # no yielding to spinning threads
    assert [w["cpu_priority"] for w in s["workers"]] == ["nice 19" if y and sleeps else own
                                                         for y in s["layout"]["yields"]]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert {r["event"] for r in records} == {"worker", "eval", "status"}  # status: at least the final one
    assert all("wall_s" in r for r in records)
    assert s["rejected_messages"] == 0


@pytest.mark.timeout(180)
def test_queues_bound_how_far_stage_0_runs_ahead(tiny_cfg):
    """With --queue-depth 1, stage 0 never holds more than a few steps per link awaiting their
    true gradients (an unbounded queue lets it run hundreds of steps ahead)."""
    q, k = 1, 4
    _, s = run(tiny_cfg, mode="unlocked", layers=(784, 256, 256, 256, 10), batch_size=256,
               synthetic_train=256 * 100, steps=100, queue_depth=q)
    ahead = s["workers"][0]["max_outstanding_steps"]
    assert 1 <= ahead <= 4 * (q + 1) * (k - 1), ahead


# ---------------------------------------------------------------------------- failures
@pytest.mark.timeout(120)
def test_killed_worker_ends_the_run_with_a_clear_error(tmp_path):
    with training_launcher(tmp_path) as (proc, pids):
        assert len(pids) == 4
        victim = pids[2]
        os.kill(victim, signal.SIGKILL)
        t0 = time.monotonic()
        out, _ = proc.communicate(timeout=30)
        took = time.monotonic() - t0
        assert proc.returncode == 1, out
        # only the process group's check names the signal (a silent stage is "sent nothing for
        # Ns"), so the words prove what noticed; the time only rules out a hang, with room for a
        # loaded machine
        assert f"stage 2 (pid {victim}) killed by SIGKILL" in out
        assert took < 30, f"took {took:.1f}s to notice"
        assert_all_gone(pids)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())  # how it ended, on disk
    assert summary["status"] == "failed" and f"stage 2 (pid {victim}) killed by SIGKILL" in summary["error"]
    assert summary["steps"] > 0 and summary["segments"][0]["status"] == "failed"


@pytest.mark.timeout(120)
def test_ctrl_c_stops_every_process(tmp_path):
    with training_launcher(tmp_path) as (proc, pids):
        os.kill(proc.pid, signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 130, out
        assert "interrupted" in out
        assert_all_gone(pids)


@pytest.mark.timeout(120)
def test_workers_exit_when_the_launcher_is_killed(tmp_path):
    with training_launcher(tmp_path) as (proc, pids):
        everyone = [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]  # fork server too
        assert set(pids) < set(everyone)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        assert_all_gone(everyone, timeout=10)


@pytest.mark.timeout(120)
def test_a_second_run_into_the_same_folder_starts_clean_records(tiny_cfg):
    """Records start afresh; the first run's weights move aside instead of mixing with the
    second run's (a locked run leaves four stage files, backprop writes one)."""
    first_dir, _ = run(tiny_cfg, mode="locked")
    first = load_model_state(first_dir)
    cfg = tiny_cfg.replace(mode="backprop", backprop_threads=1)
    for _ in range(2):
        run_dir, summary = run(cfg)
    evals = [line for line in (run_dir / "metrics.jsonl").read_text().splitlines() if '"eval"' in line]
    assert len(evals) == len(summary["evals"]) == 1
    assert [p.name for p in run_dir.glob("stage*.pt")] == ["stage0.pt"]
    aside = sorted(run_dir.glob("checkpoints.before-*/stage*.pt"))
    assert {p.name for p in aside} >= {"stage1.pt", "stage2.pt", "stage3.pt"}
    moved = {int(k): v for p in aside if p.name != "stage0.pt"
             for k, v in torch.load(p, weights_only=True)["units"].items()}
    assert_states_equal({u: first[u] for u in moved}, moved)


@pytest.mark.timeout(120)
def test_a_diverged_run_fails_naming_the_stage_and_step(tiny_cfg):
    """NaN or Inf produced by a stage ends the run before it is used, with the stage and the step
    in the error and in summary.json (that a poisoned state is never saved: test_parts.py)."""
    from synthgrad import RunFailed
    cfg = tiny_cfg.replace(mode="locked", optimizer="sgd", lr=100.0, momentum=0.99, steps=60, epochs=2)
    with pytest.raises(RunFailed, match=r"stage \d failed: NonFinite: stage \d: .* of step \d+ is NaN or infinite"):
        run(cfg)
    summary = json.loads((Path(cfg.out) / "summary.json").read_text())
    assert summary["status"] == "failed" and "NaN or infinite" in summary["error"]
