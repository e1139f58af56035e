"""Dead or hung peers are noticed within --heartbeat-timeout, by the coordinator (a hung stage)
and by workers on other hosts (a vanished coordinator), and nothing is left running."""
from __future__ import annotations

import os
import re
import signal
import time

import psutil
import pytest

from tests.test_multihost import RUN, launch, stop_all
from tests.helpers import assert_all_gone, training_launcher, wait_for_line

pytestmark = pytest.mark.slow  # every test here starts processes


@pytest.mark.timeout(120)
def test_hung_stage_is_detected_within_the_heartbeat_timeout(tmp_path):
    """SIGSTOP freezes stage 2 without closing a socket: only the heartbeat check can tell."""
    with training_launcher(tmp_path, "--heartbeat-timeout", "3") as (proc, pids):
        victim = pids[2]
        os.kill(victim, signal.SIGSTOP)
        t0 = time.monotonic()
        out, _ = proc.communicate(timeout=60)
        took = time.monotonic() - t0
        assert proc.returncode == 1, out
        assert f"stage 2 (pid {victim} on " in out and "it is hung or unreachable" in out, out
        silent = float(re.search(r"sent nothing for ([0-9.]+)s", out).group(1))
        assert 3.0 <= silent < 3.0 + 1.0, out  # detected within one heartbeat of the timeout
        assert took < 3.0 + 5.0, f"the run ended {took:.1f}s after the stage froze"
        assert_all_gone(pids)  # the stopped process too (SIGKILL works on a stopped process)


@pytest.mark.timeout(120)
def test_workers_on_other_hosts_notice_a_vanished_coordinator(tmp_path):
    coord = launch("coordinator", "--bind", "tcp://127.0.0.1:0", *RUN, "--epochs", "200",
                   "--heartbeat-timeout", "3", "--out", str(tmp_path / "run"))
    procs = [coord]
    try:
        line, _ = wait_for_line(coord, "coordinator at ", timeout=60)
        endpoint = line.split("coordinator at ")[1].split(";")[0]
        workers = launch("worker", "--coordinator", endpoint, "--stages", "0,1,2,3", "--no-secure")
        procs.append(workers)
        wait_for_line(coord, "train step", timeout=60)
        stages = [c.pid for c in psutil.Process(workers.pid).children()
                  if "resource_tracker" not in " ".join(c.cmdline())]
        coord.kill()  # the coordinator's host vanishes: no FIN, no goodbye
        t0 = time.monotonic()
        out, _ = workers.communicate(timeout=60)
        took = time.monotonic() - t0
    finally:
        stop_all(*procs)
    assert workers.returncode == 1, out
    assert "no word from the coordinator" in out or "exited with code 1" in out, out
    assert took < 3.0 + 5.0, f"workers noticed after {took:.1f}s"
    assert_all_gone(stages)
