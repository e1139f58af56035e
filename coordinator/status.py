"""The run's status as one record, built from the workers' latest reports (about once a second):
what the coordinator publishes to monitors and writes to metrics.jsonl as event "status"."""
from __future__ import annotations

from typing import Optional

from synthgrad.common import reports

WORKER_FIELDS = ("stage", "pid", "step", "samples_per_s", "busy_fraction", "wait_input_fraction",
                 "wait_send_fraction", "wait_grad_fraction", "send_fraction", "recv_fraction",
                 "outstanding_steps", "cpu_percent", "rss_mb", "loss", "sg_loss", "sg_cosine")


def _step_at(report: dict, wall_s: float, batch_size: int) -> float:
    """A worker's step now, projected from its last report at its recent rate: reports arrive
    about once a second at different moments, so comparing raw steps of two workers would mostly
    measure how far apart their reports were sent."""
    age = max(wall_s - report.get("wall_s", wall_s), 0.0)
    return report.get("step", -1) + age * (report.get("samples_per_s") or 0.0) / batch_size


def status_record(latest: dict[int, dict], *, num_stages: int, total_steps: int, batch_size: int,
                  wall_s: float, test_accuracy: Optional[float] = None, done: bool = False,
                  test_bits: Optional[float] = None, test_perplexity: Optional[float] = None) -> dict:
    """Run-wide figures plus one row per worker. `latest` maps stage -> its last report. The
    last evaluation's figures: accuracy, and on stream data bits per target and perplexity."""
    last = latest.get(num_stages - 1, {})
    first = latest.get(0, {})
    steps_done = last.get("step", -1) + 1
    rate = last.get("samples_per_s", 0.0) or 0.0
    remaining = max(total_steps - steps_done, 0)
    return {
        "event": "status", "wall_s": wall_s, "done": done,
        "step": steps_done, "total_steps": total_steps,
        "progress": steps_done / total_steps if total_steps else 0.0,
        "samples_per_s": rate,
        "steps_per_s": rate / batch_size,
        "eta_s": remaining * batch_size / rate if rate > 0 else None,
        # how many steps stage 0 is ahead of the last stage (0 when in lockstep)
        "staleness_steps": max(round(_step_at(first, wall_s, batch_size) - _step_at(last, wall_s, batch_size)), 0)
        if first and last else 0,
        "loss": last.get("loss"),
        "test_accuracy": test_accuracy,
        "test_bits": test_bits,
        "test_perplexity": test_perplexity,
        "workers": [{**{k: latest[s].get(k) for k in WORKER_FIELDS},
                     "steps_per_s": (latest[s].get("samples_per_s") or 0.0) / batch_size}
                    for s in sorted(latest)],
    }


def progress_line(latest: dict[int, dict], num_stages: int, total_steps: int, batch_size: int) -> str:
    """The plain progress line of a stage-worker run, from the workers' latest reports."""
    last = latest.get(num_stages - 1, {})
    step = last.get("step", -1) + 1
    rate = last.get("samples_per_s", 0.0)
    eta = f"{(total_steps - step) * batch_size / rate:.0f}s" if rate > 0 else "?"
    busy = " ".join(f"{latest[s].get('busy_fraction', 0):.2f}" for s in sorted(latest))
    return reports.progress_line(step, total_steps, rate, last.get("loss"), f"busy [{busy}]  eta {eta}")
