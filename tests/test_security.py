"""CURVE links: `launch.py keys` makes the key pairs; with --keys every link is encrypted and
authenticated; a worker, monitor or peer at a stage's activation input without an authorised key
is refused (and the process it knocked on logs and counts it) while the run goes on; no secret
ever lands in the run folder."""
from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any, Optional

import psutil
import pytest
import zmq
import zmq.auth

from synthgrad.common.config import ConfigError
from synthgrad.common.security import ROLES, Guard, Keys, MonitorKeys, local_run_keys, make_keys, resolve_keys
from tests.helpers import wait_for_line
from tests.test_multihost import JOB, launch, stop_all
from tests.zygote import Launched, run_launch


def test_tcp_links_need_keys_unless_said_otherwise(tmp_path):
    with pytest.raises(ConfigError, match="is a tcp link, and tcp links are CURVE-encrypted"):
        resolve_keys(None, None, "worker", "--coordinator tcp://127.0.0.1:5555")  # loopback too
    assert resolve_keys(False, None, "worker", "x") is None  # --no-secure
    make_keys(tmp_path / "k")
    with pytest.raises(ConfigError, match="contradict"):
        resolve_keys(False, str(tmp_path / "k"), "worker", "x")
    assert resolve_keys(None, str(tmp_path / "k"), "worker", "x").role == "worker"


def test_a_local_run_makes_its_own_keys_for_tcp_links(tmp_path):
    run = local_run_keys(None, None, "tcp")
    assert run.source == "per-run" and run.monitor is not None
    other = local_run_keys(None, None, "tcp")
    assert run.coordinator.public != other.coordinator.public  # fresh for every run
    assert run.coordinator.admits("links") == {run.worker.public}  # only this run's workers
    assert run.coordinator.admits("status") == {run.monitor.public}
    assert run.worker.coordinator_public == run.coordinator.public
    assert "monitor" not in run.worker.publics and "worker" not in run.monitor.publics
    assert local_run_keys(None, None, "ipc") is None  # ipc lives in owner-only folders
    assert local_run_keys(True, None, "ipc").source == "per-run"  # --secure asks for CURVE anyway
    assert local_run_keys(False, None, "tcp") is None
    make_keys(tmp_path / "k")
    assert local_run_keys(None, str(tmp_path / "k"), "tcp").source == str(tmp_path / "k")
    monitor_keys = MonitorKeys(run.monitor)  # what `monitor --keys FOLDER` reads
    try:
        assert monitor_keys.folder.stat().st_mode & 0o777 == 0o700
        assert Keys.load(monitor_keys.folder, "monitor") == run.monitor
        assert sorted(p.name for p in monitor_keys.folder.iterdir()) == [
            "coordinator.key", "monitor.key", "monitor.key_secret"]
    finally:
        monitor_keys.remove()
    assert not monitor_keys.folder.exists()


def test_split_keys_give_each_role_only_what_it_needs(tmp_path):
    make_keys(tmp_path / "k", split=True)
    held = {role: sorted(p.name for p in (tmp_path / "k" / role).iterdir()) for role in ROLES}
    assert held == {"coordinator": ["coordinator.key", "coordinator.key_secret", "monitor.key", "worker.key"],
                    "worker": ["coordinator.key", "worker.key", "worker.key_secret"],
                    "monitor": ["coordinator.key", "monitor.key", "monitor.key_secret"]}
    keys = {role: Keys.load(tmp_path / "k" / role, role) for role in ROLES}
    assert keys["coordinator"].admits("links") == {keys["worker"].public}
    assert keys["worker"].coordinator_public == keys["monitor"].coordinator_public == keys["coordinator"].public
    with pytest.raises(ConfigError, match="no worker.key_secret"):  # a monitor host cannot act as a worker
        Keys.load(tmp_path / "k" / "monitor", "worker")
    with pytest.raises(ConfigError, match="already holds keys"):
        make_keys(tmp_path / "k", split=True)


def test_keys_are_refused_when_others_could_read_or_replace_them(tmp_path):
    make_keys(tmp_path / "k")
    assert (tmp_path / "k").stat().st_mode & 0o777 == 0o700
    secret = tmp_path / "k" / "worker.key_secret"
    secret.chmod(0o644)
    with pytest.raises(ConfigError, match=f"{secret} is readable by others; run: chmod 600 {secret}"):
        Keys.load(tmp_path / "k", "worker")
    secret.chmod(0o600)
    (tmp_path / "k").chmod(0o777)
    with pytest.raises(ConfigError, match=f"keys folder {tmp_path / 'k'} is writable by others; run: chmod 700"):
        Keys.load(tmp_path / "k", "worker")


def test_a_monitor_key_opens_only_the_status_stream(tmp_path):
    make_keys(tmp_path / "k")
    coordinator = Keys.load(tmp_path / "k", "coordinator")
    monitor, worker = (Keys.load(tmp_path / "k", r).public for r in ("monitor", "worker"))
    guard = Guard(zmq.Context.instance(), coordinator)
    try:
        assert guard.callback("status", monitor) and not guard.callback("links", monitor)
        assert guard.callback("links", worker) and not guard.callback("status", worker)
        assert any("unauthorised key" in r and "links" in r for r in guard.take_refusals())
    finally:
        guard.close()


@pytest.mark.slow
def test_keys_command_and_loading(tmp_path):
    done = run_launch("keys", str(tmp_path / "k"), timeout=60)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "k" / "worker.key_secret").stat().st_mode & 0o077 == 0  # owner only
    again = run_launch("keys", str(tmp_path / "k"), timeout=60)
    assert again.returncode == 2 and "--force" in again.stderr  # never overwrites silently
    keys = Keys.load(tmp_path / "k", "worker")
    assert keys.admits("links") == {keys.worker_public} and not keys.admits("status")
    coordinator = Keys.load(tmp_path / "k", "coordinator")  # monitors open only the status stream
    assert coordinator.admits("status") == {coordinator.publics["monitor"]}
    assert coordinator.admits("links") == {coordinator.worker_public}
    (tmp_path / "k" / "monitor.key").unlink()
    Keys.load(tmp_path / "k", "worker")  # a worker's host needs no monitor key
    with pytest.raises(ConfigError, match="no monitor.key in"):
        Keys.load(tmp_path / "k", "coordinator")


def listening_ports(pid: int, besides: tuple[str, ...] = (), count: int = 3, timeout: float = 60.0) -> list[int]:
    """The TCP ports `pid`'s descendants listen on, other than those of the `besides` endpoints
    (here: the stages' activation inputs), once there are `count` of them."""
    skip = {int(e.rsplit(":", 1)[1]) for e in besides}
    deadline = time.monotonic() + timeout
    while True:
        ports = set()
        for p in psutil.Process(pid).children(recursive=True):
            try:
                ports |= {c.laddr.port for c in p.net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN}
            except psutil.Error:
                pass
        ports -= skip
        if len(ports) >= count or time.monotonic() > deadline:
            assert len(ports) == count, f"expected {count} stage inputs, found ports {sorted(ports)}"
            return sorted(ports)
        time.sleep(0.1)


def knock(ctx: zmq.Context, port: int, curve: Optional[tuple[bytes, bytes, bytes]] = None) -> zmq.Socket:
    """A stranger pushing an activation-sized message at a stage's input: plain, or as a CURVE
    client (`curve`: its public and secret key, and the server key it expects)."""
    sock = ctx.socket(zmq.PUSH)
    sock.linger = 0
    if curve is not None:
        sock.curve_publickey, sock.curve_secretkey, sock.curve_serverkey = curve
    sock.connect(f"tcp://127.0.0.1:{port}")
    sock.send_multipart([b"\x00" * 64, b"\x00" * 4096], flags=zmq.NOBLOCK)  # queued: nothing gets through
    return sock


def wait_for_stage_refusals(proc: Any, needle: str, stages: set[int],
                            timeout: float = 60.0) -> list[str]:
    """Read `proc`'s output until each of `stages` has logged a refusal containing `needle`."""
    seen: list[str] = []
    waiting = set(stages)
    while waiting:
        line, more = wait_for_line(proc, needle, timeout=timeout)
        seen += more
        waiting -= {s for s in waiting if line.startswith(f"[stage {s}] refused ")}
    return seen


def assert_no_secret_in(folder: Path, secrets: list[bytes]) -> None:
    """No file under `folder` holds any of `secrets`, nor a secret key in ZeroMQ's certificate
    format (a key this test does not know, as a local run's own)."""
    files = [p for p in folder.rglob("*") if p.is_file()]
    assert files, folder
    for path in files:
        data = path.read_bytes()
        assert not any(s in data for s in secrets) and b"secret-key" not in data, path


def _monitor(endpoint: str, *args: str) -> Launched:
    return launch("monitor", "--connect", endpoint, "--json", *args)


@pytest.mark.slow
def test_a_coordinator_bound_on_tcp_without_keys_is_refused_before_it_starts(tmp_path):
    done = run_launch("coordinator", "--bind", "tcp://127.0.0.1:0", *JOB, "--out", str(tmp_path / "run"), timeout=60)
    assert done.returncode == 2 and "is a tcp link, and tcp links are CURVE-encrypted" in done.stderr, done.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_secure_runs_refuse_strangers_and_go_on(tmp_path):
    """Two secure runs side by side, each disturbed once both listen, so they share one start-up:
    - A: a keys folder, its stages started by hand; a worker with a stranger's keys, a plain
      worker and two monitors without an authorised key are refused, a stranger with CURVE keys
      of its own (and the stages' public key, which is no secret) is refused at each stage's
      activation input, an authorised monitor reads the status stream, and no secret key lands
      in the run folder;
    - B: a local tcp run with no keys given makes its own: its stages get them at start, a
      monitor gets them from the private folder the run prints, a process without them is
      refused at the coordinator and a plain peer at each stage's activation input, no secret
      lands in its run folder, and the key folder goes when the run ends (here by Ctrl-C, once
      all that is seen). Each stage logs and counts what it refused, and trains on."""
    keys, stranger = tmp_path / "keys", tmp_path / "stranger"
    make_keys(keys)
    stranger.mkdir()  # knows the coordinator's public key, but has its own worker/monitor keys
    (stranger / "coordinator.key").write_bytes((keys / "coordinator.key").read_bytes())
    for role in ("worker", "monitor"):  # kept private, as a careful stranger would
        os.chmod(zmq.auth.create_certificates(stranger, role)[1], 0o600)
    # A's last stage sleeps 10 ms a step (3.2 s for its 320): its stages take the refusals at
    # their inputs in while they train
    coord = launch("coordinator", "--bind", "tcp://127.0.0.1:0", "--keys", str(keys), *JOB,
                   "--epochs", "10", "--slow-stage", "3,10", "--metrics-every", "0.2", "--out", str(tmp_path / "a"))
    # B runs until it is interrupted (its last stage sleeping 25 ms a step: 40 s for its 50
    # epochs): its strangers, started after it listens, knock while it runs
    run = launch("train", *JOB, "--transport", "tcp", "--epochs", "50", "--slow-stage", "3,25",
                 "--metrics-every", "0.2", "--out", str(tmp_path / "b"))
    procs = [coord, run]
    ctx = zmq.Context()
    knocks: list[zmq.Socket] = []
    try:
        line, seen = wait_for_line(coord, "coordinator at ", timeout=60)
        endpoint = line.split("coordinator at ")[1].split(";")[0]
        status_a = next(x for x in seen if "monitor --connect" in x).split("--connect ")[1].split()[0]
        watch, seen_b = wait_for_line(run, "watch it:", timeout=60)
        status_b = watch.split("--connect ")[1].split()[0]
        folder = watch.split("--keys ")[1].split()[0]
        assert oct(os.stat(folder).st_mode & 0o777) == oct(0o700)
        line, more = wait_for_line(run, "coordinator at ", timeout=60)
        seen_b += more
        endpoint_b = line.split("coordinator at ")[1].split(";")[0]
        a = {"intruder": launch("worker", "--coordinator", endpoint, "--stage", "0", "--keys", str(stranger),
                                "--connect-timeout", "20"),
             "plain": launch("worker", "--coordinator", endpoint, "--stage", "0", "--connect-timeout", "20",
                             "--no-secure"),
             "workers": launch("worker", "--coordinator", endpoint, "--stages", "0,1,2,3", "--keys", str(keys)),
             "stranger monitor": _monitor(status_a, "--keys", str(stranger), "--timeout", "3", "--count", "2"),
             "plain monitor": _monitor(status_a, "--no-secure", "--timeout", "3", "--count", "2"),
             "monitor": _monitor(status_a, "--keys", str(keys), "--timeout", "30", "--count", "3")}
        b = {"plain": launch("worker", "--coordinator", endpoint_b, "--stage", "0", "--connect-timeout", "20",
                             "--no-secure"),
             "plain monitor": _monitor(status_b, "--no-secure", "--timeout", "3", "--count", "2"),
             "monitor": _monitor(status_b, "--keys", folder, "--timeout", "30", "--count", "2")}
        procs += [*a.values(), *b.values()]
        # strangers at the stages' activation inputs: in A with CURVE keys of their own and the
        # stages' public key, in B plain
        stage_key = zmq.auth.load_certificate(keys / "worker.key")[0]
        stranger_key = zmq.auth.load_certificate(stranger / "worker.key_secret")
        knocks += [knock(ctx, port, (*stranger_key, stage_key)) for port in listening_ports(a["workers"].pid)]
        knocks += [knock(ctx, port) for port in listening_ports(run.pid, besides=(endpoint_b, status_b))]
        monitor_secret_b = Keys.load(folder, "monitor").secret  # B's one secret on disk, while it runs
        a_refusals = wait_for_stage_refusals(a["workers"], "refused a peer with an unauthorised key", {1, 2, 3})
        assert all("on a links socket" in line for line in a_refusals if "unauthorised key" in line), a_refusals
        seen_b += wait_for_stage_refusals(run, "refused a failed handshake on the stage", {1, 2, 3})
        for sock in knocks:  # a stranger that stays retries: once refused is enough here
            sock.close(0)
        for p, why in ((a["intruder"], "refused this process's key"), (a["plain"], "one side uses CURVE"),
                       (b["plain"], "one side uses CURVE")):
            out, _ = p.communicate(timeout=60)
            assert p.returncode == 1 and why in out, out
        for m, count in ((a["monitor"], 3), (b["monitor"], 2)):
            out, _ = m.communicate(timeout=60)
            assert m.returncode == 0, out
            assert sum(json.loads(x)["event"] == "status" for x in out.splitlines()) == count
        for m in (a["stranger monitor"], a["plain monitor"], b["plain monitor"]):  # nothing readable
            out, _ = m.communicate(timeout=60)
            assert m.returncode == 1 and "nothing from" in out, out
        # the coordinator logs a failed handshake when its socket's monitor reports it, which
        # under load can come after the plain worker has given up: wait for it before stopping B
        refused_b = "refused a failed handshake on the coordinator socket"
        if not any(refused_b in x for x in seen_b):
            seen_b += wait_for_line(run, refused_b, timeout=60)[1]
        assert run.poll() is None, "B ended before its strangers were refused"
        run.send_signal(signal.SIGINT)
        rest_b, _ = run.communicate(timeout=60)
        assert run.returncode == 130, "".join(seen_b)[-2000:] + rest_b[-2000:]
        rest, _ = coord.communicate(timeout=150)
        coord_out = "".join(seen) + rest
        assert coord.returncode == 0, coord_out[-3000:]
        assert a["workers"].wait(30) == 0
    finally:
        for sock in knocks:
            sock.close(0)
        ctx.term()
        stop_all(*procs)
    # A: four strangers, each refused where it knocked (a peer that retries is refused again)
    assert "refused a peer with an unauthorised key" in coord_out and "on a links socket" in coord_out
    assert "refused a failed handshake on the coordinator socket" in coord_out
    assert "on a status socket" in coord_out and "refused a failed handshake on the status socket" in coord_out
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert summary["secure"] and summary["refused_connections"] >= 4
    assert summary["steps"] == 10 * 32
    # ... and the stranger at the stages' inputs, counted by each stage, which trained on
    assert all(w["rejected_messages"] >= 1 and w["steps"] == 10 * 32 for w in summary["workers"][1:]), \
        summary["workers"]
    secrets = [Keys.load(keys, role).secret for role in ("coordinator", "worker", "monitor")]
    assert_no_secret_in(tmp_path / "a", secrets)
    # B: the monitor's key does not outlive the run
    assert not os.path.exists(folder)
    summary = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["keys"] == "per-run" and summary["secure"]
    assert "refused a failed handshake on the coordinator socket" in "".join(seen_b) + rest_b
    records = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    refused = {r["stage"]: r["rejected_messages"] for r in records if r["event"] == "worker"}  # the latest
    assert all(refused[stage] >= 1 for stage in (1, 2, 3)), refused
    assert_no_secret_in(tmp_path / "b", [monitor_secret_b])
