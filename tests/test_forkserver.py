"""The workers' fork server (common/forkserver.py): it forks for this process only, hands each
worker to it, and a server that is killed or told garbage is replaced before the next fork while
the workers it forked run on."""
from __future__ import annotations

import os
import signal
import sys
import time

import psutil
import pytest
import torch

from synthgrad.common.forkserver import SERVER_NAME, ForkServer

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]  # it starts processes


def add_one_and_exit(shared: torch.Tensor, code: int) -> None:
    shared += 1
    sys.exit(code)


def report_parent_and_wait(shared: torch.Tensor) -> None:
    shared[0] = os.getppid()
    while True:
        time.sleep(0.05)


def raise_an_error() -> None:
    raise ValueError("as asked")


@pytest.fixture
def server():
    made = ForkServer(["torch"])
    made.start()
    yield made
    made.stop()


def test_a_worker_is_a_child_of_the_asker_and_shares_its_memory(server):
    shared = torch.zeros(3).share_memory_()
    done = server.fork("adder", add_one_and_exit, (shared, 3))
    assert psutil.Process(done.pid).ppid() == os.getpid() or done.exitcode is not None
    done.join(30)
    assert done.exitcode == 3 and shared.tolist() == [1.0, 1.0, 1.0]
    failed = server.fork("raiser", raise_an_error, ())
    failed.join(30)
    assert failed.exitcode == 1
    running = server.fork("sleeper", report_parent_and_wait, (shared,))
    deadline = time.monotonic() + 30
    while shared[0] != os.getpid() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert shared[0] == os.getpid()
    assert psutil.Process(running.pid).name() == "sleeper"  # ps shows what it is
    os.kill(running.pid, signal.SIGTERM)
    running.join(10)
    assert running.exitcode == -signal.SIGTERM


def test_nothing_else_can_reach_the_server(server):
    """No listening socket, no address: only this process holds the other end of its pair."""
    server.fork("ready", add_one_and_exit, (torch.zeros(1), 0)).join(30)  # it serves: named
    proc = psutil.Process(server.pid)
    assert proc.name() == SERVER_NAME
    conns = proc.net_connections(kind="all")
    assert conns and all(not c.laddr and c.status == psutil.CONN_NONE for c in conns), conns


def test_a_killed_or_garbled_server_is_replaced_and_its_workers_run_on(server, capfd):
    shared = torch.zeros(1).share_memory_()
    survivor = server.fork("survivor", report_parent_and_wait, (shared,))
    first = server.pid
    os.kill(first, signal.SIGKILL)
    done = server.fork("after-kill", add_one_and_exit, (torch.zeros(1).share_memory_(), 0))
    done.join(30)
    assert done.exitcode == 0 and server.restarts == 1 and server.pid != first
    assert f"the workers' fork server (pid {first}) killed by SIGKILL" in capfd.readouterr().err
    second = server.pid
    assert server._sock is not None
    server._sock.sendall(os.urandom(64))  # garbage where a request belongs
    done = server.fork("after-garbage", add_one_and_exit, (torch.zeros(1).share_memory_(), 0))
    done.join(30)
    assert done.exitcode == 0 and server.restarts == 2 and server.pid not in (first, second)
    assert "refused a malformed request" in capfd.readouterr().err
    # the worker forked before both ran on: a child of this process all along
    assert survivor.exitcode is None and psutil.Process(survivor.pid).ppid() == os.getpid()
    os.kill(survivor.pid, signal.SIGKILL)
    survivor.join(10)
    assert survivor.exitcode == -signal.SIGKILL


def test_only_its_own_process_may_ask(server):
    pid = os.fork()
    if pid == 0:  # a child that inherited the object: refused before anything is sent
        try:
            server.fork("stranger", add_one_and_exit, (torch.zeros(1), 0))
        except RuntimeError:
            os._exit(7)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 7
