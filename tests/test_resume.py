"""`launch.py train --resume RUN_DIR`: a locked run stopped with Ctrl-C and resumed ends with the
same parameters as one never interrupted, and its records continue the old ones; every other
rule's resumed stages restore their own state (predictors, heads, the last true gradient, every
optimiser), go on exactly from it, and go on learning."""
from __future__ import annotations

import copy
import json

import pytest
import torch

from synthgrad.common.config import ConfigError
from synthgrad.common.files import load_model_state
from tests.helpers import LOCKED, assert_states_equal, interrupt_after
from tests.zygote import Launched, launch, run_launch

pytestmark = pytest.mark.slow  # every test here starts processes



def _launch(*args: str) -> Launched:
    return launch("train", *args)


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
        return run_launch("train", *args, timeout=60)
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


# every rule but locked (whose resume is compared with an uninterrupted run above): its N
RESUMED_RULES = {"unlocked": 4, "local": 1, "delayed": 1, "corrected": 4, "stale": 4}
# the test loss must fall by this much from the interruption to the run's end (the test says why)
GOES_ON_LEARNING = {"unlocked": 0.2, "local": 0.2, "delayed": 0.2, "corrected": 0.2, "stale": 0.04}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", list(RESUMED_RULES))
def test_every_rule_resumes_its_own_state_and_goes_on_learning(mode, tmp_path):
    """A run of each rule but locked is interrupted after step 9 (in its third epoch of four
    steps), resumed for a few steps, and resumed again to its end at step 48: three invocations.
    The first ends because its --steps ends there, which leaves the checkpoint a Ctrl-C at that
    step leaves (every stage after the same step, every gradient of the steps before applied:
    workers/checkpointing.py) at a step the test chooses.

    Restored: each stage's file of the interruption, loaded here by the workers' own code into a
    stage built as a worker builds it, gives back every tensor and figure it holds (the layers,
    every optimiser, the predictor, the heads, the running cosine, the last true gradient), each
    checked to have moved from its start where the cut makes it move whatever the timing (a
    running cosine, and the layers of unlocked's and stale's lower stages, move only when a
    prediction or a gradient came in time, which stage 0's lead decides; tests/test_rule_resume.py
    checks those in one process). No step's stash is in it: the cut waits for every gradient
    before it saves. The second invocation runs only as far as the next step whose
    true gradient comes back (one step for delayed, whose every step does; two for local, whose
    none do): only that last step's gradient travels, after every stage has finished it, so
    nothing can arrive between two steps and the processes' timing cannot change the result.
    This process replays those steps from the same files (tests/chain.py) and the stage files
    the processes wrote at its end are bitwise the replay's: the resumed processes restored all
    of it and went on exactly from there. (A longer stretch is not reproducible step for step:
    where a late gradient lands between a stage's steps depends on timing.)

    Record: the step count, one segment per invocation, each invocation's true-gradient steps
    (its own: a summary's other totals are the invocation's, docs/usage.md), and one evaluation
    curve in order, with an evaluation at each epoch's end and at each invocation's end.

    Goes on learning: the test loss falls by GOES_ON_LEARNING from the evaluation at the
    interruption to the run's end (38 steps later). An evaluation is a function of the weights
    alone, so a run that stopped learning at the resume would end where it was. Seen here, five
    times each: 0.46-0.77 for the rules that learn below their last stage (unlocked 0.46-0.48,
    delayed 0.52-0.57, corrected 0.67-0.69, local 0.77), so 0.2 is less than half the smallest;
    stale, the control whose lower stages step on another batch's gradient, fell by 0.07-0.09,
    so its bar is 0.04, about half the smallest."""
    import shutil

    from synthgrad.common.config import RunConfig
    from synthgrad.common.data import steps_per_epoch
    from synthgrad.common.datasets import run_dataset
    from synthgrad.common.devices import CPU
    from synthgrad.coordinator.resume import resume_config
    from synthgrad.workers.checkpointing import StageCheckpoints
    from synthgrad.workers.schedule import TrainBatch, schedule, split_batches
    from synthgrad.workers.stage import build_stage
    from tests.chain import Chain, assert_same_state, differs, one_thread
    from tests.helpers import run

    cut, end = 9, 48
    cfg = RunConfig(dataset="synthetic", mode=mode, true_grad_every=RESUMED_RULES[mode], layers=(784, 64, 64, 10),
                    batch_size=32, synthetic_train=128, synthetic_test=256, epochs=end // 4, lr=1e-2, threads=(1,),
                    checkpoint_every=0, progress_every=60.0, start_timeout=60.0, stall_timeout=30.0,
                    out=str(tmp_path / "run"))
    run_dir, first = run(cfg, steps=cut + 1)
    assert first["steps"] == cut + 1
    assert json.loads((run_dir / "checkpoints" / "manifest.json").read_text())["step"] == cut
    saved = tmp_path / "cut"  # the next invocation writes its own stage files in their place
    saved.mkdir()
    for path in run_dir.glob("stage*.pt"):
        shutil.copy(path, saved / path.name)
    short = next((s for s in range(cut + 1, cut + 3) if cfg.true_grad_at(s)), cut + 2) + 1
    _, second = run(resume_config(str(run_dir), {"steps": short}), resume=str(run_dir))
    assert second["steps"] == short and second["resumed_from_step"] == cut

    ran = RunConfig.from_dict(json.loads((run_dir / "config.json").read_text()))
    with one_thread():
        stages = []
        for i in range(ran.num_stages):
            logic, plan = build_stage(ran, i, short, CPU)
            start = copy.deepcopy(logic.state_dict())
            StageCheckpoints(i, ran, saved, logic, plan.units[0]).load(saved / f"stage{i}.pt", cut)
            in_file = torch.load(saved / f"stage{i}.pt", weights_only=True)["state"]
            assert_same_state(in_file, logic.state_dict(), f"stage {i} restored")
            assert set(start) <= set(in_file) <= set(start) | {"last_true"}, (i, list(start), list(in_file))
            # what the cut makes move whatever the timing: every true gradient of the steps before
            # it has trained the predictor (and stepped the layers: delayed, corrected, unlocked's
            # true updates with their own optimiser), every step the heads and the last stage
            moves = {"sg", "sg_optimizer", "true_optimizer", "head", "head_optimizer", "module", "optimizer"}
            if i < ran.num_stages - 1 and mode in ("unlocked", "stale"):  # theirs step on what came in time
                moves -= {"module", "optimizer"} if mode == "stale" else {"optimizer"}
            still = sorted(k for k in moves & set(in_file) if not differs(in_file[k], start[k]))
            assert not still, f"stage {i}: {still} never moved before the interruption"
            stages.append(logic)
        assert ("last_true" in torch.load(saved / "stage0.pt", weights_only=True)["state"]) == (mode == "stale")
        replay = Chain(stages, ran)
        data = run_dataset(ran)
        for event in schedule(ran, split_batches(ran, data.train), steps_per_epoch(len(data.train), ran.batch_size),
                              short, cut + 1):
            if isinstance(event, TrainBatch):
                replay.step(event.step, event.x, event.labels, event.epoch)
        replay.drain()
        for i, logic in enumerate(stages):
            written = torch.load(run_dir / f"stage{i}.pt", weights_only=True)
            assert written["step"] == short - 1
            assert_same_state(logic.state_dict(), written["state"], f"stage {i} after step {short - 1}")

    _, summary = run(resume_config(str(run_dir), {"steps": end}), resume=str(run_dir))
    assert summary["status"] == "done" and summary["steps"] == end and summary["resumed_from_step"] == short - 1
    assert summary["last_checkpoint"]["step"] == end - 1
    assert [(s["status"], s["first_step"], s["steps"]) for s in summary["segments"]] == \
        [("done", 0, cut + 1), ("done", cut + 1, short - cut - 1), ("done", short, end - short)]
    # each invocation counted its own true-gradient steps; the record's total is the whole run's
    for segment, (a, b) in zip(summary["segments"], ((0, cut + 1), (cut + 1, short), (short, end))):
        assert segment["true_gradient_steps"] == sum(cfg.true_grad_at(s) for s in range(a, b)), segment
    assert summary["true_gradient_steps"] == sum(cfg.true_grad_at(s) for s in range(end))
    evals = [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["event"] == "eval"]
    assert [r["step"] for r in evals] == sorted({*range(4, end + 1, 4), cut + 1, short}), [r["step"] for r in evals]
    at_cut, last = evals[[r["step"] for r in evals].index(cut + 1)], evals[-1]
    assert last["test_loss"] <= at_cut["test_loss"] - GOES_ON_LEARNING[mode], (at_cut, last)
