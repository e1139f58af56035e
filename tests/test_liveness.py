"""Dead or hung peers are noticed within --heartbeat-timeout, by the coordinator (a hung stage)
and by workers on other hosts (a vanished coordinator), and nothing is left running."""
from __future__ import annotations

import os
import re
import signal
import threading
import time

import pytest

from tests.test_multihost import RUN, launch, stop_all
from tests.helpers import assert_all_gone, start_launcher, wait_for_line, worker_pids

pytestmark = pytest.mark.slow  # every test here starts processes


# How late a detection may come, past --heartbeat-timeout: the coordinator checks every 0.1 s and
# a worker about as often, but on a loaded 2-core machine a process can lose the CPU for a few
# seconds. Any margin below the next timer that could end these runs (--stall-timeout, 30 s
# here) still shows that the heartbeat timeout, and nothing else, is what noticed.
LATE_S = 6.0
TIMEOUT_S = 3.0



def _exits(procs: dict[str, object], t0: float) -> dict[str, tuple[str, float, int]]:
    """Each process's output, seconds from t0 to its exit, and exit code, read side by side."""
    got: dict[str, tuple[str, float, int]] = {}

    def read(name, proc):
        out, _ = proc.communicate(timeout=60)
        got[name] = (out, time.monotonic() - t0, proc.returncode)

    threads = [threading.Thread(target=read, args=item) for item in procs.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(70)
    return got


@pytest.mark.timeout(200)
def test_dead_and_hung_peers_are_noticed_within_the_heartbeat_timeout(tmp_path):
    """Three runs side by side, each disturbed once all three train (they share the wait for
    their processes to start; once disturbed, none trains, so none loads the others while they
    count):
    - a hung stage: SIGSTOP freezes stage 2 without closing a socket; only the coordinator's
      heartbeat check can tell, and it names the stage and stops the run;
    - a coordinator killed (SIGKILL: its connections close) under workers started by hand
      (`launch.py worker`, as on another host): the workers exit with the reason;
    - a coordinator hung with its connections open (SIGSTOP: its pid stays alive, nothing a
      closed connection or a pid check could see): only its silence past the timeout tells."""
    timeout = ["--heartbeat-timeout", str(TIMEOUT_S)]
    (tmp_path / "hung").mkdir()
    run = start_launcher(tmp_path / "hung", *timeout, "--stall-timeout", "30")
    coords = {name: launch("coordinator", "--bind", "tcp://127.0.0.1:0", *RUN, "--epochs", "200", *timeout,
                           "--out", str(tmp_path / name)) for name in ("killed", "stopped")}
    procs = [run, *coords.values()]
    stopped = []
    try:
        workers = {}
        for name, coord in coords.items():
            line, _ = wait_for_line(coord, "coordinator at ", timeout=60)
            endpoint = line.split("coordinator at ")[1].split(";")[0]
            workers[name] = launch("worker", "--coordinator", endpoint, "--stages", "0,1,2,3", "--no-secure")
            procs.append(workers[name])
        for proc in (run, *coords.values()):
            wait_for_line(proc, "train step", timeout=90)
        pids = {"hung": worker_pids(run), **{name: worker_pids(w) for name, w in workers.items()}}
        assert all(len(p) == 4 for p in pids.values()), pids
        victim = pids["hung"][2]
        t0 = time.monotonic()
        os.kill(victim, signal.SIGSTOP)
        coords["killed"].kill()
        os.kill(coords["stopped"].pid, signal.SIGSTOP)
        stopped.append(coords["stopped"])
        exits = _exits({"hung": run, "killed": workers["killed"], "stopped": workers["stopped"]}, t0)
    finally:
        for p in stopped:
            if p.poll() is None:
                os.kill(p.pid, signal.SIGCONT)  # a stopped process is killed all the same; be tidy
        stop_all(*procs)
    for p in pids.values():
        assert_all_gone(p)  # the stopped stage too (SIGKILL works on a stopped process)

    out, took, code = exits["hung"]
    assert code == 1, out
    # the words of common/liveness.py: the stage, its pid (its host is this one, so not named)
    assert f"stage 2 (pid {victim}) sent nothing for " in out and "it is hung or unreachable" in out, out
    assert f"--heartbeat-timeout {TIMEOUT_S:g}" in out, out
    silent = float(re.search(r"sent nothing for ([0-9.]+)s", out).group(1))
    assert TIMEOUT_S <= silent < TIMEOUT_S + LATE_S, out
    assert took < TIMEOUT_S + LATE_S, f"the run ended {took:.1f}s after the stage froze"
    for name in ("killed", "stopped"):
        out, took, code = exits[name]
        assert code == 1, out
        assert "the coordinator at tcp://" in out and f"--heartbeat-timeout {TIMEOUT_S:g}" in out, out
        assert re.search(r"stage \d: the coordinator at \S+ sent nothing for", out), out
        assert took < TIMEOUT_S + LATE_S, f"{name}: workers noticed after {took:.1f}s"
    silent = [float(x) for x in re.findall(r"the coordinator at \S+ sent nothing for ([0-9.]+)s", exits["stopped"][0])]
    assert silent and all(TIMEOUT_S <= x < TIMEOUT_S + LATE_S for x in silent), exits["stopped"][0]
