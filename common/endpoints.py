"""Binding listeners: one rule for the coordinator and every worker.

A listener binds to a wildcard (an ipc name the OS makes unique, or tcp port 0 on the given
address) and reports the endpoint it got, so nothing probes for free ports.
"""
from __future__ import annotations

import os
import tempfile

import zmq


def bind_wildcard(sock: zmq.Socket, transport: str, host: str) -> str:
    """Bind `sock` and return the bound endpoint (what peers connect to)."""
    if transport == "ipc":
        # libzmq makes a wildcard ipc socket's folder under $TMPDIR, or in the current
        # directory when it is unset; a killed process would leave that folder behind there.
        os.environ.setdefault("TMPDIR", tempfile.gettempdir())
        sock.bind("ipc://*")
    else:
        sock.bind(f"tcp://{host}:*")
    return sock.getsockopt(zmq.LAST_ENDPOINT).decode()
