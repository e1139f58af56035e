"""The coordinator process logic: one ROUTER socket that every worker's DEALER talks to.

It registers workers and hands each the config and its downstream neighbour's endpoint, relays
true (and bootstrapped) gradients from stage i to stage i-1 without copying their bytes,
aggregates metrics into metrics.jsonl and progress lines, and ends the run: cleanly when every
stage reports DONE, or with RunFailed naming the stage when one dies, reports an error, or
everything falls silent for longer than the stall timeout.
"""
from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Optional

import zmq

from common import wire
from common.config import ConfigError, RunConfig
from common.data import total_steps
from common.files import atomic_write_json
from common.endpoints import bind_wildcard, max_frame_bytes, set_heartbeats
from common.procs import ProcessGroup, available_cores, describe_exit
from common.security import Guard
from coordinator.stream import StatusStream

POLL_MS = 100


def snake_core(stage: int, cores: list[int]) -> int:
    """Cores in the order 0,1,..,C-1,C-1,..,1,0,0,1,..: with more stages than cores, the heavy
    first stage (widest input) shares its core with the light last stage (the head)."""
    lap, pos = divmod(stage, len(cores))
    return cores[pos if lap % 2 == 0 else len(cores) - 1 - pos]


def _sender_problem(msg: wire.Message, sender: Optional[int]) -> Optional[str]:
    """Why `msg` may not come from this peer (None when it may): only REGISTER comes from a
    peer the coordinator does not know; a stage speaks only for itself, and sends gradients
    only to the stage before it."""
    if isinstance(msg, wire.Register):
        return None
    if sender is None:
        return f"{type(msg).__name__} from a peer that never registered"
    claimed = getattr(msg, "stage", sender)
    if isinstance(msg, (wire.Metrics, wire.Done, wire.Ready, wire.Error, wire.Heartbeat, wire.Saved)) \
            and claimed != sender:
        return f"{type(msg).__name__} for stage {claimed} from stage {sender}"
    if isinstance(msg, wire.Grad) and msg.to_stage != sender - 1:
        return f"stage {sender} sent a gradient for stage {msg.to_stage}"
    return None


class RunFailed(RuntimeError):
    """The run cannot go on; the message names the stage and the reason."""


class Coordinator:
    def __init__(self, cfg: RunConfig, run_dir: Path, *, n_train: int,
                 log: Callable[[str], None] = print, bind: Optional[str] = None,
                 stream: Optional[StatusStream] = None, guard: Optional[Guard] = None,
                 resume: Optional[dict] = None):
        """`stream` receives the workers' reports (train.py passes the run's); without one the
        coordinator makes and closes its own. `guard` makes the ROUTER a CURVE server (its
        context is used); without one the links are plain and the context is the coordinator's."""
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.resume = resume  # the manifest to continue from, or None
        self.resume_step = resume["step"] if resume else -1
        self.wall_offset = resume["wall_s"] if resume else 0.0  # curves continue the old run's
        self.log = log
        self.num_stages = len(cfg.stage_groups)
        self.total_steps = total_steps(n_train, cfg.batch_size, cfg.epochs, cfg.steps)
        self._own_ctx = guard is None
        self.guard = guard or Guard(zmq.Context())
        self.ctx = self.guard.ctx
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.guard.server(self.sock, "coordinator")
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # an unroutable message is an error, not a drop
        self.sock.setsockopt(zmq.SNDHWM, 0)
        self.sock.setsockopt(zmq.RCVHWM, 0)
        self.sock.setsockopt(zmq.LINGER, 0)
        set_heartbeats(self.sock, cfg.heartbeat_timeout)
        self.sock.setsockopt(zmq.MAXMSGSIZE, max_frame_bytes(cfg))  # libzmq drops bigger frames
        if bind is None:
            self.endpoint = bind_wildcard(self.sock, cfg.transport, cfg.host)
        else:
            try:
                self.sock.bind(bind)
            except zmq.ZMQError as exc:
                self.close()
                raise ConfigError(f"the coordinator cannot listen on {bind}: {exc} (bind an "
                                  f"address of this host; port 0 picks a free port)") from None
            self.endpoint = self.sock.getsockopt(zmq.LAST_ENDPOINT).decode()
        self._own_stream = stream is None
        self.stream = stream or StatusStream(cfg, self.run_dir, num_stages=self.num_stages,
                                             total_steps=self.total_steps, guard=self.guard)
        self.registered: dict[int, wire.Register] = {}
        self.ready: dict[int, str] = {}  # stage -> its activation input endpoint
        self.identities: dict[int, bytes] = {}
        self.done: dict[int, dict] = {}
        self.relayed_true = [0] * self.num_stages  # true gradients delivered to each stage
        self.relayed_bootstrap = [0] * self.num_stages
        self.rejected = 0
        self.refused = 0  # connections turned away by CURVE authentication
        self._ckpt_asked: Optional[float] = None  # when the checkpoint in flight was asked for
        self._last_ckpt = time.monotonic()
        self._saved: dict[int, dict[int, dict]] = {}  # step -> stage -> where it was saved
        self.checkpoints: list[dict] = []
        self.checkpoint_failures = 0
        self.last_checkpoint_step: Optional[int] = None
        self._interrupted: Optional[str] = None
        self._stop_by: Optional[float] = None
        self._step_before_stop: Optional[int] = None
        self._refusals: dict[str, int] = {}
        self.t_created = time.monotonic()
        self.t_start: Optional[float] = None
        self.t_end: Optional[float] = None
        self._last_advance = time.monotonic()  # when a step, evaluation or DONE last came in
        self._max_step = -1
        self.stage_of: dict[bytes, int] = {}
        self.last_heard: dict[int, float] = {}  # stage -> when it last sent anything
        self._last_beat = 0.0
        self._last_progress = time.monotonic()

    # ------------------------------------------------------------------ sending
    def _send(self, stage: int, msg: wire.Message) -> None:
        self.sock.send_multipart([self.identities[stage], *wire.encode(msg)], copy=False)

    def stop_all(self, reason: str) -> None:
        for stage in list(self.identities):
            try:
                self._send(stage, wire.Stop(reason))
            except zmq.ZMQError:
                pass  # that worker is gone already

    # ------------------------------------------------------------------ handling
    def _handle(self, frames: list) -> None:
        identity, body = frames[0].bytes, frames[1:]
        try:
            msg = wire.decode(body, max_tensor_bytes=self.cfg.max_message_mb << 20, align=False)  # relayed as is
        except wire.WireError as exc:
            self._reject(identity, str(exc))
            return
        now = time.monotonic()
        sender = self.stage_of.get(identity)
        problem = _sender_problem(msg, sender)
        if problem is not None:  # decoded fine, but not from who may send it
            self._reject(identity, problem)
            return
        if sender is not None:
            self.last_heard[sender] = now
        if isinstance(msg, wire.Heartbeat):
            return
        if isinstance(msg, wire.Register):
            self._on_register(identity, msg)
        elif isinstance(msg, wire.Grad):
            self._relay(msg, body)
        elif isinstance(msg, wire.Metrics):
            if isinstance(msg.record.get("step"), int) and msg.record["step"] > self._max_step:
                self._max_step, self._last_advance = msg.record["step"], now
            self.stream.worker({"event": "worker", "wall_s": self._wall(), **msg.record, "stage": msg.stage})
        elif isinstance(msg, wire.EvalResult):
            rec = {"event": "eval", "wall_s": self._wall(), "epoch": msg.epoch, "step": msg.step,
                   "test_loss": msg.loss, "test_accuracy": msg.accuracy, "test_samples": msg.samples}
            self.stream.eval(rec)
            self._last_advance = now
            self.log(f"eval  epoch {msg.epoch + 1} step {msg.step}: test accuracy "
                     f"{100 * msg.accuracy:.2f}%  test loss {msg.loss:.4f}  ({self._wall():.1f}s)")
        elif isinstance(msg, wire.Ready):
            self.ready[msg.stage] = msg.endpoint
            if len(self.ready) == self.num_stages:
                for stage in range(self.num_stages):
                    downstream = self.ready[stage + 1] if stage + 1 < self.num_stages else ""
                    self._send(stage, wire.Begin(downstream))
                self.t_start = self._last_advance = self._last_ckpt = time.monotonic()
                self.log(f"all {self.num_stages} stages ready after {self.t_start - self.t_created:.1f}s; "
                         f"training {self.total_steps} steps")
                self.log("stage inputs: " + "  ".join(f"{s}={self.ready[s]}" for s in range(1, self.num_stages)))
        elif isinstance(msg, wire.Saved):
            self._on_saved(msg)
        elif isinstance(msg, wire.Done):
            self._last_advance = now
            self.done[msg.stage] = msg.summary
        elif isinstance(msg, wire.Error):
            last = self.last_checkpoint_step
            raise RunFailed(f"stage {msg.stage} failed: {msg.message}" + (
                "" if last is None else f" (the last complete checkpoint is step {last}: "
                                        f"--resume {self.run_dir})"))
        else:
            self._reject(identity, f"unexpected {type(msg).__name__}")

    def _on_register(self, identity: bytes, msg: wire.Register) -> None:
        problem = None
        if not 0 <= msg.stage < self.num_stages:
            problem = f"this run has stages 0..{self.num_stages - 1}"
        elif msg.stage in self.registered:
            first = self.registered[msg.stage]
            problem = f"stage {msg.stage} is taken (pid {first.pid} on {first.host})"
        elif self.t_start is not None or len(self.registered) == self.num_stages:
            problem = "the run has started"
        if problem is not None:  # turn the newcomer away; the run goes on
            self.rejected += 1
            self.log(f"[coordinator] refused stage {msg.stage} (pid {msg.pid} on {msg.host}): {problem}")
            self.sock.send_multipart([identity, *wire.encode(wire.Stop(f"refused: {problem}"))], copy=False)
            return
        self.registered[msg.stage] = msg
        self.identities[msg.stage] = identity
        self.stage_of[identity] = msg.stage
        self.last_heard[msg.stage] = time.monotonic()
        self.log(f"[coordinator] stage {msg.stage} registered: pid {msg.pid} on {msg.host} "
                 f"({len(self.registered)}/{self.num_stages})")
        if len(self.registered) == self.num_stages:
            self._start_all()

    def _start_all(self) -> None:
        cores = available_cores()
        for stage in range(self.num_stages):
            core = snake_core(stage, cores) if self.cfg.pin_cores else -1
            resume = self.resume["stages"][str(stage)]["path"] if self.resume else ""
            self._send(stage, wire.Start(self.cfg.to_dict(), str(self.run_dir), core, self.total_steps,
                                         self.resume_step, resume))

    def _reject(self, identity: bytes, why: str) -> None:
        """Count a bad message and log it (the first ten, then every thousandth): a flood of
        garbage must not become a flood of log lines."""
        self.rejected += 1
        if self.rejected <= 10 or self.rejected % 1000 == 0:
            self.log(f"[coordinator] rejected message #{self.rejected} from {identity[:40]!r}: {why}")

    def _relay(self, msg: wire.Grad, body: list) -> None:
        if msg.to_stage not in self.identities:
            self._reject(self.identities.get(msg.to_stage + 1, b"?"), f"gradient for unknown stage {msg.to_stage}")
            return
        try:
            self.sock.send_multipart([self.identities[msg.to_stage], *body], copy=False)
        except zmq.ZMQError as exc:
            raise RunFailed(f"stage {msg.to_stage} cannot be reached to deliver the gradient of "
                            f"step {msg.step}: {exc}") from None
        if msg.is_true:
            self.relayed_true[msg.to_stage] += 1
        else:
            self.relayed_bootstrap[msg.to_stage] += 1

    # ------------------------------------------------------------------ the loop
    def _wall(self) -> float:
        return self.wall_offset + time.monotonic() - (self.t_start or self.t_created)

    def _check(self, group: Optional[ProcessGroup]) -> None:
        for refusal in self.guard.take_refusals():  # CURVE: peers without an authorised key
            self.refused += 1
            seen = self._refusals[refusal] = self._refusals.get(refusal, 0) + 1
            if seen in (1, 10, 100, 1000) or seen % 10000 == 0:  # a peer retrying is one problem
                self.log(f"[coordinator] refused {refusal}" + (f" ({seen} times)" if seen > 1 else ""))
        now = time.monotonic()
        if self.t_start is None and now - self.t_created > self.cfg.start_timeout:
            missing = sorted(set(range(self.num_stages)) - set(self.registered))
            missing = missing or sorted(set(range(self.num_stages)) - set(self.ready))
            raise RunFailed(f"stages {missing} were not ready within {self.cfg.start_timeout:.0f}s "
                            f"(start them, or raise --start-timeout)")
        if self.t_start is not None:
            for stage, heard in self.last_heard.items():
                if now - heard > self.cfg.heartbeat_timeout:
                    raise RunFailed(f"stage {stage} ({self._who(stage)}) sent nothing for "
                                    f"{now - heard:.1f}s: it is hung or unreachable "
                                    f"(--heartbeat-timeout {self.cfg.heartbeat_timeout:g})")
        if self.t_start is not None and now - self._last_advance > self.cfg.stall_timeout:
            raise RunFailed(f"no progress (no new step, evaluation or DONE) for "
                            f"{self.cfg.stall_timeout:.0f}s although every stage is alive; "
                            f"stages done: {sorted(self.done)}")
        if group is not None:
            for child in group.dead():
                stage = int(child.name.split("-")[1])
                self._drain()  # an ERROR it sent before dying explains more than its exit code
                raise RunFailed(f"stage {stage} (pid {child.process.pid}) "
                                f"{describe_exit(child.process.exitcode)} during the run")

    def _heartbeat(self) -> None:
        """Tell every registered worker, about every heartbeat_every, that the coordinator lives."""
        now = time.monotonic()
        if now - self._last_beat < self.cfg.heartbeat_every:
            return
        self._last_beat = now
        for stage in list(self.identities):
            try:
                self._send(stage, wire.Heartbeat(-1))
            except zmq.ZMQError as exc:
                raise RunFailed(f"stage {stage} ({self._who(stage)}) cannot be reached: {exc}") from None

    def _who(self, stage: int) -> str:
        reg = self.registered.get(stage)
        return f"pid {reg.pid} on {reg.host}" if reg else "not registered"

    def _drain(self) -> None:
        while self.sock.poll(50):
            self._handle(self.sock.recv_multipart(copy=False))

    def _progress(self) -> None:
        now = time.monotonic()
        if now - self._last_progress < self.cfg.progress_every or \
                self.num_stages - 1 not in self.stream.latest:  # nothing to say before the last stage reports
            return
        self._last_progress = now
        last = self.stream.latest.get(self.num_stages - 1, {})
        step = last.get("step", -1) + 1
        rate = last.get("samples_per_s", 0.0)
        pct = 100.0 * step / max(self.total_steps, 1)
        eta = f"{(self.total_steps - step) * self.cfg.batch_size / rate:.0f}s" if rate > 0 else "?"
        busy = " ".join(f"{self.stream.latest[s].get('busy_fraction', 0):.2f}" for s in sorted(self.stream.latest))
        loss = last.get("loss")
        self.log(f"train step {step}/{self.total_steps} ({pct:.0f}%)  {rate:.0f} samples/s  "
                 f"loss {'-' if loss is None else f'{loss:.4f}'}  busy [{busy}]  eta {eta}")

    def _status(self, done: bool = False) -> None:
        """About once a second once training runs: the status record, to every consumer."""
        if self.t_start is not None or done:
            self.stream.tick(self._wall(), done=done)

    # ------------------------------------------------------------------ checkpoints
    def request_checkpoint(self, reason: str) -> None:
        """Ask stage 0 to save at its next step boundary; its marker takes the request down the
        stages. One checkpoint at a time."""
        if self._ckpt_asked is not None or 0 not in self.identities or 0 in self.done:
            return
        self._ckpt_asked = time.monotonic()
        self._send(0, wire.Checkpoint(reason))

    def _maybe_checkpoint(self) -> None:
        every = self.cfg.checkpoint_every
        if every > 0 and self.t_start is not None and time.monotonic() - self._last_ckpt >= every:
            self._last_ckpt = time.monotonic()
            self.request_checkpoint(f"every {every:g}s")

    def _on_saved(self, msg: wire.Saved) -> None:
        if msg.error:  # this checkpoint is incomplete for good; the last complete one stands
            self._saved.pop(msg.step, None)
            self._ckpt_asked = None
            self.checkpoint_failures += 1
            self.log(f"[coordinator] checkpoint at step {msg.step} failed on stage {msg.stage}: "
                     f"{msg.error}; the last complete checkpoint stays step {self.last_checkpoint_step}")
            return
        if msg.step not in self._saved and self._ckpt_asked is None:
            return  # a late SAVED of a checkpoint already given up
        saved = self._saved.setdefault(msg.step, {})
        saved[msg.stage] = {"path": msg.path, "host": msg.host}
        if len(saved) < self.num_stages:
            return
        took = time.monotonic() - (self._ckpt_asked or time.monotonic())
        self._ckpt_asked = None
        try:
            self._write_manifest(msg.step, saved, final=False)
        except OSError as exc:
            self.checkpoint_failures += 1
            self.log(f"[coordinator] cannot write the manifest of step {msg.step}: {exc}; the last "
                     f"complete checkpoint stays step {self.last_checkpoint_step}")
            del self._saved[msg.step]
            return
        del self._saved[msg.step]
        self.checkpoints.append({"step": msg.step, "wall_s": self._wall(), "took_s": took})
        self.log(f"checkpoint: step {msg.step} saved on every stage in {took:.2f}s "
                 f"({self.run_dir / 'checkpoints' / 'manifest.json'})")

    def _write_manifest(self, step: int, stages: dict[int, dict], final: bool) -> None:
        """checkpoints/manifest.json names the last step that is complete on every stage."""
        atomic_write_json(self.run_dir / "checkpoints" / "manifest.json", {
            "step": step, "final": final, "mode": self.cfg.mode, "num_stages": self.num_stages,
            "stages": {str(s): stages[s] for s in sorted(stages)}, "wall_s": self._wall(),
            "written_at": time.time(), "config": self.cfg.to_dict()})
        self.last_checkpoint_step = step

    def _on_interrupt(self, signum, frame) -> None:
        """First Ctrl-C / SIGTERM: checkpoint, then stop (the loop sees the flag). Second: now."""
        if self._interrupted:
            raise KeyboardInterrupt
        self._interrupted = signal.Signals(signum).name

    def _graceful_stop(self) -> None:
        """After an interrupt: wait for a checkpoint at the next step, then raise
        KeyboardInterrupt (the launcher exits 130). Bounded by heartbeat_timeout x 3."""
        if self._stop_by is None:
            self._stop_by = time.monotonic() + 3 * self.cfg.heartbeat_timeout
            done_before = self.last_checkpoint_step
            self.log(f"{self._interrupted}: saving every stage at the next step, then stopping "
                     f"(press Ctrl-C again to stop at once)")
            self._ckpt_asked = None  # a periodic request in flight still completes; ask anew
            self.request_checkpoint("interrupted")
            self._step_before_stop = done_before
            if self.t_start is None or 0 in self.done:
                raise KeyboardInterrupt  # nothing to save mid-run
        if self._ckpt_asked is None and self.last_checkpoint_step != self._step_before_stop:
            self.log(f"stopped after the checkpoint at step {self.last_checkpoint_step}")
            raise KeyboardInterrupt
        if time.monotonic() > self._stop_by:
            self.log("no checkpoint within the time allowed; stopping without one")
            raise KeyboardInterrupt

    def serve(self, group: Optional[ProcessGroup] = None) -> dict:
        """Run until every stage is done; return the summary. Raises RunFailed, or
        KeyboardInterrupt after Ctrl-C / SIGTERM (once a checkpoint is written)."""
        handlers = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                handlers[sig] = signal.signal(sig, self._on_interrupt)
        try:
            while len(self.done) < self.num_stages:
                if self.sock.poll(POLL_MS):
                    while True:
                        self._handle(self.sock.recv_multipart(copy=False))
                        if not self.sock.poll(0):
                            break
                self._check(group)
                self._heartbeat()
                self._maybe_checkpoint()
                if self._interrupted:
                    self._graceful_stop()
                self._progress()
                self._status()
            self.t_end = time.monotonic()
            try:
                self._write_manifest(max(d.get("last_step", -1) for d in self.done.values()),
                                     {s: {"path": d["checkpoint"], "host": d["host"]} for s, d in self.done.items()},
                                     final=True)
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
            if self._own_stream:
                self.stream.close()

    def summary(self) -> dict:
        workers = [self.done[s] for s in sorted(self.done)]
        last = self.done.get(self.num_stages - 1, {})
        samples = last.get("samples", 0)
        wall = (self.t_end or time.monotonic()) - (self.t_start or self.t_created)
        final = self.stream.evals[-1] if self.stream.evals else {}
        if self.num_stages == 1:
            true_steps = last.get("steps", 0)
        else:
            true_steps = self.relayed_true[0]
        return {
            "mode": self.cfg.mode,
            "steps": last.get("steps", 0),
            "samples": samples,
            "wall_clock_s": wall,
            "startup_s": (self.t_start or self.t_created) - self.t_created,
            "samples_per_s": samples / wall if wall > 0 else 0.0,
            "test_accuracy": final.get("test_accuracy"),
            "test_loss": final.get("test_loss"),
            "true_gradient_steps": true_steps,
            "true_gradients_relayed": self.relayed_true,
            "bootstrap_gradients_relayed": self.relayed_bootstrap,
            "rejected_messages": self.rejected + sum(w.get("rejected_messages", 0) for w in workers),
            "refused_connections": self.refused,
            "checkpoints": self.checkpoints,
            "checkpoint_failures": self.checkpoint_failures,
            "resumed_from_step": self.resume_step if self.resume else None,
            "secure": self.guard.on,
            "num_stages": self.num_stages,
            "evals": self.stream.evals,
            "workers": workers,
            "coordinator_pid": os.getpid(),
            "endpoint": self.endpoint,
        }

    def close(self) -> None:
        if getattr(self, "_own_stream", False):
            self.stream.close()
        self.sock.close(0)
        if self._own_ctx:
            self.guard.close()
            self.ctx.term()
