"""CURVE-encrypted, authenticated links (ZeroMQ CURVE + a ZAP handler from pyzmq).

The rule, the same for every process: a tcp link is CURVE unless --no-secure says otherwise
(ipc lives in folders only the owner can enter, so it needs none). There are three roles:
coordinator, worker, monitor. Listeners are CURVE servers: the coordinator's ROUTER and status
PUB (coordinator key), and each worker's activation input (worker key). Connecting sockets are
CURVE clients with their role's key and the server's public key. A listener's ZAP handler admits
only the keys its kind of socket may hear from (ADMITS), so a peer without them is refused during
the handshake; refusals are counted and reported.

Where the keys come from:
- a local run (`launch.py train`, which starts every stage itself) makes a fresh set in memory
  (`RunKeys.fresh`); the stages get theirs through the process start, never through a file; a
  monitor's key goes into a private temporary folder that the run prints and deletes at its end;
- processes started by hand or by torchrun on several hosts read a folder made by
  `launch.py keys DIR` (`--split` writes one folder per role, so a host gets only what its
  role needs). Secret keys never go over the wire or into the run folder.
"""
from __future__ import annotations

import os
import queue
import shutil
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils.monitor import recv_monitor_message

from synthgrad.common.config import ConfigError

ROLES = ("coordinator", "worker", "monitor")
# which key may open which kind of listener (the ZAP domain a listener is in): workers speak on
# the coordinator's socket and on stage inputs; a monitor key opens only the status stream
ADMITS = {"links": ("worker",), "status": ("monitor",)}
# the public keys each role needs besides its own pair (so a host gets only what its role needs)
NEEDS = {"coordinator": ("worker", "monitor"), "worker": ("coordinator",), "monitor": ("coordinator",)}


def resolve_keys(secure: Optional[bool], keys_dir: Optional[str], role: str,
                 what: str) -> Optional["Keys"]:
    """The keys of a process whose tcp links reach processes it did not start (a coordinator
    started by hand, a `launch.py worker`, a monitor, a torchrun rank): from the keys folder,
    or None with --no-secure. `what` names the link in the error message."""
    if secure is False:
        if keys_dir:
            raise ConfigError("--keys and --no-secure contradict each other: drop one")
        return None
    if not keys_dir:
        raise ConfigError(f"{what} is a tcp link, and tcp links are CURVE-encrypted and "
                          f"authenticated: make keys with `python launch.py keys DIR`, give the "
                          f"folder to every process of the run and pass --keys DIR (or --no-secure "
                          f"to send in the clear, where anyone who reaches the port can join)")
    return Keys.load(keys_dir, role)


def _write_key_file(path: Path, public: bytes, secret: Optional[bytes] = None) -> Path:
    """A ZeroMQ certificate file (the format zmq.auth.load_certificate reads); a secret one is
    created owner-only before anything is written into it."""
    lines = ["# ZeroMQ CURVE " + ("secret" if secret else "public") + " certificate (synthgrad)",
             "metadata", "curve", f'    public-key = "{public.decode()}"']
    if secret:
        lines.append(f'    secret-key = "{secret.decode()}"')
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if secret else 0o644)
    if secret:
        os.fchmod(fd, 0o600)  # a file replaced by --force keeps its old mode otherwise
    with os.fdopen(fd, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def write_role(folder: Path, keys: "Keys") -> list[Path]:
    """Write what one role needs into `folder` (made owner-only): its own pair and the public
    keys of the roles it talks to."""
    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    written = [_write_key_file(folder / f"{keys.role}.key_secret", keys.public, keys.secret)]
    for role, public in keys.publics.items():
        written.append(_write_key_file(folder / f"{role}.key", public))
    return written


def make_keys(folder: Path, force: bool = False, split: bool = False) -> list[Path]:
    """Make a fresh set of the three key pairs in `folder`: all of them together (a folder to copy
    to every host), or with `split` one subfolder per role holding only what that role needs."""
    folder = Path(folder)
    targets = [folder / r if split else folder for r in ROLES]
    existing = [t / f"{r}.key_secret" for t, r in zip(targets, ROLES) if (t / f"{r}.key_secret").exists()]
    if existing and not force:
        raise ConfigError(f"{folder} already holds keys ({existing[0]}); pass --force to replace "
                          f"them (every host then needs the new ones)")
    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    fresh = RunKeys.fresh()
    written: list[Path] = []
    for target, role in zip(targets, ROLES):
        keys = fresh.of(role)
        if not split:  # one folder: every public key, so each role finds what it needs
            keys = Keys(role, keys.public, keys.secret, fresh.publics)
        written += write_role(target, keys)
    return sorted(set(written))


def _check_private(folder: Path, secret_file: Path) -> None:
    """Like ssh: refuse a secret key others can read, or a folder others can write to (they
    could replace the keys), saying which and what to run."""
    if os.name != "posix":
        return
    if folder.stat().st_mode & 0o022:
        raise ConfigError(f"keys folder {folder} is writable by others; run: chmod 700 {folder}")
    if secret_file.stat().st_mode & 0o077:
        raise ConfigError(f"{secret_file} is readable by others; run: chmod 600 {secret_file}")


@dataclass(frozen=True)
class Keys:
    """This process's key pair plus the public keys its role needs."""
    role: str
    public: bytes
    secret: bytes
    publics: dict  # role -> z85 public key, for the roles this one needs (and its own)

    @property
    def coordinator_public(self) -> bytes:
        return self.publics["coordinator"]

    @property
    def worker_public(self) -> bytes:
        return self.publics["worker"]

    def admits(self, domain: str) -> frozenset[bytes]:
        """The public keys a listener of this ZAP domain lets in."""
        return frozenset(self.publics[r] for r in ADMITS.get(domain, ()) if r in self.publics)

    @classmethod
    def load(cls, folder: str | Path, role: str) -> "Keys":
        folder = Path(folder)

        def read(name: str, secret: bool = False) -> tuple[bytes, Optional[bytes]]:
            path = folder / (f"{name}.key_secret" if secret else f"{name}.key")
            if not path.is_file():
                raise ConfigError(f"no {path.name} in {folder}: make keys with "
                                  f"`python launch.py keys DIR` and give each host the folder of its role")
            if secret:
                _check_private(folder, path)
            try:
                return zmq.auth.load_certificate(path)
            except (ValueError, OSError) as exc:
                raise ConfigError(f"{path} is not a key file: {exc}") from None

        public, secret = read(role, secret=True)
        if secret is None:
            raise ConfigError(f"{folder / (role + '.key_secret')} holds no secret key")
        publics = {role: public, **{r: read(r)[0] for r in NEEDS[role]}}
        return cls(role, public, secret, publics)


@dataclass(frozen=True)
class RunKeys:
    """One set of the three key pairs, made in memory (a local run's own keys)."""
    pairs: dict  # role -> (public, secret)

    @classmethod
    def fresh(cls) -> "RunKeys":
        return cls({role: zmq.curve_keypair() for role in ROLES})

    @property
    def publics(self) -> dict:
        return {role: pair[0] for role, pair in self.pairs.items()}

    def of(self, role: str) -> Keys:
        """`role`'s keys: its pair and the public keys of the roles it talks to."""
        public, secret = self.pairs[role]
        return Keys(role, public, secret, {role: public, **{r: self.pairs[r][0] for r in NEEDS[role]}})


@dataclass(frozen=True)
class LocalRunKeys:
    """The keys of a run whose coordinator starts every stage itself."""
    coordinator: Keys
    worker: Keys  # handed to the stages it starts
    monitor: Optional[Keys]  # made here (None when they come from a folder the user has)
    source: str  # "per-run" or the keys folder


def local_run_keys(secure: Optional[bool], keys_dir: Optional[str], transport: str) -> Optional[LocalRunKeys]:
    """A local run's keys: from --keys, or a fresh set for this run when its links are tcp (or
    --secure asks for CURVE over ipc too); None with --no-secure or over plain ipc."""
    if keys_dir:
        if secure is False:
            raise ConfigError("--keys and --no-secure contradict each other: drop one")
        return LocalRunKeys(Keys.load(keys_dir, "coordinator"), Keys.load(keys_dir, "worker"), None, keys_dir)
    if secure is False or (secure is None and transport != "tcp"):
        return None
    fresh = RunKeys.fresh()
    return LocalRunKeys(fresh.of("coordinator"), fresh.of("worker"), fresh.of("monitor"), "per-run")


class MonitorKeys:
    """A local run's monitor key in a private temporary folder (`monitor --keys FOLDER`), deleted
    when the run ends: the one secret of a local run that touches the disk, readable by the
    owner only, outside the run folder."""

    def __init__(self, keys: Keys):
        self.folder = Path(tempfile.mkdtemp(prefix="synthgrad-monitor-"))  # 0700
        write_role(self.folder, keys)

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


class Guard:
    """CURVE for one process's sockets: a ZAP handler (thread) for its listeners and a log of
    refused peers. Without keys it does nothing, so callers use one code path either way."""

    def __init__(self, ctx: zmq.Context, keys: Optional[Keys] = None):
        self.ctx = ctx
        self.keys = keys
        self.refused: "queue.Queue[str]" = queue.Queue()
        self._auth: Optional[ThreadAuthenticator] = None
        self._monitors: list[tuple[zmq.Socket, str]] = []
        self._lock = threading.Lock()
        if keys is not None:
            self._auth = ThreadAuthenticator(ctx)
            self._auth.start()
            for domain in ADMITS:  # pyzmq asks the provider registered for the listener's domain
                self._auth.configure_curve_callback(domain=domain, credentials_provider=self)

    @property
    def on(self) -> bool:
        return self.keys is not None

    def callback(self, domain: str, client_key: bytes) -> bool:
        """The ZAP decision (runs on the authenticator's thread): the key must be one this kind
        of listener admits."""
        ok = client_key in self.keys.admits(domain)
        if not ok:
            self.refused.put(f"a peer with an unauthorised key {client_key.decode()} on a {domain} socket")
        return ok

    def server(self, sock: zmq.Socket, name: str, domain: str = "links") -> None:
        """Make a listener a CURVE server (call before bind); `domain` says who may connect
        (ADMITS)."""
        if self.keys is None:
            return
        sock.zap_domain = domain.encode()
        sock.curve_secretkey = self.keys.secret
        sock.curve_publickey = self.keys.public
        sock.curve_server = True
        # handshake failures that never reach ZAP (a peer without CURVE, a wrong server key)
        mon = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                                      | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
        self._monitors.append((mon, name))

    def client(self, sock: zmq.Socket, server_public: bytes) -> None:
        """Make a connecting socket a CURVE client of the listener with `server_public`."""
        if self.keys is not None:
            curve_client(sock, self.keys, server_public)

    def take_refusals(self) -> list[str]:
        """What was refused since the last call (ZAP denials and failed handshakes)."""
        out = []
        for mon, name in self._monitors:
            while mon.poll(0):
                event = recv_monitor_message(mon)  # (AUTH failures are reported by the ZAP callback)
                out.append(f"a failed handshake on the {name} socket ({_handshake_reason(event)})")
        while True:
            try:
                out.append(self.refused.get_nowait())
            except queue.Empty:
                return out

    def close(self) -> None:
        for mon, _ in self._monitors:
            mon.close(0)
        self._monitors = []
        if self._auth is not None:
            self._auth.stop()
            self._auth = None


class HandshakeWatch:
    """Tells a connecting socket's owner that the listener refused the handshake (wrong or
    missing key, CURVE on one side only), instead of libzmq retrying silently forever."""

    EVENTS = (zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_AUTH
              | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_SUCCEEDED)

    def __init__(self, sock: zmq.Socket):
        self._mon = sock.get_monitor_socket(self.EVENTS)
        self.succeeded = False

    def failure(self) -> Optional[str]:
        """Why the last handshake failed, if it did and none has succeeded since."""
        why = None
        while self._mon.poll(0):
            event = recv_monitor_message(self._mon)["event"]
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self.succeeded, why = True, None
            elif event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                why = "it refused this process's key (CURVE authentication failed; check --keys)"
            else:
                why = ("the handshake failed: one side uses CURVE and the other does not, or the "
                       "server key is wrong (check --keys / --secure on both sides)")
        return why

    def close(self) -> None:
        self._mon.close(0)


def curve_client(sock: zmq.Socket, keys: Keys, server_public: bytes) -> None:
    """A connecting socket as a CURVE client (call before connect); needs no ZAP handler."""
    sock.curve_secretkey = keys.secret
    sock.curve_publickey = keys.public
    sock.curve_serverkey = server_public


def _handshake_reason(event: dict) -> str:
    if event["event"] == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
        return "the peer does not speak CURVE or used the wrong server key"
    return "no detail from libzmq"


class RefusalLog:
    """Counts refused connections and logs them at a bounded rate: the same refusal is logged the
    1st, 10th, 100th and 1000th time, then every 10000th (a peer retrying is one problem)."""

    def __init__(self, log: Callable[[str], None]):
        self.log = log
        self.count = 0
        self._seen: dict[str, int] = {}

    def take(self, guard: "Guard") -> None:
        for refusal in guard.take_refusals():
            self.count += 1
            seen = self._seen[refusal] = self._seen.get(refusal, 0) + 1
            if seen in (1, 10, 100, 1000) or seen % 10000 == 0:
                self.log(f"refused {refusal}" + (f" ({seen} times)" if seen > 1 else ""))
