"""What a stage tells the coordinator about itself: a metrics record every --metrics-every
seconds (throughput, where the time went, the stage logic's running figures) and, at the end,
the summary of its whole run (the DONE message)."""
from __future__ import annotations

import os
import socket as pysocket
import time
from collections.abc import Callable

import psutil
import torch

from synthgrad.common import wire
from synthgrad.common.config import RunConfig
from synthgrad.workers.stage import StageLogic
from synthgrad.workers.timings import MESSAGING, Timings


class StageReporter:
    def __init__(self, stage: int, cfg: RunConfig, logic: StageLogic, timings: Timings,
                 send: Callable[[wire.Message], None], rejected: Callable[[], int]):
        self.stage = stage
        self.cfg = cfg
        self.logic = logic
        self.timings = timings
        self.send = send
        self.rejected = rejected  # messages this stage's links turned away so far
        self.proc = psutil.Process()
        self.proc.cpu_percent(None)
        self.samples = 0
        self.steps = 0
        self.last_step = -1
        self.max_outstanding = 0  # most steps held at once awaiting their gradient (staleness)
        self.started = self._last_report = time.monotonic()
        self._samples_since_report = 0

    def start(self) -> None:
        """Training begins now (rates count from here)."""
        self.started = self._last_report = time.monotonic()

    def step_done(self, step: int, samples: int) -> None:
        self.steps += 1
        self.samples += samples
        self._samples_since_report += samples
        self.last_step = step
        self.max_outstanding = max(self.max_outstanding, self.logic.outstanding())
        self.maybe_report()

    def maybe_report(self) -> None:
        if time.monotonic() - self._last_report >= self.cfg.metrics_every:
            self.report()

    def report(self, final: bool = False) -> None:
        now = time.monotonic()
        dt = max(now - self._last_report, 1e-9)
        t = self.timings.take()
        rec = {
            "stage": self.stage, "pid": os.getpid(), "final": final,
            "step": self.last_step, "steps": self.steps, "samples": self.samples,
            "samples_per_s": self._samples_since_report / dt,
            "busy_fraction": t["compute"] / dt,
            **{f"{k}_fraction": v / dt for k, v in t.items() if k != "compute"},
            "messaging_fraction": sum(t[k] for k in MESSAGING) / dt,
            "outstanding_steps": self.logic.outstanding(),
            "cpu_percent": self.proc.cpu_percent(None),
            "rss_mb": self.proc.memory_info().rss / 2**20,
            "rejected_messages": self.rejected(),
            **self.logic.stats.take(),
        }
        self._last_report = now
        self._samples_since_report = 0
        self.send(wire.Metrics(self.stage, rec))

    def final_summary(self, *, ended: float, endpoint: str, core: int, units: tuple[int, int],
                      checkpoint: str) -> dict:
        """This stage's figures over the whole run (the DONE message's summary)."""
        elapsed = ended - self.started
        totals = self.timings.total
        stats = self.logic.stats
        return {
            "stage": self.stage, "pid": os.getpid(), "host": pysocket.gethostname(),
            "input_endpoint": endpoint, "core": core, "threads": torch.get_num_threads(),
            "cores_allowed": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "units": list(units),
            "steps": self.steps, "last_step": self.last_step, "samples": self.samples, "elapsed_s": elapsed,
            "samples_per_s": self.samples / elapsed if elapsed > 0 else 0.0,
            "busy_fraction": totals["compute"] / elapsed if elapsed > 0 else 0.0,
            "messaging_fraction": sum(totals[k] for k in MESSAGING) / elapsed if elapsed > 0 else 0.0,
            **{f"{k}_s": v for k, v in totals.items()},
            "compute_cpu_s": self.timings.compute_cpu,
            "max_outstanding_steps": self.max_outstanding,
            "true_grads_received": stats.true_grads,
            "bootstrap_grads_received": stats.bootstrap_grads,
            "sg_s": stats.sg_seconds,
            "sg_share_of_compute": stats.sg_seconds / totals["compute"] if totals["compute"] > 0 else 0.0,
            "head_share_of_compute": stats.head_seconds / totals["compute"] if totals["compute"] > 0 else 0.0,
            "gradient_delay_mean": stats.delay_total / stats.delay_total_n if stats.delay_total_n else None,
            "gradient_delay_max": stats.delay_max if stats.delay_total_n else None,
            "rejected_messages": self.rejected(),
            "checkpoint": checkpoint,
        }
