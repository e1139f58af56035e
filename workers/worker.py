"""The layer-worker process: the ZeroMQ shell around one stage's StageLogic.

Sockets: a DEALER to the coordinator (control, gradients, metrics), a PULL bound on this host for
activations from the stage before, a PUSH connected to the stage after. Activations flow
stage to stage directly; gradients go through the coordinator, which relays (and counts) them.
Every wait polls the coordinator socket too, so gradients are handled while the worker would
otherwise sit idle, and checks that the coordinator is still alive.
"""
from __future__ import annotations

import collections
import dataclasses
import math
import os
import signal
import socket as pysocket
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import psutil
import torch
import zmq
from torch import nn

from common import wire
from common.config import RunConfig
from common.data import (
    eval_batches,
    load_dataset,
    steps_per_epoch,
    total_steps,
    train_batches,
)
from common.endpoints import bind_wildcard, max_frame_bytes, set_heartbeats
from common.files import atomic_torch_save, atomic_write_json
from common.security import Guard, HandshakeWatch, Keys
from common.models import build_units, stage_bounds, stage_io_shapes
from common.procs import alive, die_with_parent, pin_to_core
from workers.stage import StageLogic, snapshot_steps
from workers.timings import MESSAGING, Timings

POLL_MS = 100
LIVENESS_EVERY_S = 1.0


@dataclass(frozen=True)
class WorkerSpec:
    stage: int
    coordinator: str  # the coordinator's ROUTER endpoint
    coordinator_pid: int = -1  # watched when on the same host; -1 = not watched
    transport: str = "ipc"
    host: str = "127.0.0.1"  # address this worker binds its activation input on (tcp)
    run_dir: str = ""  # where to write checkpoints and traces; "" = the coordinator's folder
    core: Optional[int] = None  # pin here; None = the core the coordinator assigns (same host)
    connect_timeout: float = 600.0  # give up when no START arrives within this many seconds
    keys: Optional[str] = None  # keys folder: CURVE on every link of this worker; None = plain


class Stopped(Exception):
    """The coordinator said stop."""


class CoordinatorGone(RuntimeError):
    pass


class Refused(RuntimeError):
    """The coordinator turned this worker away (wrong stage number, stage already taken)."""


class LayerWorker:
    def __init__(self, spec: WorkerSpec):
        self.spec = spec
        self.stage = spec.stage
        self.ctx = zmq.Context()
        self.guard = Guard(self.ctx, Keys.load(spec.keys, "worker") if spec.keys else None)
        self.coord = self.ctx.socket(zmq.DEALER)
        if self.guard.on:
            self.guard.client(self.coord, self.guard.keys.coordinator_public)
        # unique per process, so the coordinator can refuse a second stage-I instead of libzmq
        # silently dropping the connection of a duplicate identity
        self.coord.setsockopt(zmq.IDENTITY, f"stage-{spec.stage}-{pysocket.gethostname()}-{os.getpid()}".encode())
        self.coord.setsockopt(zmq.SNDHWM, 0)  # control traffic is bounded by the forward stream
        self.coord.setsockopt(zmq.RCVHWM, 0)
        self.coord.setsockopt(zmq.LINGER, 2000)  # the last word (ERROR, DONE) must arrive
        set_heartbeats(self.coord, RunConfig.heartbeat_timeout)  # before the config arrives
        self.handshake_watch = HandshakeWatch(self.coord)
        self.coord.connect(spec.coordinator)
        self.inbox: Optional[zmq.Socket] = None
        self.outbox: Optional[zmq.Socket] = None
        self.endpoint = ""
        self._pollers: dict[tuple[int, int], zmq.Poller] = {}
        self.timings = Timings()
        self.rejected = 0
        self.proc = psutil.Process()
        self.proc.cpu_percent(None)
        self._last_liveness = time.monotonic()
        self._last_report = time.monotonic()
        self._samples_since_report = 0
        self.samples = 0
        self.steps = 0
        self.last_step = -1
        self.max_outstanding = 0  # most steps held at once awaiting their gradient (staleness)
        self.delay = 0.0  # --link-delay-ms, in seconds (testing: simulated link latency)
        self._held: collections.deque[tuple[float, wire.Grad]] = collections.deque()
        self._last_from_coord = self._last_to_coord = time.monotonic()
        self._checkpoint_asked: Optional[str] = None
        self._saved_paths: list[Path] = []

    # ------------------------------------------------------------------ sockets
    def send_coord(self, msg: wire.Message) -> None:
        if self.delay and isinstance(msg, wire.Grad):
            msg = dataclasses.replace(msg, sent_at=time.monotonic())
        with self.timings.span("send"):
            self.coord.send_multipart(wire.encode(msg), copy=False)
        self._last_to_coord = time.monotonic()

    def _recv_coord(self) -> Optional[wire.Message]:
        """One message from the coordinator (None for a heartbeat or a malformed message);
        anything that arrives proves the coordinator alive."""
        msg = self._decode(self.coord.recv_multipart(copy=False))
        self._last_from_coord = time.monotonic()
        return None if isinstance(msg, wire.Heartbeat) else msg

    def _check_liveness(self) -> None:
        now = time.monotonic()
        cfg = getattr(self, "cfg", None)
        if cfg is not None:  # after START: heartbeats both ways
            if now - self._last_to_coord >= cfg.heartbeat_every:
                self.send_coord(wire.Heartbeat(self.stage))
            if now - self._last_from_coord > cfg.heartbeat_timeout and not self.coord.poll(0):
                raise CoordinatorGone(
                    f"stage {self.stage}: no word from the coordinator at {self.spec.coordinator} for "
                    f"{now - self._last_from_coord:.1f}s (dead, hung or unreachable; "
                    f"--heartbeat-timeout {cfg.heartbeat_timeout:g}); exiting")
        if now - self._last_liveness < LIVENESS_EVERY_S:
            return
        self._last_liveness = now
        for refusal in self.guard.take_refusals():  # CURVE: a peer without an authorised key
            self.rejected += 1
            print(f"[stage {self.stage}] refused {refusal}", file=sys.stderr, flush=True)
        if self.spec.coordinator_pid > 0 and not alive(self.spec.coordinator_pid):
            raise CoordinatorGone(f"stage {self.stage}: coordinator (pid "
                                  f"{self.spec.coordinator_pid}) is gone; exiting")

    def _reject(self, exc: Exception) -> None:
        self.rejected += 1
        if self.rejected <= 10 or self.rejected % 1000 == 0:
            print(f"[stage {self.stage}] rejected message #{self.rejected}: {exc}",
                  file=sys.stderr, flush=True)

    # ------------------------------------------------------------------ handshake
    def handshake(self) -> wire.Start:
        self.send_coord(wire.Register(self.stage, os.getpid(), pysocket.gethostname()))
        deadline = time.monotonic() + self.spec.connect_timeout
        while time.monotonic() < deadline:
            self._check_liveness()
            why = self.handshake_watch.failure()
            if why is not None:
                raise Refused(f"stage {self.stage}: the coordinator at {self.spec.coordinator} "
                              f"turned this worker away: {why}")
            if self.coord.poll(POLL_MS):
                msg = self._recv_coord()
                if isinstance(msg, wire.Start):
                    return msg
                if isinstance(msg, wire.Stop):
                    raise Refused(f"stage {self.stage}: the coordinator stopped this worker before "
                                  f"the run began: {msg.reason}")
        raise TimeoutError(f"stage {self.stage}: no answer from the coordinator at {self.spec.coordinator} "
                           f"within {self.spec.connect_timeout:.0f}s (is it running, and is this the "
                           f"endpoint it printed after 'coordinator at'?)")

    def setup(self, start: wire.Start) -> None:
        cfg = RunConfig.from_dict(start.config)
        self.cfg = cfg
        torch.set_num_threads(cfg.threads_per_worker)
        self.core = start.core if self.spec.core is None else self.spec.core
        pin_to_core(self.core)
        self.run_dir = Path(self.spec.run_dir or start.run_dir)
        self.num_stages = len(cfg.stage_groups)
        self.is_last = self.stage == self.num_stages - 1
        self.max_bytes = cfg.max_message_mb << 20
        self.delay = cfg.link_delay_ms / 1000.0
        slow = cfg.slow_stage
        self.slow_s = slow[1] / 1000.0 if slow is not None and slow[0] == self.stage else 0.0
        units = build_units(cfg)
        self.first_unit, self.end_unit = stage_bounds(cfg)[self.stage]
        module = nn.Sequential(*units[self.first_unit:self.end_unit])
        self.in_shape, self.out_shape = stage_io_shapes(cfg)[self.stage]
        self.logic = StageLogic(cfg, self.stage, self.num_stages, module, self.out_shape,
                                snapshot_steps=snapshot_steps(cfg, start.total_steps))
        if self.stage > 0:
            # the high-water mark must be set before bind: a listener copies its options then
            self.inbox = self.ctx.socket(zmq.PULL)
            self.inbox.setsockopt(zmq.LINGER, 0)
            self.inbox.setsockopt(zmq.RCVHWM, cfg.queue_depth)
            self.inbox.setsockopt(zmq.MAXMSGSIZE, max_frame_bytes(cfg))
            self.guard.server(self.inbox, f"stage {self.stage} input")
            self.endpoint = bind_wildcard(self.inbox, self.spec.transport, self.spec.host)
        if not self.is_last:
            self.outbox = self.ctx.socket(zmq.PUSH)
            self.outbox.setsockopt(zmq.SNDHWM, cfg.queue_depth)
            self.outbox.setsockopt(zmq.LINGER, 2000)
            if self.guard.on:
                self.guard.client(self.outbox, self.guard.keys.worker_public)
        self.first_step = start.resume_step + 1
        if start.resume_path:
            self._load(Path(start.resume_path), start.resume_step)
        self.dataset = None
        if self.stage == 0:
            self.dataset = load_dataset(cfg.dataset, cfg.data_dir, cfg.synthetic_train, cfg.synthetic_test)

    # ------------------------------------------------------------------ messages from the coordinator
    def _decode(self, frames) -> Optional[wire.Message]:
        try:
            return wire.decode(frames, max_tensor_bytes=getattr(self, "max_bytes", 256 << 20))
        except wire.WireError as exc:
            self._reject(exc)
            return None

    def _handle_coord(self) -> None:
        """Handle every message the coordinator has queued for us, without blocking."""
        while self.coord.poll(0):
            with self.timings.span("recv"):
                msg = self._recv_coord()
            if msg is None:
                continue
            if isinstance(msg, wire.Stop):
                raise Stopped(msg.reason)
            if isinstance(msg, wire.Checkpoint):
                self._checkpoint_asked = msg.reason  # stage 0 acts at its next step boundary
                continue
            if isinstance(msg, wire.Grad):
                if self.delay:  # simulated latency: deliver it `delay` after it was sent
                    self._held.append((msg.sent_at + self.delay, msg))
                else:
                    self._on_grad(msg)
            else:
                self._reject(ValueError(f"unexpected {type(msg).__name__} from the coordinator"))
        while self._held and self._held[0][0] <= time.monotonic():
            self._on_grad(self._held.popleft()[1])

    def _on_grad(self, msg: wire.Grad) -> None:
        try:
            if msg.to_stage != self.stage:
                raise wire.WireError(f"gradient addressed to stage {msg.to_stage}")
            wire.check_tensor(msg.g, "GRAD.g", torch.float32, self.out_shape, self.cfg.batch_size)
            with self.timings.span("compute"):
                dx = self.logic.receive_grad(msg.step, msg.g, msg.is_true)
        except (wire.WireError, KeyError, ValueError) as exc:
            self._reject(exc)
            return
        if dx is not None and self.stage > 0:
            self.send_coord(wire.Grad(msg.step, self.stage - 1, msg.is_true, dx))

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

    def _wait(self, activity: str, ready, sock: Optional[zmq.Socket] = None,
              event: int = zmq.POLLIN, due: Optional[float] = None) -> None:
        """Poll until `ready()` is true, handling coordinator messages meanwhile. `sock`/`event`
        is what can make `ready()` true besides a coordinator message (wakes the poll at once)."""
        poller = self._poller(sock, event)
        while True:
            self._handle_coord()
            if ready():
                break
            self._check_liveness()
            self._maybe_report()
            t0 = time.perf_counter()
            poller.poll(self._poll_ms(due))
            self.timings.add(activity, t0, time.perf_counter())

    def _poll_ms(self, due: Optional[float] = None) -> int:
        """How long a wait may sleep: POLL_MS, or less when a held message falls due sooner."""
        dues = [d for d in (due, self._held[0][0] if self._held else None) if d is not None]
        if not dues:
            return POLL_MS
        return max(0, min(POLL_MS, math.ceil(1000 * (min(dues) - time.monotonic()))))

    def recv_activation(self) -> wire.Activation:
        assert self.inbox is not None
        while True:
            self._wait("wait_input", lambda: bool(self.inbox.poll(0)), self.inbox, zmq.POLLIN)
            with self.timings.span("recv"):
                msg = self._decode(self.inbox.recv_multipart(copy=False))
            if not isinstance(msg, wire.Activation):
                if msg is not None:
                    self._reject(ValueError(f"unexpected {type(msg).__name__} on the activation link"))
                continue
            try:
                if msg.phase in ("train", "eval"):
                    wire.check_tensor(msg.h, "ACTIVATION.h", torch.float32, self.in_shape, self.cfg.batch_size)
                    wire.check_tensor(msg.labels, "ACTIVATION.labels", torch.int64, (), msg.h.shape[0])
                    if msg.labels.shape[0] != msg.h.shape[0]:
                        raise wire.WireError("ACTIVATION: labels and h differ in batch size")
                elif msg.phase not in ("eval_end", "checkpoint", "end"):
                    raise wire.WireError(f"ACTIVATION: unknown phase {msg.phase!r}")
            except wire.WireError as exc:
                self._reject(exc)
                continue
            if self.delay:  # simulated latency: use it `delay` after it was sent
                due = msg.sent_at + self.delay
                self._wait("wait_input", lambda: time.monotonic() >= due, due=due)
            return msg

    def send_down(self, msg: wire.Activation) -> None:
        assert self.outbox is not None
        if self.delay:
            msg = dataclasses.replace(msg, sent_at=time.monotonic())
        with self.timings.span("send"):
            frames = wire.encode(msg)
        self._wait("wait_send", lambda: bool(self.outbox.poll(0, zmq.POLLOUT)), self.outbox, zmq.POLLOUT)
        with self.timings.span("send"):
            self.outbox.send_multipart(frames, copy=False)

    # ------------------------------------------------------------------ training steps
    def train_step(self, step: int, epoch: int, x: torch.Tensor, labels: torch.Tensor) -> None:
        true_step = self.cfg.is_true_grad_step(step)
        self.timings.recording = self.steps < self.cfg.timeline_steps
        if self.slow_s:  # --slow-stage (testing): this stage is the bottleneck
            with self.timings.span("compute"):
                time.sleep(self.slow_s)
        if self.is_last:
            with self.timings.span("compute"):
                _, dx = self.logic.last_step(step, x, labels, true_step)
            if dx is not None:
                self.send_coord(wire.Grad(step, self.stage - 1, true_step, dx))
        else:
            with self.timings.span("compute"):
                h = self.logic.forward(step, x, labels, true_step)
            self.send_down(wire.Activation(step, epoch, "train", true_step, h, labels))
            with self.timings.span("compute"):
                dx = self.logic.local_update(step)
            if dx is not None:
                self.send_coord(wire.Grad(step, self.stage - 1, False, dx))
            if self.cfg.mode == "locked":
                self._wait("wait_grad", lambda: step not in self.logic.kept)
        self.steps += 1
        self.samples += int(labels.shape[0])
        self._samples_since_report += int(labels.shape[0])
        self.last_step = step
        self.max_outstanding = max(self.max_outstanding, self.logic.outstanding())
        self._maybe_report()

    # ------------------------------------------------------------------ the run
    def run_first(self) -> None:
        cfg, ds = self.cfg, self.dataset
        per_epoch = steps_per_epoch(len(ds.train), cfg.batch_size)
        total = total_steps(len(ds.train), cfg.batch_size, cfg.epochs, cfg.steps)
        step = 0
        for epoch in range(cfg.epochs):
            if (epoch + 1) * per_epoch <= self.first_step:  # resumed: this epoch and its test are done
                step = (epoch + 1) * per_epoch
                continue
            for x, y in train_batches(ds.train, cfg.batch_size, cfg.seed, epoch):
                if step >= total:
                    break
                if step < self.first_step:  # resumed: the same batches as before, skipped
                    step += 1
                    continue
                self.train_step(step, epoch, x, y)
                step += 1
                if cfg.mid_epoch_eval(step, per_epoch, total):
                    self.evaluate_first(epoch, step)
                # not at an epoch's last step: its test comes first, so a resume never skips it
                if self._checkpoint_asked is not None and step < total and step % per_epoch:
                    self._checkpoint_asked = None
                    self.checkpoint(step - 1, epoch)
            self.evaluate_first(epoch, step)
            if step >= total:
                break
        if not self.is_last:
            self.send_down(wire.Activation(step, cfg.epochs, "end", False))

    def evaluate_first(self, epoch: int, step: int) -> None:
        ds = self.dataset
        acc = _EvalAccumulator()
        for b, (x, y) in enumerate(eval_batches(ds.test, self.cfg.batch_size, self.cfg.eval_samples)):
            if self.is_last:
                acc.add(*self.logic.eval_last(x, y), int(y.shape[0]))
            else:
                with self.timings.span("compute"):
                    h = self.logic.eval_forward(x)
                self.send_down(wire.Activation(b, epoch, "eval", False, h, y))
        if self.is_last:
            self.send_coord(acc.result(epoch, step))
        else:
            self.send_down(wire.Activation(step, epoch, "eval_end", False))

    def run_rest(self) -> None:
        acc = _EvalAccumulator()
        while True:
            msg = self.recv_activation()
            if msg.phase == "train":
                self.train_step(msg.step, msg.epoch, msg.h, msg.labels)
            elif msg.phase == "eval":
                with self.timings.span("compute"):
                    if self.is_last:
                        acc.add(*self.logic.eval_last(msg.h, msg.labels), int(msg.labels.shape[0]))
                    else:
                        h = self.logic.eval_forward(msg.h)
                if not self.is_last:
                    self.send_down(wire.Activation(msg.step, msg.epoch, "eval", False, h, msg.labels))
            elif msg.phase == "checkpoint":
                self.checkpoint(msg.step, msg.epoch)
            elif msg.phase == "eval_end":
                if self.is_last:
                    self.send_coord(acc.result(msg.epoch, msg.step))
                    acc = _EvalAccumulator()
                else:
                    self.send_down(msg)
            else:  # end
                if not self.is_last:
                    self.send_down(msg)
                return

    def _load(self, path: Path, step: int) -> None:
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except (OSError, RuntimeError, EOFError) as exc:
            raise RuntimeError(f"stage {self.stage}: cannot read checkpoint {path}: {exc}") from None
        if ckpt.get("stage") != self.stage or ckpt.get("step") != step:
            raise RuntimeError(f"stage {self.stage}: {path} holds stage {ckpt.get('stage')} at step "
                               f"{ckpt.get('step')}, expected stage {self.stage} at step {step}")
        self.logic.load_state_dict(ckpt["state"])
        self.last_step = step

    def save(self, path: Path, step: int) -> None:
        """This stage's state after `step`, written atomically (temporary file, fsync, rename)."""
        module = self.logic.module
        atomic_torch_save(path, {
            "stage": self.stage,
            "units": {self.first_unit + j: module[j].state_dict() for j in range(len(module))},
            "state": self.logic.state_dict(),
            "step": step,
            "config": self.cfg.to_dict(),
        })

    def checkpoint(self, step: int, epoch: int) -> None:
        """Save at `step` on every stage: pass the marker on first (the stages after this one
        save concurrently), then wait for every gradient of steps <= `step`, save, tell the
        coordinator. The marker follows step `step` down each FIFO link, so every stage saves
        the state right after the same step."""
        if not self.is_last:
            self.send_down(wire.Activation(step, epoch, "checkpoint", False))
        self._wait("wait_grad", lambda: self.logic.outstanding() == 0)
        path = self.run_dir / "checkpoints" / f"step-{step:09d}" / f"stage{self.stage}.pt"
        try:
            self.save(path, step)
        except OSError as exc:  # a full disk fails this checkpoint, not the run
            print(f"[stage {self.stage}] checkpoint at step {step} failed: {exc}", file=sys.stderr, flush=True)
            self.send_coord(wire.Saved(self.stage, step, "", pysocket.gethostname(), str(exc)))
            return
        self.send_coord(wire.Saved(self.stage, step, str(path), pysocket.gethostname()))
        # the coordinator asks for one checkpoint at a time, so the one before this was complete
        # on every stage: keep it and this one, delete older ones
        self._saved_paths.append(path)
        while len(self._saved_paths) > 2:
            old = self._saved_paths.pop(0)
            old.unlink(missing_ok=True)
            try:
                old.parent.rmdir()  # once every stage on this host has removed its file
            except OSError:
                pass

    def finish(self) -> None:
        """Wait for the gradients still travelling back, save, report, wait for STOP."""
        self._wait("wait_grad", lambda: self.logic.outstanding() == 0)
        self.train_end = time.monotonic()
        path = self.run_dir / f"stage{self.stage}.pt"
        self.save(path, self.last_step)
        # traces for `launch.py compare` (too large for a control message's header bound)
        atomic_write_json(self.run_dir / f"timeline-stage{self.stage}.json", self.timings.timeline)
        if self.logic.snapshots:
            atomic_write_json(self.run_dir / f"sg-snapshots-stage{self.stage}.json", self.logic.snapshots)
        self._report(final=True)
        elapsed = self.train_end - self.train_start
        totals = self.timings.total
        self.send_coord(wire.Done(self.stage, {
            "stage": self.stage, "pid": os.getpid(), "host": pysocket.gethostname(),
            "input_endpoint": self.endpoint, "core": self.core, "units": [self.first_unit, self.end_unit],
            "steps": self.steps, "last_step": self.last_step, "samples": self.samples, "elapsed_s": elapsed,
            "samples_per_s": self.samples / elapsed if elapsed > 0 else 0.0,
            "busy_fraction": totals["compute"] / elapsed if elapsed > 0 else 0.0,
            "messaging_fraction": sum(totals[k] for k in MESSAGING) / elapsed if elapsed > 0 else 0.0,
            **{f"{k}_s": v for k, v in totals.items()},
            "compute_cpu_s": self.timings.compute_cpu,
            "max_outstanding_steps": self.max_outstanding,
            "true_grads_received": self.logic.stats.true_grads,
            "bootstrap_grads_received": self.logic.stats.bootstrap_grads,
            "sg_s": self.logic.stats.sg_seconds,
            "sg_share_of_compute": self.logic.stats.sg_seconds / totals["compute"] if totals["compute"] > 0 else 0.0,
            "rejected_messages": self.rejected,
            "checkpoint": str(path),
        }))
        while True:  # until STOP (raises Stopped) or the coordinator vanishes
            self._wait("wait_grad", lambda: False)

    def wait_begin(self) -> None:
        self._last_from_coord = time.monotonic()  # setup() blocked; what came meanwhile is queued
        self.send_coord(wire.Ready(self.stage, self.endpoint))
        while True:
            self._check_liveness()
            if self.coord.poll(POLL_MS):
                msg = self._recv_coord()
                if isinstance(msg, wire.Begin):
                    if self.outbox is not None:
                        self.outbox.connect(msg.downstream)
                    return
                if isinstance(msg, wire.Stop):
                    raise Stopped(msg.reason)

    def run(self) -> None:
        start = self.handshake()
        self.setup(start)
        self.wait_begin()
        self.train_start = time.monotonic()
        self._last_report = self.train_start
        if self.stage == 0:
            self.run_first()
        else:
            self.run_rest()
        self.finish()

    # ------------------------------------------------------------------ metrics
    def _maybe_report(self) -> None:
        if time.monotonic() - self._last_report >= self.cfg.metrics_every:
            self._report()

    def _report(self, final: bool = False) -> None:
        now = time.monotonic()
        dt = max(now - self._last_report, 1e-9)
        t = self.timings.take()
        rec = {
            "stage": self.stage, "pid": os.getpid(), "final": final,
            "step": self.last_step, "steps": self.steps, "samples": self.samples,
            "samples_per_s": self._samples_since_report / dt,
            "busy_fraction": t["compute"] / dt,
            **{f"{k}_fraction": v / dt for k, v in t.items() if k != "compute"},
            "messaging_fraction": sum(t[k] for k in MESSAGING) / dt,
            "outstanding_steps": self.logic.outstanding(),
            "cpu_percent": self.proc.cpu_percent(None),
            "rss_mb": self.proc.memory_info().rss / 2**20,
            "rejected_messages": self.rejected,
            **self.logic.stats.take(),
        }
        self._last_report = now
        self._samples_since_report = 0
        self.send_coord(wire.Metrics(self.stage, rec))

    def close(self) -> None:
        self.handshake_watch.close()
        for s in (self.outbox, self.inbox, self.coord):
            if s is not None:
                s.close()
        self.guard.close()
        self.ctx.term()


class _EvalAccumulator:
    def __init__(self) -> None:
        self.loss = 0.0
        self.correct = 0
        self.n = 0

    def add(self, loss_sum: float, correct: int, n: int) -> None:
        self.loss += loss_sum
        self.correct += correct
        self.n += n

    def result(self, epoch: int, step: int) -> wire.EvalResult:
        n = max(self.n, 1)
        return wire.EvalResult(epoch, step, self.loss / n, self.correct / n, self.n)


def _on_sigterm(signum, frame):
    raise SystemExit(128 + signum)


def run_worker(spec: WorkerSpec) -> None:
    """Process entry point (spawn target). Exits 0 after STOP, 1 after reporting an error."""
    die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the coordinator's to handle
    signal.signal(signal.SIGTERM, _on_sigterm)
    worker = LayerWorker(spec)
    code = 0
    try:
        worker.run()
    except Stopped:
        pass
    except (CoordinatorGone, Refused, TimeoutError) as exc:
        print(str(exc), file=sys.stderr, flush=True)
        code = 1
    except SystemExit as exc:  # SIGTERM: told to stop, nothing to report
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException as exc:  # report anything, then exit non-zero
        code = 1
        tb = traceback.format_exc(limit=4)
        msg = f"{type(exc).__name__}: {exc}"
        print(f"[stage {spec.stage}] {tb}", file=sys.stderr, flush=True)
        try:
            worker.send_coord(wire.Error(spec.stage, msg))
        except zmq.ZMQError:
            pass
    finally:
        worker.close()
    sys.exit(code)
