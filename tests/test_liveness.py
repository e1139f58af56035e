"""Dead or hung peers are noticed within --heartbeat-timeout, by the coordinator (a hung stage)
and by workers on other hosts (a vanished coordinator), and nothing is left running."""
from __future__ import annotations

import os
import re
import signal
import time

import pytest

from tests.test_multihost import RUN, launch, stop_all
from tests.helpers import assert_all_gone, training_launcher, wait_for_line, worker_pids

pytestmark = pytest.mark.slow  # every test here starts processes


# How late a detection may come, past --heartbeat-timeout: the coordinator checks every 0.1 s and
# a worker about as often, but on a loaded 2-core machine a process can lose the CPU for a few
# seconds. Any margin below the next timer that could end these runs (--stall-timeout, 30 s
# here) still shows that the heartbeat timeout, and nothing else, is what noticed.
LATE_S = 6.0
TIMEOUT_S = 3.0


@pytest.mark.timeout(120)
def test_hung_stage_is_detected_within_the_heartbeat_timeout(tmp_path):
    """SIGSTOP freezes stage 2 without closing a socket: only the heartbeat check can tell."""
    with training_launcher(tmp_path, "--heartbeat-timeout", str(TIMEOUT_S), "--stall-timeout", "30") as (proc, pids):
        victim = pids[2]
        os.kill(victim, signal.SIGSTOP)
        t0 = time.monotonic()
        out, _ = proc.communicate(timeout=60)
        took = time.monotonic() - t0
        assert proc.returncode == 1, out
        assert f"stage 2 (pid {victim} on " in out and "it is hung or unreachable" in out, out
        assert f"--heartbeat-timeout {TIMEOUT_S:g}" in out, out
        silent = float(re.search(r"sent nothing for ([0-9.]+)s", out).group(1))
        assert TIMEOUT_S <= silent < TIMEOUT_S + LATE_S, out
        assert took < TIMEOUT_S + LATE_S, f"the run ended {took:.1f}s after the stage froze"
        assert_all_gone(pids)  # the stopped process too (SIGKILL works on a stopped process)


def _workers_lose_their_coordinator(tmp_path, vanish) -> tuple[str, float, int]:
    """A coordinator started by hand and its workers (`launch.py worker`, as on another host):
    once training runs, `vanish(coordinator)`; returns what the workers printed, how long they
    took to exit after it, and their exit code."""
    coord = launch("coordinator", "--bind", "tcp://127.0.0.1:0", *RUN, "--epochs", "200",
                   "--heartbeat-timeout", str(TIMEOUT_S), "--out", str(tmp_path / "run"))
    procs = [coord]
    try:
        line, _ = wait_for_line(coord, "coordinator at ", timeout=60)
        endpoint = line.split("coordinator at ")[1].split(";")[0]
        workers = launch("worker", "--coordinator", endpoint, "--stages", "0,1,2,3", "--no-secure")
        procs.append(workers)
        wait_for_line(coord, "train step", timeout=60)
        stages = worker_pids(workers)
        assert len(stages) == 4
        vanish(coord)
        t0 = time.monotonic()
        out, _ = workers.communicate(timeout=60)
        took = time.monotonic() - t0
    finally:
        if coord.poll() is None:
            os.kill(coord.pid, signal.SIGCONT)  # a stopped process is killed all the same; be tidy
        stop_all(*procs)
    assert_all_gone(stages)
    return out, took, workers.returncode


@pytest.mark.timeout(120)
def test_workers_notice_a_coordinator_that_hangs_with_its_connections_open(tmp_path):
    """SIGSTOP: the coordinator's sockets stay open and its pid stays alive (nothing a closed
    connection or a pid check could see); only its silence past --heartbeat-timeout tells."""
    out, took, code = _workers_lose_their_coordinator(tmp_path, lambda c: os.kill(c.pid, signal.SIGSTOP))
    assert code == 1, out
    assert "no word from the coordinator at" in out and f"--heartbeat-timeout {TIMEOUT_S:g}" in out, out
    silent = [float(x) for x in re.findall(r"no word from the coordinator at \S+ for ([0-9.]+)s", out)]
    assert silent and all(TIMEOUT_S <= x < TIMEOUT_S + LATE_S for x in silent), out
    assert took < TIMEOUT_S + LATE_S, f"workers noticed after {took:.1f}s"


@pytest.mark.timeout(120)
def test_workers_notice_a_coordinator_that_is_killed(tmp_path):
    """SIGKILL: its connections close; the workers (a host of their own) exit with the reason."""
    out, took, code = _workers_lose_their_coordinator(tmp_path, lambda c: c.kill())
    assert code == 1, out
    assert "no word from the coordinator at" in out and f"--heartbeat-timeout {TIMEOUT_S:g}" in out, out
    assert took < TIMEOUT_S + LATE_S, f"workers noticed after {took:.1f}s"
