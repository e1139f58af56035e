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
from synthgrad.common.models import build_units
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
    assert [w["device"] for w in ref["workers"]] == ["cpu"]  # backprop's one process says where it ran too



# The runs that show a rule training the stages below the last: 120 steps over four epochs, at
# a learning rate where the tiny MLP learns clearly within them.
LEARNING = dict(steps=120, epochs=4, lr=5e-3, metrics_every=0.05)
_frozen_runs: dict[str, tuple[dict, dict]] = {}


@pytest.fixture
def frozen(tiny_cfg):
    """The control every learning run is compared with: the same run with the stages below the
    last not updating (unlocked at N=1 with its predicted steps at lr x 0, --sg-update-lr-scale
    0; at N=1 no true update is applied either). Only the last stage learns, on its exact
    gradient, as it does under every rule; with the activations it sees the same whatever the
    rule, this is every rule's run with the stages below the last frozen. Run once per session
    (and configuration); returns (summary, the initial parameters), and checks that the stages
    below the last still hold them at the end (their batch-norm statistics follow the data)."""
    cfg = tiny_cfg.replace(mode="unlocked", sg_prior="none", true_grad_every=1, sg_update_lr_scale=0.0, **LEARNING)
    key = json.dumps({k: v for k, v in cfg.to_dict().items() if k != "out"}, sort_keys=True)
    if key not in _frozen_runs:
        run_dir, s = run(cfg, out=str(Path(tiny_cfg.out).parent / "frozen"))
        initial = {unit: {name: p.detach().clone() for name, p in layer.named_parameters()}
                   for unit, layer in enumerate(build_units(cfg))}
        trained = parameters(run_dir, initial)
        last = max(trained)
        assert_states_equal({u: initial[u] for u in range(last)}, {u: trained[u] for u in range(last)},
                            "below the last stage of the frozen control")
        assert any(not torch.equal(initial[last][n], t) for n, t in trained[last].items())  # the last learned
        _frozen_runs[key] = (s, initial)
    return _frozen_runs[key]


def parameters(run_dir: Path, like: dict) -> dict:
    """A run's trained parameters, unit by unit, those `like` names (no buffers)."""
    trained = load_model_state(run_dir)
    return {unit: {name: trained[unit][name] for name in names} for unit, names in like.items()}


def assert_moved_below_the_last(initial: dict, run_dir: Path) -> None:
    """Every unit below the last stage's ends away from its initial parameters."""
    trained = parameters(run_dir, initial)
    for unit in range(max(trained)):
        assert any(not torch.equal(t, initial[unit][name]) for name, t in trained[unit].items()), \
            f"unit {unit} never stepped"


@pytest.mark.timeout(180)
def test_unlocked_learns_and_counts_true_gradients(tiny_cfg, frozen):
    """The synthetic gradients train the stages below the last: the DNI paper's rule (full steps
    on the predictor from the start; true gradients only train the predictors) ends clearly
    above the same run with those stages frozen (here 0.48-0.54 against 0.17-0.19 over three
    seeds), and every predictor agrees with the true gradient better than chance by the end.
    The defaults step on the predictor at a step scaled by its running cosine, and where N > 1
    also apply the true gradients that come back (true updates), so each part has its control:
    - at N=1 the defaults apply no true update: predictions are all the stages below the last
      step on, and frozen is the same run with those steps at lr x 0 (0.68-0.73 against 0.17-0.19
      over four seeds);
    - at N=5 the control keeps the true updates and freezes only the predicted steps
      (--sg-update-lr-scale 0): it learns (0.74-0.81), which shows the true updates train the
      stages below the last, and the defaults end no worse than it (their test loss 0.003-0.135
      lower in nine pairs): a predictor whose cosine is still low moves the layers little, and
      over 120 steps that adds nothing to assert beyond doing no harm."""
    n = 5
    paper = dict(sg_true_updates=False, sg_trust_scale=False, sg_prior="none")
    fro = frozen[0]["test_accuracy"]
    run_dir, s = run(tiny_cfg, mode="unlocked", true_grad_every=n, **LEARNING, **paper)
    assert s["steps"] == 120
    assert s["true_gradient_steps"] == 120 // n
    # each stage but the last got exactly one true gradient per true-gradient step
    assert s["true_gradients_relayed"] == [120 // n] * 3 + [0]
    assert all(w["true_grads_received"] == 120 // n for w in s["workers"][:-1])
    assert s["test_accuracy"] > 0.35 and s["test_accuracy"] >= fro + 0.15, (s["evals"], frozen[0]["evals"])
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

    out = Path(tiny_cfg.out).parent
    _, every = run(tiny_cfg, mode="unlocked", sg_prior="none", true_grad_every=1, **LEARNING,
                   out=str(out / "defaults-1"))
    assert all(w["gradient_delay_max"] is None for w in every["workers"]), "a true update was applied at N=1"
    assert every["test_accuracy"] >= fro + 0.3, (every["evals"], frozen[0]["evals"])

    _, default = run(tiny_cfg, mode="unlocked", sg_prior="none", true_grad_every=n, **LEARNING,
                     out=str(out / "defaults-5"))
    _, truths = run(tiny_cfg, mode="unlocked", sg_prior="none", true_grad_every=n, sg_update_lr_scale=0.0, **LEARNING,
                    out=str(out / "true-updates-only"))
    assert all(w["gradient_delay_max"] is not None for w in truths["workers"][:-1]), "no true update applied"
    assert truths["test_accuracy"] >= fro + 0.3, (truths["evals"], frozen[0]["evals"])
    assert default["test_loss"] <= truths["test_loss"] + 0.05, (default["evals"], truths["evals"])


@pytest.mark.timeout(180)
@pytest.mark.parametrize("changes", [
    {"mode": "local"},
    {"mode": "delayed"},
    {"mode": "corrected", "true_grad_every": 5},
    {"mode": "stale", "true_grad_every": 5},
    {"mode": "unlocked", "true_grad_every": 5},
], ids=["local", "delayed", "corrected", "stale", "unlocked-head-prior"])
def test_every_rule_trains_the_stages_below_the_last(tiny_cfg, frozen, changes):
    """Each rule through the stage processes against the run with the stages below the last
    frozen: local, delayed, corrected and unlocked with its head prior end far above it
    (local, delayed and corrected 0.92-0.97 against 0.17-0.19 over two seeds). Stale is a control, not a learning rule: the last true gradient belongs to another
    batch, whose samples and labels the stage's current inputs do not match, so it carries next
    to nothing (0.19-0.21 over six runs at N=1, 2 and 5; 0.22-0.24 at the full learning rate):
    what it must show is that the stages below the last step on it at all."""
    run_dir, s = run(tiny_cfg, **LEARNING, **changes)
    assert s["steps"] == 120
    assert_moved_below_the_last(frozen[1], run_dir)
    if changes["mode"] in ("delayed", "corrected"):  # the true gradients that came back were applied
        assert all(w["gradient_delay_max"] is not None for w in s["workers"][:-1]), s["workers"]
    if changes["mode"] != "stale":
        assert s["test_accuracy"] >= frozen[0]["test_accuracy"] + 0.4, (s["evals"], frozen[0]["evals"])


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
    # every worker says where its parameters are, in its summary and in each of its reports
    assert [w["device"] for w in s["workers"]] == ["cpu"] * len(s["workers"])
    assert {(r["stage"], r["device"]) for r in records if r["event"] == "worker"} == \
        {(w["stage"], "cpu") for w in s["workers"]}


@pytest.mark.timeout(180)
def test_queues_bound_how_far_stage_0_runs_ahead(tiny_cfg):
    """With the last stage slow (100 ms a step; stage 0 takes a few), stage 0 runs ahead as far
    as the links let it: with --queue-depth 1 it waits on a full link and never holds more than
    a few steps per link awaiting their true gradients (10 here), while the same run with room
    for 1000 messages per link runs far further ahead (40-51 of its 60 steps at 30 ms; at least
    twice as far). The last stage sleeps long enough that stage 0 keeps ahead on a machine
    loaded by the suite's other worker: at 30 ms it reached 12 steps there against 10. Activations
    of 256 x 256 floats: an OS socket buffer holds less than one, so the queues are what bound."""
    k, steps = 4, 60
    slow = dict(mode="unlocked", layers=(784, 256, 256, 256, 10), batch_size=256, synthetic_train=256 * steps,
                steps=steps, slow_stage=(k - 1, 100))
    _, held = run(tiny_cfg, queue_depth=1, **slow)
    ahead = held["workers"][0]["max_outstanding_steps"]
    assert 1 <= ahead <= 4 * (1 + 1) * (k - 1), ahead
    assert held["workers"][0]["wait_send_s"] > 0  # the bound was reached: stage 0 waited on a full link
    _, free = run(tiny_cfg, queue_depth=1000, **slow, out=str(Path(tiny_cfg.out).parent / "free"))
    assert free["workers"][0]["max_outstanding_steps"] >= 2 * ahead, (free["workers"][0]["max_outstanding_steps"], ahead)


# ---------------------------------------------------------------------------- failures
@pytest.mark.timeout(120)
def test_killed_worker_ends_the_run_with_a_clear_error(tmp_path):
    with training_launcher(tmp_path) as (proc, pids):
        assert len(pids) == 4
        victim = pids[2]
        os.kill(victim, signal.SIGKILL)
        t0 = time.monotonic()
        out, _ = proc.communicate(timeout=60)
        took = time.monotonic() - t0
        assert proc.returncode == 1, out
        # only the process group's check names the signal (a silent stage is "sent nothing for
        # Ns"), so the words prove what noticed. The time proves it noticed at once and ended
        # within its own shutdown: one 100 ms poll, then at most 7 s of stopping the others (3 s
        # for them to stop by themselves, 2 s after SIGTERM, 2 s after SIGKILL: ProcessGroup.
        # shutdown), about 3 s here; a check that only ran now and then, or a shutdown that hung
        # on a stage, would take longer (and the heartbeat timeout, 10 s, is not reached)
        assert f"stage 2 (pid {victim}) killed by SIGKILL" in out
        assert took < 10, f"took {took:.1f}s to notice and stop"
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
