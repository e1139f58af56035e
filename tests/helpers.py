"""Helpers shared by the tests: running a job in-process or as `launch.py train`, waiting for its
output, checking that no process is left, and comparing trained parameters.

Why the tolerances below are what they are
------------------------------------------
`locked` performs exactly the operations of single-process backprop on one thread, in the same
order, on tensors of the same shapes, strides and (since common/wire.py realigns what it
decodes) memory alignment, so on the machines measured its parameters are equal bit for bit
(`python bench/equivalence.py`, under every kernel path the machine offers: ATEN_CPU_CAPABILITY,
MKL_ENABLE_INSTRUCTIONS, ONEDNN_MAX_CPU_ISA, MKL_CBWR). Before the realignment, MKL blocked a
product whose operand sat off a 64-byte boundary differently, each such product rounded by
about one unit in the last place (6e-8 relative), and the largest difference after 200 steps
was 2.1e-6 with Adam and 4.6e-6 with SGD (AVX2 path).

The tests still allow a tolerance, because a CPU or a torch build this was not measured on may
pick kernels by something else again; they are written so that such rounding stays small:

- SGD with momentum is linear in the gradient: a rounding difference in a gradient becomes a
  difference of lr x (that difference) in the weights, and 20 steps cannot grow it much.
- Adam divides each gradient component by the root of its running square: a component whose
  true gradient is (almost) zero gets a step of about lr whatever its size, so rounding noise
  there becomes a visible difference. (That is also why no layer followed by BatchNorm has a
  bias: its true gradient is exactly zero.)

So the step-by-step equalities use SGD with momentum and LOCKED_EQUALS_BACKPROP: five times the
largest difference seen at 20 steps even with misaligned operands (1.8e-7), and still a
thousand times below what one wrong or missing update changes (lr x gradient, ~1e-3 here).
Comparisons of one code path with itself (resume, restart, full disk, fuzzing) are bitwise.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import time
import typing
from pathlib import Path
from typing import Any, Callable, Mapping

import psutil
import pytest
import torch

from synthgrad.common import wire
from synthgrad.common.forkserver import SERVER_NAME

ROOT = Path(__file__).resolve().parent.parent

# element-wise |got - expected| <= atol + rtol * |expected|; see the module docstring
LOCKED_EQUALS_BACKPROP = {"rtol": 1e-5, "atol": 1e-6}
# SGD with momentum: the optimiser under which rounding is not amplified (module docstring); and
# one torch thread per stage, as the single-thread backprop they are compared with (--threads
# auto may give a costly stage more on a machine with more cores, and more threads may sum in
# another order)
EXACT_SGD = {"optimizer": "sgd", "lr": 0.05, "momentum": 0.9, "threads": (1,)}

# a small locked run (192 steps) that resume, restart and full-disk tests compare against
LOCKED = ["--dataset", "synthetic", "--mode", "locked", "--layers", "784,64,64,64,10", "--batch-size", "64",
          "--synthetic-train", "2048", "--synthetic-test", "512", "--epochs", "6", "--checkpoint-every", "0",
          "--metrics-every", "0.2", "--progress-every", "0.2", "--start-timeout", "60"]

States = Mapping[int, Mapping[str, torch.Tensor]]

quiet = lambda *_: None  # noqa: E731


# ---------------------------------------------------------------------------- comparing parameters
def assert_states_close(expected: States, got: States, *, rtol: float, atol: float, what: str = "") -> None:
    """Every tensor of every unit within the tolerance (same units and names on both sides)."""
    assert sorted(expected) == sorted(got), f"units differ: {sorted(expected)} vs {sorted(got)}"
    for unit in expected:
        assert expected[unit].keys() == got[unit].keys(), f"unit {unit}: tensors differ"
        for name in expected[unit]:
            torch.testing.assert_close(got[unit][name], expected[unit][name], rtol=rtol, atol=atol,
                                       msg=lambda m, u=unit, n=name: f"unit {u} {n} {what}: {m}")


def assert_same_evaluation(ref: dict, got: dict, test_samples: int = 512) -> None:
    """Two runs' final evaluation: test loss equal up to rounding, accuracy within one test sample
    (two logits within rounding of each other may take the argmax either way)."""
    assert got["test_loss"] == pytest.approx(ref["test_loss"], rel=1e-4)
    assert abs(got["test_accuracy"] - ref["test_accuracy"]) <= 1 / test_samples + 1e-9


def assert_states_equal(expected: States, got: States, what: str = "") -> None:
    """Bitwise equality: for one code path compared with itself."""
    assert sorted(expected) == sorted(got), f"units differ: {sorted(expected)} vs {sorted(got)}"
    for unit in expected:
        assert expected[unit].keys() == got[unit].keys(), f"unit {unit}: tensors differ"
        for name in expected[unit]:
            assert torch.equal(expected[unit][name], got[unit][name]), f"unit {unit} {name} differs {what}"


def sg_cosines(run_dir: Path) -> dict[int, list[float]]:
    """Each stage's reported cosine between its synthetic and the true gradients, in order."""
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    out: dict[int, list[float]] = {}
    for r in recs:
        if r["event"] == "worker" and r.get("sg_cosine") is not None:
            out.setdefault(r["stage"], []).append(r["sg_cosine"])
    return out


# A predictor that has learned nothing about the true gradient meets it at a cosine of about
# 0 +- 1/sqrt(D): 0.016 for D = 64 samples x 64 features, and the mean over the second half of a
# run averages ten or more true-gradient steps (+- 0.005). 0.04 is far outside both, and a
# positive cosine is what makes a synthetic step a descent step on average. (Seen here with the
# default, budgeted predictors over 120 steps at N=5, three seeds: 0.067-0.157 per stage.)
SG_COSINE_BAR = 0.04


def late_cosine(series: list[float]) -> float:
    """The mean of the second half of a stage's reported cosines (a single report can average
    as few as one true-gradient step)."""
    late = series[len(series) // 2:]
    return sum(late) / len(late)


# ---------------------------------------------------------------------------- runs
def run(cfg, **changes):
    """Train in this process (workers are spawned); returns (run folder, summary)."""
    from synthgrad.coordinator.train import train
    run_dir, summary = train(cfg.replace(**changes), log=quiet)
    on_disk = json.loads((run_dir / "summary.json").read_text())
    assert on_disk["steps"] == summary["steps"]
    return run_dir, summary


def start_launcher(tmp_path, *extra):
    from tests.zygote import launch
    return launch("train", "--dataset", "synthetic", "--mode", "unlocked",
                  "--epochs", "50", "--layers", "784,64,64,64,10", "--batch-size", "64",
                  "--synthetic-train", "4096", "--progress-every", "0.5", "--out", str(tmp_path / "run"), *extra)


def wait_for_line(proc, needle, timeout=90.0) -> tuple[str, list[str]]:
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line)
        if needle in line:
            return line, seen
    proc.kill()
    raise AssertionError(f"never saw {needle!r}; output:\n{''.join(seen)}")


def interrupt_after(proc, *needles: str, timeout: float = 90.0) -> str:
    """Wait for each of `needles` in turn in a launcher's output, press Ctrl-C (SIGINT), and
    return everything it printed; the launcher is killed if anything goes wrong."""
    seen: list[str] = []
    try:
        for needle in needles:
            seen += wait_for_line(proc, needle, timeout=timeout)[1]
        os.kill(proc.pid, signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    return "".join(seen) + out


def kill_after(proc, needle: str, victim: Callable[[list[str]], int], timeout: float = 90.0) -> tuple[str, int]:
    """Wait for `needle` in a launcher's output, SIGKILL the process `victim` picks (given the
    lines so far), let the launcher finish; return everything it printed and the victim's pid.
    The launcher is killed if anything goes wrong."""
    out = ""
    seen: list[str] = []
    try:
        seen = wait_for_line(proc, needle, timeout=timeout)[1]
        pid = victim(seen)
        os.kill(pid, signal.SIGKILL)
        out, _ = proc.communicate(timeout=150)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    return "".join(seen) + out, pid


def is_mp_helper(p: psutil.Process) -> bool:
    """A helper process that lives as long as the process that uses it, not a run's: a fork
    server (common/forkserver.py) and multiprocessing's resource tracker."""
    try:
        return p.name() == SERVER_NAME or "resource_tracker" in " ".join(p.cmdline())
    except psutil.Error:
        return False


def worker_pids(proc) -> list[int]:
    """The worker processes a launcher (or `launch.py worker`) started, in the order started:
    its own children, and theirs (a replicated stage's replicas), less the fork servers."""
    found = [c for c in psutil.Process(proc.pid if hasattr(proc, "pid") else proc).children(recursive=True)
             if not is_mp_helper(c)]
    return [c.pid for c in sorted(found, key=lambda c: c.create_time())]


def assert_all_gone(pids, timeout=10.0):
    procs = []
    for pid in pids:
        try:
            procs.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    assert not alive, f"orphans left: {[p.pid for p in alive]}"


@contextlib.contextmanager
def training_launcher(tmp_path, *extra):
    """A `launch.py train` subprocess that is training; yields (process, worker pids) and kills
    the launcher afterwards whatever the test did."""
    proc = start_launcher(tmp_path, *extra)
    try:
        wait_for_line(proc, "train step")
        yield proc, worker_pids(proc)
    finally:
        proc.kill()


def blank_record(cls: type, **values: Any) -> Any:
    """A record dataclass (common/records.py) with every field not given at its type's zero (an
    Optional one None): a well-typed WorkerReport or StageSummary in one line."""
    zero = {int: 0, float: 0.0, bool: False, str: ""}
    out = {}
    for name, t in wire.record_fields(cls).items():
        if name in values:
            out[name] = values[name]
        elif typing.get_origin(t) is list:
            out[name] = []
        else:
            out[name] = zero.get(t)  # None for an Optional field
    return cls(**out)
