"""A stage on several processes: more than one core's worth of work on the heaviest layer.

`--replicas` gives a stage R processes. The stage worker (the leader, replica 0) keeps the
stage's links and its place in the run; it starts the other R-1 replicas on its own host and
joins them in a torch.distributed process group (gloo). Every training call of the stage's logic
(forward, the rule's update, a returning gradient, the last stage's step) runs on all R at
once, each on an equal, contiguous part of the batch's rows: the leader puts the batch in
shared memory (`Rows`) and broadcasts the call, every replica copies out its rows, computes,
and writes its part of what goes on (the output, dL/dx) back beside the others'. Before
any model steps, its gradients are summed over the replicas (workers/sync.py), with every loss
counted for its share of the batch, so each replica takes the step the whole batch gives and
all replicas keep equal weights, optimiser states, predictors and heads. Evaluation runs on the
leader alone (the weights are the same), and so does everything else the stage does.

Why rows of one batch and not PipeDream's alternate batches: each rule keeps its exact step
semantics (alternate batches would add a step of staleness to every replicated stage, or an
averaging of two batches' updates), `locked` still reproduces backprop, and nothing outside the
stage changes: the links, the coordinator's relay, checkpoints, restarts and hosts see one stage.
What it costs is a copy of each batch into shared memory, each replica's copy of its rows out
and of its results back, and a few small collectives a step.
"""
from __future__ import annotations

import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from synthgrad.common.config import RunConfig
from synthgrad.common.costs import Helpers
from synthgrad.common.devices import Compute
from synthgrad.common.liveness import Process, ProcessFailure, Watch
from synthgrad.common.procs import ProcessGroup, die_with_parent, pin_to_core, yield_cpu
from synthgrad.common.reports import RunFailed
from synthgrad.workers.stage import StageLogic, StagePlan, build_stage
from synthgrad.workers.sync import GradientSync

FORWARD, LOCAL_UPDATE, RECEIVE_GRAD, LAST_STEP, STOP = range(1, 6)
# Collectives wait this long: a replica idles in one while the leader evaluates, checkpoints or
# waits for its input. A replica that dies closes its connections, which fails the leader's next
# collective at once, and the leader's watch names it (common/liveness.py); a leader that dies
# takes its replicas with it (die_with_parent); a leader that hangs is the coordinator's
# watchdog's to notice.
IDLE_TIMEOUT = timedelta(days=7)


@dataclass(frozen=True)
class Rows:
    """Shared memory on this host through which a batch goes to the replicas and their results
    come back: one buffer per tensor a training call moves, each the whole batch's rows (a
    replica uses its part). Handed to the replicas when they start (torch shares the memory)."""
    x: torch.Tensor  # [B, *in]: the stage's input
    labels: torch.Tensor  # [B]
    g: torch.Tensor  # [B, *out]: a returning gradient
    h: torch.Tensor  # [B, *out]: the output
    dx: torch.Tensor  # [B, *in]: the gradient for the stage before
    loss: torch.Tensor  # [R]: the last stage's loss on each replica's rows

    @classmethod
    def make(cls, batch: int, in_shape: tuple[int, ...], out_shape: tuple[int, ...], replicas: int) -> "Rows":
        def buffer(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
            return torch.zeros(shape, dtype=dtype).share_memory_()
        return cls(buffer(batch, *in_shape), buffer(batch, dtype=torch.int64), buffer(batch, *out_shape),
                   buffer(batch, *out_shape), buffer(batch, *in_shape), buffer(replicas, dtype=torch.float64))

    @staticmethod
    def part(buffer: torch.Tensor, replica: int, replicas: int) -> torch.Tensor:
        n = buffer.shape[0] // replicas
        return buffer[replica * n:(replica + 1) * n]


@dataclass(frozen=True)
class ReplicaSpec:
    stage: int
    replica: int  # 1..replicas-1 (0 is the stage worker)
    replicas: int
    config: RunConfig
    rendezvous: str  # a file the group meets at, on this host
    core: int  # first core of its block; -1: not pinned
    threads: int
    total_steps: int
    rows: Rows
    resume_path: str = ""
    resume_step: int = -1
    yields: bool = False  # the stage yields the CPU (common/placement.py yielding_stages): so does each replica
    helpers: Optional[Helpers] = None  # the stage's helper models, as its START gave them


class ReplicatedLogic:
    """The leader's StageLogic: the same interface, each training call run by every replica on
    its rows. Anything not overridden here is the leader's own (its logic holds the stage's
    state: kept steps, statistics, the module for checkpoints and evaluation)."""

    def __init__(self, logic: StageLogic, replicas: int, group: Any, procs: ProcessGroup, rendezvous: Path,
                 rows: Rows, watch: Watch):
        self.logic = logic
        self.replicas = replicas
        self.group = group
        self.procs = procs
        self.watch = watch  # the replicas' exits, each by its number (not its process's name)
        self.rows = rows
        self._rendezvous = rendezvous
        self._closed = False

    @classmethod
    def start(cls, logic: StageLogic, plan: StagePlan, cfg: RunConfig, stage: int, total_steps: int,
              blocks: list[tuple[int, int]], resume_path: str, resume_step: int,
              yields: bool = False, helpers: Optional[Helpers] = None) -> "ReplicatedLogic":
        """Start replicas 1..R-1 (blocks[r]: their cores and threads) and join them; they must
        all join within --start-timeout."""
        replicas = len(blocks)
        folder = Path(tempfile.mkdtemp(prefix=f"synthgrad-stage{stage}-replicas-"))
        rendezvous = folder / "group"
        rows = Rows.make(cfg.batch_size, plan.in_shape, plan.out_shape, replicas)
        procs = ProcessGroup()
        watch = Watch()  # no limits: a replica is judged by its exit (see IDLE_TIMEOUT)
        try:
            for r in range(1, replicas):
                child = procs.start(f"replica {r}", run_replica, ReplicaSpec(
                    stage, r, replicas, cfg, str(rendezvous), *blocks[r], total_steps, rows,
                    resume_path or "", resume_step, yields, helpers))
                watch.add(r, Process.of_replica(stage, r, child.process.pid), handle=child.process)
            dist.init_process_group("gloo", init_method=rendezvous.as_uri(), rank=0, world_size=replicas,
                                    timeout=timedelta(seconds=cfg.start_timeout))
            group = dist.new_group(list(range(replicas)), timeout=IDLE_TIMEOUT)
        except BaseException:
            procs.shutdown()
            raise
        sync = logic.parts.share.sync
        assert sync is not None
        sync.group = group
        return cls(logic, replicas, group, procs, folder, rows, watch)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.logic, name)

    @property
    def replica_pids(self) -> list[int]:
        return [c.process.pid for c in self.procs.children]

    # ------------------------------------------------------------------ the training calls
    def forward(self, step: int, x: torch.Tensor, labels: torch.Tensor, true_grad: bool) -> torch.Tensor:
        rows = self.rows
        with self._replicas_alive():
            self._command(FORWARD, step, true_grad, (rows.x, x), (rows.labels, labels))
            h = self.logic.forward(step, self._mine(x), self._mine(labels), true_grad)
            return self._collect(rows.h, h)

    def local_update(self, step: int) -> Optional[torch.Tensor]:
        with self._replicas_alive():
            self._command(LOCAL_UPDATE, step)
            dx = self.logic.local_update(step)
            return self._collect(self.rows.dx, dx)

    def receive_grad(self, step: int, g: torch.Tensor, true_grad: bool) -> Optional[torch.Tensor]:
        # the leader's checks first, before any replica is told: a rejected gradient (a step not
        # held, a wrong shape) must leave every replica as it was
        kept = self.logic.kept.get(step)
        if kept is None:
            raise KeyError(f"stage {self.logic.stage}: gradient for step {step}, which it does not hold")
        part = kept.h_detached.shape
        if tuple(g.shape) != (part[0] * self.replicas, *part[1:]):
            raise ValueError(f"stage {self.logic.stage}: gradient for step {step} has shape {list(g.shape)}, "
                             f"its output had {[part[0] * self.replicas, *part[1:]]}")
        with self._replicas_alive():
            self._command(RECEIVE_GRAD, step, true_grad, (self.rows.g, g))
            dx = self.logic.receive_grad(step, self._mine(g), true_grad)
            return self._collect(self.rows.dx, dx)

    def last_step(self, step: int, x: torch.Tensor, labels: torch.Tensor,
                  true_grad: bool) -> tuple[float, Optional[torch.Tensor]]:
        rows = self.rows
        with self._replicas_alive():
            self._command(LAST_STEP, step, true_grad, (rows.x, x), (rows.labels, labels))
            own, dx = self.logic.last_step(step, self._mine(x), self._mine(labels), true_grad)
            rows.loss[0] = own
            dx = self._collect(rows.dx, dx)  # every replica's loss is in rows.loss once this returns
            loss = float(rows.loss.mean())  # equal parts: the batch's mean loss
            # the stage reports the whole batch's loss, weighted as last_step weighted its own rows
            self.logic.stats.loss_sum += (loss - own) * int(self._mine(labels).shape[0])
            return loss, dx

    def close(self) -> None:
        """Stop the other replicas (idempotent)."""
        if self._closed:
            return
        self._closed = True
        try:
            self._command(STOP, -1)
        except RuntimeError:
            pass  # a replica has gone already: its process is stopped below all the same
        finally:
            self.procs.shutdown()
            if dist.is_initialized():
                dist.destroy_process_group()
            for f in self._rendezvous.iterdir():
                f.unlink(missing_ok=True)
            self._rendezvous.rmdir()

    # ------------------------------------------------------------------ collectives
    @contextmanager
    def _replicas_alive(self) -> Iterator[None]:
        """A collective that fails because a replica has gone says which and how (gloo only
        says that a connection closed): ProcessFailure with the watch's verdict."""
        try:
            yield
        except RuntimeError as exc:
            deadline = time.monotonic() + 2.0  # its exit status comes through the fork server
            while not (gone := self.watch.exits()) and time.monotonic() < deadline:
                time.sleep(0.05)
            if not gone:
                raise
            raise ProcessFailure(gone[0]) from exc

    def _command(self, op: int, step: int, flag: bool = False, *inputs: tuple[torch.Tensor, torch.Tensor]) -> None:
        """Put the call's inputs (buffer, batch) in shared memory, then tell every replica."""
        for buffer, batch in inputs:
            if batch.dtype != buffer.dtype or batch.shape != buffer.shape:
                raise RunFailed(f"stage {self.logic.stage}: a batch of {batch.dtype} {list(batch.shape)} for "
                                f"its replicas, which take {buffer.dtype} {list(buffer.shape)}")
            buffer.copy_(batch)
        dist.broadcast(torch.tensor([op, step, int(flag)], dtype=torch.int64), 0, group=self.group)

    def _mine(self, batch: torch.Tensor) -> torch.Tensor:
        """The leader's own rows of a batch: the first part."""
        return batch[:batch.shape[0] // self.replicas]

    def _collect(self, buffer: torch.Tensor, mine: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """Wait until every replica has written its part of a result (and is done reading the
        call's inputs), then the whole result: the leader's rows, then the others'. None when
        the call has no result (on every replica alike)."""
        dist.barrier(group=self.group)
        if mine is None:
            return None
        return torch.cat([mine, buffer[mine.shape[0]:]])


def _take(buffer: torch.Tensor, replica: int, replicas: int) -> torch.Tensor:
    """A replica's rows of a call's input, copied out of shared memory (the buffer is refilled by
    the next call, while a kept step's graph may still need them)."""
    return Rows.part(buffer, replica, replicas).clone()


def _give(buffer: torch.Tensor, result: Optional[torch.Tensor], replica: int, replicas: int, group: Any) -> None:
    """A replica's part of a call's result, written beside the others'; then the call's barrier."""
    if result is not None:
        Rows.part(buffer, replica, replicas).copy_(result)
    dist.barrier(group=group)


def run_replica(spec: ReplicaSpec) -> None:
    """Process entry point of replica `spec.replica` of a stage: build the stage as the leader
    did, load the same checkpoint, then do what the leader says on the rows it is sent."""
    die_with_parent()
    cfg = spec.config
    torch.set_num_threads(spec.threads)
    pin_to_core(spec.core, spec.threads)
    if spec.yields:
        yield_cpu()
    sync = GradientSync(spec.replicas)
    logic, _ = build_stage(cfg, spec.stage, spec.total_steps, Compute.of("cpu", cfg.precision), sync, spec.helpers)
    if spec.resume_path:
        state = torch.load(spec.resume_path, map_location="cpu", weights_only=True)
        logic.load_state_dict(state["state"])
    torch.manual_seed(cfg.seed * 1009 + spec.replica)  # its own dropout masks, not the leader's
    dist.init_process_group("gloo", init_method=Path(spec.rendezvous).as_uri(), rank=spec.replica,
                            world_size=spec.replicas, timeout=timedelta(seconds=cfg.start_timeout))
    group = dist.new_group(list(range(spec.replicas)), timeout=IDLE_TIMEOUT)
    sync.group = group
    command = torch.zeros(3, dtype=torch.int64)
    rows, r, n = spec.rows, spec.replica, spec.replicas
    while True:
        dist.broadcast(command, 0, group=group)
        op, step, flag = (int(v) for v in command)
        if op == STOP:
            break
        if op == FORWARD:
            h = logic.forward(step, _take(rows.x, r, n), _take(rows.labels, r, n), bool(flag))
            _give(rows.h, h, r, n, group)
        elif op == LOCAL_UPDATE:
            _give(rows.dx, logic.local_update(step), r, n, group)
        elif op == RECEIVE_GRAD:
            _give(rows.dx, logic.receive_grad(step, _take(rows.g, r, n), bool(flag)), r, n, group)
        elif op == LAST_STEP:
            loss, dx = logic.last_step(step, _take(rows.x, r, n), _take(rows.labels, r, n), bool(flag))
            rows.loss[r] = loss
            _give(rows.dx, dx, r, n, group)
    dist.destroy_process_group()
