"""CURVE links: `launch.py keys` makes the key pairs; with --keys every link is encrypted and
authenticated; a worker or monitor without an authorised key is refused (and the coordinator
logs it) while the run goes on; no secret ever lands in the run folder."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import zmq.auth

from common.config import ConfigError
from common.security import Guard, Keys, make_keys, resolve_keys
from tests.helpers import ROOT, wait_for_line
from tests.test_multihost import RUN, launch, stop_all


def test_secure_by_default_off_loopback_and_keys_required():
    assert resolve_keys(None, None, ["127.0.0.1"], "worker", "x") is None  # loopback: plain
    with pytest.raises(ConfigError, match="is not loopback, so every link is CURVE-encrypted"):
        resolve_keys(None, None, ["10.1.2.3"], "worker", "--coordinator tcp://10.1.2.3:5555")
    assert resolve_keys(False, None, ["10.1.2.3"], "worker", "x") is None  # --no-secure


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
    done = subprocess.run([sys.executable, str(ROOT / "launch.py"), "keys", str(tmp_path / "k")],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "k" / "worker.key_secret").stat().st_mode & 0o077 == 0  # owner only
    again = subprocess.run([sys.executable, str(ROOT / "launch.py"), "keys", str(tmp_path / "k")],
                           capture_output=True, text=True, timeout=60, cwd=ROOT)
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


def _monitor(endpoint: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / "launch.py"), "monitor", "--connect", endpoint,
                             "--json", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, cwd=ROOT)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_secure_run_refuses_strangers_and_goes_on(tmp_path):
    keys, stranger = tmp_path / "keys", tmp_path / "stranger"
    make_keys(keys)
    stranger.mkdir()  # knows the coordinator's public key, but has its own worker/monitor keys
    (stranger / "coordinator.key").write_bytes((keys / "coordinator.key").read_bytes())
    for role in ("worker", "monitor"):  # kept private, as a careful stranger would
        os.chmod(zmq.auth.create_certificates(stranger, role)[1], 0o600)
    coord = launch("coordinator", "--bind", "tcp://127.0.0.1:0", "--keys", str(keys), *RUN,
                   "--epochs", "30", "--metrics-every", "0.2", "--out", str(tmp_path / "run"))
    procs = [coord]
    try:
        line, seen = wait_for_line(coord, "coordinator at ", timeout=60)
        endpoint = line.split("coordinator at ")[1].split(";")[0]
        status_ep = next(x for x in seen if "monitor --connect" in x).split("--connect ")[1].split()[0]
        intruder = launch("worker", "--coordinator", endpoint, "--stage", "0", "--keys", str(stranger),
                          "--connect-timeout", "20")
        plain = launch("worker", "--coordinator", endpoint, "--stage", "0", "--connect-timeout", "20")
        procs += [intruder, plain]
        for p, why in ((intruder, "refused this process's key"), (plain, "one side uses CURVE")):
            out, _ = p.communicate(timeout=60)
            assert p.returncode == 1 and why in out, out
        workers = launch("worker", "--coordinator", endpoint, "--stages", "0,1,2,3", "--keys", str(keys))
        procs.append(workers)
        _, more = wait_for_line(coord, "training ")  # all stages ready
        seen += more
        stranger_monitor = _monitor(status_ep, "--keys", str(stranger), "--timeout", "3", "--count", "2")
        plain_monitor = _monitor(status_ep, "--no-secure", "--timeout", "3", "--count", "2")
        monitor = _monitor(status_ep, "--keys", str(keys), "--timeout", "30", "--count", "3")
        procs += [stranger_monitor, plain_monitor, monitor]
        out, _ = monitor.communicate(timeout=60)
        assert monitor.returncode == 0, out
        assert sum(json.loads(x)["event"] == "status" for x in out.splitlines()) == 3
        for m in (stranger_monitor, plain_monitor):  # nothing readable without an authorised key
            out, _ = m.communicate(timeout=60)
            assert m.returncode == 1 and "nothing from" in out, out
        rest, _ = coord.communicate(timeout=150)
        coord_out = "".join(seen) + rest
        assert coord.returncode == 0, coord_out[-3000:]
        assert workers.wait(30) == 0
    finally:
        stop_all(*procs)
    assert "refused a peer with an unauthorised key" in coord_out
    assert "refused a failed handshake on the coordinator socket" in coord_out
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["secure"] and summary["refused_connections"] >= 3  # 2 workers + 2 monitors, retries
    assert summary["steps"] == 30 * 32
    secrets = [Keys.load(keys, role).secret for role in ("coordinator", "worker", "monitor")]
    for path in (p for p in (tmp_path / "run").rglob("*") if p.is_file()):  # no secret key anywhere
        data = path.read_bytes()
        assert not any(s in data for s in secrets), path
