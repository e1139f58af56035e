"""Three 'hosts' (network namespaces on a bridge): the coordinator in one, stages in the other
two on their own addresses, CURVE on by default because the addresses are not loopback.
(Strangers refused, a coordinator without keys refused: tests/test_security.py, on loopback,
the same code at less cost; torchrun across two 'hosts': tests/test_torchrun.py.)"""
from __future__ import annotations

import json
import sys

import pytest

from synthgrad.common.security import make_keys
from tests.helpers import ROOT, wait_for_line
from tests.netns import Hosts, unavailable
from tests.test_multihost import JOB, stop_all

WHY = unavailable()
pytestmark = [pytest.mark.slow,  # every test here starts processes
              pytest.mark.skipif(WHY is not None, reason=f"no network namespaces here: {WHY}")]


def launch_in(hosts: Hosts, host: int, *args: str):
    import subprocess
    return hosts.popen(host, [sys.executable, "-u", str(ROOT / "launch.py"), *args], cwd=ROOT,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.timeout(240)
def test_unlocked_run_across_three_namespaces(tmp_path, delay_ms=5.0):
    """With 5 ms of simulated link latency (no tc netem in this kernel): see bench/latency.py."""
    keys = tmp_path / "keys"
    make_keys(keys)
    procs = []
    with Hosts(3) as hosts:
        try:
            a0, a1, a2 = hosts.addresses
            # stage 2 on two processes: its worker starts its replica on its own host (namespace 2)
            coord = launch_in(hosts, 0, "coordinator", "--bind", f"tcp://{a0}:0", "--keys", str(keys),
                              *JOB, "--replicas", "1,1,2,1", "--link-delay-ms", str(delay_ms),
                              "--out", str(tmp_path / "run"))
            procs.append(coord)
            line, seen = wait_for_line(coord, "coordinator at ", timeout=60)
            endpoint = line.split("coordinator at ")[1].split(";")[0]
            assert endpoint.startswith(f"tcp://{a0}:")
            first = launch_in(hosts, 1, "worker", "--coordinator", endpoint, "--stages", "0,1", "--keys", str(keys))
            procs.append(first)
            second = launch_in(hosts, 2, "worker", "--coordinator", endpoint, "--stages", "2,3",
                               "--keys", str(keys), "--out", str(tmp_path / "host2"))
            procs.append(second)
            rest, _ = coord.communicate(timeout=180)
            log = "".join(seen) + rest
            assert coord.returncode == 0, log[-3000:]
            assert first.wait(30) == 0 and second.wait(30) == 0
        finally:
            stop_all(*procs)
    assert not Hosts.leftovers()
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["secure"] and summary["steps"] == 64
    ends = {w["stage"]: w["input_endpoint"] for w in summary["workers"]}
    assert ends[1].startswith(f"tcp://{a1}:") and ends[2].startswith(f"tcp://{a2}:")
    assert ends[3].startswith(f"tcp://{a2}:")  # each stage listens on its own host's address
    assert [len(w["replica_pids"]) for w in sorted(summary["workers"], key=lambda w: w["stage"])] == [0, 0, 1, 0]
