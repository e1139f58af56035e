"""Shared fixtures. Every test that starts processes is followed by a reaper that stops any
child it left behind (terminate, then kill) and fails the test if there were any."""
from __future__ import annotations

import sys
from pathlib import Path

import psutil
import pytest

if str(Path(__file__).resolve().parent.parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from synthgrad.common.procs import terminate_then_kill  # noqa: E402
from tests.helpers import LOCKED, ROOT, is_mp_helper  # noqa: E402


def _reap() -> list[int]:
    children = psutil.Process().children(recursive=True)
    # the resource tracker and fork server of multiprocessing live as long as this process and
    # are not ours to judge; what they started is
    ours = [c.pid for c in children if not is_mp_helper(c)]
    terminate_then_kill(ours, timeout=3.0)
    return ours


@pytest.fixture(autouse=True)
def reap_children():
    yield
    leftovers = _reap()
    assert not leftovers, f"test left child processes running: {leftovers}"


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
    import subprocess

    from synthgrad.common.files import load_model_state
    out = tmp_path_factory.mktemp("locked-reference")
    done = subprocess.run([sys.executable, str(ROOT / "launch.py"), "train", *LOCKED, "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=150)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return load_model_state(out)
