"""Whether the processes a run depends on are still doing their part, said one way everywhere.

A run depends on its stage workers (watched by the coordinator), a stage's replicas (by the
stage worker that started them), the pipeline contender's ranks (by the launcher) and the
coordinator (by every worker). Each of these observers keeps one `Watch` over the processes it
depends on; the watch decides, from what it is told (who is who, what was heard, when the run
advanced) and from the exit status of the processes it started, whether one has

- exited (with a code, or killed by a signal),
- failed, in its own words (an error it reported),
- fallen silent (sent nothing, not even a heartbeat, for the silence limit),
- stopped the run advancing (no progress for the stall limit, although all are alive), or
- never become ready (within the start limit),

and says so as a `Verdict`: which process (stage N, replica r of stage N, pipeline rank r, the
coordinator; its pid, and its host where that is another), what happened, and the option that
bounds it. A process that failed in its own words also says what it ran into (`Fault`): whether
the same run would meet it again. An observer that cannot go on raises `ProcessFailure`, the one
error that carries a verdict; a stage sends the coordinator its verdict as it is (ERROR), so a
replica's exit reaches the coordinator as one; the restart policy reads the verdict, never the
words.

A process's identity is data here (`Process`), given by whoever started or registered it, not
read back from a process name.
"""
from __future__ import annotations

import math
import socket
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Any, Optional

from synthgrad.common.procs import alive, describe_exit
from synthgrad.common.reports import RunFailed

__all__ = ["Cause", "Fault", "Limit", "Limits", "Process", "ProcessFailure", "Role", "Verdict", "Watch",
           "elsewhere", "exit_verdict", "reported"]


class Role(Enum):
    """What a watched process is to the run."""
    STAGE = "stage"
    REPLICA = "replica"  # one of a stage's extra processes (workers/replicas.py)
    RANK = "pipeline rank"  # a process of the pipeline contender (workers/pipeline.py)
    COORDINATOR = "coordinator"


def elsewhere(host: Optional[str]) -> Optional[str]:
    """`host` when it is not this machine, else None: a host is named only where it tells the
    reader something (a local run's messages stay short)."""
    return host if host and host != socket.gethostname() else None


@dataclass(frozen=True)
class Process:
    """Who a verdict is about. `index`: the stage's number, the replica's (1..R-1) or the rank's."""
    role: Role
    index: int = -1
    stage: int = -1  # a replica's stage
    pid: Optional[int] = None
    host: Optional[str] = None  # set only when it is another host (`elsewhere`)
    address: str = ""  # where it listens (the coordinator's endpoint)

    @classmethod
    def of_stage(cls, stage: int, pid: Optional[int] = None, host: Optional[str] = None) -> "Process":
        return cls(Role.STAGE, stage, stage, pid, host)

    @classmethod
    def of_replica(cls, stage: int, replica: int, pid: Optional[int] = None) -> "Process":
        return cls(Role.REPLICA, replica, stage, pid)

    @classmethod
    def of_rank(cls, rank: int, pid: Optional[int] = None) -> "Process":
        return cls(Role.RANK, rank, rank, pid)

    @classmethod
    def of_coordinator(cls, address: str = "", pid: Optional[int] = None) -> "Process":
        return cls(Role.COORDINATOR, pid=pid, address=address)

    @property
    def name(self) -> str:
        """What it is, without where: "stage 2", "stage 1: its replica 1", "pipeline rank 0"."""
        if self.role is Role.STAGE:
            return f"stage {self.index}"
        if self.role is Role.REPLICA:
            return f"stage {self.stage}: its replica {self.index}"
        if self.role is Role.RANK:
            return f"pipeline rank {self.index}"
        return "the coordinator" + (f" at {self.address}" if self.address else "")

    def __str__(self) -> str:
        where = [f"pid {self.pid}"] if self.pid is not None else []
        if self.host:
            where.append(f"on {self.host}")
        return self.name + (f" ({' '.join(where)})" if where else "")


def _group(processes: tuple[Process, ...]) -> str:
    """Several processes of one role by number: "stages [1, 2]", "pipeline ranks [3]"."""
    roles = {p.role for p in processes}
    if len(roles) != 1 or Role.COORDINATOR in roles:
        return ", ".join(p.name for p in processes)
    role, numbers = roles.pop(), [p.index for p in processes]
    if role is Role.REPLICA:
        return f"stage {processes[0].stage}: its replicas {numbers}"
    return f"{role.value}s {numbers}"


class Cause(Enum):
    EXITED = "exited"  # exited by itself (code), or gone with its code unknown (not our child)
    KILLED = "killed"  # ended by a signal
    REPORTED = "failed"  # said why it failed (its own words)
    SILENT = "silent"  # sent nothing for the silence limit
    STALLED = "stalled"  # the run made no progress for the stall limit
    NOT_READY = "not ready"  # did not become ready within the start limit


class Fault(Enum):
    """What a process that said why it failed (Cause.REPORTED) ran into, as far as another try
    is concerned: whether the same run from the same checkpoint would meet it again."""
    OTHER = "other"  # anything else (a lost peer, a full disk, ...): another try may go otherwise
    DIVERGED = "diverged"  # training produced NaN or Inf: the same steps diverge again
    CONFIGURATION = "configuration"  # the configuration, the model or the data cannot be used


@dataclass(frozen=True)
class Verdict:
    """What became of which processes, in words every observer shares (`str(verdict)`)."""
    processes: tuple[Process, ...]  # whom it is about (a stall: those that were to progress)
    cause: Cause
    code: Optional[int] = None  # EXITED, KILLED: the exit status as multiprocessing gives it (-N: signal N)
    seconds: Optional[float] = None  # SILENT, STALLED: for how long; NOT_READY: the limit
    detail: str = ""  # REPORTED: its words; STALLED: what counts as progress; EXITED, KILLED: when
    hint: str = ""  # what bounds it or what to do, said last in parentheses
    fault: Fault = Fault.OTHER  # REPORTED: what it ran into

    @property
    def process(self) -> Optional[Process]:
        return self.processes[0] if self.processes else None

    def about(self, role: Role) -> bool:
        return any(p.role is role for p in self.processes)

    def __str__(self) -> str:
        who = str(self.processes[0]) if len(self.processes) == 1 else _group(self.processes)
        cause = self.cause
        if cause is Cause.REPORTED:
            text = f"{self.processes[0].name} failed: {self.detail}"  # it named itself in its words
        elif cause in (Cause.EXITED, Cause.KILLED):
            text = f"{who} {'has exited' if self.code is None else describe_exit(self.code)}"
            text += f" {self.detail}" if self.detail else ""
        elif cause is Cause.SILENT:
            text = f"{who} sent nothing for {self.seconds:.1f}s: it is hung or unreachable"
        elif cause is Cause.STALLED:
            roles = {p.role.value for p in self.processes}
            everyone = f"every {roles.pop()}" if len(roles) == 1 else "everyone"
            text = f"no progress ({self.detail}) for {self.seconds:.1f}s although {everyone} is alive"
        else:  # NOT_READY: several by number ("stages [1, 2]"), or the coordinator
            alone = len(self.processes) == 1 and self.processes[0].role is Role.COORDINATOR
            text = f"{_group(self.processes)} {'was' if alone else 'were'} not ready within {self.seconds:.0f}s"
        return text + (f" ({self.hint})" if self.hint else "")


def exit_verdict(process: Process, code: Optional[int], when: str = "") -> Verdict:
    """`process` has ended with exit status `code` (None: unknown, it is not our child)."""
    return Verdict((process,), Cause.KILLED if code is not None and code < 0 else Cause.EXITED, code,
                   detail=when)


def reported(process: Process, words: str, hint: str = "", fault: Fault = Fault.OTHER) -> Verdict:
    """`process` failed and said why (its words name it: they are said after its name alone)."""
    return Verdict((process,), Cause.REPORTED, detail=words, hint=hint, fault=fault)


class ProcessFailure(RunFailed):
    """A process the run depends on exited, failed, fell silent or never became ready, or the run
    stopped advancing: `verdict` says which and how. `by`: the observer, where the message is
    read beside others' (a worker's stderr); `note`: what the observer adds."""

    def __init__(self, verdict: Verdict, by: str = "", note: str = ""):
        self.verdict, self.by, self.note = verdict, by, note
        super().__init__((f"{by}: " if by else "") + str(verdict) + (f" ({note})" if note else ""))

    def __reduce__(self):
        return type(self), (self.verdict, self.by, self.note)


@dataclass(frozen=True)
class Limit:
    seconds: float
    hint: str  # the option that sets it, or what to do, as the verdict says it


@dataclass(frozen=True)
class Limits:
    """What an observer allows; None: not watched."""
    start: Optional[Limit] = None  # every expected process ready, counted from the watch's creation
    silence: Optional[Limit] = None  # each process heard from, once started
    stall: Optional[Limit] = None  # the run advances, once started
    progress: str = "nothing new"  # what counts as progress, as a stall's verdict says it


@dataclass
class _Entry:
    process: Process
    handle: Any = None  # a child's handle (multiprocessing.Process, a fork server's Forked): .exitcode
    pid_every: float = 0.0  # > 0: not our child, probed by pid at most this often
    may_finish: bool = False  # an exit with code 0 is its work done, not a failure
    when: str = ""  # said after how it exited ("during the run")
    ready: bool = False
    heard: Optional[float] = None
    finished: bool = False
    probed: float = -math.inf
    gone: bool = False  # a pid-probed process found gone


@dataclass
class Watch:
    """One observer's watch over the processes it depends on, by the observer's keys (a stage's
    number, a replica's, a rank's). It keeps no clock of its own: every judgement takes `now`
    (time.monotonic()), so its rules run on any clock."""
    limits: Limits = field(default_factory=Limits)
    created: float = 0.0
    is_alive: Callable[[int], bool] = alive  # probes a process that is not our child
    started: Optional[float] = field(default=None, init=False)  # when every process was ready
    last_advance: float = field(default=0.0, init=False)  # when the run last made progress
    max_step: int = field(default=-1, init=False)  # the highest step reported
    entries: dict[Hashable, _Entry] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        self.last_advance = self.created

    # ------------------------------------------------------------------ who is who
    def add(self, key: Hashable, process: Process, *, handle: Any = None, pid_every: float = 0.0,
            may_finish: bool = False, when: str = "") -> None:
        """Watch `process`: its exit through `handle` (our child) or by its pid every `pid_every`
        seconds (another's), and whatever the observer reports about it under `key`."""
        self.entries[key] = _Entry(process, handle, pid_every, may_finish, when)

    def adopt(self, key: Hashable, handle: Any, pid: Optional[int] = None, when: str = "") -> None:
        """The process watched as `key` was started by us: its exit status is `handle`'s."""
        entry = self.entries[key]
        entry.handle, entry.when = handle, when
        if pid is not None:
            entry.process = replace(entry.process, pid=pid)

    def identify(self, key: Hashable, pid: Optional[int], host: Optional[str] = None) -> None:
        """Who the process watched as `key` turned out to be (it registered)."""
        entry = self.entries[key]
        entry.process = replace(entry.process, pid=pid, host=elsewhere(host))

    def process(self, key: Hashable) -> Process:
        return self.entries[key].process

    # ------------------------------------------------------------------ what the observer saw
    def ready(self, key: Hashable) -> None:
        self.entries[key].ready = True

    def all_ready(self) -> bool:
        return all(e.ready for e in self.entries.values())

    def start(self, now: float) -> None:
        """Every process is ready: silence and stalls count from now."""
        self.started = self.last_advance = now
        for e in self.entries.values():
            e.ready = True

    def heard(self, key: Hashable, now: float) -> None:
        self.entries[key].heard = now

    def advanced(self, now: float, step: Optional[int] = None) -> None:
        """Progress: an evaluation, a result, or (with `step`) a report of a new highest step."""
        if step is None:
            self.last_advance = now
        elif step > self.max_step:
            self.max_step, self.last_advance = step, now

    def finished(self, key: Hashable, now: float) -> None:
        """Its work is done (it said so): that is progress, and no more is asked of it."""
        self.entries[key].finished = True
        self.advanced(now)

    # ------------------------------------------------------------------ judgement
    def _ended(self, entry: _Entry, now: float) -> tuple[bool, Optional[int]]:
        """(has it ended, its exit status or None when unknown)."""
        if entry.handle is not None:
            code = entry.handle.exitcode
            return code is not None, code
        if entry.pid_every > 0 and entry.process.pid is not None and not entry.gone \
                and now - entry.probed >= entry.pid_every:
            entry.probed = now
            entry.gone = not self.is_alive(entry.process.pid)
        return entry.gone, None

    def exits(self, now: Optional[float] = None) -> list[Verdict]:
        """Every process that has ended other than by finishing its work; in the order added."""
        now = time.monotonic() if now is None else now
        found = []
        for e in self.entries.values():
            ended, code = self._ended(e, now)
            if not ended:
                continue
            if e.may_finish and code == 0:
                e.finished = True
                continue
            found.append(exit_verdict(e.process, code, e.when))
        return found

    def all_ended(self) -> bool:
        now = time.monotonic()
        return all(self._ended(e, now)[0] for e in self.entries.values())

    def verdict(self, now: float) -> Optional[Verdict]:
        """Why the observer cannot go on, or None: an exit first (it names the signal), then a
        start that took too long, a silence, a stall."""
        gone = self.exits(now)
        if gone:
            return gone[0]
        limits = self.limits
        if self.started is None:
            if limits.start is not None and now - self.created > limits.start.seconds:
                waiting = tuple(e.process for e in self.entries.values() if not e.ready)
                return Verdict(waiting, Cause.NOT_READY, seconds=limits.start.seconds, hint=limits.start.hint)
            return None
        if limits.silence is not None:
            for e in self.entries.values():
                if e.heard is not None and now - e.heard > limits.silence.seconds:
                    return Verdict((e.process,), Cause.SILENT, seconds=now - e.heard, hint=limits.silence.hint)
        if limits.stall is not None and now - self.last_advance > limits.stall.seconds:
            working = tuple(e.process for e in self.entries.values() if not e.finished)
            done = [e.process.index for e in self.entries.values() if e.finished]
            roles = {e.process.role.value for e in self.entries.values()}
            plural = f"{roles.pop()}s" if len(roles) == 1 else "processes"
            return Verdict(working, Cause.STALLED, seconds=now - self.last_advance, detail=limits.progress,
                           hint=f"{limits.stall.hint}; {plural} done: {done}")
        return None

    def check(self, now: float, by: str = "") -> None:
        """Raise ProcessFailure when the observer cannot go on."""
        verdict = self.verdict(now)
        if verdict is not None:
            raise ProcessFailure(verdict, by)
