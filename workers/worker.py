"""The stage process: a thin shell that joins the parts of one stage and runs its life cycle.

    handshake (REGISTER -> START) -> set up (model, links, data) -> READY -> BEGIN
    -> train (stage 0 from its data, the others from their input link) -> DONE -> STOP

The parts, each in its own file: the links and the wait loop (links.py), what a stage computes
(stage.py, with its update rule from common/modes.py), the run's schedule (schedule.py),
checkpoints (checkpointing.py) and reports (reporting.py).
"""
from __future__ import annotations

import os
import signal
import socket as pysocket
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import zmq

from synthgrad.common import wire
from synthgrad.common.config import RunConfig
from synthgrad.common.data import Dataset, eval_batches, steps_per_epoch
from synthgrad.common.datasets import run_dataset
from synthgrad.common.devices import Compute, stage_device
from synthgrad.common.endpoints import CONNECT_TIMEOUT_S
from synthgrad.common.evaluation import EvalTally
from synthgrad.common.faults import FaultPlan
from synthgrad.common.files import atomic_write_json
from synthgrad.common.liveness import ProcessFailure, Role, Verdict
from synthgrad.common.placement import replica_blocks, self_sized_threads
from synthgrad.common.procs import available_cores, die_with_parent, openmp_threads_sleep, pin_to_core, yield_cpu
from synthgrad.common.security import Keys
from synthgrad.common.wire import Phase
from synthgrad.workers.checkpointing import StageCheckpoints, final_path
from synthgrad.workers.errors import bounded, own_failure
from synthgrad.workers.links import POLL_MS, Handlers, Links, Refused, Stopped
from synthgrad.workers.replicas import ReplicatedLogic
from synthgrad.workers.reporting import StageReporter
from synthgrad.workers.schedule import (
    Boundary,
    End,
    Evaluate,
    StreamOrder,
    TrainBatch,
    schedule,
    split_batches,
)
from synthgrad.workers.stage import StageLogic, build_stage
from synthgrad.workers.sync import GradientSync
from synthgrad.workers.timings import Timings


@dataclass(frozen=True)
class WorkerSpec:
    stage: int
    coordinator: str  # the coordinator's ROUTER endpoint
    coordinator_pid: int = -1  # watched when on the same host; -1 = not watched
    transport: str = "ipc"
    host: str = "127.0.0.1"  # address this worker binds its activation input on (tcp)
    run_dir: str = ""  # where to write checkpoints and traces; "" = the coordinator's folder
    core: Optional[int] = None  # pin here; None = the core the coordinator assigns (same host)
    connect_timeout: float = CONNECT_TIMEOUT_S  # give up when no START arrives within this many seconds
    keys: Optional[Keys] = None  # CURVE on every link of this worker; None = plain
    local_index: Optional[int] = None  # torchrun's LOCAL_RANK: picks the GPU of a bare --device cuda


@dataclass
class StageParts:
    """What START configures: the run, this stage's place in it and its parts."""
    cfg: RunConfig
    run_dir: Path
    core: int
    units: tuple[int, int]  # [first, end) unit indices
    out_shape: tuple[int, ...]
    is_last: bool
    total_steps: int
    first_step: int  # 0, or one past the checkpoint a resumed run continues from
    logic: StageLogic | ReplicatedLogic
    reporter: StageReporter
    checkpoints: StageCheckpoints
    dataset: Optional[Dataset]  # stage 0 reads the data itself


class LayerWorker:
    def __init__(self, spec: WorkerSpec):
        self.spec = spec
        self.stage = spec.stage
        self.timings = Timings()
        self.links = Links(spec.stage, spec.coordinator, spec.coordinator_pid, spec.keys, self.timings)
        self.parts: Optional[StageParts] = None  # set up on START
        self.yields = False  # runs at nice 19 (decided on START: common/placement.py yielding_stages)
        self._checkpoint_asked: Optional[str] = None

    # ------------------------------------------------------------------ handshake and set up
    def handshake(self) -> wire.Start:
        links = self.links
        register = wire.Register(self.stage, os.getpid(), pysocket.gethostname())
        registered = False  # queued (a refused handshake leaves nothing to queue into)
        deadline = time.monotonic() + self.spec.connect_timeout
        while time.monotonic() < deadline:
            registered = registered or links.try_send_coord(register)
            links.check_liveness()
            why = links.handshake_refusal()
            if why is not None:
                raise Refused(f"stage {self.stage}: the coordinator at {self.spec.coordinator} "
                              f"turned this worker away: {why}")
            if links.poll_coord(POLL_MS):
                msg = links.recv_coord()
                if isinstance(msg, wire.Start):
                    return msg
                if isinstance(msg, wire.Stop):
                    raise Refused(f"stage {self.stage}: the coordinator stopped this worker before "
                                  f"the run began: {msg.reason}")
        raise TimeoutError(f"stage {self.stage}: no answer from the coordinator at {self.spec.coordinator} "
                           f"within {self.spec.connect_timeout:.0f}s (is it running, and is this the "
                           f"endpoint it printed after 'coordinator at'?)")

    def setup(self, start: wire.Start) -> None:
        cfg = start.config.validate()  # the wire checked its fields' types; this, what they say
        replicas = cfg.stage_replica_counts()[self.stage]
        blocks = replica_blocks(*self._place(cfg, start), replicas, available_cores())
        core, threads = blocks[0]
        torch.set_num_threads(threads)
        pin_to_core(core, threads)
        # a stage placed by hand or by torchrun does not yield; nor one whose heavier neighbours'
        # idle threads spin (the user's own OpenMP wait setting): it would hardly run at all
        self.yields = self.spec.core is None and start.yields and openmp_threads_sleep()
        if self.yields:
            yield_cpu()
        device = stage_device(cfg.device, self.stage, self.spec.local_index)
        dev = Compute.of(device, cfg.precision)  # DeviceError when this host has no such device
        sync = GradientSync(replicas) if replicas > 1 else None
        helpers = start.helpers  # as the layout chose them: built, not chosen again
        logic, plan = build_stage(cfg, self.stage, start.total_steps, dev, sync, helpers)
        run_dir = Path(self.spec.run_dir or start.run_dir)
        is_last = self.stage == plan.num_stages - 1
        faults = FaultPlan.from_config(cfg).for_stage(self.stage)  # testing: nothing, in a real run
        checkpoints = StageCheckpoints(self.stage, cfg, run_dir, logic, plan.units[0],
                                       fail_after=faults.saves_fail_after)
        if faults.step_sleep_s:
            self.train_step = self._slowed(self.train_step, faults.step_sleep_s)  # type: ignore[method-assign]
        if start.resume_path:
            checkpoints.load(Path(start.resume_path), start.resume_step)
        if sync is not None:  # the other replicas load the same checkpoint themselves
            logic = ReplicatedLogic.start(logic, plan, cfg, self.stage, start.total_steps, blocks,
                                          start.resume_path, start.resume_step, self.yields, helpers)
            checkpoints.logic = logic
        reporter = StageReporter(self.stage, cfg, logic, self.timings, self.links.send_coord,
                                 lambda: self.links.rejected)
        if start.resume_path:
            reporter.last_step = start.resume_step
        self.links.configure(cfg, plan.in_shape, plan.num_classes, is_last, self.spec.host, self.spec.transport,
                             Handlers(on_grad=self._on_grad, on_checkpoint=self._on_checkpoint,
                                      on_committed=self._on_committed, on_idle=reporter.maybe_report),
                             delay_s=faults.link_delay_s)
        dataset = None
        if self.stage == 0:
            dataset = run_dataset(cfg)
        self.parts = StageParts(cfg, run_dir, core, plan.units, plan.out_shape, is_last, start.total_steps,
                                start.resume_step + 1, logic, reporter, checkpoints, dataset)

    def _place(self, cfg: RunConfig, start: wire.Start) -> tuple[int, int]:
        """(first core or -1, torch threads). A local stage takes what the coordinator's layout
        gave it; a stage started by hand or by torchrun pins itself (its spec's core) and sizes
        itself by the same rule from its stage's share of the run's FLOPs and this host's
        cores (common/placement.py); --threads, when given, decides the threads everywhere."""
        given = cfg.stage_thread_counts()
        if self.spec.core is None:
            return start.core, given[self.stage] if given else max(start.threads, 1)
        if given:
            return self.spec.core, given[self.stage]
        if self.spec.core >= 0:  # pinned to one core of this host
            return self.spec.core, 1
        return -1, self_sized_threads(start.share, len(available_cores()))

    def wait_begin(self) -> None:
        links = self.links
        links.heard_from_coordinator_now()  # setup() blocked; what came meanwhile is queued
        links.send_coord(wire.Ready(self.stage, links.endpoint))
        while True:
            links.check_liveness()
            if links.poll_coord(POLL_MS):
                msg = links.recv_coord()
                if isinstance(msg, wire.Begin):
                    links.connect_downstream(msg.downstream)
                    return
                if isinstance(msg, wire.Stop):
                    raise Stopped(msg.reason)

    # ------------------------------------------------------------------ messages from the coordinator
    def _on_checkpoint(self, reason: str) -> None:
        self._checkpoint_asked = reason  # stage 0 acts at its next step boundary

    def _on_committed(self, step: int, drop: int) -> None:
        if self.parts is not None:
            self.parts.checkpoints.committed(step, drop)

    def _on_grad(self, msg: wire.Grad) -> None:
        parts = self.parts
        try:
            if msg.to_stage != self.stage:
                raise wire.WireError(f"gradient addressed to stage {msg.to_stage}", "GRAD.to_stage")
            wire.check_tensor(msg.g, "GRAD.g", parts.logic.dev.wire_dtype, parts.out_shape, parts.cfg.batch_size,
                              exact=True)
            wire.check_finite(msg.g, "GRAD.g")
            with self.timings.span("compute"):
                dx = parts.logic.receive_grad(msg.step, msg.g, msg.true_grad)
        except (wire.WireError, KeyError, ValueError) as exc:
            self.links.reject(exc)
            return
        if dx is not None and self.stage > 0:
            self.links.send_coord(wire.Grad(msg.step, self.stage - 1, msg.true_grad, dx))

    # ------------------------------------------------------------------ training
    def _send_down(self, msg: wire.Activation) -> None:
        self.links.send_down(msg)

    def _wait_for_gradients(self, until=None) -> None:
        """Serve the links until no step awaits its gradient (or `until()` holds)."""
        logic = self.parts.logic
        self.links.wait("wait_grad", until or (lambda: logic.outstanding() == 0))

    def train_step(self, step: int, epoch: int, x: torch.Tensor, labels: torch.Tensor) -> None:
        parts = self.parts
        true_grad = parts.cfg.true_grad_at(step)
        self.timings.recording = parts.reporter.steps < parts.cfg.timeline_steps
        parts.logic.begin_epoch(epoch)
        if parts.is_last:
            with self.timings.span("compute"):
                _, dx = parts.logic.last_step(step, x, labels, true_grad)
            if dx is not None:
                self.links.send_coord(wire.Grad(step, self.stage - 1, true_grad, dx))
        else:
            with self.timings.span("compute"):
                h = parts.logic.forward(step, x, labels, true_grad)
            self._send_down(wire.Activation(step, epoch, Phase.TRAIN, true_grad, h, labels))
            with self.timings.span("compute"):
                dx = parts.logic.local_update(step)
            if dx is not None:
                self.links.send_coord(wire.Grad(step, self.stage - 1, False, dx))
            if parts.logic.rule.waits_for_gradient:
                self._wait_for_gradients(lambda: step not in parts.logic.kept)
        parts.reporter.step_done(step, int(labels.shape[0]))

    def _slowed(self, train_step: Callable[..., None], seconds: float) -> Callable[..., None]:
        """A fault (--slow-stage): every training step first sleeps, as compute (the bottleneck)."""
        def slowed(*args: object) -> None:
            with self.timings.span("compute"):
                time.sleep(seconds)
            train_step(*args)
        return slowed

    def checkpoint(self, step: int, epoch: int) -> None:
        parts = self.parts
        parts.checkpoints.take(step, epoch, pass_marker=None if parts.is_last else self._send_down,
                           wait_for_gradients=self._wait_for_gradients, tell=self.links.send_coord)

    def run_first(self) -> None:
        """Stage 0: train from the data, evaluate, take checkpoints at step boundaries."""
        parts = self.parts
        ds = parts.dataset
        per_epoch = steps_per_epoch(len(ds.train), parts.cfg.batch_size)
        for event in schedule(parts.cfg, split_batches(parts.cfg, ds.train), per_epoch, parts.total_steps, parts.first_step):
            if isinstance(event, TrainBatch):
                self.train_step(event.step, event.epoch, event.x, event.labels)
            elif isinstance(event, Evaluate):
                self.evaluate_first(ds.test, event.epoch, event.step)
            elif isinstance(event, Boundary):
                if self._checkpoint_asked is not None:
                    self._checkpoint_asked = None
                    self.checkpoint(event.step, event.epoch)
            elif isinstance(event, End) and not parts.is_last:
                self._send_down(wire.Activation.marker(Phase.END, event.step, event.epoch))

    def evaluate_first(self, test, epoch: int, step: int) -> None:
        parts = self.parts
        tally = EvalTally(parts.logic.loss_fn)
        for b, (x, y) in enumerate(eval_batches(test, parts.cfg.batch_size, parts.cfg.eval_samples)):
            with self.timings.span("compute"):
                out = parts.logic.eval_forward(x, fresh=b == 0)
            if parts.is_last:
                tally.add(out, y)
            else:
                self._send_down(wire.Activation(b, epoch, Phase.EVAL, False, out, y))
        if parts.is_last:
            self.links.send_coord(wire.EvalResult(epoch, step, tally.loss, tally.accuracy, tally.n))
        else:
            self._send_down(wire.Activation.marker(Phase.EVAL_END, step, epoch))

    def run_rest(self) -> None:
        """Stages > 0: act on what arrives from the stage before until its end marker."""
        parts = self.parts
        tally = EvalTally(parts.logic.loss_fn)
        order = StreamOrder(parts.cfg, parts.reporter.last_step)
        while True:
            msg = self.links.recv_activation()
            problem = order.problem(msg.phase, msg.step, msg.true_grad)
            if problem is not None:
                self.links.reject(wire.WireError(f"ACTIVATION: {problem}", "ACTIVATION.step"))
                continue
            order.accept(msg.phase, msg.step)
            if msg.phase is Phase.TRAIN:
                self.train_step(msg.step, msg.epoch, msg.h, msg.labels)
            elif msg.phase is Phase.EVAL:
                with self.timings.span("compute"):
                    out = parts.logic.eval_forward(msg.h, fresh=msg.step == 0)
                    if parts.is_last:
                        tally.add(out, msg.labels)
                if not parts.is_last:
                    self._send_down(wire.Activation(msg.step, msg.epoch, Phase.EVAL, False, out, msg.labels))
            elif msg.phase is Phase.CHECKPOINT:
                self.checkpoint(msg.step, msg.epoch)
            elif msg.phase is Phase.EVAL_END:
                if parts.is_last:
                    self.links.send_coord(wire.EvalResult(msg.epoch, msg.step, tally.loss, tally.accuracy, tally.n))
                    tally = EvalTally(parts.logic.loss_fn)
                else:
                    self._send_down(msg)
            else:  # end
                if not parts.is_last:
                    self._send_down(msg)
                return

    def finish(self) -> None:
        """Wait for the gradients still travelling back, save, report, wait for STOP."""
        parts = self.parts
        self._wait_for_gradients()
        ended = time.monotonic()
        path = final_path(parts.run_dir, self.stage)
        parts.checkpoints.save(path, parts.reporter.last_step)
        # traces for `launch.py compare` (too large for a control message's header bound)
        atomic_write_json(parts.run_dir / f"timeline-stage{self.stage}.json", self.timings.timeline)
        if parts.logic.snapshots:
            atomic_write_json(parts.run_dir / f"sg-snapshots-stage{self.stage}.json", parts.logic.snapshots)
        parts.reporter.report(final=True)
        self.links.send_coord(wire.Done(self.stage, parts.reporter.final_summary(
            ended=ended, endpoint=self.links.endpoint, core=parts.core, units=parts.units, checkpoint=str(path))))
        while True:  # until STOP (raises Stopped) or the coordinator vanishes
            self._wait_for_gradients(lambda: False)

    def run(self) -> None:
        start = self.handshake()
        self.setup(start)
        self.wait_begin()
        self.parts.reporter.start()
        if self.stage == 0:
            self.run_first()
        else:
            self.run_rest()
        self.finish()

    def close(self) -> None:
        if self.parts is not None:
            self.parts.logic.close()  # a replicated stage stops its other replicas
        self.links.close()


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
    except (Refused, TimeoutError) as exc:
        print(str(exc), file=sys.stderr, flush=True)
        code = 1
    except ProcessFailure as exc:  # the coordinator is gone (nobody to tell), or a replica is
        print(str(exc), file=sys.stderr, flush=True)
        code = 1
        if not exc.verdict.about(Role.COORDINATOR):  # a replica's: sent as it is
            _report(worker, spec.stage, bounded(exc.verdict))
    except SystemExit as exc:  # SIGTERM: told to stop, nothing to report
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException as exc:  # report anything, then exit non-zero
        code = 1
        tb = traceback.format_exc(limit=4)
        print(f"[stage {spec.stage}] {tb}", file=sys.stderr, flush=True)
        _report(worker, spec.stage, own_failure(spec.stage, exc))
    finally:
        worker.close()
    sys.exit(code)


def _report(worker: LayerWorker, stage: int, verdict: Verdict) -> None:
    """Tell the coordinator why this stage cannot go on (ERROR), if it can still be told."""
    try:
        worker.links.send_coord(wire.Error(stage, verdict))
    except zmq.ZMQError:
        pass
