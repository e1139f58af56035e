"""`--on-failure restart`: whether a failure is worth another try, decided from its verdict
(common/liveness.py) alone, and how summary.json lists it.

A restart starts every stage again from the last checkpoint complete on all of them. It can
mend what happened to a process (it exited, was killed, fell silent, never became ready) or to
the run (it stalled), and an error a process reported for a reason another try may not meet
again. It cannot mend a failure the same steps meet again: training that diverged (NaN or Inf)
does so again from the same checkpoint, and a configuration, model or data that cannot be used
cannot be used on any try. Those end the run at once, saying why."""
from __future__ import annotations

from dataclasses import dataclass

from synthgrad.common.liveness import Cause, Fault, Verdict

# what every try would meet again, and why a restart is refused for it
REPEATS = {
    Fault.DIVERGED: "training diverged, and the same steps from the same checkpoint would diverge again",
    Fault.CONFIGURATION: "the configuration, the model or the data cannot be used, on any try",
}


@dataclass(frozen=True)
class Decision:
    restart: bool
    why: str  # said in the log and recorded in the failure


def decide(verdict: Verdict, restarts: int, max_restarts: int) -> Decision:
    """Restart after `verdict`, `restarts` restarts having been made, or not, and why."""
    if verdict.cause is Cause.REPORTED and verdict.fault in REPEATS:
        return Decision(False, f"not restarting: {REPEATS[verdict.fault]}")
    if restarts >= max_restarts:
        return Decision(False, f"after {restarts} restarts; --max-restarts {max_restarts}")
    return Decision(True, f"restart {restarts + 1} of at most {max_restarts}")


def failure_record(verdict: Verdict, decision: Decision) -> dict:
    """A failure as summary.json lists it: the verdict's words, what they say as data (the
    cause, what a reported error ran into, which process), and what was done about it."""
    who = verdict.process
    return {"error": str(verdict), "cause": verdict.cause.value,
            "fault": verdict.fault.value if verdict.cause is Cause.REPORTED else None,
            "process": who.name if who is not None else None,
            "stage": who.stage if who is not None and who.stage >= 0 else None,
            "pid": who.pid if who is not None else None,
            "restarted": decision.restart, "why": decision.why}
