"""The workers' fork server: one process that has imported torch and the worker code once, and
forks a ready worker in milliseconds, for the process that started it and no other.

Why not multiprocessing's forkserver. Its server listens on a socket in the temp folder that any
process of the same user can connect to; a few random bytes there end its loop. And every worker
stays its child: a worker's exit status reaches the launcher only through it, so when it dies
(random bytes, the OOM killer, a stray signal) every worker it forked is reported dead, and with
their death signal tied to it they are.

Here:
- the server answers on one end of a socket pair that this process made and holds: there is no
  address, so nothing but this process can make it fork;
- a worker is handed to the process that asked for it. The server forks a short-lived
  intermediate, which forks the worker and exits at once; the orphaned worker is reparented by
  the kernel to the nearest child subreaper, which the asking process made itself
  (PR_SET_CHILD_SUBREAPER). The worker is then that process's own child: its exit status comes
  from waitpid, its parent-death signal is tied to that process (workers/worker.py
  die_with_parent, set once the worker has been handed over), and the server may die, be killed
  or be restarted at any time without touching a running worker;
- a server found dead is started again before the next fork, and one that is sent a malformed
  request exits (a stream it cannot trust) and is started again the same way.

Linux only (it needs the subreaper); elsewhere common/procs.py starts workers with spawn.
"""
from __future__ import annotations

import ctypes
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from typing import Any, Callable, Mapping, Optional

PR_SET_PDEATHSIG = 1
PR_SET_NAME = 15
PR_SET_CHILD_SUBREAPER = 36

SERVER_NAME = "synthgrad-fork"  # the server's process name (ps -o comm, psutil's name())
HEADER = struct.Struct("!IHH")  # payload bytes, name bytes, file descriptors sent with it
REPLY = struct.Struct("!q")  # the worker's pid, or -1: the request was refused
MAX_PAYLOAD = 64 << 20  # a worker's arguments are a config and a few handles: kilobytes
MAX_NAME = 256
MAX_FDS = 64
HANDOVER_TIMEOUT = 10.0  # how long a forked worker waits to become its asker's child

_inherited_fds: list[int] = []  # in a forked worker: the descriptors its arguments refer to


def _prctl(option: int, value: int) -> bool:
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        return libc.prctl(option, value, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _set_name(name: str) -> None:
    """This process's name as ps and top show it (15 bytes at most)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(PR_SET_NAME, ctypes.c_char_p(name.encode()[:15]), 0, 0, 0)
    except (OSError, AttributeError):
        pass


def supported() -> bool:
    """Whether this platform can hand a forked worker to the process that asked for it."""
    return sys.platform.startswith("linux") and hasattr(socket, "send_fds")


# ---------------------------------------------------------------------------- asking side
class Forked:
    """A worker the server forked, now a child of this process: the part of
    multiprocessing.Process that the process groups use (name, pid, exitcode, join)."""

    def __init__(self, name: str, pid: int) -> None:
        self.name = name
        self.pid = pid
        self._owner = os.getpid()
        self._child = ChildPid(pid, name)

    @property
    def exitcode(self) -> Optional[int]:
        """None while it runs; its exit code, or minus the signal that killed it (as
        multiprocessing reports them). Only its parent can tell (a forked copy sees None)."""
        return self._child.poll() if os.getpid() == self._owner else self._child.returncode

    def is_alive(self) -> bool:
        return self.exitcode is None

    def join(self, timeout: Optional[float] = None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.exitcode is None and (deadline is None or time.monotonic() < deadline):
            time.sleep(0.01)


class _Handles:
    """Collects the file descriptors a pickled argument refers to (torch's shared memory, for a
    replica's Rows): sent beside the request, found again by index in the worker. Plays the part
    multiprocessing asks of a "spawning popen" (multiprocessing.reduction.DupFd)."""

    def __init__(self) -> None:
        self.fds: list[int] = []

    def duplicate_for_child(self, fd: int) -> int:
        self.fds.append(fd)
        return len(self.fds) - 1

    class DupFd:
        def __init__(self, index: int) -> None:
            self.index = index

        def detach(self) -> int:
            return _inherited_fds[self.index]


def _dumps(target: Callable[..., Any], args: tuple) -> tuple[bytes, list[int]]:
    from multiprocessing import context, reduction
    handles = _Handles()
    context.set_spawning_popen(handles)
    try:
        return bytes(reduction.ForkingPickler.dumps((target, args))), handles.fds
    finally:
        context.set_spawning_popen(None)


class ChildPid:
    """A child of this process known by its pid (a server forked here, ForkServer.start(here=True);
    the test suite's forked launchers): the part of subprocess.Popen its users need (args, pid,
    returncode, poll, wait, send_signal, kill)."""

    def __init__(self, pid: int, args: Any = SERVER_NAME) -> None:
        self.pid = pid
        self.args = args
        self.returncode: Optional[int] = None

    def poll(self) -> Optional[int]:
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                self.returncode = 255  # reaped by someone else: its status is lost
            else:
                if pid:
                    self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: Optional[float] = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(self.args, timeout)
            time.sleep(0.005)
        assert self.returncode is not None
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class ForkServer:
    """The server this process asks for workers; started by `start`, started again when found
    dead. Only the process that made it may use it."""

    def __init__(self, preload: list[str]) -> None:
        self.preload = list(preload)
        self.env: dict[str, str] = {}
        self.restarts = 0
        self._proc: Optional[Any] = None  # subprocess.Popen, or ChildPid
        self._sock: Optional[socket.socket] = None
        self._owner = os.getpid()
        self._lock = threading.Lock()

    def owned_here(self) -> bool:
        """Whether this process made this server (a forked copy of the object is not its owner)."""
        return os.getpid() == self._owner

    @property
    def pid(self) -> Optional[int]:
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    def start(self, env: Optional[Mapping[str, str]] = None, *, here: bool = False) -> None:
        """Start the server now (its imports run while this process prepares the run), with
        `env` added to its environment, which every worker it forks has from the start. A
        server running with other additions is replaced; running workers are not its children
        and go on. `here`: fork the server from this process rather than start a new
        interpreter, for a process that already holds the imports and has run nothing yet
        (no thread pool to fork): a process forked from another fork server, as the test
        suite's launchers are (tests/zygote.py). It saves the server's imports (about 3 s of
        one core); it needs no additions to the environment, which torch has already read."""
        env = dict(env or {})
        if here and env:
            raise ValueError("a server forked from this process has this process's environment")
        with self._lock:
            if self._proc is not None and self._proc.poll() is not None:
                self._replace_dead()
            if env == self.env and self._proc is not None:
                return
            self._stop()
            self.env = env
            self._start(here)

    def _start(self, here: bool = False) -> None:
        if not _prctl(PR_SET_CHILD_SUBREAPER, 1):
            raise OSError("cannot make this process a child subreaper")
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        if here:
            missing = [m for m in self.preload if m not in sys.modules]
            if missing:
                raise RuntimeError(f"cannot fork the workers' server from a process without {missing}")
            pid = os.fork()
            if pid == 0:  # the server: it never returns to the caller's code
                code = 0
                try:
                    ours.close()
                    devnull = os.open(os.devnull, os.O_RDONLY)
                    os.dup2(devnull, 0)
                    os.close(devnull)
                    serve(theirs.fileno(), self.preload)
                except SystemExit as exc:
                    code = exc.code if isinstance(exc.code, int) else 1
                except BaseException:
                    code = 1
                finally:
                    os._exit(code)
            theirs.close()
            self._proc = ChildPid(pid)
            self._sock = ours
            return
        code = (f"import sys; sys.path[:0] = {sys.path!r}; "
                f"from synthgrad.common.forkserver import serve; serve({theirs.fileno()}, {self.preload!r})")
        try:
            self._proc = subprocess.Popen([sys.executable, "-c", code], pass_fds=[theirs.fileno()],
                                          stdin=subprocess.DEVNULL, env={**os.environ, **self.env})
        finally:
            theirs.close()
        self._sock = ours

    def _stop(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._proc is not None:  # it holds nothing worth a graceful exit: its workers are ours
            self._proc.kill()
            self._proc.wait()
            self._proc = None

    def stop(self) -> None:
        with self._lock:
            self._stop()

    def fork(self, name: str, target: Callable[..., Any], args: tuple) -> Forked:
        """A worker running target(*args), named `name`, as a child of this process."""
        if os.getpid() != self._owner:
            raise RuntimeError("a fork server serves only the process that started it")
        sys.audit("synthgrad.fork", name)
        payload, fds = _dumps(target, args)
        label = name.encode()[:MAX_NAME]
        with self._lock:
            for attempt in range(2):
                if self._proc is None or self._proc.poll() is not None:
                    self._replace_dead()
                try:
                    pid = self._ask(label, payload, fds)
                except (OSError, EOFError) as exc:
                    if attempt:
                        raise RuntimeError(f"the workers' fork server failed twice: {exc}") from exc
                    self._replace_dead()
                    continue
                if pid <= 0:
                    raise RuntimeError(f"the workers' fork server could not fork {name!r}")
                return Forked(name, pid)
        raise AssertionError("unreachable")

    def _replace_dead(self) -> None:
        """A server that died (killed, or told garbage) is reaped, said so, and started again."""
        if self._proc is not None:
            code = self._proc.poll()
            if code is None:  # not answering: a moment to exit by itself, then it goes
                try:
                    code = self._proc.wait(1.0)
                except subprocess.TimeoutExpired:
                    self._proc.kill()
                    code = self._proc.wait()
            from synthgrad.common.procs import describe_exit
            print(f"the workers' fork server (pid {self._proc.pid}) {describe_exit(code)}; starting it again",
                  file=sys.stderr, flush=True)
            self.restarts += 1
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._proc = None
        self._start()

    def _ask(self, label: bytes, payload: bytes, fds: list[int]) -> int:
        assert self._sock is not None
        socket.send_fds(self._sock, [HEADER.pack(len(payload), len(label), len(fds))], fds)
        self._sock.sendall(label + payload)
        return REPLY.unpack(_read_exactly(self._sock, REPLY.size))[0]


def _read_exactly(sock: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        if not chunk:
            raise EOFError("the other end closed")
        out += chunk
    return bytes(out)


# ---------------------------------------------------------------------------- the server
def serve(fd: int, preload: list[str]) -> None:
    """The server's loop: import `preload`, then fork a worker for each request on `fd` until
    the asker closes its end. A malformed request ends the server (the stream cannot be trusted
    after it); the asker starts another."""
    _set_name(SERVER_NAME)
    asker = os.getppid()
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # its asker gone, nothing is left to serve
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the asker's to handle
    for module in preload:
        __import__(module)
    sock = socket.socket(fileno=fd)
    while True:
        try:
            request = _receive(sock)
        except EOFError:
            return
        except (ValueError, OSError) as exc:  # no reply: the asker reads EOF and starts another
            print(f"{SERVER_NAME}: refused a malformed request ({exc}); exiting", file=sys.stderr, flush=True)
            sys.exit(2)
        label, payload, fds = request
        try:
            pid = _fork_worker(label, payload, fds, sock, asker)
        except OSError as exc:  # out of processes or memory: this request fails, the next may not
            print(f"{SERVER_NAME}: cannot fork {label!r}: {exc}", file=sys.stderr, flush=True)
            pid = -1
        finally:
            for handle in fds:
                os.close(handle)
        sock.sendall(REPLY.pack(pid))


def _receive(sock: socket.socket) -> tuple[str, bytes, list[int]]:
    head, fds, _, _ = socket.recv_fds(sock, HEADER.size, MAX_FDS)
    if not head:
        raise EOFError
    try:
        head += _read_exactly(sock, HEADER.size - len(head))
        size, name_size, fd_count = HEADER.unpack(head)
        if size > MAX_PAYLOAD or name_size > MAX_NAME or fd_count != len(fds):
            raise ValueError(f"a request of {size} bytes, a name of {name_size} and {len(fds)} of "
                             f"{fd_count} descriptors")
        body = _read_exactly(sock, name_size + size)
        return body[:name_size].decode(errors="replace"), body[name_size:], fds
    except BaseException:
        for handle in fds:
            os.close(handle)
        raise


def _fork_worker(label: str, payload: bytes, fds: list[int], sock: socket.socket, asker: int) -> int:
    """Fork an intermediate that forks the worker and exits, so that the worker is reparented
    to the asker; the worker's pid, or -1."""
    read_end, write_end = os.pipe()
    middle = os.fork()
    if middle == 0:
        try:
            os.close(read_end)
            pid = os.fork()
            if pid == 0:
                os.close(write_end)
                _become_worker(label, payload, fds, sock, asker)
            os.write(write_end, REPLY.pack(pid))
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        got = pipe.read(REPLY.size)
    os.waitpid(middle, 0)
    return REPLY.unpack(got)[0] if len(got) == REPLY.size else -1


def _become_worker(label: str, payload: bytes, fds: list[int], sock: socket.socket, asker: int) -> None:
    """In the forked worker: wait to be the asker's child, then run the target; never returns."""
    code = 1
    try:
        sock.close()
        _set_name(label)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        deadline = time.monotonic() + HANDOVER_TIMEOUT
        while os.getppid() != asker:  # the intermediate exits at once; then the kernel reparents
            if time.monotonic() > deadline:
                os._exit(1)  # the asker is gone, or not a subreaper: nobody would reap this one
            time.sleep(0.001)
        global _inherited_fds
        _inherited_fds = fds
        from multiprocessing import reduction
        target, args = reduction.ForkingPickler.loads(payload)
        target(*args)
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:
        import traceback
        traceback.print_exc()
        code = 1
    finally:
        # as multiprocessing's children: no atexit handlers (they are the server's, inherited
        # through the fork, and one that waits, e.g. on a socket's linger, would hang the
        # exit); the target cleans up after itself (workers/worker.py run_worker)
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)
