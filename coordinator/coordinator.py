"""The coordinator process: a thin shell around one ROUTER socket that every worker's DEALER
talks to. It decodes each message, checks who sent it, and hands it to the part that owns it:

- registry.py: who is who (REGISTER, READY, and what each registered stage may say);
- the gradient relay (here): true and bootstrapped gradients from stage i to stage i-1, relayed
  as the frames that arrived (no copy), and counted;
- checkpoints.py: when to checkpoint, who has saved what, the manifest;
- watchdog.py: the coordinator's liveness watch over its stages (common/liveness.py: exited,
  silent, stalled, never ready); heartbeats to the workers;
- the status stream (stream.py): reports and evaluations, to metrics.jsonl and monitors.

It ends the run cleanly when every stage reports DONE, or with ProcessFailure (a RunFailed
carrying the verdict) when a stage dies, reports an error, or the watchdog gives up; a first
Ctrl-C / SIGTERM saves a checkpoint and stops, a second stops at once.
"""
from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Optional

import zmq

from synthgrad.common import wire
from synthgrad.common.config import ConfigError, RunConfig
from synthgrad.common.endpoints import bind_wildcard, max_frame_bytes, set_heartbeats
from synthgrad.common.evaluation import eval_line, eval_record
from synthgrad.common.scores import in_bits
from synthgrad.common.placement import Placement
from synthgrad.coordinator.layout import Layout, plan_layout
from synthgrad.common.liveness import Cause, Role, Verdict, reported
from synthgrad.common.procs import Child, ProcessGroup
from synthgrad.common.records import StageSummary
from synthgrad.common.security import Guard, RefusalLog
from synthgrad.common.reports import run_summary
from synthgrad.coordinator.checkpoints import CheckpointBook, StopAfterCheckpoint
from synthgrad.coordinator.registry import Registry
from synthgrad.coordinator.status import progress_line
from synthgrad.coordinator.stream import StatusStream
from synthgrad.coordinator.watchdog import ProcessFailure, RunFailed, Watchdog

POLL_MS = 100

__all__ = ["Coordinator", "ProcessFailure", "RunFailed"]


PEER_BACKLOG = 1000  # unread messages held per connected peer (ZMQ_RCVHWM of the ROUTER)


@dataclass
class StartPlan:
    """What START tells each stage: where it is pinned and with how many threads, its helper
    models (`layout`; None: chosen from the config when the stages start) and the checkpoint it
    continues from (`resume`, the manifest; None: a new run)."""
    placement: Placement
    layout: Optional[Layout]
    resume: Optional[dict]

    @classmethod
    def of(cls, num_stages: int, layout: Optional[Layout], resume: Optional[dict]) -> "StartPlan":
        placement = layout.placement if layout is not None else Placement(
            "none", (-1,) * num_stages, 0.0, "not placed", (1,) * num_stages, (1.0 / num_stages,) * num_stages)
        return cls(placement, layout, resume)

    @property
    def resume_step(self) -> Optional[int]:
        return self.resume["step"] if self.resume else None

    def starts(self, cfg: RunConfig, run_dir: Path, total_steps: int) -> list[wire.Start]:
        """Each stage's START, in stage order."""
        helpers = (self.layout or plan_layout(cfg)[1]).helpers
        resume_step = self.resume_step if self.resume_step is not None else -1
        out = []
        for stage in range(len(cfg.stage_groups)):
            resume = self.resume["stages"][str(stage)]["path"] if self.resume else ""
            core, threads, share = self.placement.of(stage)
            out.append(wire.Start(cfg, str(run_dir), core, total_steps, helpers[stage],
                                  resume_step, resume, threads, share, self.placement.yields_at(stage)))
        return out


@dataclass
class RelayCounts:
    """The gradients relayed towards stage 0: true and bootstrapped ones delivered to each stage,
    and the bytes of every one (the summary's figures)."""
    true: list[int]
    bootstrap: list[int]
    bytes_backward: int = 0

    @classmethod
    def of(cls, num_stages: int) -> "RelayCounts":
        return cls([0] * num_stages, [0] * num_stages)

    def add(self, msg: wire.Grad, body: list) -> None:
        self.bytes_backward += sum(len(frame) for frame in body)
        (self.true if msg.true_grad else self.bootstrap)[msg.to_stage] += 1


@dataclass
class PeerFaults:
    """Messages turned away (`rejected`) and ones whose peer's connection had gone
    (`undelivered`), counted; each count says when to log, so a flood of garbage or of sends to
    a gone peer does not become a flood of log lines (the first ten, then every thousandth)."""
    rejected: int = 0
    undelivered: int = 0

    @staticmethod
    def _worth_logging(n: int) -> bool:
        return n <= 10 or n % 1000 == 0

    def reject(self) -> bool:
        self.rejected += 1
        return self._worth_logging(self.rejected)

    def undeliverable(self) -> bool:
        self.undelivered += 1
        return self._worth_logging(self.undelivered)


@dataclass
class RunClock:
    """The run's clock beyond the watchdog's: where a resumed run's curves continue from
    (`offset`, its wall_s), when training ended, and when progress was last logged."""
    offset: float = 0.0
    ended: Optional[float] = None
    last_progress: float = field(default_factory=time.monotonic)


@dataclass
class Owned:
    """What this coordinator made itself, and so must close: the ZeroMQ context (no Guard
    given) and the status stream (none given)."""
    ctx: bool
    stream: bool


class Coordinator:
    def __init__(self, cfg: RunConfig, run_dir: Path, *, total_steps: int,
                 log: Callable[[str], None] = print, bind: Optional[str] = None,
                 stream: Optional[StatusStream] = None, guard: Optional[Guard] = None,
                 resume: Optional[dict] = None, layout: Optional[Layout] = None):
        """`layout` (coordinator/layout.py): where each stage is pinned and with how many threads
        (None: not pinned, one thread; workers on other hosts place themselves), and each
        stage's helper models, which START carries (None: chosen from the config the same way). `stream` receives the workers' reports (train.py passes the run's); without one the
        coordinator makes and closes its own. `guard` makes the ROUTER a CURVE server (its
        context is used); without one the links are plain and the context is the coordinator's."""
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.log = log
        self.num_stages = len(cfg.stage_groups)
        self.plan = StartPlan.of(self.num_stages, layout, resume)
        self.total_steps = total_steps
        self.clock = RunClock(resume["wall_s"] if resume else 0.0)  # curves continue the old run's
        self.owned = Owned(ctx=guard is None, stream=stream is None)
        self.guard = guard or Guard(zmq.Context())
        self.sock = self._listen(bind)
        self.stream = stream or StatusStream(cfg, self.run_dir, num_stages=self.num_stages,
                                             total_steps=total_steps, guard=self.guard)
        self.registry = Registry(self.num_stages)
        self.watchdog = Watchdog(cfg, time.monotonic(), self.num_stages)
        self.checkpoints = CheckpointBook(cfg, self.run_dir, self.num_stages, log, self._wall,
                                          committed=self._committed)
        self.done: dict[int, StageSummary] = {}
        self.relay = RelayCounts.of(self.num_stages)
        self.faults = PeerFaults()
        self.refusals = RefusalLog(lambda line: log(f"[coordinator] {line}"))  # CURVE turned them away
        self.stopping = StopAfterCheckpoint(self.checkpoints, 3 * cfg.heartbeat_timeout, log)

    def _listen(self, bind: Optional[str]) -> zmq.Socket:
        cfg = self.cfg
        sock = self.guard.ctx.socket(zmq.ROUTER)
        self.guard.server(sock, "coordinator")
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # an unroutable message is an error, not a drop
        sock.setsockopt(zmq.SNDHWM, 0)
        # at most this many unread messages per peer: past it libzmq stops reading that peer's
        # connection (backpressure, nothing dropped; a worker's own send queue takes the rest),
        # so a flooding peer cannot grow this process without bound. The loop drains every
        # peer continuously: a working stage never gets near it.
        sock.setsockopt(zmq.RCVHWM, PEER_BACKLOG)
        sock.setsockopt(zmq.LINGER, 0)
        set_heartbeats(sock, cfg.heartbeat_timeout)
        sock.setsockopt(zmq.MAXMSGSIZE, max_frame_bytes(cfg))  # libzmq drops bigger frames
        if bind is None:
            self.endpoint = bind_wildcard(sock, cfg.transport, cfg.host)
            return sock
        try:
            sock.bind(bind)
        except zmq.ZMQError as exc:
            sock.close(0)
            if self.owned.ctx:
                self.guard.close()
                self.guard.ctx.term()
            raise ConfigError(f"the coordinator cannot listen on {bind}: {exc} (bind an "
                              f"address of this host; port 0 picks a free port)") from None
        self.endpoint = sock.getsockopt(zmq.LAST_ENDPOINT).decode()
        return sock

    @property
    def started(self) -> Optional[float]:
        return self.watchdog.started

    # ------------------------------------------------------------------ sending
    def _deliver(self, identity: bytes, frames: list, what: str) -> bool:
        """The one way anything leaves the coordinator's socket. With ROUTER_MANDATORY a send to a
        peer whose connection has gone raises EHOSTUNREACH. That is news about the peer, never a
        reason to end the run: it is counted and logged here, and whether the stage is lost is
        for the watchdog to say (a local stage that exited, a silent one).
        Returns whether the message was handed to the peer's connection."""
        try:
            self.sock.send_multipart([identity, *frames], copy=False)
            return True
        except zmq.ZMQError as exc:
            if exc.errno not in (zmq.EHOSTUNREACH, zmq.EAGAIN):
                raise  # not about a peer: a fault of this process
            if self.faults.undeliverable():
                stage = self.registry.stage_of.get(identity)
                to = f"stage {stage}" if stage is not None else f"peer {identity[:40]!r}"
                self.log(f"[coordinator] could not deliver {what} to {to} (its connection is gone: "
                         f"{exc.strerror}); undelivered #{self.faults.undelivered}")
            return False

    def _send(self, stage: int, msg: wire.Message) -> bool:
        return self._deliver(self.registry.identities[stage], wire.encode(msg), type(msg).__name__)

    def stop_all(self, reason: str) -> None:
        for stage in list(self.registry.identities):
            self._send(stage, wire.Stop(reason))

    # ------------------------------------------------------------------ handling
    def _handle(self, frames: list) -> None:
        identity, body = frames[0].bytes, frames[1:]
        try:
            msg = wire.decode(body, max_tensor_bytes=self.cfg.max_message_mb << 20, align=False)  # relayed as is
        except wire.WireError as exc:
            self._reject(identity, str(exc))
            return
        now = time.monotonic()
        problem = self.registry.sender_problem(msg, identity)
        if problem is not None:  # decoded fine, but not from who may send it
            self._reject(identity, problem)
            return
        sender = self.registry.stage_of.get(identity)
        if sender is not None:
            self.watchdog.heard(sender, now)
        if isinstance(msg, wire.Heartbeat):
            return
        if isinstance(msg, wire.Register):
            self._on_register(identity, msg)
        elif isinstance(msg, wire.Grad):
            self._relay(msg, body)
        elif isinstance(msg, wire.Metrics):
            self.watchdog.advanced(now, msg.record.step)
            self.stream.worker({"event": "worker", "wall_s": self._wall(), **asdict(msg.record), "stage": msg.stage})
        elif isinstance(msg, wire.EvalResult):
            rec = eval_record(msg.epoch, msg.step, self._wall(), msg.loss, msg.accuracy, msg.samples,
                              in_bits(self.cfg.per_position, self.cfg.loss))
            self.stream.eval(rec)
            self.watchdog.advanced(now)
            self.log(eval_line(rec))
        elif isinstance(msg, wire.Ready):
            self.watchdog.ready(msg.stage)
            if self.registry.set_ready(msg.stage, msg.endpoint):
                self._begin()
        elif isinstance(msg, wire.Saved):
            self.checkpoints.on_saved(msg)
        elif isinstance(msg, wire.Done):
            self.watchdog.finished(msg.stage, now)
            self.done[msg.stage] = msg.summary
        elif isinstance(msg, wire.Error):
            raise ProcessFailure(self._stage_verdict(msg))
        else:
            self._reject(identity, f"unexpected {type(msg).__name__}")

    def _stage_verdict(self, msg: wire.Error) -> Verdict:
        """The verdict a stage sent, said of whom the coordinator knows (a stage speaks for itself
        and its replicas only): the exit of one of its replicas, on its host; anything else, the
        stage's own failure in its words, with what it ran into."""
        stage = self.watchdog.process(msg.stage)
        last = self.checkpoints.last_complete
        hint = "" if last is None else f"the last complete checkpoint is step {last}: --resume {self.run_dir}"
        sent, who = msg.verdict, msg.verdict.process
        if sent.cause in (Cause.EXITED, Cause.KILLED) and who is not None and who.role is Role.REPLICA \
                and who.stage == msg.stage:
            return Verdict((replace(who, host=stage.host),), sent.cause, sent.code, detail=sent.detail, hint=hint)
        return reported(stage, sent.detail or sent.cause.value, hint, sent.fault)

    def _on_register(self, identity: bytes, msg: wire.Register) -> None:
        problem = self.registry.register(identity, msg, started=self.started is not None)
        if problem is not None:  # turn the newcomer away; the run goes on
            self.faults.reject()
            self.log(f"[coordinator] refused stage {msg.stage} (pid {msg.pid} on {msg.host}): {problem}")
            self._deliver(identity, wire.encode(wire.Stop(f"refused: {problem}")), "a refusal")
            return
        self.watchdog.identify(msg.stage, msg.pid, msg.host)
        self.watchdog.heard(msg.stage, time.monotonic())
        self.log(f"[coordinator] stage {msg.stage} registered: pid {msg.pid} on {msg.host} "
                 f"({len(self.registry.registered)}/{self.num_stages})")
        if self.registry.complete:
            self._start_all()

    def _start_all(self) -> None:
        for stage, start in enumerate(self.plan.starts(self.cfg, self.run_dir, self.total_steps)):
            self._send(stage, start)

    def _begin(self) -> None:
        """Every stage is ready: tell each its downstream neighbour, and training begins."""
        for stage in range(self.num_stages):
            self._send(stage, wire.Begin(self.registry.downstream(stage)))
        now = time.monotonic()
        self.watchdog.start(now)
        self.checkpoints.started()
        self.log(f"all {self.num_stages} stages ready after {now - self.watchdog.created:.1f}s; "
                 f"training {self.total_steps} steps")
        self.log("stage inputs: " + "  ".join(f"{s}={self.registry.ready[s]}" for s in range(1, self.num_stages)))

    def _reject(self, identity: bytes, why: str) -> None:
        """Count a bad message and log it (the first ten, then every thousandth): a flood of
        garbage must not become a flood of log lines."""
        if self.faults.reject():
            self.log(f"[coordinator] rejected message #{self.faults.rejected} from {identity[:40]!r}: {why}")

    def _relay(self, msg: wire.Grad, body: list) -> None:
        identities = self.registry.identities
        if msg.to_stage not in identities:
            self._reject(identities.get(msg.to_stage + 1, b"?"), f"gradient for unknown stage {msg.to_stage}")
            return
        if not self._deliver(identities[msg.to_stage], body, f"the gradient of step {msg.step}"):
            return  # a stage that is gone: the watchdog says so
        self.relay.add(msg, body)

    # ------------------------------------------------------------------ the loop
    def _wall(self) -> float:
        return self.clock.offset + time.monotonic() - (self.started or self.watchdog.created)

    def adopt(self, stage: int, child: Child) -> None:
        """`child` is stage `stage`, started on this host: the watchdog reads its exit status."""
        self.watchdog.adopt(stage, child.process, child.process.pid, when="during the run")

    def _check(self) -> None:
        self.refusals.take(self.guard)  # CURVE: peers without an authorised key
        verdict = self.watchdog.verdict(time.monotonic())
        if verdict is None:
            return
        if verdict.cause in (Cause.EXITED, Cause.KILLED):
            self._drain()  # an ERROR it sent before dying explains more than its exit code
        raise ProcessFailure(verdict)

    def _heartbeat(self) -> None:
        """Tell every registered worker, about every heartbeat_every, that the coordinator lives."""
        if not self.watchdog.heartbeat_due(time.monotonic()):
            return
        for stage in list(self.registry.identities):
            self._send(stage, wire.Heartbeat(-1))  # one that cannot be reached falls silent too

    def _drain(self) -> None:
        while self.sock.poll(50):
            self._handle(wire.receive(self.sock, envelope=1))

    def _progress(self) -> None:
        now = time.monotonic()
        if now - self.clock.last_progress < self.cfg.progress_every or \
                self.num_stages - 1 not in self.stream.latest:  # nothing to say before the last stage reports
            return
        self.clock.last_progress = now
        self.log(progress_line(self.stream.latest, self.num_stages, self.total_steps, self.cfg.batch_size))

    def _status(self, done: bool = False) -> None:
        """About once a second once training runs: the status record, to every consumer."""
        if self.started is not None or done:
            self.stream.tick(self._wall(), done=done)

    # ------------------------------------------------------------------ checkpoints and stopping
    def _committed(self, step: int, drop: int) -> None:
        """Every stage may now delete its checkpoint files older than `step`, and that of `drop`."""
        for stage in list(self.registry.identities):
            self._send(stage, wire.Committed(step, drop))

    def request_checkpoint(self, reason: str) -> None:
        if 0 in self.registry.identities and 0 not in self.done:
            self.checkpoints.ask(lambda msg: self._send(0, msg), reason)

    def _on_interrupt(self, signum, frame) -> None:
        """First Ctrl-C / SIGTERM: checkpoint, then stop (the loop sees the flag). Second: now."""
        if self.stopping.signal:
            raise KeyboardInterrupt
        self.stopping.arm(signal.Signals(signum).name)

    def serve(self, group: Optional[ProcessGroup] = None) -> dict:
        """Run until every stage is done; return the summary. Raises ProcessFailure, or
        KeyboardInterrupt after Ctrl-C / SIGTERM (once a checkpoint is written). `group`: the
        stages started here (each adopted, `adopt`), waited for at the end."""
        handlers = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                handlers[sig] = signal.signal(sig, self._on_interrupt)
        try:
            while len(self.done) < self.num_stages:
                if self.sock.poll(POLL_MS):
                    while True:
                        self._handle(wire.receive(self.sock, envelope=1))
                        if not self.sock.poll(0):
                            break
                self._check()
                self._heartbeat()
                if self.started is not None and self.checkpoints.due():
                    self.request_checkpoint(f"every {self.cfg.checkpoint_every:g}s")
                if self.stopping.signal and self.stopping.should_stop(
                        lambda: self.request_checkpoint("interrupted"),
                        nothing_to_save=self.started is None or 0 in self.done):
                    raise KeyboardInterrupt  # the launcher exits 130
                self._progress()
                self._status()
            self.clock.ended = time.monotonic()
            try:
                self.checkpoints.write_manifest(
                    max(d.last_step for d in self.done.values()),
                    {s: {"path": d.checkpoint, "host": d.host} for s, d in self.done.items()}, final=True)
            except OSError as exc:
                self.log(f"[coordinator] cannot write the final manifest: {exc}")
            self._status(done=True)
            self.stop_all("run complete")
            if group is not None and not group.wait(15.0):
                self.log("[coordinator] some workers did not exit after STOP; terminating them")
            return self.summary()
        finally:
            for sig, old in handlers.items():
                signal.signal(sig, old)
            if self.owned.stream:
                self.stream.close()

    def summary(self) -> dict:
        done = [self.done[s] for s in sorted(self.done)]
        last = self.done.get(self.num_stages - 1)
        steps, samples = (last.steps, last.samples) if last is not None else (0, 0)
        created = self.watchdog.created
        started = self.started or created
        return run_summary(
            self.cfg.mode, steps=steps, samples=samples,
            wall_clock_s=(self.clock.ended or time.monotonic()) - started, startup_s=started - created,
            evals=self.stream.evals, workers=[asdict(d) for d in done],
            true_gradient_steps=steps if self.num_stages == 1 else self.relay.true[0],
            num_stages=self.num_stages,
            rejected_messages=self.faults.rejected + sum(d.rejected_messages for d in done),
            undelivered_messages=self.faults.undelivered,
            true_gradients_relayed=self.relay.true,
            bootstrap_gradients_relayed=self.relay.bootstrap,
            bytes_backward_per_step=self.relay.bytes_backward / max(steps, 1),
            refused_connections=self.refusals.count,
            checkpoints=self.checkpoints.taken,
            checkpoint_failures=self.checkpoints.failures,
            resumed_from_step=self.plan.resume_step,
            secure=self.guard.on,
            coordinator_pid=os.getpid(),
            endpoint=self.endpoint,
        )

    def close(self) -> None:
        if hasattr(self, "stream") and self.owned.stream:
            self.stream.close()
        self.sock.close(0)
        if self.owned.ctx:
            self.guard.close()
            self.guard.ctx.term()
