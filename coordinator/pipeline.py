"""mode=pipeline, the launcher's side: start one rank process per stage (workers/pipeline.py),
watch them (failing fast when one dies or the pipeline goes quiet), feed the run's status stream
from the last rank's metrics.jsonl, and assemble the summary from the ranks' result files."""
from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

from synthgrad.common.config import RunConfig
from synthgrad.common.evaluation import eval_line
from synthgrad.common.files import JsonlTail
from synthgrad.common.modes import Mode
from synthgrad.common.placement import Placement
from synthgrad.common.procs import ProcessGroup, describe_exit
from synthgrad.common.reports import progress_line, run_summary
from synthgrad.coordinator.stream import StatusStream
from synthgrad.workers.pipeline import RankSpec, run_rank


class PipelineFailed(RuntimeError):
    pass


def _rank_failure(run_dir: Path, child) -> str:
    """Why the pipeline failed when `child` ended badly: the words a rank left (a non-finite
    value; a rank writes them before it exits, so they are there by the time its peers die of
    the closed connection), else how `child` exited."""
    how = f"pipeline {child.name} (pid {child.process.pid}) {describe_exit(child.process.exitcode)}"
    for said in sorted(run_dir.glob("pipeline-rank*.error.json")):
        try:
            return f"{said.name.split('.')[0]}: {json.loads(said.read_text())['error']}"
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return how


def run_pipeline(cfg: RunConfig, run_dir: Path, log: Callable[[str], None], stream: StatusStream,
                 total: int, placement: Placement) -> dict:
    """Start one process per stage, wait for them (failing fast when one dies), feed `stream`
    from the last rank's metrics.jsonl records, and return the run summary in the same shape as
    the other modes'."""
    world = len(cfg.stage_groups)
    if world < 2:
        raise PipelineFailed("mode=pipeline needs at least two stages (--stages 2 or more)")
    rendezvous = run_dir / ".pipeline-rendezvous"
    rendezvous.unlink(missing_ok=True)
    for old in [*run_dir.glob("pipeline-rank*.json"), *run_dir.glob(".pipeline-rank*.started")]:
        old.unlink()
    group = ProcessGroup()
    t_created = time.monotonic()
    try:
        for rank in range(world):
            group.start(f"pipeline-{rank}", run_rank,
                        RankSpec(rank, world, cfg.to_dict(), str(run_dir), *placement.of(rank)[:2], total,
                                 placement.yields_at(rank)))
        log(f"pipeline: {world} stage processes ({cfg.schedule}, {cfg.microbatches} microbatches), "
            f"pids {', '.join(str(c.process.pid) for c in group.children)}")
        tail = JsonlTail(run_dir / "metrics.jsonl")  # the last rank's reports and evaluations
        joined = None  # time.monotonic() when every rank had joined
        last_sign = last_progress = time.monotonic()

        def follow(rec: dict) -> None:
            """Hand one of the last rank's records to the stream; log progress and evaluations."""
            nonlocal last_progress
            if rec.get("event") == "worker":
                stream.worker(rec, logged=True)
                if time.monotonic() - last_progress >= cfg.progress_every:
                    last_progress = time.monotonic()
                    log(progress_line(rec["steps"], stream.total_steps, rec["samples_per_s"], rec.get("loss")))
            elif rec.get("event") == "eval":
                stream.eval(rec, logged=True)
                log(eval_line(rec))

        while not all(c.process.exitcode is not None for c in group.children):
            for c in group.dead():
                if c.process.exitcode != 0:
                    raise PipelineFailed(_rank_failure(run_dir, c))
            now = time.monotonic()
            started = len(list(run_dir.glob(".pipeline-rank*.started")))
            if started < world and now - t_created > cfg.start_timeout:
                raise PipelineFailed(f"only {started} of {world} pipeline stages joined the process "
                                     f"group within {cfg.start_timeout:.0f}s (raise --start-timeout)")
            if started == world and joined is None:
                joined = last_sign = now
            for rec in tail.read():
                last_sign = now
                follow(rec)
            if joined is not None:
                stream.tick(now - joined)
                if now - last_sign > max(cfg.stall_timeout, 2 * cfg.metrics_every):
                    raise PipelineFailed(f"the pipeline wrote no metrics for {cfg.stall_timeout:.0f}s")
            time.sleep(0.1)
        bad = [c for c in group.children if c.process.exitcode != 0]
        if bad:
            raise PipelineFailed(_rank_failure(run_dir, bad[0]))
    finally:
        group.shutdown()
        rendezvous.unlink(missing_ok=True)
        for marker in run_dir.glob(".pipeline-rank*.started"):
            marker.unlink()
    ranks = [json.loads((run_dir / f"pipeline-rank{r}.json").read_text()) for r in range(world)]
    last = ranks[-1]
    evals = last.pop("evals")
    for r in ranks:
        r.pop("evals", None)
    wall = last["elapsed_s"]
    for rec in tail.read():  # what the last rank wrote after the last poll
        follow(rec)
    stream.tick(wall, done=True)
    return run_summary(
        Mode.PIPELINE, steps=last["steps"], samples=last["samples"], wall_clock_s=wall,
        startup_s=time.monotonic() - t_created - wall, evals=evals, true_gradient_steps=last["steps"],
        num_stages=world, schedule=cfg.schedule, microbatches=cfg.microbatches, workers=ranks)
