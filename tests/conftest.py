"""Shared fixtures, and two rules no test can forget:

- No process outlives the test that started it. This process is made a child subreaper, so a
  worker orphaned from a `launch.py` subprocess (its launcher killed, say) is reparented here
  rather than to init, and after every test the reaper looks at every descendant: the dead are
  reaped, and any still running after a short grace (death signals are delivered
  asynchronously) is killed and fails the test.
- The fast tier starts no process. An audit hook sees every way Python starts one (subprocess,
  fork, exec, spawn, and the workers' fork server's `synthgrad.fork`); in a test without the
  `slow` mark it refuses with a message saying to mark the test.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import psutil
import pytest

if str(Path(__file__).resolve().parent.parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from synthgrad.common import forkserver  # noqa: E402
from tests.helpers import LOCKED, is_mp_helper  # noqa: E402

# processes that exit by themselves this soon after their test ends were on their way out (a
# parent-death signal, a pipe's EOF); anything slower is a leftover
GRACE_S = 2.0
STARTS_A_PROCESS = {"subprocess.Popen", "os.fork", "os.forkpty", "os.posix_spawn", "os.spawn", "os.exec",
                    "os.system", "pty.spawn", "synthgrad.fork"}

_fast_test: Optional[str] = None  # the node id of the fast-tier test running now, if one is
_started_in_fast_test: list[str] = []


def _refuse_processes_in_fast_tests(event: str, args: tuple) -> None:
    if _fast_test is not None and event in STARTS_A_PROCESS:
        what = f"{event}{args[:2]!r}"
        _started_in_fast_test.append(what)
        raise RuntimeError(f"{_fast_test} starts a process ({what}) but is not marked "
                           f"@pytest.mark.slow: the fast tier (-m 'not slow') starts none")


def _warm_font_cache() -> None:
    """matplotlib's first import on a machine runs `fc-list` to build its font cache: the
    tool's one-time cache, not a process a test starts. Built here, before the hook, so the
    fast test that happens to import it first on a fresh machine is not refused for it."""
    try:
        import matplotlib.font_manager  # noqa: F401
    except ImportError:  # plots are optional: no cache to build
        pass


def pytest_configure(config) -> None:
    forkserver._prctl(forkserver.PR_SET_CHILD_SUBREAPER, 1)  # orphans below come back here
    _warm_font_cache()
    sys.addaudithook(_refuse_processes_in_fast_tests)


def _exempt(p: psutil.Process) -> bool:
    """This process's own helpers, which live as long as it does: its fork server and
    multiprocessing's resource tracker, and the launcher zygote (tests/zygote.py). A fork server
    whose launcher has gone is not exempt."""
    from synthgrad.common.procs import fork_server
    from tests.zygote import zygote_pid
    server = fork_server()
    try:
        if p.name() == forkserver.SERVER_NAME:
            return (server is not None and p.pid == server.pid) or p.pid == zygote_pid()
    except psutil.Error:
        return True  # gone
    return is_mp_helper(p)


def _reap_dead_children() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _leftovers() -> list[psutil.Process]:
    _reap_dead_children()
    live = []
    for p in psutil.Process().children(recursive=True):
        try:
            if p.status() != psutil.STATUS_ZOMBIE and not _exempt(p):
                live.append(p)
        except psutil.Error:
            pass
    return live


@pytest.fixture(autouse=True)
def no_process_outlives_its_test(request):
    global _fast_test
    fast = request.node.get_closest_marker("slow") is None
    _fast_test = request.node.nodeid if fast else None
    _started_in_fast_test.clear()
    try:
        yield
    finally:
        _fast_test = None
    assert not _started_in_fast_test, (f"a test outside the slow tier started processes: "
                                       f"{_started_in_fast_test}; mark it @pytest.mark.slow")
    if fast:  # the hook let it start none: nothing to look for
        return
    live = _leftovers()
    if live:
        _, live = psutil.wait_procs(live, timeout=GRACE_S)
    if live:
        described = []
        for p in live:
            try:
                described.append(f"{p.pid} {p.name()!r} {' '.join(p.cmdline())[:120]!r}")
                p.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(live, timeout=3.0)
        _reap_dead_children()
        pytest.fail(f"processes outlived the test: {described}")


@pytest.fixture
def tiny_cfg(tmp_path):
    """A quick run on the synthetic set: small network, few steps."""
    from synthgrad.common.config import RunConfig
    return RunConfig(dataset="synthetic", layers=(784, 64, 64, 64, 10), batch_size=64,
                     synthetic_train=2048, synthetic_test=512, epochs=1, steps=20,
                     out=str(tmp_path / "run"), progress_every=60.0, start_timeout=60.0,
                     stall_timeout=30.0)


@pytest.fixture(scope="session")
def locked_reference(tmp_path_factory):
    """The parameters of LOCKED run undisturbed (computed once per test session)."""
    from synthgrad.common.files import load_model_state
    from tests.zygote import run_launch
    out = tmp_path_factory.mktemp("locked-reference")
    done = run_launch("train", *LOCKED, "--out", str(out), timeout=150)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return load_model_state(out)
