"""mode=pipeline: PyTorch's own pipeline parallelism, the strongest *locked* peer to compare with.

One process per stage (the same stages, units and seed as synthgrad's modes), joined by a gloo
process group; torch.distributed.pipelining splits each batch into microbatches and runs a GPipe
or 1F1B schedule, so stages overlap on different microbatches while every update still waits
for the true gradient. Gradients are averaged over microbatches, so without batch norm this is
plain backprop; batch norm sees microbatch statistics (as in any pipeline-parallel run).

The launcher only starts the ranks and waits; the last rank writes metrics.jsonl and evaluations,
every rank writes its stage checkpoint and a small result file the summary is assembled from.
"""
from __future__ import annotations

import json
import os
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Optional

import psutil
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from common.config import RunConfig
from common.data import load_dataset, steps_per_epoch, total_steps, train_batches
from common.files import JsonlLog, JsonlTail, atomic_torch_save, atomic_write_json
from common.models import build_units, make_optimizer, stage_bounds, stage_io_shapes
from common.procs import (
    ProcessGroup,
    available_cores,
    describe_exit,
    die_with_parent,
    pin_to_core,
)
from coordinator.stream import StatusStream


class PipelineFailed(RuntimeError):
    pass


@dataclass(frozen=True)
class RankSpec:
    rank: int
    world: int
    config: dict
    run_dir: str
    core: int


def _loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out, target)


def _schedule(cfg: RunConfig, stage):
    from torch.distributed.pipelining import Schedule1F1B, ScheduleGPipe
    cls = ScheduleGPipe if cfg.schedule == "gpipe" else Schedule1F1B
    return cls(stage, cfg.microbatches, loss_fn=_loss)


def run_rank(spec: RankSpec) -> None:
    """Process entry point of one pipeline stage."""
    from torch.distributed.pipelining import PipelineStage
    die_with_parent()
    cfg = RunConfig.from_dict(spec.config)
    run_dir = Path(spec.run_dir)
    torch.set_num_threads(cfg.threads_per_worker)
    pin_to_core(spec.core)
    rank, world = spec.rank, spec.world
    first, last = rank == 0, rank == world - 1
    dist.init_process_group("gloo", init_method=(run_dir / ".pipeline-rendezvous").resolve().as_uri(),
                            rank=rank, world_size=world, timeout=timedelta(seconds=cfg.stall_timeout))
    units = build_units(cfg)
    a, b = stage_bounds(cfg)[rank]
    module = nn.Sequential(*units[a:b])
    in_shape, out_shape = stage_io_shapes(cfg)[rank]
    mb = cfg.batch_size // cfg.microbatches
    example = (torch.zeros(mb, *in_shape),)
    schedule = _schedule(cfg, PipelineStage(module, rank, world, torch.device("cpu"), input_args=example))
    # Evaluation gets a schedule of its own: a schedule that switches between forward-only and
    # training re-infers its shapes each time, with a stray forward pass in training mode.
    eval_schedule = _schedule(cfg, PipelineStage(module, rank, world, torch.device("cpu"), input_args=example))
    optimizer = make_optimizer(module.parameters(), cfg.optimizer, cfg.lr, cfg.momentum)
    _warm_up(cfg, schedule, module, first, last, in_shape)
    ds = load_dataset(cfg.dataset, cfg.data_dir, cfg.synthetic_train, cfg.synthetic_test) \
        if (first or last) else None
    n_train = len(ds.train) if ds is not None else 0
    n_train_all = torch.tensor([n_train])
    dist.all_reduce(n_train_all, op=dist.ReduceOp.MAX)  # middle ranks load no data
    per_epoch = steps_per_epoch(int(n_train_all), cfg.batch_size)
    total = total_steps(int(n_train_all), cfg.batch_size, cfg.epochs, cfg.steps)
    metrics = JsonlLog(run_dir / "metrics.jsonl") if last else None
    proc = psutil.Process()
    proc.cpu_percent(None)
    evals: list[dict] = []
    step = samples = 0
    compute = 0.0
    iv_loss, iv_n, iv_samples, iv_compute = 0.0, 0, 0, 0.0
    dist.barrier()
    t_start = last_report = time.monotonic()
    (run_dir / f".pipeline-rank{rank}.started").touch()  # the launcher's start check

    def batches(epoch: int):
        if ds is not None:
            yield from train_batches(ds.train, cfg.batch_size, cfg.seed, epoch)
        else:
            for _ in range(per_epoch):
                yield None, None

    def test(epoch: int, step: int) -> None:
        acc = _evaluate(cfg, eval_schedule, module, ds, first, last)
        if last:
            loss_sum, correct, n = acc
            rec = {"event": "eval", "wall_s": time.monotonic() - t_start, "epoch": epoch,
                   "step": step, "test_loss": loss_sum / max(n, 1),
                   "test_accuracy": correct / max(n, 1), "test_samples": n}
            evals.append(rec)
            metrics.write(rec)

    def report(now: float, step: int, samples: int, final: bool = False) -> None:
        """The last rank's figures for this interval, to metrics.jsonl (the launcher follows it)."""
        nonlocal last_report, iv_loss, iv_n, iv_samples, iv_compute
        span = max(now - last_report, 1e-9)
        metrics.write({"event": "worker", "wall_s": now - t_start, "stage": rank, "pid": os.getpid(),
                       "final": final, "step": step - 1, "steps": step, "samples": samples,
                       "samples_per_s": iv_samples / span, "busy_fraction": iv_compute / span,
                       "loss": iv_loss / max(iv_n, 1), "cpu_percent": proc.cpu_percent(None),
                       "rss_mb": proc.memory_info().rss / 2**20})
        last_report = now
        iv_loss, iv_n, iv_samples, iv_compute = 0.0, 0, 0, 0.0

    try:
        for epoch in range(cfg.epochs):
            for x, y in batches(epoch):
                if step >= total:
                    break
                t0 = time.perf_counter()
                optimizer.zero_grad(set_to_none=True)
                losses: list = []
                if first:
                    schedule.step(x)
                elif last:
                    schedule.step(target=y, losses=losses)
                else:
                    schedule.step()
                optimizer.step()
                dt = time.perf_counter() - t0
                compute += dt
                iv_compute += dt
                step += 1
                samples += cfg.batch_size
                iv_samples += cfg.batch_size
                if last:
                    iv_loss += float(torch.stack([l.detach() for l in losses]).mean())
                    iv_n += 1
                if cfg.mid_epoch_eval(step, per_epoch, total):
                    test(epoch, step)
                now = time.monotonic()
                if last and now - last_report >= cfg.metrics_every:
                    report(now, step, samples)
            if last and (step >= total or epoch == cfg.epochs - 1):  # before the final test
                report(time.monotonic(), step, samples, final=True)
            test(epoch, step)
            if step >= total:
                break
        dist.barrier()
        wall = time.monotonic() - t_start
    finally:
        if metrics is not None:
            metrics.close()
    path = run_dir / f"stage{rank}.pt"
    atomic_torch_save(path, {"stage": rank, "units": {a + j: module[j].state_dict() for j in range(len(module))},
                             "state": {"optimizer": optimizer.state_dict()}, "step": step - 1,
                             "config": cfg.to_dict()})
    atomic_write_json(run_dir / f"pipeline-rank{rank}.json", {
        "stage": rank, "pid": os.getpid(), "host": socket.gethostname(), "core": spec.core,
        "units": [a, b], "steps": step, "samples": samples, "elapsed_s": wall,
        "samples_per_s": samples / wall if wall > 0 else 0.0,
        "busy_fraction": compute / wall if wall > 0 else 0.0, "checkpoint": str(path),
        "evals": evals})
    dist.destroy_process_group()


def _warm_up(cfg: RunConfig, schedule, module: nn.Module, first: bool, last: bool,
             in_shape: tuple[int, ...]) -> None:
    """One untimed, discarded step so the schedule infers its shapes before training. The
    inference runs forward on uninitialised buffers in stages > 0; with the modules in eval mode
    batch norm leaves its running statistics alone, and the gradients are thrown away."""
    module.eval()
    try:
        if first:
            schedule.step(torch.zeros(cfg.batch_size, *in_shape))
        elif last:
            schedule.step(target=torch.zeros(cfg.batch_size, dtype=torch.long), losses=[])
        else:
            schedule.step()
    finally:
        module.train()
        for p in module.parameters():
            p.grad = None


@torch.no_grad()
def _evaluate(cfg: RunConfig, schedule, module: nn.Module, ds, first: bool, last: bool
              ) -> Optional[tuple[float, int, int]]:
    """Forward-only pass over the test set through the pipeline. Batches are padded to the
    training batch size (the stages' buffers have that shape); padded rows are ignored."""
    module.eval()
    n_test = len(ds.test) if ds is not None else 0
    n = torch.tensor([n_test if cfg.eval_samples is None else min(cfg.eval_samples, n_test)])
    dist.all_reduce(n, op=dist.ReduceOp.MAX)
    n = int(n)
    loss_sum, correct = 0.0, 0
    try:
        for start in range(0, n, cfg.batch_size):
            rows = min(cfg.batch_size, n - start)
            x = y = None
            if ds is not None:
                x = _pad(ds.test.images[start:start + rows], cfg.batch_size)
                y = _pad(ds.test.labels[start:start + rows], cfg.batch_size)
            if first:
                schedule.eval(x)
            elif last:
                out = schedule.eval(target=y, losses=[])
                out, y = out[:rows], y[:rows]
                loss_sum += float(F.cross_entropy(out, y, reduction="sum"))
                correct += int((out.argmax(1) == y).sum())
            else:
                schedule.eval()
    finally:
        module.train()
    return (loss_sum, correct, n) if last else None


def _pad(t: torch.Tensor, rows: int) -> torch.Tensor:
    if t.shape[0] == rows:
        return t
    return torch.cat([t, t.new_zeros((rows - t.shape[0], *t.shape[1:]))])


def run_pipeline(cfg: RunConfig, run_dir: Path, log: Callable[[str], None], stream: StatusStream) -> dict:
    """Start one process per stage, wait for them (failing fast when one dies), feed `stream`
    from the last rank's metrics.jsonl records, and return the run summary in the same shape as
    the other modes'."""
    from coordinator.coordinator import snake_core
    world = len(cfg.stage_groups)
    if world < 2:
        raise PipelineFailed("mode=pipeline needs at least two stages (--stages 2 or more)")
    rendezvous = run_dir / ".pipeline-rendezvous"
    rendezvous.unlink(missing_ok=True)
    for old in [*run_dir.glob("pipeline-rank*.json"), *run_dir.glob(".pipeline-rank*.started")]:
        old.unlink()
    cores = available_cores()
    group = ProcessGroup()
    t_created = time.monotonic()
    try:
        for rank in range(world):
            core = snake_core(rank, cores) if cfg.pin_cores else -1
            group.start(f"pipeline-{rank}", run_rank, RankSpec(rank, world, cfg.to_dict(), str(run_dir), core))
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
                    log(f"train step {rec['steps']}/{stream.total_steps} "
                        f"({100 * rec['steps'] / max(stream.total_steps, 1):.0f}%)  "
                        f"{rec['samples_per_s']:.0f} samples/s  loss {rec['loss']:.4f}")
            elif rec.get("event") == "eval":
                stream.eval(rec, logged=True)
                log(f"eval  epoch {rec['epoch'] + 1} step {rec['step']}: test accuracy "
                    f"{100 * rec['test_accuracy']:.2f}%  test loss {rec['test_loss']:.4f}  "
                    f"({rec['wall_s']:.1f}s)")

        while not all(c.process.exitcode is not None for c in group.children):
            for c in group.dead():
                if c.process.exitcode != 0:
                    raise PipelineFailed(f"pipeline {c.name} (pid {c.process.pid}) "
                                         f"{describe_exit(c.process.exitcode)}")
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
            raise PipelineFailed(f"pipeline {bad[0].name} {describe_exit(bad[0].process.exitcode)}")
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
    return {
        "mode": "pipeline", "steps": last["steps"], "samples": last["samples"],
        "wall_clock_s": wall, "startup_s": time.monotonic() - t_created - wall,
        "samples_per_s": last["samples_per_s"],
        "test_accuracy": evals[-1]["test_accuracy"] if evals else None,
        "test_loss": evals[-1]["test_loss"] if evals else None,
        "true_gradient_steps": last["steps"], "num_stages": world, "evals": evals,
        "rejected_messages": 0, "schedule": cfg.schedule, "microbatches": cfg.microbatches,
        "workers": ranks,
    }


if __name__ == "__main__":  # pragma: no cover - a quick manual check
    sys.exit("use: python launch.py train --mode pipeline")
