"""Process lifecycle, the same for every process synthgrad starts: fork, pin, watch, stop.

Workers come from this process's fork server (common/forkserver.py), which hands each one over
as a child of this process; where there is none (not Linux) they are spawned. Shutdown
escalates (ask, wait, SIGTERM, wait, SIGKILL), is safe to call twice, and runs at interpreter
exit too, so no worker outlives the process that started it. Workers additionally ask the
kernel for SIGTERM when their parent dies (PR_SET_PDEATHSIG) and watch the coordinator's pid
themselves.
"""
from __future__ import annotations

import atexit
import ctypes
import multiprocessing as mp
import os
import signal
import time
from dataclasses import dataclass
from collections.abc import Mapping
from typing import Any, Callable, Optional

import psutil

from synthgrad.common import forkserver
from synthgrad.common.forkserver import ForkServer


def describe_exit(code: Optional[int]) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code}"


def die_with_parent() -> None:
    """Linux: have the kernel send SIGTERM to this process when its parent exits (a worker's
    parent is the process that asked for it: common/forkserver.py hands it over first)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass  # not Linux: the worker's own parent-liveness check still applies


def pin_to_core(core: int, count: int = 1) -> None:
    """Pin this process to `count` cores from `core` on, in the order this process may use them
    (common/placement.py gives each stage such a block); core -1: not pinned."""
    if core < 0:
        return
    try:
        usable = available_cores()
        first = usable.index(core) if core in usable else 0
        psutil.Process().cpu_affinity(usable[first:first + max(count, 1)] or [core])
    except (AttributeError, psutil.Error, ValueError):
        pass  # pinning is an optimisation; platforms without affinity run unpinned


def available_cores() -> list[int]:
    try:
        return sorted(psutil.Process().cpu_affinity())
    except (AttributeError, psutil.Error):
        return list(range(os.cpu_count() or 1))


def alive(pid: int) -> bool:
    try:
        p = psutil.Process(pid)
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _stopped(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_STOPPED
    except psutil.Error:
        return False


@dataclass
class Child:
    name: str
    process: Any  # multiprocessing.Process (spawn context)


# What every worker imports before it does anything. A child forked from a server that has
# imported these starts in milliseconds instead of importing them afresh: about 1.5 s of one
# core for torch, and as much again for torch._dynamo, which torch.optim imports when the first
# optimiser is made; paid by every process at every start and restart. The server itself only
# imports: no torch thread pool and no CUDA context exist in it to be forked.
PRELOAD = ["torch", "torch._dynamo", "synthgrad.workers.worker", "synthgrad.workers.pipeline"]

# OpenMP settings the user chose, which worker_environment leaves alone
OPENMP_WAIT_SETTINGS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")
_server: Optional[ForkServer] = None  # this process's fork server (Linux), made on first use
_spawn_env: dict[str, str] = {}  # elsewhere: what the last warm_up added to this environment


def fork_server() -> Optional[ForkServer]:
    """This process's fork server (common/forkserver.py), or None where workers are spawned."""
    global _server
    if _server is not None and not _server.owned_here():
        _server = None  # forked from a process that had one (a server forked from its asker): not ours
    if _server is None and forkserver.supported():
        _server = ForkServer(PRELOAD)
    return _server


def _server_env() -> dict[str, str]:
    server = fork_server()
    return server.env if server is not None else _spawn_env


def _users_own(key: str) -> bool:
    """An OpenMP setting in this environment that the user made (not one warm_up left there
    for spawned children)."""
    return key in os.environ and _server_env().get(key) != os.environ[key]


def openmp_threads_sleep() -> bool:
    """Whether this process's idle OpenMP threads sleep rather than spin: what a stage that
    yields needs of the stages it yields to (they share this environment)."""
    return os.environ.get("OMP_WAIT_POLICY", "").strip().upper() == "PASSIVE"


def worker_environment(yielding: bool) -> dict[str, str]:
    """What a run's workers add to this process's environment. With stages that yield the CPU
    (common/placement.py yielding_stages), a stage's idle OpenMP threads sleep at once instead
    of spinning (OMP_WAIT_POLICY=PASSIVE), so the yielding stages get the cores they leave:
    spinning, they would keep the cores busy and yielding would gain nothing (docs/results.md).
    Otherwise nothing: a stage alone on its cores, and backprop, run with OpenMP's defaults.
    The user's own setting wins."""
    if not yielding or any(_users_own(k) for k in OPENMP_WAIT_SETTINGS):
        return {}
    return {"OMP_WAIT_POLICY": "PASSIVE"}


def warm_up(env: Optional[Mapping[str, str]] = None) -> None:
    """Start the fork server now, so that its imports run while this process prepares the run
    (data checks, keys) instead of after it; with `env` added to its environment, which every
    worker it forks then has from the start (OpenMP reads its settings once, when torch is
    imported, which the server does). A server started with other additions is replaced;
    workers already running are this process's children, not the server's, and go on."""
    global _spawn_env
    env = dict(env or {})
    server = fork_server()
    if server is not None:
        server.start(env)
        return
    for key, value in _spawn_env.items():  # spawn: each child starts from this environment
        if os.environ.get(key) == value and key not in env:
            del os.environ[key]  # what the last run added, and this one does not want
    os.environ.update(env)
    _spawn_env = env


def warm_up_early() -> None:
    """Start the fork server before this process imports torch, with what most runs' workers
    add to the environment (nothing): its imports (about 3 s of CPU) then run beside this
    process's own on another core, instead of after them. A run whose layout asks for another
    environment replaces it (warm_up); where workers are spawned this does nothing."""
    server = fork_server()
    if server is not None and server.pid is None:
        server.start({})


def cpu_priority() -> str:
    """This process's CPU priority as the OS holds it: "idle" (SCHED_IDLE), "nice N", or
    "normal"; what a stage's summary reports."""
    try:
        if os.sched_getscheduler(0) == os.SCHED_IDLE:  # type: ignore[attr-defined]
            return "idle"
    except (AttributeError, OSError):
        pass
    niceness = os.nice(0) if hasattr(os, "nice") else 0
    return f"nice {niceness}" if niceness else "normal"


def yield_cpu() -> None:
    """Run this process at the lowest CPU priority (nice 19), for a stage that yields the cores
    to heavier ones (common/placement.py yielding_stages). On Linux niceness is per thread:
    the calling thread and those it starts later (torch's) get it; ZeroMQ's I/O threads,
    started before, keep theirs, as they should (they only move messages).
    Not SCHED_IDLE, which measured no faster (docs/results.md): a process at nice 19 still gets
    a sliver of a busy core, so other load on the machine cannot starve a stage past its
    heartbeats."""
    try:
        os.nice(19)
    except (AttributeError, OSError):
        pass  # no niceness here (Windows): the stage runs at normal priority


class ProcessGroup:
    """Children of this process, forked by its fork server (spawned where there is none), and
    stopped by their own pids."""

    def __init__(self) -> None:
        self.children: list[Child] = []
        self._closed = False
        atexit.register(self.shutdown)

    def start(self, name: str, target: Callable[..., None], *args: Any) -> Child:
        server = fork_server()
        if server is not None:
            server.start(server.env)  # a no-op while it runs; warm_up chose its environment
            proc: Any = server.fork(name, target, args)
        else:
            proc = mp.get_context("spawn").Process(target=target, args=args, name=name, daemon=False)
            proc.start()
        child = Child(name, proc)
        self.children.append(child)
        return child

    def dead(self) -> list[Child]:
        """Children that have exited (for any reason)."""
        return [c for c in self.children if c.process.exitcode is not None]

    def wait(self, timeout: float) -> bool:
        """Wait for every child to exit by itself; True if all did."""
        deadline = time.monotonic() + timeout
        for c in self.children:
            c.process.join(max(0.0, deadline - time.monotonic()))
        return all(c.process.exitcode is not None for c in self.children)

    def kill(self) -> None:
        """SIGKILL every child that is still running, at once."""
        self._signal([c.process for c in self.children], signal.SIGKILL, timeout=1.0)

    def shutdown(self, grace: float = 3.0) -> None:
        """Stop every child: wait `grace`, then SIGTERM, then SIGKILL. Idempotent."""
        if self._closed:
            return
        self._closed = True
        procs = [c.process for c in self.children if c.process.pid is not None]
        # a stopped process cannot act on STOP or SIGTERM
        self._signal([p for p in procs if p.exitcode is None and _stopped(p.pid)], signal.SIGKILL, 0.5)
        self.wait(grace)
        self._signal(procs, signal.SIGTERM, timeout=2.0)
        self._signal(procs, signal.SIGKILL, timeout=2.0)
        atexit.unregister(self.shutdown)

    @staticmethod
    def _signal(procs: list[Any], sig: int, timeout: float) -> None:
        """Send `sig` to those of `procs` still running and wait up to `timeout` for them, by
        their own handles: their exit codes stay readable (psutil's wait would reap them)."""
        running = [p for p in procs if p.pid is not None and p.exitcode is None]
        for p in running:
            try:
                os.kill(p.pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.monotonic() + timeout
        for p in running:
            p.join(max(0.0, deadline - time.monotonic()))
