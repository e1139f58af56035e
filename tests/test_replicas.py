"""--replicas: a stage on several processes, each on its part of every batch's rows, gradients
summed over them (workers/replicas.py). A replicated stage computes what the stage alone would:
`locked` and `local` (the deterministic rules) end where the same run without replicas ends, a
killed replica is named and its stage restarts from the checkpoint, and no replica outlives its
run."""
from __future__ import annotations

import json

import psutil
import pytest

from synthgrad.common.config import ConfigError, RunConfig
from synthgrad.common.files import load_model_state
from synthgrad.common.placement import replica_blocks
from synthgrad.cli import build_parser, config_from_args
from tests.helpers import (
    EXACT_SGD,
    LOCKED,
    LOCKED_EQUALS_BACKPROP,
    assert_states_close,
    assert_states_equal,
    is_mp_helper,
    kill_after,
    run,
)
from tests.zygote import launch

# The model has no batch norm: a replica normalises by its own rows' statistics (as a pipeline's
# microbatch does), which is another computation; everything else is row by row or a sum over rows.
PLAIN = "tests.user_models:plain_mlp"


def test_replica_blocks_split_a_stages_cores():
    usable = [0, 1, 2, 3, 4, 5]
    assert replica_blocks(2, 4, 2, usable) == [(2, 2), (4, 2)]  # two blocks of two cores
    assert replica_blocks(0, 1, 2, usable) == [(0, 1), (0, 1)]  # fewer cores than replicas: shared
    assert replica_blocks(4, 3, 3, [4, 0, 5, 1]) == [(4, 1), (0, 1), (5, 1)]  # in the usable order
    assert replica_blocks(-1, 4, 2, usable) == [(-1, 2), (-1, 2)]  # not pinned: threads split


@pytest.mark.parametrize("changes, words", [
    ({"replicas": (3,)}, "does not divide --batch-size 64"),
    ({"replicas": (1, 2)}, "lists 2 counts, but the run has 4 stages"),
    ({"replicas": (0,)}, "at least 1"),
    ({"replicas": (2,), "mode": "backprop"}, "mode backprop has none"),
    ({"replicas": (2,), "precision": "bf16"}, "--precision fp32"),
])
def test_replicas_config_errors(tiny_cfg, changes, words):
    with pytest.raises(ConfigError, match=words):
        tiny_cfg.replace(**changes).validate()
    RunConfig(replicas=(1,)).validate()  # one process a stage is every run's default


# One locked job the tests below share: stages 1 and 3 (a middle stage and the last) on two
# processes each, SGD with momentum and one thread a stage (EXACT_SGD: the setting in which float
# rounding is not amplified), 64 steps.
JOB = [*LOCKED, "--model", PLAIN, "--epochs", "2", "--optimizer", "sgd", "--lr", "0.05", "--momentum", "0.9",
       "--threads", "1"]
REPLICAS = ["--replicas", "1,2,1,2"]


def _config(*args: str) -> RunConfig:
    return config_from_args(build_parser().parse_args(["train", *args]))


@pytest.fixture(scope="module")
def replicated(tmp_path_factory):
    """The replicated job run undisturbed: (run folder, summary)."""
    return run(_config(*JOB, *REPLICAS), out=str(tmp_path_factory.mktemp("replicated") / "run"))


def _assert_replicas_stopped(summary: dict) -> list[int]:
    replica_pids = {w["stage"]: w["replica_pids"] for w in summary["workers"]}
    assert [len(replica_pids[s]) for s in range(4)] == [0, 1, 0, 1]
    pids = replica_pids[1] + replica_pids[3]
    for pid in pids:  # each replica stopped with its stage
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    return pids


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_a_replicated_stage_computes_what_the_stage_alone_does(tmp_path, replicated):
    """Every parameter equals the run without replicas up to float32 rounding
    (LOCKED_EQUALS_BACKPROP: the only change is that a batch's gradient is summed as two halves,
    then added; at most 9e-8 seen after these 64 steps, natively and under
    ATEN_CPU_CAPABILITY=default), and both evaluate the same."""
    split_dir, split = replicated
    alone_dir, alone = run(_config(*JOB), out=str(tmp_path / "alone"))
    assert alone["steps"] == split["steps"] == 64
    assert_states_close(load_model_state(alone_dir), load_model_state(split_dir), **LOCKED_EQUALS_BACKPROP)
    assert split["test_accuracy"] == pytest.approx(alone["test_accuracy"], abs=1 / 512)
    assert split["layout"]["replicas"] == [1, 2, 1, 2]
    _assert_replicas_stopped(split)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_a_replicated_stage_with_local_heads_computes_what_the_stage_alone_does(tiny_cfg, tmp_path):
    """The same for `local` (also deterministic): the heads' gradients are summed too."""
    cfg = tiny_cfg.replace(**EXACT_SGD, model=PLAIN, mode="local")
    alone_dir, alone = run(cfg, out=str(tmp_path / "alone"))
    split_dir, split = run(cfg, replicas=(1, 2, 1, 2), out=str(tmp_path / "replicated"))
    assert alone["steps"] == split["steps"] == 20
    assert_states_close(load_model_state(alone_dir), load_model_state(split_dir), **LOCKED_EQUALS_BACKPROP)


def _replica_of(stage_pid: int) -> int:
    """The replica process of a stage worker: forked by the stage's own fork server and handed
    to the stage, so a child of the stage worker."""
    for child in psutil.Process(stage_pid).children():
        if not is_mp_helper(child):
            return child.pid
    raise AssertionError(f"stage worker {stage_pid} has no replica")


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_killed_replica_is_named_and_its_stage_restarts_from_the_checkpoint(tmp_path, replicated):
    run_dir = tmp_path / "restarted"
    proc = launch("train", *JOB, *REPLICAS, "--checkpoint-every", "0.3", "--on-failure", "restart",
                  "--link-delay-ms", "3", "--out", str(run_dir))
    def replica_of_stage1(seen: list[str]) -> int:
        return _replica_of(int(next(l for l in seen if "stage 1 registered: pid" in l).split("pid ")[1].split()[0]))
    out, victim = kill_after(proc, "checkpoint: step", replica_of_stage1)
    assert proc.returncode == 0, out[-3000:]
    assert f"stage 1: its replica 1 (pid {victim}) killed by SIGKILL" in out, out[-3000:]
    assert "restarting every stage from the checkpoint" in out
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["restarts"] == 1 and summary["status"] == "done"
    assert_states_equal(load_model_state(replicated[0]), load_model_state(run_dir), "after the restart")
    assert not psutil.pid_exists(victim) or psutil.Process(victim).status() == psutil.STATUS_ZOMBIE
    _assert_replicas_stopped(summary)
