"""A stage's ZeroMQ sockets: the DEALER to the coordinator, made when the worker starts; the PULL
bound on this host for activations from the stage before and the PUSH towards the stage after,
made once START has said the run's bounds. What travels on them is workers/links.py's to say."""
from __future__ import annotations

import os
import socket as pysocket
from typing import Optional

import zmq

from synthgrad.common.config import RunConfig
from synthgrad.common.endpoints import bind_wildcard, max_frame_bytes, set_heartbeats
from synthgrad.common.security import Guard, HandshakeWatch, Keys


class Sockets:
    """The context, its CURVE guard and the stage's three sockets (None until made)."""

    def __init__(self, stage: int, coordinator: str, keys: Optional[Keys]):
        self.stage = stage
        self.ctx = zmq.Context()
        self.guard = Guard(self.ctx, keys)
        self.coord = self.ctx.socket(zmq.DEALER)
        if self.guard.on:
            self.guard.client(self.coord, self.guard.keys.coordinator_public)
        # unique per process, so the coordinator can refuse a second stage-I instead of libzmq
        # silently dropping the connection of a duplicate identity
        self.coord.setsockopt(zmq.IDENTITY, f"stage-{stage}-{pysocket.gethostname()}-{os.getpid()}".encode())
        self.coord.setsockopt(zmq.SNDHWM, 0)  # control traffic is bounded by the forward stream
        self.coord.setsockopt(zmq.RCVHWM, 0)
        self.coord.setsockopt(zmq.LINGER, 2000)  # the last word (ERROR, DONE) must arrive
        set_heartbeats(self.coord, RunConfig.heartbeat_timeout)  # before the config arrives
        self.handshake_watch = HandshakeWatch(self.coord)
        self.coord.connect(coordinator)
        self.inbox: Optional[zmq.Socket] = None
        self.outbox: Optional[zmq.Socket] = None
        self.endpoint = ""  # where this stage's input is bound ("" on stage 0)

    def open(self, cfg: RunConfig, is_last: bool, host: str, transport: str) -> None:
        """Bind the activation input (stages > 0) and make the output (all but the last)."""
        if self.stage > 0:
            # the high-water mark must be set before bind: a listener copies its options then
            self.inbox = self.ctx.socket(zmq.PULL)
            self.inbox.setsockopt(zmq.LINGER, 0)
            self.inbox.setsockopt(zmq.RCVHWM, cfg.queue_depth)
            self.inbox.setsockopt(zmq.MAXMSGSIZE, max_frame_bytes(cfg))
            self.guard.server(self.inbox, f"stage {self.stage} input")
            self.endpoint = bind_wildcard(self.inbox, transport, host)
        if not is_last:
            self.outbox = self.ctx.socket(zmq.PUSH)
            self.outbox.setsockopt(zmq.SNDHWM, cfg.queue_depth)
            self.outbox.setsockopt(zmq.LINGER, 2000)
            if self.guard.on:
                self.guard.client(self.outbox, self.guard.keys.worker_public)

    def close(self) -> None:
        self.handshake_watch.failure()  # reads the handshake events so far
        if not self.handshake_watch.succeeded:  # no coordinator ever answered: what is queued
            self.coord.setsockopt(zmq.LINGER, 0)  # for it has nowhere to go, so do not wait on it
        self.handshake_watch.close()
        for s in (self.outbox, self.inbox, self.coord):
            if s is not None:
                s.close()
        self.guard.close()
        self.ctx.term()
