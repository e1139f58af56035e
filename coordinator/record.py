"""The run's record on disk: every run, done, failed or interrupted, leaves summary.json saying
how it ended (status, error, the last complete checkpoint), and a resumed run's summary covers
the whole run, with one segment per invocation."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from synthgrad.common.config import RunConfig
from synthgrad.common.reports import run_summary

DONE, FAILED, INTERRUPTED = "done", "failed", "interrupted"


def last_checkpoint(run_dir: Path) -> Optional[dict]:
    """The last complete checkpoint ({step, final, path}), or None."""
    path = Path(run_dir) / "checkpoints" / "manifest.json"
    try:
        manifest = json.loads(path.read_text())
        return {"step": manifest["step"], "final": manifest["final"], "manifest": str(path)}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def previous_record(run_dir: Path) -> Optional[dict]:
    """The summary.json a resumed run continues (None when there is none, or it is unreadable)."""
    try:
        record = json.loads((Path(run_dir) / "summary.json").read_text())
        return record if isinstance(record, dict) else None
    except (OSError, ValueError):
        return None


def partial_summary(cfg: RunConfig, latest: dict[int, dict], evals: list[dict], wall_s: float) -> dict:
    """What is known of a run that did not finish: the workers' last reports and the evaluations."""
    last = latest.get(cfg.num_stages - 1, {})
    steps = last.get("step", -1) + 1
    return run_summary(cfg.mode, steps=steps, samples=steps * cfg.batch_size, wall_clock_s=wall_s,
                       startup_s=0.0, evals=evals, workers=[latest[s] for s in sorted(latest)],
                       true_gradient_steps=None, num_stages=cfg.num_stages,
                       rejected_messages=sum(w.get("rejected_messages", 0) for w in latest.values()))


def _segment(summary: dict, first_step: int, status: str, error: Optional[str]) -> dict:
    return {"status": status, "error": error, "first_step": first_step, "steps": summary.get("steps", 0),
            "samples": summary.get("samples", 0), "wall_clock_s": summary.get("wall_clock_s", 0.0),
            "samples_per_s": summary.get("samples_per_s", 0.0),
            "true_gradient_steps": summary.get("true_gradient_steps")}


def finish(summary: dict, *, cfg: RunConfig, run_dir: Path, status: str, error: Optional[str],
           resumed_from: Optional[int], previous: Optional[dict]) -> dict:
    """The summary of this invocation, made the record of the whole run: how it ended, the last
    complete checkpoint, and (resumed) the earlier segments and whole-run totals."""
    first_step = (resumed_from + 1) if resumed_from is not None else 0
    segment = _segment(summary, first_step, status, error)
    earlier: list[dict] = []
    if resumed_from is not None and previous is not None:
        earlier = list(previous.get("segments") or [_segment(previous, 0, previous.get("status", "unknown"),
                                                             previous.get("error"))])
    segments = [*earlier, segment]
    steps = first_step + segment["steps"]  # the steps the final weights have seen
    wall = sum(s["wall_clock_s"] or 0.0 for s in segments)
    if resumed_from is not None:  # the true-gradient steps of those steps (each segment has its own count)
        summary = {**summary, "true_gradient_steps": sum(cfg.true_grad_at(s) for s in range(steps))}
    return {**summary, "status": status, "error": error, "last_checkpoint": last_checkpoint(run_dir),
            "steps": steps, "samples": steps * cfg.batch_size if resumed_from is not None else summary.get("samples", 0),
            "wall_clock_s": wall, "samples_per_s": (steps * cfg.batch_size / wall if resumed_from is not None and wall
                                                    else summary.get("samples_per_s", 0.0)),
            "segments": segments}
