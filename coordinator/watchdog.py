"""The coordinator's watch over its stages (common/liveness.py judges): each stage by its number,
identified when it registers, its process adopted when this host started it; the limits are the
run's (--start-timeout, --heartbeat-timeout, --stall-timeout). And the heartbeats the
coordinator owes the workers, which watch it the same way."""
from __future__ import annotations

from synthgrad.common.config import RunConfig
from synthgrad.common.liveness import Limit, Limits, Process, ProcessFailure, Watch
from synthgrad.common.reports import RunFailed

__all__ = ["ProcessFailure", "RunFailed", "Watchdog"]

PROGRESS = "no new step, evaluation or DONE"


def stage_limits(cfg: RunConfig) -> Limits:
    return Limits(
        start=Limit(cfg.start_timeout, "start them, or raise --start-timeout"),
        silence=Limit(cfg.heartbeat_timeout, f"--heartbeat-timeout {cfg.heartbeat_timeout:g}"),
        stall=Limit(cfg.stall_timeout, f"--stall-timeout {cfg.stall_timeout:g}"),
        progress=PROGRESS)


class Watchdog(Watch):
    def __init__(self, cfg: RunConfig, created: float, num_stages: int):
        super().__init__(stage_limits(cfg), created)
        self.cfg = cfg
        for stage in range(num_stages):
            self.add(stage, Process.of_stage(stage))
        self._last_beat = 0.0

    def heartbeat_due(self, now: float) -> bool:
        """About every heartbeat_every, the coordinator tells every worker that it lives."""
        if now - self._last_beat < self.cfg.heartbeat_every:
            return False
        self._last_beat = now
        return True
