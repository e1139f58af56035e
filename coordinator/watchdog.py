"""How the coordinator notices that a run cannot go on: stages that never become ready, a stage
that falls silent (dead, hung, stopped or unreachable: no message, not even a heartbeat, for
--heartbeat-timeout), and a run that stops advancing although everyone is alive
(--stall-timeout). Local stage processes that exit are noticed by the coordinator's process
group at once (coordinator.py)."""
from __future__ import annotations

from collections.abc import Callable
from typing import Optional

from synthgrad.common.config import RunConfig
from synthgrad.common.reports import RunFailed

__all__ = ["RunFailed", "Watchdog"]


class Watchdog:
    def __init__(self, cfg: RunConfig, created: float):
        self.cfg = cfg
        self.created = created
        self.started: Optional[float] = None  # when every stage was ready
        self.last_heard: dict[int, float] = {}  # stage -> when it last sent anything
        self.last_advance = created  # when a step, evaluation or DONE last came in
        self.max_step = -1
        self._last_beat = 0.0

    def start(self, now: float) -> None:
        self.started = self.last_advance = now

    def heard(self, stage: int, now: float) -> None:
        self.last_heard[stage] = now

    def advanced(self, now: float, step: Optional[int] = None) -> None:
        """Progress: an evaluation, a DONE, or (with `step`) a report of a new highest step."""
        if step is None:
            self.last_advance = now
        elif step > self.max_step:
            self.max_step, self.last_advance = step, now

    def heartbeat_due(self, now: float) -> bool:
        """About every heartbeat_every, the coordinator tells every worker that it lives."""
        if now - self._last_beat < self.cfg.heartbeat_every:
            return False
        self._last_beat = now
        return True

    def check(self, now: float, missing: Callable[[], list[int]], who: Callable[[int], str],
              done: list[int]) -> None:
        """Raise RunFailed if the run cannot go on."""
        cfg = self.cfg
        if self.started is None:
            if now - self.created > cfg.start_timeout:
                raise RunFailed(f"stages {missing()} were not ready within {cfg.start_timeout:.0f}s "
                                f"(start them, or raise --start-timeout)")
            return
        for stage, heard in self.last_heard.items():
            if now - heard > cfg.heartbeat_timeout:
                raise RunFailed(f"stage {stage} ({who(stage)}) sent nothing for {now - heard:.1f}s: "
                                f"it is hung or unreachable (--heartbeat-timeout {cfg.heartbeat_timeout:g})")
        if now - self.last_advance > cfg.stall_timeout:
            raise RunFailed(f"no progress (no new step, evaluation or DONE) for {cfg.stall_timeout:.0f}s "
                            f"although every stage is alive; stages done: {done}")
