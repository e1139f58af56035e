"""A hostile peer throws malformed frames and well-formed forgeries at every stage's activation
input and at the coordinator while a locked run trains over unsecured tcp: nothing crashes or
hangs, every bad message is rejected and counted, and the trained parameters equal, bit for bit,
those of the undisturbed locked run (the session's `locked_reference`)."""
from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from synthgrad.common.files import load_model_state
from tests.helpers import LOCKED, ROOT, assert_states_equal, wait_for_line
from tests.zygote import launch

pytestmark = pytest.mark.slow  # every test here starts processes

COUNT = 90  # messages per target
INBOX_KINDS = {"random-bytes", "truncated", "oversized", "wrong-kind", "dtype-list", "impossible-shape",
               "labels-out-of-range", "batch-of-one", "nan-activation", "step-far-ahead", "forged-end",
               "forged-checkpoint", "marker-with-tensors", "fuzzed-fields"}
COORDINATOR_KINDS = {"random-bytes", "wrong-kind", "wrong-field-type", "forged-register", "forged-error",
                     "forged-done", "forged-saved", "forged-metrics", "forged-eval", "forged-grad",
                     "forged-grad-nan-time"}


@pytest.mark.timeout(240)
def test_malformed_and_forged_messages_are_rejected_counted_and_change_nothing(tmp_path, locked_reference):
    # The fuzzer starts first and has imported everything before the run prints its endpoints, so
    # all of its messages arrive within a fraction of a second of the run's first step. The run
    # is slowed (6 links of 5 ms: >= 30 ms a locked step, >= 5.8 s for its 192 steps) so that
    # every stage still reads its input then: a stage reads it only while it waits for its next
    # activation, and what comes after its last step is never read. The delay changes timing only.
    fuzz = subprocess.Popen([sys.executable, str(ROOT / "tests" / "fuzz.py"), "--targets-from-stdin",
                             "--count", str(COUNT), "--max-bytes", str(1 << 20), "--hold"], cwd=ROOT, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    run = launch("train", *LOCKED, "--transport", "tcp", "--no-secure", "--max-message-mb", "1",
                 "--link-delay-ms", "5", "--stall-timeout", "60", "--out", str(tmp_path / "fuzzed"))
    try:
        line, seen = wait_for_line(run, "stage inputs:", timeout=90)
        coordinator = re.search(r"coordinator at (\S+);", "".join(seen)).group(1)
        inputs = re.findall(r"(\d)=(\S+)", line.split("stage inputs:")[1])
        # the fuzzer keeps its connections open until the run is over: libzmq drops what a stage
        # has not read yet when its sender disconnects, and every message is to be counted
        fuzz.stdin.write(" ".join([f"inbox={ep}" for _, ep in inputs] + [f"coordinator={coordinator}"]) + "\n")
        fuzz.stdin.flush()
        sent = json.loads(fuzz.stdout.readline() or "{}")
        out, _ = run.communicate(timeout=180)
        out = "".join(seen) + out
        assert run.returncode == 0, out[-3000:]
        _, err = fuzz.communicate("", timeout=30)  # closes its stdin: it disconnects and exits
        assert fuzz.returncode == 0, err
    finally:
        for proc in (run, fuzz):
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    summary = json.loads((tmp_path / "fuzzed" / "summary.json").read_text())
    n_sent = sum(sum(kinds.values()) for kinds in sent.values())
    assert n_sent == COUNT * 4 and set(sent["inbox"]) >= INBOX_KINDS, sent
    assert set(sent["coordinator"]) >= COORDINATOR_KINDS, sent
    per_stage = {w["stage"]: w["rejected_messages"] for w in summary["workers"]}
    assert summary["rejected_messages"] == n_sent, (summary["rejected_messages"], per_stage, sent, out[-3000:])
    assert per_stage == {0: 0, 1: COUNT, 2: COUNT, 3: COUNT}
    # a refused Register's answer may find its peer gone (tests/test_coordinator_peers.py makes
    # sure of it): that is counted, and the run went on
    assert summary["undelivered_messages"] <= sent["coordinator"]["forged-register"]
    assert_states_equal(locked_reference, load_model_state(tmp_path / "fuzzed"), "under fuzzing")
