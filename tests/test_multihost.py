"""Stages started by hand: `launch.py coordinator --bind` on one host, `launch.py worker` on
others (here: loopback; tests/test_netns.py does the same across network namespaces)."""
from __future__ import annotations

import re
import subprocess
import sys
from typing import Any

import pytest

from tests import zygote
from tests.helpers import ROOT, wait_for_line

pytestmark = pytest.mark.slow  # every test here starts processes

JOB = ["--dataset", "synthetic", "--mode", "unlocked", "--layers", "784,64,64,64,10",
       "--batch-size", "64", "--synthetic-train", "2048", "--epochs", "2", "--start-timeout", "60",
       "--stall-timeout", "30"]
RUN = [*JOB, "--no-secure"]  # plain tcp on loopback (tests/test_security.py runs JOB with keys)


def launch(*args: str, prefix: tuple[str, ...] = ()) -> Any:
    """`launch.py *args`, forked from the test zygote; under `prefix` (`ip netns exec NS`) a new
    interpreter."""
    if not prefix:
        return zygote.launch(*args)
    return subprocess.Popen([*prefix, sys.executable, "-u", str(ROOT / "launch.py"), *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def coordinator_endpoint(coord: subprocess.Popen) -> str:
    line, _ = wait_for_line(coord, "coordinator at ", timeout=60)
    return re.search(r"coordinator at (tcp://\S+);", line).group(1)


def stop_all(*procs: subprocess.Popen) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait(10)


@pytest.mark.timeout(150)
def test_coordinator_and_workers_started_by_hand(tmp_path):
    coord = launch("coordinator", "--bind", "tcp://127.0.0.1:0", *RUN, "--out", str(tmp_path / "run"))
    procs = [coord]
    try:
        endpoint = coordinator_endpoint(coord)
        first = launch("worker", "--coordinator", endpoint, "--stages", "0,1", "--no-secure")
        procs.append(first)
        wait_for_line(coord, "(2/4)")  # stages 0 and 1 registered
        twin = launch("worker", "--coordinator", endpoint, "--stage", "1", "--no-secure")  # stage 1 is taken
        procs.append(twin)
        twin_out, _ = twin.communicate(timeout=60)
        assert twin.returncode == 1 and "stage 1 is taken" in twin_out, twin_out
        second = launch("worker", "--coordinator", endpoint, "--stages", "2,3", "--out", str(tmp_path / "host2"), "--no-secure")
        procs.append(second)
        coord_out, _ = coord.communicate(timeout=120)
        assert coord.returncode == 0, coord_out[-3000:]
        assert "refused stage 1" in coord_out and "mode unlocked: 64 steps" in coord_out
        for w in (first, second):
            out, _ = w.communicate(timeout=30)
            assert w.returncode == 0, out
    finally:
        stop_all(*procs)
    # each host writes its stages' checkpoints into its own folder
    assert sorted(p.name for p in (tmp_path / "run").glob("stage*.pt")) == ["stage0.pt", "stage1.pt"]
    assert sorted(p.name for p in (tmp_path / "host2").glob("stage*.pt")) == ["stage2.pt", "stage3.pt"]


def test_worker_without_a_coordinator_gives_up_clearly():
    w = launch("worker", "--coordinator", "tcp://127.0.0.1:9", "--stage", "0", "--connect-timeout", "1",
               "--no-secure")
    try:
        out, _ = w.communicate(timeout=30)
    finally:
        stop_all(w)
    assert w.returncode == 1
    assert "no answer from the coordinator at tcp://127.0.0.1:9 within 1s" in out


@pytest.mark.parametrize("bind, needle", [("tcp://192.0.2.77:0", "cannot listen on tcp://192.0.2.77:0"),
                                          ("ipc:///tmp/x", "expected tcp://HOST:PORT")])
def test_coordinator_bind_errors_are_config_errors(bind, needle):
    c = launch("coordinator", "--bind", bind, *RUN)
    try:
        out, _ = c.communicate(timeout=60)
    finally:
        stop_all(c)
    assert c.returncode == 2 and needle in out, out
