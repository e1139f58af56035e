"""A hostile peer throws malformed frames (and well-formed messages that are not from the run:
forged markers, steps out of order, labels outside the classes, NaN) at every stage's activation input and at the
coordinator while a locked run trains: nothing crashes or hangs, every bad message is rejected
and counted, and the trained parameters equal those of an undisturbed run."""
from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from synthgrad.common.files import load_model_state
from tests.helpers import ROOT, assert_states_equal, wait_for_line

pytestmark = pytest.mark.slow  # every test here starts processes

RUN = ["--dataset", "synthetic", "--mode", "locked", "--layers", "784,64,64,64,10", "--batch-size", "64",
       "--synthetic-train", "4096", "--synthetic-test", "512", "--epochs", "2", "--max-message-mb", "1",
       "--metrics-every", "0.2", "--start-timeout", "60", "--stall-timeout", "30"]


def _train(out, *extra) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-u", str(ROOT / "launch.py"), "train", *RUN, "--out", str(out),
                             *extra], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.timeout(240)
def test_malformed_frames_are_rejected_counted_and_change_nothing(tmp_path):
    # the fuzzed run is slowed down (>= 7.6 s: 128 locked steps, 6 links of 10 ms each) so all the
    # fuzz arrives while every stage still reads its input (a stage reads it only while it waits
    # for its next activation, and what comes after its last step is never read); the delay
    # changes timing only
    run = _train(tmp_path / "fuzzed", "--link-delay-ms", "10")
    fuzz = None
    try:
        line, seen = wait_for_line(run, "stage inputs:", timeout=90)
        coordinator = re.search(r"coordinator at (\S+);", "".join(seen)).group(1)
        inputs = re.findall(r"(\d)=(\S+)", line.split("stage inputs:")[1])
        targets = [f"inbox={ep}" for _, ep in inputs] + [f"coordinator={coordinator}"]
        # the fuzzer keeps its connections open until the run is over: libzmq drops what a stage
        # has not read yet when its sender disconnects, and every message is to be counted
        fuzz = subprocess.Popen([sys.executable, str(ROOT / "tests" / "fuzz.py"), *targets, "--count", "60",
                                 "--max-bytes", str(1 << 20), "--hold"], cwd=ROOT, text=True,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        sent = json.loads(fuzz.stdout.readline() or "{}")
        out, _ = run.communicate(timeout=180)
        assert run.returncode == 0, "".join(seen) + out
        _, err = fuzz.communicate("", timeout=30)  # closes its stdin: it disconnects and exits
        assert fuzz.returncode == 0, err
    finally:
        for proc in (run, fuzz):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait(10)
    summary = json.loads((tmp_path / "fuzzed" / "summary.json").read_text())
    n_sent = sum(sum(kinds.values()) for kinds in sent.values())
    assert n_sent == 60 * 4 and set(sent["inbox"]) >= {"random-bytes", "truncated", "oversized", "wrong-kind",
                                                        "dtype-list", "impossible-shape", "labels-out-of-range",
                                                        "batch-of-one", "nan-activation", "step-far-ahead",
                                                        "forged-end", "forged-checkpoint"}
    per_stage = {w["stage"]: w["rejected_messages"] for w in summary["workers"]}
    assert summary["rejected_messages"] == n_sent, (summary["rejected_messages"], per_stage, sent, out[-3000:])
    assert per_stage == {0: 0, 1: 60, 2: 60, 3: 60}
    clean = _train(tmp_path / "clean")  # no fuzz, no delay
    out, _ = clean.communicate(timeout=180)
    assert clean.returncode == 0, out
    a, b = load_model_state(tmp_path / "clean"), load_model_state(tmp_path / "fuzzed")
    assert_states_equal(a, b, "under fuzzing")
