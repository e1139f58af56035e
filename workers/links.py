"""A stage's links: the DEALER to the coordinator (control, gradients, metrics), the PULL bound on
this host for activations from the stage before, the PUSH connected to the stage after.

Everything about moving messages lives here: encoding and decoding (a malformed message is a
counted rejection, never an exception), the simulated link delay (testing), the heartbeats that
keep both ends' watches fed, and the one wait loop. Whether the coordinator is still there is
the stage's `Watch` over it to say (common/liveness.py: its pid, when on this host, and its
silence). Every wait polls the coordinator socket too, so gradients are handled while the
stage would otherwise sit idle.
"""
from __future__ import annotations

import collections
import dataclasses
import math
import os
import socket as pysocket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional

import torch
import zmq

from synthgrad.common import wire
from synthgrad.common.config import RunConfig
from synthgrad.common.devices import wire_dtype
from synthgrad.common.endpoints import bind_wildcard, max_frame_bytes, set_heartbeats
from synthgrad.common.liveness import Cause, Limit, Limits, Process, ProcessFailure, Watch
from synthgrad.common.security import Guard, HandshakeWatch, Keys, RefusalLog
from synthgrad.workers.timings import Timings

POLL_MS = 100
LIVENESS_EVERY_S = 1.0  # how often the coordinator's pid is probed, and refusals collected
COORDINATOR = "coordinator"  # the one key of a stage's watch
DEFAULT_MAX_BYTES = 256 << 20  # before START says the run's bound


class Stopped(Exception):
    """The coordinator said stop."""


@dataclass
class Handlers:
    """What the stage does with the coordinator's messages that are not about the links."""
    on_grad: Callable[[wire.Grad], None]
    on_checkpoint: Callable[[str], None]
    on_committed: Callable[[int, int], None]  # a checkpoint is complete on every stage; one to drop
    on_idle: Callable[[], None]  # called in every wait (periodic reports)


class Links:
    def __init__(self, stage: int, coordinator: str, coordinator_pid: int, keys: Optional[Keys],
                 timings: Timings):
        self.stage = stage
        self.coordinator = coordinator
        self.coordinator_pid = coordinator_pid  # watched when on the same host; -1 = not watched
        self.timings = timings
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
        self.handlers: Optional[Handlers] = None
        self.cfg: Optional[RunConfig] = None  # set by configure(): then heartbeats flow both ways
        self.in_shape: tuple[int, ...] = ()
        self.wire_dtype = torch.float32  # of activations (--precision), set by configure()
        self.num_classes = 0
        self.max_bytes = DEFAULT_MAX_BYTES
        self.delay = 0.0  # a fault (common/faults.py): simulated link latency, in seconds
        self.rejected = 0
        self.refusals = RefusalLog(lambda line: print(f"[stage {stage}] {line}", file=sys.stderr, flush=True))
        self._held: collections.deque[tuple[float, wire.Grad]] = collections.deque()
        self._pollers: dict[tuple[int, int], zmq.Poller] = {}
        self._last_liveness = self._last_to_coord = time.monotonic()
        # the coordinator: gone (its pid, when on this host) at once; silent once configured
        self.watch = Watch(created=self._last_liveness)
        pid = coordinator_pid if coordinator_pid > 0 else None
        self.watch.add(COORDINATOR, Process.of_coordinator(coordinator, pid),
                       pid_every=LIVENESS_EVERY_S if pid is not None else 0.0)

    # ------------------------------------------------------------------ set up
    def configure(self, cfg: RunConfig, in_shape: tuple[int, ...], num_classes: int, is_last: bool,
                  host: str, transport: str, handlers: Handlers, delay_s: float = 0.0) -> None:
        """After START: bind the activation input (stages > 0), make the output (all but the
        last), and take the run's bounds, shapes and heartbeat interval, and the simulated
        delay of the run's faults (0: none)."""
        self.cfg = cfg
        self.in_shape = in_shape
        self.wire_dtype = wire_dtype(cfg.precision)
        self.num_classes = num_classes
        self.handlers = handlers
        self.max_bytes = cfg.max_message_mb << 20
        if delay_s:
            self._simulate_delay(delay_s)
        timeout = cfg.heartbeat_timeout
        self.watch.limits = Limits(silence=Limit(timeout, f"--heartbeat-timeout {timeout:g}"))
        self.watch.start(time.monotonic())
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

    def _simulate_delay(self, delay_s: float) -> None:
        """A fault: stamp every gradient and activation sent with its time, and use what arrives
        `delay_s` after it was sent. Only a run with the fault wraps its sends."""
        self.delay = delay_s
        send_coord, send_down = self.send_coord, self.send_down

        def stamped_coord(msg: wire.Message) -> None:
            send_coord(dataclasses.replace(msg, sent_at=time.monotonic()) if isinstance(msg, wire.Grad) else msg)

        def stamped_down(msg: wire.Activation) -> None:
            send_down(dataclasses.replace(msg, sent_at=time.monotonic()))
        self.send_coord, self.send_down = stamped_coord, stamped_down  # type: ignore[method-assign]

    def connect_downstream(self, endpoint: str) -> None:
        if self.outbox is not None:
            self.outbox.connect(endpoint)

    def handshake_refusal(self) -> Optional[str]:
        """Why the coordinator's end refused this worker's connection (CURVE), or None."""
        return self.handshake_watch.failure()

    # ------------------------------------------------------------------ the coordinator
    def send_coord(self, msg: wire.Message) -> None:
        with self.timings.span("send"):
            self.coord.send_multipart(wire.encode(msg), copy=False)
        self._last_to_coord = time.monotonic()

    def recv_coord(self) -> Optional[wire.Message]:
        """One message from the coordinator (None for a heartbeat or a malformed message);
        anything that arrives proves the coordinator alive."""
        msg = self.decode(wire.receive(self.coord))
        self.watch.heard(COORDINATOR, time.monotonic())
        return None if isinstance(msg, wire.Heartbeat) else msg

    def poll_coord(self, timeout_ms: int) -> bool:
        return bool(self.coord.poll(timeout_ms))

    def heard_from_coordinator_now(self) -> None:
        """Restart the silence clock (after a long blocking step such as building the model)."""
        self.watch.heard(COORDINATOR, time.monotonic())

    def check_liveness(self) -> None:
        """Heartbeats both ways once the run is configured; raises ProcessFailure when the watch
        finds the coordinator gone (same host) or silent past --heartbeat-timeout."""
        now = time.monotonic()
        if self.cfg is not None and now - self._last_to_coord >= self.cfg.heartbeat_every:
            self.send_coord(wire.Heartbeat(self.stage))
        verdict = self.watch.verdict(now)
        # a message waiting to be read is word from the coordinator, however late it is read
        if verdict is not None and not (verdict.cause is Cause.SILENT and self.coord.poll(0)):
            raise ProcessFailure(verdict, by=f"stage {self.stage}")
        if now - self._last_liveness < LIVENESS_EVERY_S:
            return
        self._last_liveness = now
        before = self.refusals.count
        self.refusals.take(self.guard)  # CURVE: a peer without an authorised key
        self.rejected += self.refusals.count - before

    # ------------------------------------------------------------------ decoding
    def decode(self, frames) -> Optional[wire.Message]:
        try:
            return wire.decode(frames, max_tensor_bytes=self.max_bytes)
        except wire.WireError as exc:
            self.reject(exc)
            return None

    def reject(self, exc: Exception) -> None:
        """Count a bad message; log the first ten, then every thousandth."""
        self.rejected += 1
        if self.rejected <= 10 or self.rejected % 1000 == 0:
            print(f"[stage {self.stage}] rejected message #{self.rejected}: {exc}",
                  file=sys.stderr, flush=True)

    def handle_coord(self) -> None:
        """Handle every message the coordinator has queued, without blocking."""
        assert self.handlers is not None
        while self.coord.poll(0):
            with self.timings.span("recv"):
                msg = self.recv_coord()
            if msg is None:
                continue
            if isinstance(msg, wire.Stop):
                raise Stopped(msg.reason)
            if isinstance(msg, wire.Checkpoint):
                self.handlers.on_checkpoint(msg.reason)
                continue
            if isinstance(msg, wire.Committed):
                self.handlers.on_committed(msg.step, msg.drop)
                continue
            if isinstance(msg, wire.Grad):
                if self.delay:  # simulated latency: deliver it `delay` after it was sent
                    self._held.append((self._due(msg.sent_at), msg))
                else:
                    self.handlers.on_grad(msg)
            else:
                self.reject(ValueError(f"unexpected {type(msg).__name__} from the coordinator"))
        while self._held and self._held[0][0] <= time.monotonic():
            self.handlers.on_grad(self._held.popleft()[1])

    # ------------------------------------------------------------------ waiting
    def _poller(self, sock: Optional[zmq.Socket], event: int) -> zmq.Poller:
        """A poller for the coordinator socket plus the one thing being waited for."""
        key = (id(sock), event)
        if key not in self._pollers:
            poller = zmq.Poller()
            poller.register(self.coord, zmq.POLLIN)
            if sock is not None:
                poller.register(sock, event)
            self._pollers[key] = poller
        return self._pollers[key]

    def wait(self, activity: str, ready: Callable[[], bool], sock: Optional[zmq.Socket] = None,
             event: int = zmq.POLLIN, due: Optional[float] = None) -> None:
        """Poll until `ready()` is true, handling coordinator messages meanwhile. `sock`/`event`
        is what can make `ready()` true besides a coordinator message (wakes the poll at once)."""
        assert self.handlers is not None
        poller = self._poller(sock, event)
        while True:
            self.handle_coord()
            if ready():
                break
            self.check_liveness()
            self.handlers.on_idle()
            t0 = time.perf_counter()
            poller.poll(self._poll_ms(due))
            self.timings.add(activity, t0, time.perf_counter())

    def _poll_ms(self, due: Optional[float] = None) -> int:
        """How long a wait may sleep: POLL_MS, or less when a held message falls due sooner."""
        dues = [d for d in (due, self._held[0][0] if self._held else None) if d is not None]
        if not dues:
            return POLL_MS
        return max(0, min(POLL_MS, math.ceil(1000 * (min(dues) - time.monotonic()))))

    # ------------------------------------------------------------------ activations
    def recv_activation(self) -> wire.Activation:
        """The next well-formed activation (or marker) from the stage before; anything else
        that arrives is rejected and counted."""
        assert self.inbox is not None and self.cfg is not None
        while True:
            self.wait("wait_input", lambda: bool(self.inbox.poll(0)), self.inbox, zmq.POLLIN)
            with self.timings.span("recv"):
                msg = self.decode(wire.receive(self.inbox))
            if not isinstance(msg, wire.Activation):
                if msg is not None:
                    self.reject(ValueError(f"unexpected {type(msg).__name__} on the activation link"))
                continue
            try:
                if not msg.phase.is_marker:
                    full = msg.phase is wire.Phase.TRAIN  # training batches are always full (batch norm)
                    wire.check_tensor(msg.h, "ACTIVATION.h", self.wire_dtype, self.in_shape, self.cfg.batch_size, full)
                    label_shape = tuple(self.cfg.label_shape or ())
                    wire.check_tensor(msg.labels, "ACTIVATION.labels", torch.int64, label_shape, msg.h.shape[0])
                    if msg.labels.shape[0] != msg.h.shape[0]:
                        raise wire.WireError("ACTIVATION: labels and h differ in batch size", "ACTIVATION.labels")
                    wire.check_labels(msg.labels, self.num_classes, "ACTIVATION.labels", bool(label_shape))
                    wire.check_finite(msg.h, "ACTIVATION.h")
                elif msg.h is not None or msg.labels is not None:
                    raise wire.WireError(f"ACTIVATION: a {msg.phase.value} marker carries no tensors",
                                         "ACTIVATION.h")
            except wire.WireError as exc:
                self.reject(exc)
                continue
            if self.delay:  # simulated latency: use it `delay` after it was sent
                due = self._due(msg.sent_at)
                self.wait("wait_input", lambda: time.monotonic() >= due, due=due)
            return msg

    def _due(self, sent_at: float) -> float:
        """When a message sent at `sent_at` may be used under --link-delay-ms. A time in the
        future (a forged or foreign clock) counts as now: nothing is held longer than the delay."""
        return min(sent_at, time.monotonic()) + self.delay

    def send_down(self, msg: wire.Activation) -> None:
        assert self.outbox is not None
        with self.timings.span("send"):
            frames = wire.encode(msg)
        self.wait("wait_send", lambda: bool(self.outbox.poll(0, zmq.POLLOUT)), self.outbox, zmq.POLLOUT)
        with self.timings.span("send"):
            self.outbox.send_multipart(frames, copy=False)

    def close(self) -> None:
        self.handshake_watch.close()
        for s in (self.outbox, self.inbox, self.coord):
            if s is not None:
                s.close()
        self.guard.close()
        self.ctx.term()
