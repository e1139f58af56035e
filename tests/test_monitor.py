"""The status stream: monitors attach to a live run, receive its figures, and can come, go or
be killed without slowing or stopping it."""
from __future__ import annotations

import json
import re
import signal

import pytest

from tests.helpers import sg_cosines, start_launcher, wait_for_line
from tests.zygote import Launched, launch, run_launch

WORKER_KEYS = {"stage", "pid", "samples_per_s", "steps_per_s", "busy_fraction", "wait_input_fraction",
               "wait_send_fraction", "wait_grad_fraction", "outstanding_steps", "cpu_percent",
               "rss_mb", "loss", "sg_loss", "sg_cosine"}


def _monitor(endpoint: str, *args: str) -> Launched:
    return launch("monitor", "--connect", endpoint, "--timeout", "30", *args, merge_stderr=False)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_monitors_attach_receive_status_and_never_disturb_the_run(tmp_path):
    # 512 steps, paced by a last stage that sleeps 25 ms a step: at least 12.8 s of run for the
    # monitors to come and go in, however fast or busy the machine, at little CPU
    run = start_launcher(tmp_path, "--epochs", "8", "--true-grad-every", "2", "--metrics-every", "0.2",
                         "--slow-stage", "3,25")
    monitors: list[Launched] = []
    try:
        line, _ = wait_for_line(run, "monitor --connect")
        endpoint = re.search(r"monitor --connect (\S+)", line).group(1)
        doomed = _monitor(endpoint)  # killed mid-run: the run must not notice
        watcher = _monitor(endpoint, "--json", "--count", "8")
        monitors += [doomed, watcher]
        out, err = watcher.communicate(timeout=60)
        assert watcher.returncode == 0, err
        records = [json.loads(line) for line in out.splitlines()]
        status = [r for r in records if r["event"] == "status"]
        assert len(status) == 8
        status = status[-3:]  # the first may precede the workers' first reports
        for r in status:
            assert {"samples_per_s", "steps_per_s", "eta_s", "staleness_steps", "step", "total_steps", "progress"} <= set(r)
            assert r["total_steps"] == 8 * 64
            assert {w["stage"] for w in r["workers"]} == {0, 1, 2, 3}
            for w in r["workers"]:
                assert WORKER_KEYS <= set(w)
        assert any(w["rss_mb"] and w["rss_mb"] > 10 for r in status for w in r["workers"])
        doomed.send_signal(signal.SIGKILL)
        doomed.wait(10)
        late = _monitor(endpoint)  # plain lines on a pipe (not a terminal), until the run ends
        monitors.append(late)
        run_out, _ = run.communicate(timeout=150)
        assert run.returncode == 0, run_out[-2000:]
        out, _ = late.communicate(timeout=30)
        assert late.returncode == 0  # it saw the final status record
        lines = [line for line in out.splitlines() if " samples/s " in line]
        assert lines and all("\x1b[" not in line for line in lines)  # no terminal escape codes
        assert "step 512/512 (100%)" in lines[-1]
    finally:
        for p in [run, *monitors]:
            if p.poll() is None:
                p.kill()
                p.wait(10)
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert sum(r["event"] == "status" for r in metrics) >= 3  # the same stream is on disk


@pytest.mark.slow
def test_monitor_gives_up_clearly_when_nothing_is_there(tmp_path):
    proc = run_launch("monitor", "--connect", f"ipc://{tmp_path}/nobody", "--timeout", "1", timeout=30)
    assert proc.returncode == 1
    assert "nothing from" in proc.stdout


def _run_on_a_terminal(argv: list[str], timeout: float) -> tuple[int, str]:
    """`launch.py *argv` with a pseudo-terminal as stdout and stderr; return (exit code, output)."""
    import os
    import pty
    import select
    import time
    import fcntl
    import struct
    import termios
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 200, 0, 0))  # 50 rows, 200 columns
    try:
        # rich reads COLUMNS and LINES before the terminal's size
        proc = Launched(argv, terminal=slave, environ={"COLUMNS": "200", "LINES": "50"})
    finally:
        os.close(slave)
    chunks, deadline = [], time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # the child closed the terminal
                    break
                if not data:
                    break
                chunks.append(data)
            elif proc.poll() is not None:
                break
        return proc.wait(timeout=10), b"".join(chunks).decode(errors="replace")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        os.close(master)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_train_draws_a_live_table_on_a_terminal_and_plain_lines_elsewhere(tmp_path):
    args = ["train", "--dataset", "synthetic", "--steps", "100", "--metrics-every", "0.2", "--progress-every", "0.2"]
    rc, shown = _run_on_a_terminal(args + ["--out", str(tmp_path / "tty")], timeout=100)
    assert rc == 0, shown[-2000:]
    assert "\x1b[" in shown  # drawn with terminal control codes
    assert "samples/s" in shown and "wait grad" in shown and "rss MB" in shown  # the worker table
    assert "test accuracy" in shown  # and the summary after it
    plain = run_launch(*args, "--out", str(tmp_path / "pipe"), timeout=100)  # the same, on a pipe
    assert plain.returncode == 0, plain.stderr[-2000:]
    assert "\x1b[" not in plain.stdout
    assert "train step" in plain.stdout and "test accuracy" in plain.stdout


def _scalars(logdir) -> dict[str, list]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})  # 0: keep every event
    acc.Reload()
    return {tag: acc.Scalars(tag) for tag in acc.Tags()["scalars"]}


@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.parametrize("mode", ["backprop", "pipeline", "unlocked"])
def test_every_mode_streams_status_and_tensorboard_scalars(tiny_cfg, tmp_path, mode):
    """The same status records reach the callback (live view), metrics.jsonl and TensorBoard,
    whoever watches the run: the coordinator, the backprop process or the pipeline launcher."""
    from synthgrad.coordinator.train import train
    seen: list[dict] = []
    cfg = tiny_cfg.replace(mode=mode, steps=None, metrics_every=0.05, tensorboard=True, eval_every=16)
    run_dir, summary = train(cfg, log=lambda _: None, on_status=seen.append)
    on_disk = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    status = [r for r in on_disk if r["event"] == "status"]
    assert status == seen and len(status) >= 2
    final = status[-1]
    assert final["done"] and final["step"] == final["total_steps"] == 32 and final["progress"] == 1.0
    assert final["test_accuracy"] == summary["test_accuracy"]
    stages = {0} if mode == "backprop" else ({3} if mode == "pipeline" else {0, 1, 2, 3})
    assert {w["stage"] for w in final["workers"]} == stages  # pipeline: its last rank reports
    scalars = _scalars(run_dir / "tensorboard")
    progress = scalars["run/progress"]
    assert len(progress) == len(status)  # one point per status record
    assert [e.step for e in progress] == [r["step"] for r in status]
    assert progress[-1].value == 1.0
    assert scalars["run/samples_per_s"][-1].value == pytest.approx(final["samples_per_s"], rel=1e-6)
    evals = [r for r in on_disk if r["event"] == "eval"]
    assert [e.step for e in scalars["run/test_accuracy"]] == [r["step"] for r in evals] == [16, 32]
    for stage in stages:
        assert scalars[f"stage{stage}/samples_per_s"] and scalars[f"stage{stage}/rss_mb"][-1].value > 10
    if mode == "unlocked":
        # synthetic-gradient quality, per worker: the status records (so TensorBoard) carry each
        # stage's latest report, so every point is a value that stage reported (whether it
        # clears a bar: test_training.py's unlocked test)
        cosines = sg_cosines(run_dir)
        assert sorted(cosines) == [0, 1, 2]
        for stage, series in cosines.items():
            points = [e.value for e in scalars[f"stage{stage}/sg_cosine"]]
            assert points and all(any(abs(p - v) <= 1e-6 * max(abs(v), 1e-3) for v in series) for p in points), \
                (stage, points, series)


@pytest.mark.slow
def test_tensorboard_folder_of_an_earlier_run_is_cleared(tiny_cfg, tmp_path):
    from synthgrad.coordinator.train import train
    cfg = tiny_cfg.replace(mode="backprop", steps=5, tensorboard=True)
    run_dir, _ = train(cfg, log=lambda _: None)
    run_dir, _ = train(cfg, log=lambda _: None)
    assert len(list((run_dir / "tensorboard").glob("events.out.tfevents.*"))) == 1
    run_dir, _ = train(cfg.replace(tensorboard=False), log=lambda _: None)  # not ours to delete
    assert len(list((run_dir / "tensorboard").glob("events.out.tfevents.*"))) == 1


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_pipeline_mode_draws_the_live_table_too(tmp_path):
    args = ["train", "--mode", "pipeline", "--dataset", "synthetic", "--steps", "60", "--metrics-every", "0.2",
            "--out", str(tmp_path / "tty")]
    rc, shown = _run_on_a_terminal(args, timeout=100)
    assert rc == 0, shown[-2000:]
    assert "\x1b[" in shown and "rss MB" in shown and "step 60/60" in shown


def test_staleness_compares_workers_at_the_same_moment():
    """Reports arrive at different moments; staleness projects each to the record's time."""
    from synthgrad.coordinator.status import status_record
    rate = 100 * 64  # 100 steps/s at batch 64
    latest = {0: {"stage": 0, "step": 100, "wall_s": 9.0, "samples_per_s": rate},
              1: {"stage": 1, "step": 190, "wall_s": 10.0, "samples_per_s": rate}}
    rec = status_record(latest, num_stages=2, total_steps=1000, batch_size=64, wall_s=10.0)
    assert rec["staleness_steps"] == 10  # stage 0 is at ~200 by now, the last stage at 190
    assert rec["step"] == 191 and rec["eta_s"] == pytest.approx((1000 - 191) / 100)


def test_stream_runs_are_reported_in_bits_per_target_and_perplexity(tmp_path):
    """On stream data under cross-entropy an evaluation carries bits per target (loss / ln 2)
    and perplexity (exp(loss)), and every view of the run says them: the eval line, the
    summary, the status record, the monitor's plain line and live table, and the curves plot."""
    import math

    from rich.console import Console

    from synthgrad.common.evaluation import eval_line, eval_record
    from synthgrad.common.reports import run_summary
    from synthgrad.common.scores import in_bits
    from synthgrad.coordinator.monitor import format_status, status_table
    from synthgrad.coordinator.plots import plot_curves
    from synthgrad.coordinator.status import status_record
    from synthgrad.coordinator.train import format_summary

    assert in_bits(True, "cross_entropy") and not in_bits(False, "cross_entropy")
    assert not in_bits(True, "mypkg.losses:focal")  # a loss of the user's own has its own units
    loss = 2.0 * math.log(2)
    rec = eval_record(0, 99, 5.0, loss, 0.584, 1000, in_bits=True)
    assert rec["test_bits"] == pytest.approx(2.0) and rec["test_perplexity"] == pytest.approx(4.0)
    assert "test_bits" not in eval_record(0, 99, 5.0, loss, 0.584, 1000)  # class data: accuracy only
    assert "2.000 bits per target, perplexity 4.00, accuracy 58.40%" in eval_line(rec)
    summary = run_summary("locked", steps=100, samples=3200, wall_clock_s=10.0, startup_s=1.0, evals=[rec],
                          workers=[], true_gradient_steps=100, num_stages=2)
    assert summary["test_bits"] == pytest.approx(2.0) and summary["test_perplexity"] == pytest.approx(4.0)
    assert "test 2.000 bits per target, perplexity 4.00" in format_summary({**summary, "run_dir": "r"})
    status = status_record({}, num_stages=2, total_steps=100, batch_size=32, wall_s=10.0, test_accuracy=0.584,
                           test_bits=rec["test_bits"], test_perplexity=rec["test_perplexity"])
    assert "test 2.000 bits ppl 4.00 acc 58.40%" in format_status(status)
    console = Console(record=True, width=200)
    console.print(status_table(status))
    assert "test 2.000 bits ppl 4.00" in console.export_text()
    classes = status_record({}, num_stages=2, total_steps=100, batch_size=32, wall_s=1.0, test_accuracy=0.9)
    assert classes["test_bits"] is None and "test acc 90.00%" in format_status(classes)
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in (
        {"event": "worker", "stage": 1, "wall_s": 1.0, "loss": 2.5}, {**rec, "wall_s": 2.0})) + "\n")
    plot_curves([("locked", run)], tmp_path / "curves.png", "stream")
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"
