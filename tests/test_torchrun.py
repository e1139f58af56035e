"""The same job under torchrun: rank 0 coordinates, ranks 1..K run the stages, rendezvous from
torchrun's environment. Locked training under torchrun must still equal single-process backprop."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from synthgrad.common.files import load_model_state
from synthgrad.common.security import make_keys
from tests.helpers import EXACT_SGD, LOCKED_EQUALS_BACKPROP, ROOT, assert_states_close, quiet
from tests.netns import unavailable

pytestmark = pytest.mark.slow  # every test here starts processes

TINY = ["--dataset", "synthetic", "--layers", "784,64,64,64,10", "--batch-size", "64",
        "--synthetic-train", "2048", "--synthetic-test", "512", "--epochs", "1", "--steps", "20",
        "--start-timeout", "60", "--stall-timeout", "30"]


def torchrun(nproc: int, *args: str) -> subprocess.CompletedProcess:
    """torchrun as this interpreter's module (what the `torchrun` script runs), so the test
    needs no activated environment and no script on PATH."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           str(ROOT / "launch.py"), "train", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=150)


@pytest.mark.timeout(240)
def test_locked_under_torchrun_reproduces_backprop(tiny_cfg, tmp_path):
    """The README's two-host example, 2 nodes x 3 ranks = the coordinator and 5 stages, locked:
    it ends where single-process backprop ends. On two 'hosts' (network namespaces,
    tests/netns.py) where they can be made (as root, as in CI), else with both nodes' ranks on
    this host (`--standalone`): one run proves the rendezvous, CURVE, the ranks' placement and
    the equivalence at once."""
    from synthgrad.coordinator.train import train
    layers = (784, 64, 64, 64, 64, 10)
    ref_dir, _ = train(tiny_cfg.replace(mode="backprop", layers=layers, backprop_threads=1,
                                        out=str(tmp_path / "bp"), **EXACT_SGD), log=quiet)
    keys = tmp_path / "keys"
    make_keys(keys)  # torchrun's ranks are started by torchrun: they share a keys folder
    args = [*TINY, "--layers", ",".join(map(str, layers)), "--stages", "5",  # (the later --layers counts)
            "--mode", "locked", "--optimizer", "sgd",
            "--lr", str(EXACT_SGD["lr"]), "--momentum", str(EXACT_SGD["momentum"]), "--threads", "1",
            "--keys", str(keys), "--out", str(tmp_path / "trun")]
    if unavailable() is None:  # network namespaces can be made here
        addresses, outs = _on_two_hosts(args)
    else:
        done = torchrun(6, *args)
        addresses, outs = None, [done.stdout + done.stderr]
        assert done.returncode == 0, outs[0][-3000:]
    assert "CURVE-encrypted and authenticated with the keys in" in outs[0]
    assert "mode locked: 20 steps" in outs[0]
    a, b = load_model_state(ref_dir), load_model_state(tmp_path / "trun")
    assert sorted(a) == [0, 1, 2, 3, 4]
    assert_states_close(a, b, **LOCKED_EQUALS_BACKPROP)
    summary = json.loads((tmp_path / "trun" / "summary.json").read_text())
    assert summary["secure"] and len(summary["workers"]) == 5
    if addresses is not None:  # ranks 1,2 (stages 0,1) on node 0, ranks 3-5 (stages 2-4) on node 1
        listening = {w["stage"]: w["input_endpoint"].split("//")[1].split(":")[0]
                     for w in summary["workers"] if w["stage"] > 0}  # stage 0 has no input link
        assert listening[1] == addresses[0] and {listening[s] for s in (2, 3, 4)} == {addresses[1]}


def _on_two_hosts(args: list[str]) -> tuple[list[str], list[str]]:
    """Run one torchrun node (3 ranks) in each of two network namespaces; their addresses and
    outputs (node 0's first)."""
    from tests.netns import Hosts
    from tests.test_multihost import stop_all
    procs = []
    with Hosts(2) as hosts:
        try:
            for node in (0, 1):
                cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "3",
                       "--node-rank", str(node), "--master-addr", hosts.addresses[0], "--master-port", "29500",
                       str(ROOT / "launch.py"), "train", *args]
                procs.append(hosts.popen(node, cmd, cwd=ROOT, stdout=subprocess.PIPE,
                                         stderr=subprocess.STDOUT, text=True))
            outs = [p.communicate(timeout=200)[0] for p in procs]
            assert [p.returncode for p in procs] == [0, 0], "\n---\n".join(o[-2000:] for o in outs)
        finally:
            stop_all(*procs)
    assert not Hosts.leftovers()
    return hosts.addresses, outs


@pytest.mark.timeout(120)
def test_torchrun_world_size_must_be_stages_plus_one(tmp_path):
    """A rank's refusal reaches the user through torchrun. (Every rank checks its world and its
    keys before the rendezvous: tests/test_config.py checks both on run_rank in-process.)"""
    done = torchrun(2, *TINY, "--mode", "unlocked", "--no-secure", "--out", str(tmp_path / "trun"))
    assert done.returncode != 0
    assert "torchrun started 2 processes, but this run needs 5" in done.stdout + done.stderr
