"""Three 'hosts' (network namespaces on a bridge): the coordinator in one, stages in the other
two on their own addresses, CURVE on by default because the addresses are not loopback."""
from __future__ import annotations

import json
import os
import sys

import pytest
import zmq.auth

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
    keys, stranger = tmp_path / "keys", tmp_path / "stranger"
    make_keys(keys)
    stranger.mkdir()
    (stranger / "coordinator.key").write_bytes((keys / "coordinator.key").read_bytes())
    for role in ("worker", "monitor"):  # kept private, as a careful stranger would
        os.chmod(zmq.auth.create_certificates(stranger, role)[1], 0o600)
    procs = []
    with Hosts(3) as hosts:
        try:
            a0, a1, a2 = hosts.addresses
            # a tcp link without keys: refused before anything starts
            bare = launch_in(hosts, 0, "coordinator", "--bind", f"tcp://{a0}:0", *JOB)
            procs.append(bare)
            out, _ = bare.communicate(timeout=60)
            assert bare.returncode == 2 and "is a tcp link, and tcp links are CURVE-encrypted" in out, out
            # stage 2 on two processes: its worker starts its replica on its own host (namespace 2)
            coord = launch_in(hosts, 0, "coordinator", "--bind", f"tcp://{a0}:0", "--keys", str(keys),
                              *JOB, "--replicas", "1,1,2,1", "--link-delay-ms", str(delay_ms),
                              "--out", str(tmp_path / "run"))
            procs.append(coord)
            line, seen = wait_for_line(coord, "coordinator at ", timeout=60)
            endpoint = line.split("coordinator at ")[1].split(";")[0]
            assert endpoint.startswith(f"tcp://{a0}:")
            first = launch_in(hosts, 1, "worker", "--coordinator", endpoint, "--stages", "0,1", "--keys", str(keys))
            intruder = launch_in(hosts, 2, "worker", "--coordinator", endpoint, "--stage", "3",
                                 "--keys", str(stranger), "--connect-timeout", "30")
            procs += [first, intruder]
            out, _ = intruder.communicate(timeout=60)
            assert intruder.returncode == 1 and "refused this process's key" in out, out
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
    assert "refused a peer with an unauthorised key" in log
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["secure"] and summary["steps"] == 64
    ends = {w["stage"]: w["input_endpoint"] for w in summary["workers"]}
    assert ends[1].startswith(f"tcp://{a1}:") and ends[2].startswith(f"tcp://{a2}:")
    assert ends[3].startswith(f"tcp://{a2}:")  # each stage listens on its own host's address
    assert [len(w["replica_pids"]) for w in sorted(summary["workers"], key=lambda w: w["stage"])] == [0, 0, 1, 0]


@pytest.mark.timeout(240)
def test_torchrun_across_two_namespaces(tmp_path):
    """The README's two-host torchrun example, on two 'hosts': 2 x 3 ranks = coordinator + 5 stages."""
    import subprocess
    keys = tmp_path / "keys"
    make_keys(keys)
    args = ["--mode", "unlocked", "--keys", str(keys), "--dataset", "synthetic", "--layers",
            "784,64,64,64,64,10", "--stages", "5", "--batch-size", "64", "--synthetic-train", "2048",
            "--epochs", "1", "--start-timeout", "90", "--stall-timeout", "30", "--out", str(tmp_path / "run")]
    procs = []
    with Hosts(2) as hosts:
        try:
            for node in (0, 1):
                cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "3", "--node-rank", str(node),
                       "--master-addr", hosts.addresses[0], "--master-port", "29500",
                       str(ROOT / "launch.py"), "train", *args]
                procs.append(hosts.popen(node, cmd, cwd=ROOT, stdout=subprocess.PIPE,
                                         stderr=subprocess.STDOUT, text=True))
            outs = [p.communicate(timeout=200)[0] for p in procs]
            assert [p.returncode for p in procs] == [0, 0], "\n---\n".join(o[-2000:] for o in outs)
        finally:
            stop_all(*procs)
    assert not Hosts.leftovers()
    assert "mode unlocked: 32 steps" in outs[0]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["secure"] and len(summary["workers"]) == 5
    addresses = {w["stage"]: w["input_endpoint"].split("//")[1].split(":")[0]
                 for w in summary["workers"] if w["stage"] > 0}  # stage 0 has no input link
    # ranks 1,2 (stages 0,1) on node 0, ranks 3-5 (stages 2-4) on node 1
    assert addresses[1] == hosts.addresses[0] and {addresses[s] for s in (2, 3, 4)} == {hosts.addresses[1]}
