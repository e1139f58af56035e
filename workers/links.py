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
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Optional

import torch
import zmq

from synthgrad.common import wire
from synthgrad.common.config import RunConfig
from synthgrad.common.devices import wire_dtype
from synthgrad.common.liveness import Cause, Limit, Limits, Process, ProcessFailure, Watch
from synthgrad.common.security import Guard, Keys, RefusalLog
from synthgrad.workers.sockets import Sockets
from synthgrad.workers.timings import Timings

POLL_MS = 100
LIVENESS_EVERY_S = 1.0  # how often the coordinator's pid is probed, and refusals collected
COORDINATOR = "coordinator"  # the one key of a stage's watch
DEFAULT_MAX_BYTES = 256 << 20  # before START says the run's bound


class Stopped(Exception):
    """The coordinator said stop."""


class Refused(RuntimeError):
    """The coordinator turned this worker away (its key or CURVE setting, a wrong stage number,
    a stage already taken)."""


@dataclass
class Handlers:
    """What the stage does with the coordinator's messages that are not about the links."""
    on_grad: Callable[[wire.Grad], None]
    on_checkpoint: Callable[[str], None]
    on_committed: Callable[[int, int], None]  # a checkpoint is complete on every stage; one to drop
    on_idle: Callable[[], None]  # called in every wait (periodic reports)


class Rejections:
    """The bad messages this stage rejected and the peers its sockets refused (CURVE), counted
    together (`rejected_messages`) and logged at a bounded rate: a flood of garbage must not
    become a flood of lines."""

    def __init__(self, stage: int):
        self.stage = stage
        self.count = 0
        self.refusals = RefusalLog(lambda line: print(f"[stage {stage}] {line}", file=sys.stderr, flush=True))

    def reject(self, exc: Exception) -> None:
        """Count a bad message; log the first ten, then every thousandth."""
        self.count += 1
        if self.count <= 10 or self.count % 1000 == 0:
            print(f"[stage {self.stage}] rejected message #{self.count}: {exc}", file=sys.stderr, flush=True)

    def take_refusals(self, guard: Guard) -> None:
        before = self.refusals.count
        self.refusals.take(guard)
        self.count += self.refusals.count - before


class Delay:
    """A fault of the run's plan (common/faults.py): simulated link latency. A message is used
    `seconds` after it was sent; a gradient waits in `held` until then. 0: no delay."""

    def __init__(self, seconds: float = 0.0):
        self.seconds = seconds
        self.held: collections.deque[tuple[float, wire.Grad]] = collections.deque()

    def due(self, sent_at: float) -> float:
        """When a message sent at `sent_at` may be used. A time in the future (a forged or
        foreign clock) counts as now: nothing is held longer than the delay."""
        return min(sent_at, time.monotonic()) + self.seconds

    def hold(self, msg: wire.Grad) -> None:
        self.held.append((self.due(msg.sent_at), msg))

    def released(self) -> Iterator[wire.Grad]:
        """The held gradients now due, in the order they came."""
        while self.held and self.held[0][0] <= time.monotonic():
            yield self.held.popleft()[1]

    def next_due(self) -> Optional[float]:
        return self.held[0][0] if self.held else None


@dataclass
class Terms:
    """What the links agreed on at START, which every received message is checked against."""
    cfg: Optional[RunConfig] = None  # None until configured: then heartbeats flow both ways
    in_shape: tuple[int, ...] = ()
    wire_dtype: torch.dtype = torch.float32  # of activations (--precision)
    num_classes: int = 0
    max_bytes: int = DEFAULT_MAX_BYTES


class CoordinatorWatch:
    """Whether the coordinator is still there, and this stage's heartbeats to it: the stage's
    `Watch` (common/liveness.py) sees the coordinator gone (its pid, when on this host) at once,
    and silent once configured."""

    def __init__(self, coordinator: str, coordinator_pid: int):
        now = time.monotonic()
        self.last_probe = self.last_sent = now
        self.watch = Watch(created=now)
        pid = coordinator_pid if coordinator_pid > 0 else None  # -1: not watched
        self.watch.add(COORDINATOR, Process.of_coordinator(coordinator, pid),
                       pid_every=LIVENESS_EVERY_S if pid is not None else 0.0)

    def configure(self, heartbeat_timeout: float) -> None:
        self.watch.limits = Limits(silence=Limit(heartbeat_timeout, f"--heartbeat-timeout {heartbeat_timeout:g}"))
        self.watch.start(time.monotonic())

    def heard(self) -> None:
        self.watch.heard(COORDINATOR, time.monotonic())

    def sent(self) -> None:
        self.last_sent = time.monotonic()

    def probe_due(self, now: float) -> bool:
        """Whether the pid and the refusals are due a look (at most every LIVENESS_EVERY_S)."""
        if now - self.last_probe < LIVENESS_EVERY_S:
            return False
        self.last_probe = now
        return True


class Links:
    """The stage's end of every link: its sockets, what they agreed on, the rejections, the
    simulated delay and the watch over the coordinator, each a part with one job; this class
    moves the messages and runs the one wait loop."""

    def __init__(self, stage: int, coordinator: str, coordinator_pid: int, keys: Optional[Keys],
                 timings: Timings):
        self.stage = stage
        self.timings = timings
        self.sockets = Sockets(stage, coordinator, keys)
        self.terms = Terms()
        self.rejections = Rejections(stage)
        self.delay = Delay()
        self.alive = CoordinatorWatch(coordinator, coordinator_pid)
        self.handlers: Optional[Handlers] = None
        self._pollers: dict[tuple[int, int], zmq.Poller] = {}

    @property
    def endpoint(self) -> str:
        return self.sockets.endpoint

    @property
    def rejected(self) -> int:
        return self.rejections.count

    # ------------------------------------------------------------------ set up
    def configure(self, cfg: RunConfig, in_shape: tuple[int, ...], num_classes: int, is_last: bool,
                  host: str, transport: str, handlers: Handlers, delay_s: float = 0.0) -> None:
        """After START: bind the activation input (stages > 0), make the output (all but the
        last), and take the run's bounds, shapes and heartbeat interval, and the simulated
        delay of the run's faults (0: none)."""
        self.terms = Terms(cfg, in_shape, wire_dtype(cfg.precision), num_classes, cfg.max_message_mb << 20)
        self.handlers = handlers
        if delay_s:
            self._simulate_delay(delay_s)
        self.alive.configure(cfg.heartbeat_timeout)
        self.sockets.open(cfg, is_last, host, transport)

    def _simulate_delay(self, delay_s: float) -> None:
        """A fault: stamp every gradient and activation sent with its time, and use what arrives
        `delay_s` after it was sent. Only a run with the fault wraps its sends."""
        self.delay = Delay(delay_s)
        send_coord, send_down = self.send_coord, self.send_down

        def stamped_coord(msg: wire.Message) -> None:
            send_coord(dataclasses.replace(msg, sent_at=time.monotonic()) if isinstance(msg, wire.Grad) else msg)

        def stamped_down(msg: wire.Activation) -> None:
            send_down(dataclasses.replace(msg, sent_at=time.monotonic()))
        self.send_coord, self.send_down = stamped_coord, stamped_down  # type: ignore[method-assign]

    def connect_downstream(self, endpoint: str) -> None:
        if self.sockets.outbox is not None:
            self.sockets.outbox.connect(endpoint)

    def handshake_refusal(self) -> Optional[str]:
        """Why the coordinator's end refused this worker's connection (CURVE), or None."""
        return self.sockets.handshake_watch.failure()

    # ------------------------------------------------------------------ the coordinator
    def try_send_coord(self, msg: wire.Message) -> bool:
        """Queue a message for the coordinator without waiting; False when it cannot be queued
        now. A connection whose handshake failed has no pipe to queue into, and a plain send
        would wait for one forever."""
        try:
            with self.timings.span("send"):
                self.sockets.coord.send_multipart(wire.encode(msg), flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return False
        self.alive.sent()
        return True

    def send_coord(self, msg: wire.Message) -> None:
        """Queue a message for the coordinator; while it cannot be queued, wait for the socket,
        raising Refused when the coordinator turned this worker's handshake away and
        ProcessFailure when the watch finds the coordinator gone or silent."""
        while not self.try_send_coord(msg):
            why = self.handshake_refusal()
            if why is not None:
                raise Refused(f"stage {self.stage}: the coordinator turned this worker away: {why}")
            verdict = self.alive.watch.verdict(time.monotonic())
            if verdict is not None:
                raise ProcessFailure(verdict, by=f"stage {self.stage}")
            self.sockets.coord.poll(POLL_MS, zmq.POLLOUT)

    def recv_coord(self) -> Optional[wire.Message]:
        """One message from the coordinator (None for a heartbeat or a malformed message);
        anything that arrives proves the coordinator alive."""
        msg = self.decode(wire.receive(self.sockets.coord))
        self.alive.heard()
        return None if isinstance(msg, wire.Heartbeat) else msg

    def poll_coord(self, timeout_ms: int) -> bool:
        return bool(self.sockets.coord.poll(timeout_ms))

    def heard_from_coordinator_now(self) -> None:
        """Restart the silence clock (after a long blocking step such as building the model)."""
        self.alive.heard()

    def beat(self) -> None:
        """This stage's heartbeat to the coordinator, when one is due (once configured)."""
        cfg = self.terms.cfg
        if cfg is not None and time.monotonic() - self.alive.last_sent >= cfg.heartbeat_every:
            self.send_coord(wire.Heartbeat(self.stage))

    def check_liveness(self) -> None:
        """Heartbeats both ways once the run is configured; raises ProcessFailure when the watch
        finds the coordinator gone (same host) or silent past --heartbeat-timeout."""
        self.beat()
        now = time.monotonic()
        verdict = self.alive.watch.verdict(now)
        # a message waiting to be read is word from the coordinator, however late it is read
        if verdict is not None and not (verdict.cause is Cause.SILENT and self.sockets.coord.poll(0)):
            raise ProcessFailure(verdict, by=f"stage {self.stage}")
        if self.alive.probe_due(now):
            self.rejections.take_refusals(self.sockets.guard)  # CURVE: a peer without an authorised key

    # ------------------------------------------------------------------ decoding
    def decode(self, frames) -> Optional[wire.Message]:
        try:
            return wire.decode(frames, max_tensor_bytes=self.terms.max_bytes)
        except wire.WireError as exc:
            self.reject(exc)
            return None

    def reject(self, exc: Exception) -> None:
        self.rejections.reject(exc)

    def handle_coord(self) -> None:
        """Handle every message the coordinator has queued, without blocking."""
        assert self.handlers is not None
        while self.sockets.coord.poll(0):
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
                if self.delay.seconds:  # simulated latency: deliver it `delay` after it was sent
                    self.delay.hold(msg)
                else:
                    self.handlers.on_grad(msg)
            else:
                self.reject(ValueError(f"unexpected {type(msg).__name__} from the coordinator"))
        for grad in self.delay.released():
            self.handlers.on_grad(grad)

    # ------------------------------------------------------------------ waiting
    def _poller(self, sock: Optional[zmq.Socket], event: int) -> zmq.Poller:
        """A poller for the coordinator socket plus the one thing being waited for."""
        key = (id(sock), event)
        if key not in self._pollers:
            poller = zmq.Poller()
            poller.register(self.sockets.coord, zmq.POLLIN)
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
            # before `ready`: a stage working through a backlog (a heavy stage's evaluation
            # batches, all queued) finds its input ready every time, and must still beat
            self.beat()
            if ready():
                break
            self.check_liveness()
            self.handlers.on_idle()
            t0 = time.perf_counter()
            poller.poll(self._poll_ms(due))
            self.timings.add(activity, t0, time.perf_counter())

    def _poll_ms(self, due: Optional[float] = None) -> int:
        """How long a wait may sleep: POLL_MS, or less when a held message falls due sooner."""
        dues = [d for d in (due, self.delay.next_due()) if d is not None]
        if not dues:
            return POLL_MS
        return max(0, min(POLL_MS, math.ceil(1000 * (min(dues) - time.monotonic()))))

    # ------------------------------------------------------------------ activations
    def recv_activation(self) -> wire.Activation:
        """The next well-formed activation (or marker) from the stage before; anything else
        that arrives is rejected and counted."""
        inbox, terms, cfg = self.sockets.inbox, self.terms, self.terms.cfg
        assert inbox is not None and cfg is not None
        while True:
            self.wait("wait_input", lambda: bool(inbox.poll(0)), inbox, zmq.POLLIN)
            with self.timings.span("recv"):
                msg = self.decode(wire.receive(inbox))
            if not isinstance(msg, wire.Activation):
                if msg is not None:
                    self.reject(ValueError(f"unexpected {type(msg).__name__} on the activation link"))
                continue
            try:
                if not msg.phase.is_marker:
                    full = msg.phase is wire.Phase.TRAIN  # training batches are always full (batch norm)
                    wire.check_tensor(msg.h, "ACTIVATION.h", terms.wire_dtype, terms.in_shape, cfg.batch_size, full)
                    label_shape = tuple(cfg.label_shape or ())
                    wire.check_tensor(msg.labels, "ACTIVATION.labels", torch.int64, label_shape, msg.h.shape[0])
                    if msg.labels.shape[0] != msg.h.shape[0]:
                        raise wire.WireError("ACTIVATION: labels and h differ in batch size", "ACTIVATION.labels")
                    wire.check_labels(msg.labels, terms.num_classes, "ACTIVATION.labels", bool(label_shape))
                    wire.check_finite(msg.h, "ACTIVATION.h")
                elif msg.h is not None or msg.labels is not None:
                    raise wire.WireError(f"ACTIVATION: a {msg.phase.value} marker carries no tensors",
                                         "ACTIVATION.h")
            except wire.WireError as exc:
                self.reject(exc)
                continue
            if self.delay.seconds:  # simulated latency: use it `delay` after it was sent
                due = self.delay.due(msg.sent_at)
                self.wait("wait_input", lambda: time.monotonic() >= due, due=due)
            return msg

    def send_down(self, msg: wire.Activation) -> None:
        outbox = self.sockets.outbox
        assert outbox is not None
        with self.timings.span("send"):
            frames = wire.encode(msg)
        self.wait("wait_send", lambda: bool(outbox.poll(0, zmq.POLLOUT)), outbox, zmq.POLLOUT)
        with self.timings.span("send"):
            outbox.send_multipart(frames, copy=False)

    def close(self) -> None:
        self.sockets.close()
