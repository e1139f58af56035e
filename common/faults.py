"""The faults a test injects into a run: a slow stage, saves that fail as on a full disk, latency
on every link. The testing options (--slow-stage, --fail-saves, --link-delay-ms) are read once,
here, into a plan; a stage takes its part of it at start-up and hands each fault to the one part
that injects it, so that the step loop, the links and the checkpoints read no option for them,
and a run without faults (an empty plan) runs no code for them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    from synthgrad.common.config import RunConfig


@dataclass(frozen=True)
class StageFaults:
    """One stage's part of a plan."""
    step_sleep_s: float = 0.0  # sleep this long in every training step (the bottleneck)
    saves_fail_after: Optional[int] = None  # periodic saves after the first N fail (OSError)
    link_delay_s: float = 0.0  # use each activation and gradient this long after it was sent

    @property
    def empty(self) -> bool:
        return not self.step_sleep_s and self.saves_fail_after is None and not self.link_delay_s


@dataclass(frozen=True)
class FaultPlan:
    """Every fault of a run: which stage sleeps and how long, whose saves fail after how many,
    and the latency of every link (0: none)."""
    slow_stage: Optional[int] = None
    step_sleep_s: float = 0.0
    failing_stage: Optional[int] = None
    saves_fail_after: int = 0
    link_delay_s: float = 0.0

    @classmethod
    def from_config(cls, cfg: RunConfig) -> FaultPlan:
        """The plan the testing options describe (validated: STAGE,MS and STAGE,N pairs)."""
        slow, failing = cfg.slow_stage, cfg.fail_saves
        return cls(slow_stage=None if slow is None else slow[0],
                   step_sleep_s=0.0 if slow is None else slow[1] / 1000.0,
                   failing_stage=None if failing is None else failing[0],
                   saves_fail_after=0 if failing is None else failing[1],
                   link_delay_s=cfg.link_delay_ms / 1000.0)

    def for_stage(self, stage: int) -> StageFaults:
        return StageFaults(step_sleep_s=self.step_sleep_s if stage == self.slow_stage else 0.0,
                           saves_fail_after=self.saves_fail_after if stage == self.failing_stage else None,
                           link_delay_s=self.link_delay_s)
