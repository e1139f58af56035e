"""`launch.py` processes for the tests, forked from one that has already imported torch and
synthgrad: the launcher zygote.

Most of a process test's CPU went to imports: every `python launch.py ...` imported torch (about
2 s of one core) and then started its workers' fork server, which imported torch again (about 3
s with torch._dynamo). Here one fork server per test process (common/forkserver.py, the same
code the workers come from) holds those imports; a launcher is forked from it as this
process's child, runs `synthgrad.cli.main` with the test's arguments, and forks its own
workers' server from itself (ForkServer.start(here=True)) instead of importing again.

What still runs as a new interpreter (`subprocess.Popen` of `python launch.py`): a launcher that
needs another environment (torch reads it at import), one inside a network namespace or under
torchrun, and tests/test_config.py's command line, which keeps the path a user's shell takes
under test. A launcher on a terminal is forked with a pseudo-terminal as its stdout and stderr.

`Launched` is the part of subprocess.Popen the tests use: pid, stdout (and stderr, unless
merged), poll, wait, kill, send_signal, communicate, returncode.
"""
from __future__ import annotations

import atexit
import io
import os
import signal
import subprocess
import sys
import threading
import time
from multiprocessing import reduction
from pathlib import Path
from typing import Optional

from synthgrad.common.forkserver import ChildPid, ForkServer
from synthgrad.common.procs import PRELOAD

ROOT = Path(__file__).resolve().parent.parent
ZYGOTE_PRELOAD = [*PRELOAD, "synthgrad.cli", "synthgrad.coordinator.train", "synthgrad.coordinator.monitor"]
# the commands that fork workers: their launcher forks its workers' server from itself
FORKS_WORKERS = ("train", "worker", "compare")

_zygote: Optional[ForkServer] = None


def zygote() -> ForkServer:
    """This test process's launcher zygote, started on first use."""
    global _zygote
    if _zygote is None:
        _zygote = ForkServer(ZYGOTE_PRELOAD)
        _zygote.start()
    return _zygote


def zygote_pid() -> Optional[int]:
    """The zygote's pid while it runs (tests/conftest.py leaves it alone between tests)."""
    return None if _zygote is None else _zygote.pid


class _Passed:
    """A file descriptor handed to the forked launcher: pickled as multiprocessing passes one
    (common/forkserver.py sends it beside the request), an int again in the launcher."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __reduce__(self):
        return _received, (reduction.DupFd(self.fd),)


def _received(handle) -> int:
    return handle.detach()


def _run_launcher(argv: list[str], cwd: str, out_fd: int, err_fd: Optional[int],
                  environ: Optional[dict] = None) -> None:
    """In the forked launcher: stdout and stderr onto the test's pipes (unbuffered, as `python
    -u`), `environ` added to its environment (only what is read after the imports: a terminal's
    size, say), then `launch.py` with `argv`; exits as the interpreter would, running atexit."""
    os.environ.update(environ or {})
    err_fd = out_fd if err_fd is None else err_fd
    os.dup2(out_fd, 1)
    os.dup2(err_fd, 2)
    for fd in {out_fd, err_fd}:
        os.close(fd)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), write_through=True)
    sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), write_through=True)
    os.chdir(cwd)
    sys.argv = [str(ROOT / "launch.py"), *argv]
    from synthgrad import cli
    from synthgrad.common import procs
    code = 1
    try:
        command = argv[0] if argv and argv[0] in cli.SUBCOMMANDS else "train"
        if command in FORKS_WORKERS:
            server = procs.fork_server()
            assert server is not None
            server.start(here=True)
        code = cli.main(argv)
    except SystemExit as exc:  # argparse's --help and its errors
        if isinstance(exc.code, str):
            print(exc.code, file=sys.stderr)
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:
        import traceback
        traceback.print_exc()
    finally:
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


class Launched(ChildPid):
    """A launcher forked from the zygote, as the tests use a subprocess.Popen of launch.py."""

    def __init__(self, argv: list[str], cwd: Path = ROOT, merge_stderr: bool = True,
                 terminal: Optional[int] = None, environ: Optional[dict] = None) -> None:
        """`terminal`: a pseudo-terminal's slave end, the launcher's stdout and stderr (the test
        reads its master end; `stdout` is then None). `environ`: see _run_launcher."""
        out_r, out_w = (None, terminal) if terminal is not None else os.pipe()
        err_r, err_w = (None, None) if merge_stderr or terminal is not None else os.pipe()
        try:
            child = zygote().fork("launch.py", _run_launcher,
                                  (list(argv), str(cwd), _Passed(out_w),
                                   None if err_w is None else _Passed(err_w), environ))
        except BaseException:
            for fd in (out_r, err_r):
                if fd is not None:
                    os.close(fd)
            raise
        finally:
            if terminal is None:
                os.close(out_w)
            if err_w is not None:
                os.close(err_w)
        super().__init__(child.pid, ["launch.py", *argv])
        self.stdout = None if out_r is None else io.TextIOWrapper(io.FileIO(out_r, "r"), encoding="utf-8",
                                                                  errors="replace")
        self.stderr = None if err_r is None else io.TextIOWrapper(io.FileIO(err_r, "r"), encoding="utf-8",
                                                                    errors="replace")

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def communicate(self, input: None = None, timeout: Optional[float] = None) -> tuple[str, Optional[str]]:
        """The rest of its output (and of stderr, when apart) once it has exited."""
        got: dict[str, str] = {}
        streams = {"out": self.stdout, "err": self.stderr}
        readers = [threading.Thread(target=lambda k=k, f=f: got.__setitem__(k, f.read()), daemon=True)
                   for k, f in streams.items() if f is not None]
        for r in readers:
            r.start()
        deadline = None if timeout is None else time.monotonic() + timeout
        for r in readers:
            r.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
            if r.is_alive():
                raise subprocess.TimeoutExpired(self.args, timeout)
        self.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))
        for f in streams.values():
            if f is not None:
                f.close()
        return got.get("out", ""), got.get("err")

    def __enter__(self) -> "Launched":
        return self

    def __exit__(self, *exc: object) -> None:
        if self.poll() is None:
            self.kill()
            self.wait(10)


def launch(*argv: str, cwd: Path = ROOT, merge_stderr: bool = True) -> Launched:
    """`python -u launch.py *argv`, stderr merged into stdout (or apart), forked from the zygote."""
    return Launched(list(argv), cwd, merge_stderr)


def run_launch(*argv: str, timeout: float = 120.0, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """`subprocess.run([python, launch.py, *argv], capture_output=True, text=True)`, from the
    zygote; the launcher is killed if it outlives `timeout`."""
    proc = Launched(list(argv), cwd, merge_stderr=False)
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
