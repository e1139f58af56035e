"""CURVE-encrypted, authenticated links (ZeroMQ CURVE + a ZAP handler from pyzmq).

`launch.py keys DIR` makes three key pairs: coordinator, worker, monitor. Listeners are CURVE
servers: the coordinator's ROUTER and status PUB (coordinator key), and each worker's activation
input (worker key). Connecting sockets are CURVE clients with their role's key and the server's
public key. A listener's ZAP handler admits only the worker and monitor public keys found in DIR,
so a peer without them is refused during the handshake; refusals are counted and reported.
Secret keys are read from DIR on each host and never leave it: nothing secret goes over the wire
or into the run folder (only DIR's path, in the config).
"""
from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils.monitor import recv_monitor_message

from common.config import ConfigError
from common.endpoints import is_loopback

ROLES = ("coordinator", "worker", "monitor")


def resolve_keys(secure: Optional[bool], keys_dir: Optional[str], hosts: list[str], role: str,
                 what: str) -> Optional["Keys"]:
    """This process's keys when its links must be CURVE, else None. The rule, the same for every
    role: --secure / --no-secure decide when given; otherwise links are secure when a keys folder
    is given or any of `hosts` (the addresses this process listens on or connects to) is not
    loopback. `what` names the endpoint in the error message."""
    need = secure if secure is not None else bool(keys_dir) or any(not is_loopback(h) for h in hosts)
    if not need:
        return None
    if not keys_dir:
        raise ConfigError(f"{what} is not loopback, so every link is CURVE-encrypted: make keys with "
                          f"`python launch.py keys DIR`, copy DIR to every host and pass --keys DIR "
                          f"(or --no-secure to send activations and gradients in the clear)")
    return Keys.load(keys_dir, role)
# which key may open which kind of listener (the ZAP domain a listener is in): workers speak on
# the coordinator's socket and on stage inputs; a monitor key opens only the status stream
ADMITS = {"links": ("worker",), "status": ("monitor",)}
# the public keys each role needs besides its own pair (so a host gets only what its role needs)
NEEDS = {"coordinator": ("worker", "monitor"), "worker": ("coordinator",), "monitor": ("coordinator",)}


def make_keys(folder: Path, force: bool = False) -> list[Path]:
    """Write the three key pairs into `folder` (secret files readable by the owner only)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    existing = [folder / f"{r}.key_secret" for r in ROLES if (folder / f"{r}.key_secret").exists()]
    if existing and not force:
        raise ConfigError(f"{folder} already holds keys ({existing[0].name}); pass --force to replace "
                          f"them (every host then needs the new ones)")
    written = []
    os.chmod(folder, 0o700)
    for role in ROLES:
        public, secret = zmq.auth.create_certificates(folder, role)
        os.chmod(secret, 0o600)
        written += [Path(public), Path(secret)]
    return written


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
    """This process's key pair plus the public keys its role needs, loaded from a keys folder."""
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
                                  f"`python launch.py keys {folder}` and copy the folder to every host")
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
