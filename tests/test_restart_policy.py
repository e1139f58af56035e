"""`--on-failure restart` as a pure function of the verdict (coordinator/restarts.py): what a
restart can mend is restarted, what would only repeat is not, and each failure is recorded as
data; and what a stage's own error says about another try (workers/errors.py). No process is
started here."""
from __future__ import annotations

import signal

import pytest

from synthgrad.common.config import ConfigError
from synthgrad.common.data import DataError
from synthgrad.common.devices import DeviceError
from synthgrad.common.liveness import Cause, Fault, Process, Verdict, exit_verdict, reported
from synthgrad.common.models import ModelError
from synthgrad.common.parts import NonFinite
from synthgrad.common.wire import WireError
from synthgrad.coordinator.restarts import Decision, decide, failure_record
from synthgrad.workers.errors import MAX_WORDS, fault_of, own_failure

STAGE = Process.of_stage(1, 10)
MENDABLE = [
    exit_verdict(STAGE, 1, "during the run"),
    exit_verdict(Process.of_replica(1, 1, 11), -signal.SIGKILL),
    Verdict((STAGE,), Cause.SILENT, seconds=12.0, hint="--heartbeat-timeout 10"),
    Verdict((STAGE,), Cause.STALLED, seconds=130.0, detail="nothing new", hint="--stall-timeout 120"),
    Verdict((STAGE, Process.of_stage(2)), Cause.NOT_READY, seconds=120.0),
    reported(STAGE, "OSError: [Errno 28] No space left on device"),  # another try may go otherwise
]
REPEATING = [
    (reported(STAGE, "NonFinite: stage 1: loss of step 5 is NaN", fault=Fault.DIVERGED), "training diverged"),
    (reported(STAGE, "ModelError: the factory failed", fault=Fault.CONFIGURATION), "cannot be used"),
]


@pytest.mark.parametrize("verdict", MENDABLE, ids=lambda v: v.cause.value)
def test_a_failure_a_restart_can_mend_is_restarted(verdict):
    assert decide(verdict, 0, 3) == Decision(True, "restart 1 of at most 3")
    assert decide(verdict, 2, 3) == Decision(True, "restart 3 of at most 3")
    assert decide(verdict, 3, 3) == Decision(False, "after 3 restarts; --max-restarts 3")


@pytest.mark.parametrize("verdict, words", REPEATING, ids=["diverged", "configuration"])
def test_a_failure_that_would_only_repeat_is_not_restarted(verdict, words):
    for restarts in (0, 3):  # with restarts left or not, it says why it is not worth one
        decision = decide(verdict, restarts, 3)
        assert not decision.restart and decision.why.startswith("not restarting: ") and words in decision.why


def test_the_fault_counts_only_for_a_reported_failure():
    killed = Verdict((STAGE,), Cause.KILLED, code=-9, fault=Fault.DIVERGED)  # a fault it never said
    assert decide(killed, 0, 3).restart


def test_each_failure_is_recorded_as_data_with_what_was_done():
    v = exit_verdict(Process.of_stage(2, 1234), -signal.SIGKILL, "during the run")
    assert failure_record(v, decide(v, 0, 3)) == {
        "error": "stage 2 (pid 1234) killed by SIGKILL during the run", "cause": "killed", "fault": None,
        "process": "stage 2", "stage": 2, "pid": 1234, "restarted": True, "why": "restart 1 of at most 3"}
    replica = exit_verdict(Process.of_replica(1, 2, 99), -signal.SIGKILL)
    got = failure_record(replica, decide(replica, 0, 3))
    assert (got["process"], got["stage"], got["pid"], got["cause"]) == ("stage 1: its replica 2", 1, 99, "killed")
    diverged, words = REPEATING[0]
    got = failure_record(diverged, decide(diverged, 0, 3))
    assert (got["cause"], got["fault"], got["restarted"]) == ("failed", "diverged", False) and words in got["why"]


@pytest.mark.parametrize("exc, fault", [
    (NonFinite("stage 1: loss of step 5 is NaN or infinite"), Fault.DIVERGED),
    (ConfigError("--lr must be positive"), Fault.CONFIGURATION),
    (DeviceError("--device cuda:99: this host has no such device"), Fault.CONFIGURATION),
    (ModelError("the factory failed"), Fault.CONFIGURATION),
    (DataError("no train file"), Fault.CONFIGURATION),
    (OSError(28, "No space left on device"), Fault.OTHER),
    (WireError("GRAD.g: NaN or infinite values"), Fault.OTHER),
    (RuntimeError("Connection closed by peer"), Fault.OTHER),
])
def test_a_stages_own_error_says_what_it_ran_into(exc, fault):
    assert fault_of(exc) is fault
    verdict = own_failure(3, exc)
    assert verdict.cause is Cause.REPORTED and verdict.fault is fault and verdict.process.index == 3
    assert verdict.detail == f"{type(exc).__name__}: {exc}"


def test_a_stages_words_are_bounded_for_the_wire():
    verdict = own_failure(0, RuntimeError("x" * 100_000))
    assert len(verdict.detail) <= MAX_WORDS + 4 and verdict.detail.endswith(" ...")
