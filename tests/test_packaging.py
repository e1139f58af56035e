"""Installing synthgrad puts one name into site-packages, and the installed package trains
(stage processes included) from anywhere, without the checkout."""
from __future__ import annotations

import os
import subprocess
import sys
import zipfile

import pytest

from tests.helpers import ROOT

pytestmark = pytest.mark.slow  # builds a wheel and starts processes


@pytest.mark.timeout(180)
def test_the_wheel_holds_only_synthgrad_and_runs_outside_the_checkout(tmp_path):
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                            "-w", str(tmp_path / "wheel"), str(ROOT)], capture_output=True, text=True, timeout=120)
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = (tmp_path / "wheel").glob("synthgrad-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"synthgrad", wheel.name.split("-py")[0] + ".dist-info"}
    assert "synthgrad/common/config.py" in names and "synthgrad/cli.py" in names
    site = tmp_path / "site"
    done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site),
                           str(wheel)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    script = ("import sys, synthgrad; "
              f"assert synthgrad.__file__.startswith({str(site)!r}), synthgrad.__file__; "
              "cfg = synthgrad.RunConfig(mode='locked', dataset='synthetic', layers=(784, 32, 10), steps=4, "
              "synthetic_train=256, synthetic_test=64, batch_size=32, out='run'); "
              "_, s = synthgrad.train(cfg, log=lambda *_: None); "
              "assert not {'common', 'workers', 'coordinator', 'launch'} & set(sys.modules); "
              "print(s['status'], s['steps'], s['num_stages'])")
    env = {**os.environ, "PYTHONPATH": str(site)}
    run = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split() == ["done", "4", "2"]
