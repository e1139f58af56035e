"""One record builder for every trainer: steps, samples, loss and compute time over the whole run
and since the last report. The stage workers (reporting.py), mode backprop and the pipeline ranks
all report through a Meter, so a "worker" record and a summary's worker entry have the same
fields and the same meaning whoever trained."""
from __future__ import annotations

import os
import socket
import time
from typing import Optional

import psutil
import torch

from synthgrad.common.devices import device_of


class Meter:
    def __init__(self, stage: int, module: torch.nn.Module, default_device: torch.device):
        """`module`: what the trainer computes with; every record names the device its
        parameters are on (`default_device` where it has none)."""
        self.stage = stage
        self.module = module
        self.default_device = default_device
        self.proc = psutil.Process()
        self.proc.cpu_percent(None)
        self.steps = 0
        self.samples = 0
        self.last_step = -1
        self.compute_s = 0.0  # the run's compute time, when the trainer times it here
        self.started = self._last_report = time.monotonic()
        self.last_span = 0.0  # the length of the interval last reported
        self._samples = 0
        self._compute = 0.0
        self._loss = 0.0
        self._losses = 0

    def start(self) -> None:
        """Training begins now (rates count from here)."""
        self.started = self._last_report = time.monotonic()

    def step_done(self, step: int, samples: int, compute_s: float = 0.0, loss: Optional[float] = None,
                  loss_weight: int = 1) -> None:
        """`loss_weight`: the predictions the step's loss is a mean over, where steps differ (a
        stream's windows hold different numbers of targets), so the reported loss is per target."""
        self.steps += 1
        self.samples += samples
        self.last_step = step
        self.compute_s += compute_s
        self._samples += samples
        self._compute += compute_s
        if loss is not None:
            self._loss += loss * loss_weight
            self._losses += loss_weight

    @property
    def device(self) -> str:
        """Where the trainer's parameters are, as torch names it ("cpu", "cuda:0")."""
        return device_of(self.module, self.default_device)

    def due(self, every: float) -> bool:
        return time.monotonic() - self._last_report >= every

    def interval(self, final: bool = False, seconds: Optional[dict[str, float]] = None) -> dict:
        """The figures since the last call (a "worker" record without its event and wall time),
        then a new interval. `seconds`: where the interval's time went when the trainer times it
        itself (the stage workers' timings): "compute" is the busy time, every other entry
        becomes a `<name>_fraction`."""
        now = time.monotonic()
        span = max(now - self._last_report, 1e-9)
        busy = self._compute if seconds is None else seconds["compute"]
        rec = {"stage": self.stage, "pid": os.getpid(), "device": self.device, "final": final,
               "step": self.last_step, "steps": self.steps, "samples": self.samples,
               "samples_per_s": self._samples / span, "busy_fraction": busy / span,
               **{f"{k}_fraction": v / span for k, v in (seconds or {}).items() if k != "compute"},
               "cpu_percent": self.proc.cpu_percent(None), "rss_mb": self.proc.memory_info().rss / 2**20}
        if self._losses:
            rec["loss"] = self._loss / self._losses
        self.last_span = span
        self._last_report = now
        self._samples, self._compute, self._loss, self._losses = 0, 0.0, 0.0, 0
        return rec

    def totals(self, ended: Optional[float] = None, busy_s: Optional[float] = None) -> dict:
        """The whole run's figures (a summary's worker entry, before the trainer's own fields)."""
        elapsed = (time.monotonic() if ended is None else ended) - self.started
        busy = self.compute_s if busy_s is None else busy_s
        return {"stage": self.stage, "pid": os.getpid(), "host": socket.gethostname(),
                "device": self.device, "steps": self.steps, "last_step": self.last_step,
                "samples": self.samples, "elapsed_s": elapsed,
                "samples_per_s": self.samples / elapsed if elapsed > 0 else 0.0,
                "busy_fraction": busy / elapsed if elapsed > 0 else 0.0}
