"""Where a worker's time goes: seconds per activity (for metrics and the summary) and, for the
first steps of a run, the spans themselves (for the timeline plot of `launch.py compare`)."""
from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator

ACTIVITIES = ("compute", "send", "recv", "wait_input", "wait_send", "wait_grad")
MESSAGING = ("send", "recv")  # CPU spent encoding, decoding and handing bytes to ZeroMQ
MERGE_GAP_S = 50e-6  # adjacent spans of one activity closer than this become one


class Timings:
    def __init__(self) -> None:
        self.interval = dict.fromkeys(ACTIVITIES, 0.0)
        self.total = dict.fromkeys(ACTIVITIES, 0.0)
        self.compute_cpu = 0.0  # CPU seconds inside compute spans (excludes time-slicing by others)
        self.recording = False
        self.timeline: list[list] = []  # [activity, start, end] in time.time() seconds
        self._offset = time.time() - time.perf_counter()

    def add(self, name: str, t0: float, t1: float) -> None:
        """Account the span [t0, t1] (time.perf_counter() stamps) to `name`."""
        seconds = t1 - t0
        self.interval[name] += seconds
        self.total[name] += seconds
        if self.recording:
            start, end = t0 + self._offset, t1 + self._offset
            last = self.timeline[-1] if self.timeline else None
            if last is not None and last[0] == name and start - last[2] < MERGE_GAP_S:
                last[2] = end
            else:
                self.timeline.append([name, start, end])

    @contextmanager
    def span(self, name: str) -> Iterator[None]:
        t0, c0 = time.perf_counter(), time.thread_time()
        try:
            yield
        finally:
            self.add(name, t0, time.perf_counter())
            if name == "compute":
                self.compute_cpu += time.thread_time() - c0

    def take(self) -> dict[str, float]:
        """Seconds per activity since the last call."""
        out = dict(self.interval)
        self.interval = dict.fromkeys(ACTIVITIES, 0.0)
        return out
