"""--on-failure restart: a stage killed mid-run is noticed, every stage restarts from the last
complete checkpoint, and a locked run still ends exactly where an undisturbed one does; a run
whose fork server was killed, and whose every listening socket got random bytes, goes on, and
its restart forks again."""
from __future__ import annotations

import json
import os
import re
import signal
import socket

import psutil
import pytest

from synthgrad.common.files import load_model_state
from synthgrad.common.forkserver import SERVER_NAME
from tests.helpers import LOCKED, assert_states_equal, kill_after, worker_pids
from tests.zygote import launch

pytestmark = pytest.mark.slow  # every test here starts processes


@pytest.mark.timeout(240)
def test_killed_stage_restarts_from_the_checkpoint_and_the_result_is_unchanged(tmp_path, locked_reference):
    run_dir = tmp_path / "restarted"
    proc = launch("train", *LOCKED, "--checkpoint-every", "0.5", "--on-failure", "restart",
                  "--link-delay-ms", "3", "--out", str(run_dir))
    servers: list[int] = []

    def after_hostile_bytes_and_a_dead_fork_server(seen: list[str]) -> int:
        tree = psutil.Process(proc.pid).children(recursive=True)
        servers.extend(p.pid for p in tree if p.name() == SERVER_NAME)
        assert len(servers) == 1, servers
        # nothing can reach the fork server: it has no listening socket and no address
        assert all(not c.laddr for c in psutil.Process(servers[0]).net_connections(kind="unix"))
        os.kill(servers[0], signal.SIGKILL)
        # the coordinator's and every stage's input, at least
        assert _write_random_bytes_to_every_listening_socket([proc.pid, *(p.pid for p in tree)]) >= 5
        return worker_pids(proc)[2]

    out, victim = kill_after(proc, "checkpoint: step", after_hostile_bytes_and_a_dead_fork_server)
    assert proc.returncode == 0, out[-3000:]
    assert f"stage 2 (pid {victim}) killed by SIGKILL" in out and "restarting every stage from the checkpoint" in out
    # the restart found the fork server dead and started another before forking the stages again
    assert f"the workers' fork server (pid {servers[0]}) killed by SIGKILL; starting it again" in out
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["restarts"] == 1
    failure = summary["failures"][0]
    assert "killed by SIGKILL" in failure["error"]
    # the policy records the verdict as data: which process, what became of it
    assert (failure["cause"], failure["process"], failure["pid"]) == ("killed", "stage 2", victim)
    # it restarted from the last checkpoint the log called complete before the failure
    before = out.split("run failed:")[0]
    saved = [int(x) for x in re.findall(r"checkpoint: step (\d+) saved", before)]
    assert saved and failure["restarted_from_step"] == saved[-1], (saved, failure)
    assert f"restarting every stage from the checkpoint at step {saved[-1]}" in out
    # the steps lost are those the last stage had reported past that checkpoint (its reports
    # come every 0.2 s, so the checkpoint may be ahead of the latest: then none were lost)
    reported = [int(x) - 1 for x in re.findall(r"train step (\d+)/", before)]
    assert reported and failure["reached_step"] >= max(reported)
    assert failure["steps_lost"] == max(failure["reached_step"] - saved[-1], 0)
    # restart time: stopping the survivors, then starting every stage again
    assert 0 < failure["shutdown_s"] < 15 and failure["restart_s"] == pytest.approx(
        failure["shutdown_s"] + summary["startup_s"])
    a, b = locked_reference, load_model_state(run_dir)
    assert_states_equal(a, b, "after the restart")
    print(json.dumps(failure))  # the figures the README reports (pytest -s)


def _write_random_bytes_to_every_listening_socket(pids: list[int]) -> int:
    """What any local process could do: connect to each socket these processes listen on (TCP,
    and Unix sockets with an address, ZeroMQ's ipc among them) and write a few random bytes;
    how many took them."""
    written = 0
    for pid in pids:
        try:
            conns = psutil.Process(pid).net_connections(kind="all")
        except psutil.Error:
            continue
        for c in conns:
            if c.family == socket.AF_UNIX and c.laddr:
                family, address = socket.AF_UNIX, c.laddr
            elif c.status == psutil.CONN_LISTEN and c.family in (socket.AF_INET, socket.AF_INET6):
                family, address = c.family, (c.laddr.ip, c.laddr.port)
            else:
                continue
            try:
                with socket.socket(family, socket.SOCK_STREAM) as s:
                    s.settimeout(1.0)
                    s.connect(address)
                    s.sendall(os.urandom(64))
                written += 1
            except OSError:
                pass  # refused or gone: nothing to write to
    return written
