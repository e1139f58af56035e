"""Binding listeners: one rule for the coordinator and every worker.

A listener binds to a wildcard (an ipc name the OS makes unique, or tcp port 0 on the given
address) and reports the endpoint it got, so nothing probes for free ports.
"""
from __future__ import annotations

import os
import socket
import tempfile

import zmq

# how long a worker waits for the coordinator's answer (START) before it gives up, by default
# (`launch.py worker --connect-timeout`); here, not with the worker, so that the command line
# knows it without importing torch
CONNECT_TIMEOUT_S = 600.0

from synthgrad.common.config import ConfigError


def bind_wildcard(sock: zmq.Socket, transport: str, host: str) -> str:
    """Bind `sock` and return the bound endpoint (what peers connect to)."""
    if transport == "ipc":
        # libzmq makes a wildcard ipc socket's folder under $TMPDIR, or in the current
        # directory when it is unset; a killed process would leave that folder behind there.
        os.environ.setdefault("TMPDIR", tempfile.gettempdir())
        address = "ipc://*"
    else:
        address = f"tcp://{host}:*"
    try:
        sock.bind(address)
    except zmq.ZMQError as exc:
        raise ConfigError(f"cannot listen on {address}: {exc} (is {host!r} an address of this "
                          f"host? set --host)") from None
    return sock.getsockopt(zmq.LAST_ENDPOINT).decode()


def tcp_host(endpoint: str) -> str:
    """The host part of tcp://HOST:PORT (brackets of an IPv6 literal removed)."""
    if not endpoint.startswith("tcp://") or ":" not in endpoint[6:]:
        raise ValueError(f"expected tcp://HOST:PORT, got {endpoint!r}")
    return endpoint[6:].rsplit(":", 1)[0].strip("[]")


def address_towards(host: str) -> str:
    """This machine's address on the route to `host`: what a peer over there can connect to.
    (A UDP 'connect' sends nothing; it only asks the kernel which source address it would use.)"""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect((host, 9))
        except OSError as exc:
            raise ValueError(f"no route to {host!r}: {exc}") from None
        return s.getsockname()[0]


def set_heartbeats(sock: zmq.Socket, timeout_s: float) -> None:
    """ZeroMQ's own heartbeats (ZMTP PING/PONG) on a connection-oriented socket: libzmq drops a
    connection whose peer stopped answering (a vanished host, a half-open TCP link), so sends
    to it fail and it can reconnect. The application-level check (wire.Heartbeat) decides
    what a silent peer means for the run."""
    ivl = max(100, int(1000 * min(1.0, timeout_s / 10)))
    sock.setsockopt(zmq.HEARTBEAT_IVL, ivl)
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, max(ivl, int(1000 * timeout_s)))
    sock.setsockopt(zmq.HEARTBEAT_TTL, max(ivl, int(1000 * timeout_s)))


def max_frame_bytes(cfg) -> int:
    """ZMQ_MAXMSGSIZE for listeners: twice the tensor bound (--max-message-mb) plus room for a
    header. Frames up to it reach the wire checks and are rejected and counted there; libzmq
    disconnects a peer that sends anything bigger, before it is held in memory."""
    return 2 * (cfg.max_message_mb << 20) + (64 << 10)
