"""What a trainer reports, whoever trained: the sink its reports go to (the run's status stream,
coordinator/stream.py, implements it), and one shape for every run's summary (summary.json,
compare's rows), from the single-process reference, the pipeline contender or the stage workers."""
from __future__ import annotations

from typing import Any, Optional, Protocol


class RunFailed(RuntimeError):
    """The run cannot go on; the message names the stage and the reason."""


class StatusSink(Protocol):
    """Where a trainer's reports go (workers/ depend on this, not on the coordinator's stream)."""

    def worker(self, rec: dict, logged: bool = False) -> None:
        """A periodic report of one worker (event "worker")."""

    def eval(self, rec: dict, logged: bool = False) -> None:
        """A test evaluation (event "eval")."""

    def tick(self, wall_s: float, done: bool = False) -> Optional[dict]:
        """The run-wide status record, when one is due (or the run is done)."""


def progress_line(steps: int, total: int, samples_per_s: float, loss: Optional[float], more: str = "") -> str:
    """The plain progress line every mode logs (`more`: a mode's own figures, after the loss)."""
    return (f"train step {steps}/{total} ({100 * steps / max(total, 1):.0f}%)  {samples_per_s:.0f} samples/s  "
            f"loss {'-' if loss is None else f'{loss:.4f}'}{'  ' + more if more else ''}")


def run_summary(mode: str, *, steps: int, samples: int, wall_clock_s: float, startup_s: float,
                evals: list[dict], workers: list[dict], true_gradient_steps: int, num_stages: int,
                rejected_messages: int = 0, **extra: Any) -> dict:
    """The fields every mode reports (final test figures from the last evaluation: on stream
    data also its bits per target and perplexity), then the mode's own (`extra`)."""
    final = evals[-1] if evals else {}
    return {
        "mode": str(mode), "steps": steps, "samples": samples,
        "wall_clock_s": wall_clock_s, "startup_s": startup_s,
        "samples_per_s": samples / wall_clock_s if wall_clock_s > 0 else 0.0,
        "test_accuracy": final.get("test_accuracy"), "test_loss": final.get("test_loss"),
        **{k: final[k] for k in ("test_bits", "test_perplexity") if k in final},
        "true_gradient_steps": true_gradient_steps, "num_stages": num_stages, "evals": evals,
        "rejected_messages": rejected_messages,
        **extra,
        "workers": workers,
    }
