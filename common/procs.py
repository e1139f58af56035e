"""Process lifecycle, the same for every process synthgrad starts: spawn, pin, watch, stop.

Shutdown escalates (ask, wait, SIGTERM, wait, SIGKILL), is safe to call twice, and runs at
interpreter exit too, so no worker outlives the process that started it. Workers additionally
ask the kernel for SIGTERM when their parent dies (PR_SET_PDEATHSIG) and watch the coordinator's
pid themselves.
"""
from __future__ import annotations

import atexit
import ctypes
import multiprocessing as mp
import os
import signal
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import psutil


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
    """Linux: have the kernel send SIGTERM to this process when its parent exits."""
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


def terminate_then_kill(pids: list[int], timeout: float = 2.0) -> None:
    """SIGTERM the processes, wait up to `timeout`, SIGKILL what is left, and reap."""
    procs = []
    for pid in pids:
        try:
            procs.append(psutil.Process(pid))
        except psutil.Error:
            pass  # already gone
    for p in procs:
        try:
            p.terminate()
        except psutil.Error:
            pass
    _, still = psutil.wait_procs(procs, timeout=timeout)
    for p in still:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(still, timeout=timeout)


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


def start_method() -> mp.context.BaseContext:
    """forkserver where the platform has it (Linux, macOS), with PRELOAD imported once by the
    server; spawn elsewhere. Either way a child shares no state with the process that asked for
    it: the server was itself started fresh, before any of this process's threads or sockets."""
    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(PRELOAD)
        return ctx
    return mp.get_context("spawn")


def warm_up() -> None:
    """Start the fork server now, so that its imports run while this process prepares the run
    (costs, layout, data checks) instead of after it."""
    if start_method().get_start_method() == "forkserver":
        from multiprocessing import forkserver
        forkserver.ensure_running()


class ProcessGroup:
    """Children started from a clean server process (start_method) and stopped by their own
    pids."""

    def __init__(self) -> None:
        self._ctx = start_method()
        self.children: list[Child] = []
        self._closed = False
        atexit.register(self.shutdown)

    def start(self, name: str, target: Callable[..., None], *args: Any) -> Child:
        proc = self._ctx.Process(target=target, args=args, name=name, daemon=False)
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
        for c in self.children:
            if c.process.exitcode is None and c.process.pid and alive(c.process.pid):
                try:
                    psutil.Process(c.process.pid).kill()
                except psutil.Error:
                    pass
        for c in self.children:
            c.process.join(1.0)

    def shutdown(self, grace: float = 3.0) -> None:
        """Stop every child: wait `grace`, then SIGTERM, then SIGKILL. Idempotent."""
        if self._closed:
            return
        self._closed = True
        procs = [c.process for c in self.children if c.process.pid is not None]
        frozen = [p.pid for p in procs if p.exitcode is None and _stopped(p.pid)]
        terminate_then_kill(frozen, timeout=0.0)  # a stopped process cannot act on STOP or SIGTERM
        self.wait(grace)
        terminate_then_kill([p.pid for p in procs if p.exitcode is None])
        for p in procs:
            p.join(0.5)
        atexit.unregister(self.shutdown)
