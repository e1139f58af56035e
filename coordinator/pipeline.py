"""mode=pipeline, the launcher's side: start one rank process per stage (workers/pipeline.py),
watch them (common/liveness.py: failing fast when one dies, never joins, or the pipeline goes
quiet), feed the run's status stream from the last rank's metrics.jsonl, and assemble the
summary from the ranks' result files."""
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
from synthgrad.common.liveness import Cause, Limit, Limits, Process, ProcessFailure, Verdict, Watch, reported
from synthgrad.common.procs import ProcessGroup
from synthgrad.common.reports import RunFailed, progress_line, run_summary
from synthgrad.coordinator.stream import StatusStream
from synthgrad.workers.pipeline import RankSpec, run_rank

PROGRESS = "no report from the pipeline ranks"


def _limits(cfg: RunConfig) -> Limits:
    """The ranks join within --start-timeout; afterwards the last rank reports at least every
    --metrics-every, so a pipeline quiet for --stall-timeout (or two reports' time) has stalled.
    Silence is not watched: the ranks talk over torch.distributed, whose own timeout covers a
    rank that hangs inside a collective."""
    return Limits(start=Limit(cfg.start_timeout, "they did not join the process group: raise --start-timeout"),
                  stall=Limit(max(cfg.stall_timeout, 2 * cfg.metrics_every), f"--stall-timeout {cfg.stall_timeout:g}"),
                  progress=PROGRESS)


def _explained(run_dir: Path, watch: Watch, verdict: Verdict) -> Verdict:
    """Why the pipeline failed when a rank ended badly: the words a rank left (a non-finite
    value; a rank writes them before it exits, so they are there by the time its peers die of
    the closed connection), else how the rank exited."""
    if verdict.cause not in (Cause.EXITED, Cause.KILLED):
        return verdict
    for rank in sorted(watch.entries):
        try:
            said = json.loads((run_dir / f"pipeline-rank{rank}.error.json").read_text())["error"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        return reported(watch.process(rank), str(said))
    return verdict


def run_pipeline(cfg: RunConfig, run_dir: Path, log: Callable[[str], None], stream: StatusStream,
                 total: int, placement: Placement) -> dict:
    """Start one process per stage, wait for them (failing fast when one dies), feed `stream`
    from the last rank's metrics.jsonl records, and return the run summary in the same shape as
    the other modes'. Raises ProcessFailure with the verdict on the rank that failed."""
    world = len(cfg.stage_groups)
    if world < 2:
        raise RunFailed("mode=pipeline needs at least two stages (--stages 2 or more)")
    rendezvous = run_dir / ".pipeline-rendezvous"
    rendezvous.unlink(missing_ok=True)
    for old in [*run_dir.glob("pipeline-rank*.json"), *run_dir.glob(".pipeline-rank*.started")]:
        old.unlink()
    group = ProcessGroup()
    t_created = time.monotonic()
    watch = Watch(_limits(cfg), t_created)
    try:
        for rank in range(world):
            child = group.start(f"pipeline-{rank}", run_rank,
                                RankSpec(rank, world, cfg.to_dict(), str(run_dir), *placement.of(rank)[:2], total,
                                         placement.yields_at(rank)))
            watch.add(rank, Process.of_rank(rank, child.process.pid), handle=child.process, may_finish=True)
        log(f"pipeline: {world} stage processes ({cfg.schedule}, {cfg.microbatches} microbatches), "
            f"pids {', '.join(str(c.process.pid) for c in group.children)}")
        tail = JsonlTail(run_dir / "metrics.jsonl")  # the last rank's reports and evaluations
        last_progress = time.monotonic()

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

        while not watch.all_ended():
            now = time.monotonic()
            if watch.started is None:
                for rank in range(world):
                    if (run_dir / f".pipeline-rank{rank}.started").exists():  # the rank's start marker
                        watch.ready(rank)
                if watch.all_ready():
                    watch.start(now)
            for rec in tail.read():
                watch.advanced(now)
                follow(rec)
            verdict = watch.verdict(now)
            if verdict is not None:
                raise ProcessFailure(_explained(run_dir, watch, verdict))
            if watch.started is not None:
                stream.tick(now - watch.started)
            time.sleep(0.1)
        bad = watch.exits()
        if bad:
            raise ProcessFailure(_explained(run_dir, watch, bad[0]))
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
