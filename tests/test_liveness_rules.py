"""The one liveness watch (common/liveness.py), on a made-up clock and made-up processes: each
cause is found by its rule and named in the shared words, with the process it is about; the
observers (coordinator, pipeline launcher) read verdicts, not strings (the restart policy's
reading: tests/test_restart_policy.py). No process is started here."""
from __future__ import annotations

import json
import pickle
import signal
from dataclasses import dataclass
from typing import Optional

import pytest

from synthgrad.common.config import RunConfig
from synthgrad.common.liveness import (
    Cause,
    Limit,
    Limits,
    Process,
    ProcessFailure,
    Role,
    Verdict,
    Watch,
    elsewhere,
    exit_verdict,
    reported,
)
from synthgrad.common.reports import RunFailed
from synthgrad.coordinator.pipeline import _explained
from synthgrad.coordinator.watchdog import Watchdog


@dataclass
class Handle:
    """A child's handle as the watch reads it (multiprocessing.Process, a fork server's Forked)."""
    exitcode: Optional[int] = None


LIMITS = Limits(start=Limit(5, "raise --start-timeout"), silence=Limit(2, "--heartbeat-timeout 2"),
                stall=Limit(10, "--stall-timeout 10"), progress="no new step")


def _watch(n: int = 3) -> Watch:
    watch = Watch(LIMITS, created=100.0)
    for s in range(n):
        watch.add(s, Process.of_stage(s, pid=50 + s))
    return watch


# ---------------------------------------------------------------------------- who
@pytest.mark.parametrize("process, words", [
    (Process.of_stage(2, pid=77), "stage 2 (pid 77)"),
    (Process.of_stage(2, pid=77, host="node7"), "stage 2 (pid 77 on node7)"),
    (Process.of_stage(3), "stage 3"),
    (Process.of_replica(1, 1, pid=8), "stage 1: its replica 1 (pid 8)"),
    (Process.of_rank(0, pid=9), "pipeline rank 0 (pid 9)"),
    (Process.of_coordinator("tcp://10.0.0.1:5555"), "the coordinator at tcp://10.0.0.1:5555"),
    (Process.of_coordinator("ipc:///tmp/x", pid=4), "the coordinator at ipc:///tmp/x (pid 4)"),
])
def test_a_process_is_named_by_its_identity(process, words):
    assert str(process) == words


def test_a_host_is_named_only_when_it_is_another():
    import socket
    assert elsewhere(socket.gethostname()) is None and elsewhere("") is None
    assert elsewhere("elsewhere.example") == "elsewhere.example"


# ---------------------------------------------------------------------------- each cause
def test_an_exit_names_the_code_or_the_signal():
    watch = _watch()
    watch.adopt(1, Handle(), when="during the run")
    watch.adopt(2, Handle(), when="during the run")
    assert watch.verdict(100.1) is None
    watch.entries[2].handle.exitcode = -signal.SIGKILL
    v = watch.verdict(100.2)
    assert v.cause is Cause.KILLED and v.process == Process.of_stage(2, pid=52) and v.code == -9
    assert str(v) == "stage 2 (pid 52) killed by SIGKILL during the run"
    watch.entries[1].handle.exitcode = 3  # both gone: the first in the order added
    v = watch.verdict(100.3)
    assert v.cause is Cause.EXITED and str(v) == "stage 1 (pid 51) exited with code 3 during the run"
    assert [x.process.index for x in watch.exits()] == [1, 2]


def test_an_exit_comes_before_a_silence_it_explains():
    watch = _watch(1)
    watch.adopt(0, Handle(-signal.SIGTERM))
    watch.start(101.0)
    watch.heard(0, 101.0)
    v = watch.verdict(200.0)  # silent and stalled too, but the exit says more
    assert v.cause is Cause.KILLED and "killed by SIGTERM" in str(v)


def test_a_finished_process_may_exit_cleanly():
    watch = Watch()
    watch.add(0, Process.of_rank(0, 5), handle=Handle(0), may_finish=True)
    watch.add(1, Process.of_rank(1, 6), handle=Handle(), may_finish=True)
    assert watch.verdict(1.0) is None and not watch.all_ended()
    watch.entries[1].handle.exitcode = 1
    assert watch.all_ended()
    assert [str(v) for v in watch.exits()] == ["pipeline rank 1 (pid 6) exited with code 1"]


def test_a_process_not_ours_is_gone_when_its_pid_is():
    probes: list[int] = []
    living = {4: True}

    def is_alive(pid: int) -> bool:
        probes.append(pid)
        return living[pid]

    watch = Watch(created=0.0, is_alive=is_alive)
    watch.add("c", Process.of_coordinator("ipc:///x", pid=4), pid_every=1.0)
    assert watch.verdict(10.0) is None
    living[4] = False
    assert watch.verdict(10.5) is None and probes == [4]  # probed at most once a second
    v = watch.verdict(11.0)
    assert v.cause is Cause.EXITED and v.code is None and v.about(Role.COORDINATOR) and watch.all_ended()
    assert str(v) == "the coordinator at ipc:///x (pid 4) has exited"


def test_a_silent_process_is_named_with_how_long():
    watch = _watch(2)
    watch.identify(1, 51, "node7")
    watch.start(106.0)
    watch.heard(0, 106.0)
    watch.heard(1, 106.0)
    watch.advanced(107.0, step=1)
    watch.heard(0, 108.0)
    assert watch.verdict(107.9) is None
    v = watch.verdict(108.5)
    assert v.cause is Cause.SILENT and v.seconds == pytest.approx(2.5) and v.process.host == "node7"
    assert str(v) == ("stage 1 (pid 51 on node7) sent nothing for 2.5s: it is hung or unreachable "
                      "(--heartbeat-timeout 2)")


def test_silence_is_not_judged_before_the_start():
    watch = _watch(1)
    watch.ready(0)
    watch.heard(0, 100.0)
    assert watch.verdict(104.0) is None  # setting up may block far longer than a heartbeat


def test_a_stall_counts_only_new_highest_steps_results_and_finishes():
    watch = _watch(3)
    watch.start(100.0)
    for s in range(3):
        watch.heard(s, 119.0)
    watch.finished(0, 104.0)  # stage 0 is done: asked for nothing more
    watch.advanced(105.0, step=4)
    watch.advanced(109.0, step=4)  # not a new step
    assert watch.verdict(114.9) is None
    v = watch.verdict(115.5)
    assert v.cause is Cause.STALLED and v.seconds == pytest.approx(10.5)
    assert [p.index for p in v.processes] == [1, 2]  # those that were still to progress
    assert str(v) == ("no progress (no new step) for 10.5s although every stage is alive "
                      "(--stall-timeout 10; stages done: [0])")
    watch.advanced(115.6)  # an evaluation or a result
    assert watch.verdict(116.0) is None


def test_processes_that_never_became_ready_are_named_together():
    watch = _watch(3)
    watch.ready(0)
    assert watch.verdict(105.0) is None
    v = watch.verdict(105.1)
    assert v.cause is Cause.NOT_READY and [p.index for p in v.processes] == [1, 2]
    assert str(v) == "stages [1, 2] were not ready within 5s (raise --start-timeout)"
    ranks = Verdict((Process.of_rank(3),), Cause.NOT_READY, seconds=60, hint="raise --start-timeout")
    assert str(ranks) == "pipeline ranks [3] were not ready within 60s (raise --start-timeout)"
    coordinator = Verdict((Process.of_coordinator("tcp://h:1"),), Cause.NOT_READY, seconds=60)
    assert str(coordinator) == "the coordinator at tcp://h:1 was not ready within 60s"


def test_a_reported_failure_is_said_in_the_process_own_words():
    v = reported(Process.of_stage(2, pid=7), "NonFinite: stage 2: loss of step 5 is NaN or infinite",
                 "the last complete checkpoint is step 3: --resume runs/x")
    assert str(v) == ("stage 2 failed: NonFinite: stage 2: loss of step 5 is NaN or infinite "
                      "(the last complete checkpoint is step 3: --resume runs/x)")


# ---------------------------------------------------------------------------- the error
def test_one_error_carries_the_verdict():
    v = exit_verdict(Process.of_replica(1, 1, 99), -signal.SIGKILL)
    exc = ProcessFailure(v, by="stage 1")
    assert isinstance(exc, RunFailed) and exc.verdict is v
    assert str(exc) == "stage 1: stage 1: its replica 1 (pid 99) killed by SIGKILL"
    again = pickle.loads(pickle.dumps(ProcessFailure(v, note="after 3 restarts")))
    assert again.verdict == v and str(again).endswith("killed by SIGKILL (after 3 restarts)")
    with pytest.raises(ProcessFailure) as caught:
        watch = Watch()
        watch.add(0, Process.of_stage(0, 3), handle=Handle(1))
        watch.check(0.0)
    assert caught.value.verdict.cause is Cause.EXITED


# ---------------------------------------------------------------------------- observers
def test_the_coordinators_watch_uses_the_runs_limits():
    cfg = RunConfig(start_timeout=5, heartbeat_timeout=2, stall_timeout=10)
    dog = Watchdog(cfg, created=100.0, num_stages=2)
    with pytest.raises(ProcessFailure, match=r"stages \[0, 1\] were not ready within 5s \(start them"):
        dog.check(105.5)
    assert dog.heartbeat_due(0.5) and not dog.heartbeat_due(0.6)


def test_the_pipeline_explains_an_exit_with_a_ranks_own_words(tmp_path):
    watch = Watch()
    for rank in range(3):
        watch.add(rank, Process.of_rank(rank, 10 + rank), handle=Handle(), may_finish=True)
    died = exit_verdict(watch.process(0), 1)
    assert _explained(tmp_path, watch, died) is died  # nothing written: how it exited
    (tmp_path / "pipeline-rank1.error.json").write_text(json.dumps({"error": "stage 1: loss of step 3 is NaN"}))
    v = _explained(tmp_path, watch, died)
    assert v.cause is Cause.REPORTED and v.process == Process.of_rank(1, 11)
    assert str(v) == "pipeline rank 1 failed: stage 1: loss of step 3 is NaN"
    stalled = Verdict((), Cause.STALLED, seconds=1.0, detail="x")
    assert _explained(tmp_path, watch, stalled) is stalled  # words are looked for after an exit only

