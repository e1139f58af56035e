"""What a stage tells the coordinator about itself: a metrics record every --metrics-every
seconds (throughput, where the time went, the stage logic's running figures) and, at the end,
the summary of its whole run (the DONE message)."""
from __future__ import annotations

import os
from collections.abc import Callable

import torch

from synthgrad.common import wire
from synthgrad.common.config import RunConfig
from synthgrad.common.procs import cpu_priority
from synthgrad.common.records import StageSummary, WorkerReport
from synthgrad.workers.meter import Meter
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
        self.meter = Meter(stage, logic.module, logic.dev.device)
        self.max_outstanding = 0  # most steps held at once awaiting their gradient (staleness)

    @property
    def steps(self) -> int:
        return self.meter.steps

    @property
    def last_step(self) -> int:
        return self.meter.last_step

    @last_step.setter
    def last_step(self, step: int) -> None:  # a resumed run: its checkpoint's step
        self.meter.last_step = step

    def start(self) -> None:
        """Training begins now (rates count from here)."""
        self.meter.start()

    def step_done(self, step: int, samples: int) -> None:
        self.meter.step_done(step, samples)
        self.max_outstanding = max(self.max_outstanding, self.logic.outstanding())
        self.maybe_report()

    def maybe_report(self) -> None:
        if self.meter.due(self.cfg.metrics_every):
            self.report()

    def report(self, final: bool = False) -> None:
        t = self.timings.take()
        rec = self.meter.interval(final, seconds=t)
        span = max(self.meter.last_span, 1e-9)
        rec.update({
            "messaging_fraction": sum(t[k] for k in MESSAGING) / span,
            "outstanding_steps": self.logic.outstanding(),
            "rejected_messages": self.rejected(),
            **self.logic.take_figures(),
        })
        self.send(wire.Metrics(self.stage, WorkerReport(**rec)))

    def final_summary(self, *, ended: float, endpoint: str, core: int, units: tuple[int, int],
                      checkpoint: str) -> StageSummary:
        """This stage's figures over the whole run (the DONE message's summary)."""
        totals = self.timings.total
        own = self.logic.totals()
        run = self.meter.totals(ended, busy_s=totals["compute"])
        elapsed = run["elapsed_s"]
        return StageSummary(**{
            **run,
            "input_endpoint": endpoint, "core": core, "threads": torch.get_num_threads(),
            "cores_allowed": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "cpu_priority": cpu_priority(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
            "units": list(units),
            "replica_pids": self.logic.replica_pids,  # the stage's other processes (--replicas)
            "messaging_fraction": sum(totals[k] for k in MESSAGING) / elapsed if elapsed > 0 else 0.0,
            **{f"{k}_s": v for k, v in totals.items()},
            "compute_cpu_s": self.timings.compute_cpu,
            "max_outstanding_steps": self.max_outstanding,
            "true_grads_received": own["true_grads_received"],
            "bootstrap_grads_received": own["bootstrap_grads_received"],
            "sg_s": own["sg_s"],
            "sg_share_of_compute": own["sg_s"] / totals["compute"] if totals["compute"] > 0 else 0.0,
            "head_share_of_compute": own["head_s"] / totals["compute"] if totals["compute"] > 0 else 0.0,
            "gradient_delay_mean": own["gradient_delay_mean"],
            "gradient_delay_max": own["gradient_delay_max"],
            "rejected_messages": self.rejected(),
            "checkpoint": checkpoint,
        })
