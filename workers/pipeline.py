"""mode=pipeline: PyTorch's own pipeline parallelism, the strongest *locked* peer to compare with.

One process per stage (the same stages, units, seed, device and precision as synthgrad's
modes), joined by a gloo process group (nccl on CUDA devices); torch.distributed.pipelining
splits each batch into microbatches and runs a GPipe or 1F1B schedule, so stages overlap on
different microbatches while every update still waits for the true gradient. Gradients are averaged over microbatches, so without batch norm this is
plain backprop; batch norm sees microbatch statistics (as in any pipeline-parallel run).

This file is one rank's process. The launcher (coordinator/pipeline.py) only starts the ranks and
waits; the last rank writes metrics.jsonl and evaluations, every rank writes its stage checkpoint
and a small result file the summary is assembled from.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn

from synthgrad.common.config import RunConfig
from synthgrad.common.data import Dataset, steps_per_epoch
from synthgrad.common.datasets import run_dataset
from synthgrad.common.devices import Compute, stage_device
from synthgrad.common.evaluation import EvalTally, eval_record
from synthgrad.common.files import JsonlLog, atomic_write_json
from synthgrad.common.models import (
    build_units,
    loss_function,
    make_optimizer,
    stage_bounds,
    stage_io_shapes,
)
from synthgrad.common.procs import (
    cpu_priority,
    die_with_parent,
    openmp_threads_sleep,
    pin_to_core,
    yield_cpu,
)
from synthgrad.workers.checkpointing import final_path, save_stage
from synthgrad.workers.meter import Meter
from synthgrad.workers.schedule import (
    Evaluate,
    TrainBatch,
    no_batches,
    schedule,
    split_batches,
)
from synthgrad.workers.stage import NonFinite, require_finite


@dataclass(frozen=True)
class RankSpec:
    rank: int
    world: int
    config: dict
    run_dir: str
    core: int  # the first of `threads` cores to pin to; -1: not pinned
    threads: int  # torch threads (coordinator/layout.py: cores follow cost)
    total_steps: int  # the run's length (the launcher's, so every rank agrees)
    yields: bool = False  # run at the lowest CPU priority (common/placement.py yielding_stages)


class _InPrecision(nn.Module):
    """A rank's layers as the stage workers run them: under the run's autocast, the output in
    the wire's dtype (bf16 under --precision bf16) unless it is the last rank's logits."""

    def __init__(self, layers: nn.Module, dev: Compute, last: bool):
        super().__init__()
        self.layers, self.dev, self.last = layers, dev, last

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with self.dev.autocast():
            out = self.layers(x)
        return out if self.last else out.to(self.dev.wire_dtype)


def _schedule(cfg: RunConfig, stage, dev: Compute):
    from torch.distributed.pipelining import Schedule1F1B, ScheduleGPipe
    cls = ScheduleGPipe if cfg.schedule == "gpipe" else Schedule1F1B
    loss_fn = loss_function(cfg.loss)

    def loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        with dev.autocast():  # as the last stage and mode backprop compute it
            return loss_fn(out, target)
    return cls(stage, cfg.microbatches, loss_fn=loss)


@dataclass
class _Rank:
    """One rank's parts, as set up before training."""
    cfg: RunConfig
    rank: int
    first: bool
    last: bool
    units: tuple[int, int]  # [first, end) unit indices
    dev: Compute
    module: nn.Sequential
    schedule: Any  # torch.distributed.pipelining's schedule for training
    eval_schedule: Any  # and its own for evaluation (see _set_up)
    optimizer: torch.optim.Optimizer
    ds: Optional[Dataset]  # the first and last ranks read the data
    per_epoch: int


def _set_up(spec: RankSpec, cfg: RunConfig, run_dir: Path) -> _Rank:
    """Join the process group, build this rank's layers and schedules, warm them up."""
    from torch.distributed.pipelining import PipelineStage
    rank, world = spec.rank, spec.world
    first, last = rank == 0, rank == world - 1
    dev = Compute.of(stage_device(cfg.device, rank), cfg.precision)
    backend = "nccl" if dev.device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=(run_dir / ".pipeline-rendezvous").resolve().as_uri(),
                            rank=rank, world_size=world, timeout=timedelta(seconds=cfg.stall_timeout))
    units = build_units(cfg)
    a, b = stage_bounds(cfg)[rank]
    in_shape, _ = stage_io_shapes(cfg, units)[rank]
    module = nn.Sequential(*units[a:b]).to(dev.device)
    staged = _InPrecision(module, dev, last)
    mb = cfg.batch_size // cfg.microbatches
    example = (torch.zeros(mb, *in_shape, dtype=torch.float32 if first else dev.wire_dtype,
                           device=dev.device),)
    schedule = _schedule(cfg, PipelineStage(staged, rank, world, dev.device, input_args=example), dev)
    # Evaluation gets a schedule of its own: a schedule that switches between forward-only and
    # training re-infers its shapes each time, with a stray forward pass in training mode.
    eval_schedule = _schedule(cfg, PipelineStage(staged, rank, world, dev.device, input_args=example),
                              dev)
    optimizer = make_optimizer(module.parameters(), cfg.optimizer, cfg.lr, cfg.momentum)
    _warm_up(cfg, schedule, module, first, last, in_shape, dev)
    ds = run_dataset(cfg) if (first or last) else None
    n_train = torch.tensor([len(ds.train) if ds is not None else 0], device=dev.device)
    dist.all_reduce(n_train, op=dist.ReduceOp.MAX)  # middle ranks load no data
    return _Rank(cfg, rank, first, last, (a, b), dev, module, schedule, eval_schedule, optimizer, ds,
                 steps_per_epoch(int(n_train), cfg.batch_size))


def _train_step(r: _Rank, step: int, x, y) -> Optional[float]:
    """One batch through the pipeline and one update; the mean microbatch loss on the last rank."""
    r.optimizer.zero_grad(set_to_none=True)
    losses: list = []
    if r.first:
        r.schedule.step(r.dev.arrive(x))
    elif r.last:
        r.schedule.step(target=r.dev.arrive(y), losses=losses)
    else:
        r.schedule.step()
    # the stages' non-finite policy: fail naming rank and step before a NaN or Inf gradient
    # reaches the weights (a NaN loss makes every rank's gradients NaN)
    loss = torch.stack([l.detach() for l in losses]) if r.last else None
    if loss is not None:
        require_finite(loss, "the loss", r.rank, step)
    for param in r.module.parameters():
        if param.grad is not None:
            require_finite(param.grad, "a gradient", r.rank, step)
    r.optimizer.step()
    r.dev.synchronize()  # on a GPU: the work done, not the work queued
    return float(loss.mean()) if loss is not None else None


def run_rank(spec: RankSpec) -> None:
    """Process entry point of one pipeline stage."""
    die_with_parent()
    cfg = RunConfig.from_dict(spec.config)
    run_dir = Path(spec.run_dir)
    torch.set_num_threads(spec.threads)
    pin_to_core(spec.core, spec.threads)
    if spec.yields and openmp_threads_sleep():  # as a stage worker decides (workers/worker.py setup)
        yield_cpu()
    r = _set_up(spec, cfg, run_dir)
    batches = split_batches(cfg, r.ds.train) if r.ds is not None else no_batches(r.per_epoch)
    metrics = JsonlLog(run_dir / "metrics.jsonl") if r.last else None
    meter = Meter(r.rank, r.module, r.dev.device)
    evals: list[dict] = []
    dist.barrier()
    meter.start()
    (run_dir / f".pipeline-rank{r.rank}.started").touch()  # the launcher's start check
    try:
        for event in schedule(cfg, batches, r.per_epoch, spec.total_steps):
            if isinstance(event, TrainBatch):
                t0 = time.perf_counter()
                loss = _train_step(r, event.step, event.x, event.labels)
                meter.step_done(event.step, cfg.batch_size, time.perf_counter() - t0, loss)
                if metrics is not None and meter.due(cfg.metrics_every):
                    metrics.write({"event": "worker", "wall_s": time.monotonic() - meter.started,
                                   **meter.interval()})
            elif isinstance(event, Evaluate):
                if metrics is not None and event.last:  # the last interval, before the final test
                    metrics.write({"event": "worker", "wall_s": time.monotonic() - meter.started,
                                   **meter.interval(final=True)})
                tally = _evaluate(cfg, r.eval_schedule, r.module, r.ds, r.first, r.last, r.dev)
                if metrics is not None and tally is not None:
                    rec = eval_record(event.epoch, event.step, time.monotonic() - meter.started,
                                      tally.loss, tally.accuracy, tally.n)
                    evals.append(rec)
                    metrics.write(rec)
        dist.barrier()
        ended = time.monotonic()
    except NonFinite as exc:  # the launcher reads this and ends the run with it
        atomic_write_json(run_dir / f"pipeline-rank{r.rank}.error.json", {"error": str(exc)})
        raise
    finally:
        if metrics is not None:
            metrics.close()
    path = final_path(run_dir, r.rank)
    save_stage(path, r.rank, r.units[0], r.module, {"optimizer": r.optimizer.state_dict()}, meter.last_step, cfg)
    atomic_write_json(run_dir / f"pipeline-rank{r.rank}.json", {
        **meter.totals(ended), "core": spec.core, "threads": spec.threads,
        "cpu_priority": cpu_priority(), "units": list(r.units),
        "checkpoint": str(path), "evals": evals})
    dist.destroy_process_group()


def _warm_up(cfg: RunConfig, schedule, module: nn.Module, first: bool, last: bool,
             in_shape: tuple[int, ...], dev: Compute) -> None:
    """One untimed, discarded step so the schedule infers its shapes before training. The
    inference runs forward on uninitialised buffers in stages > 0; with the modules in eval mode
    batch norm leaves its running statistics alone, and the gradients are thrown away."""
    module.eval()
    try:
        if first:
            schedule.step(torch.zeros(cfg.batch_size, *in_shape, device=dev.device))
        elif last:
            schedule.step(target=torch.zeros(cfg.batch_size, dtype=torch.long, device=dev.device), losses=[])
        else:
            schedule.step()
    finally:
        module.train()
        for p in module.parameters():
            p.grad = None


@torch.no_grad()
def _evaluate(cfg: RunConfig, schedule, module: nn.Module, ds, first: bool, last: bool,
              dev: Compute) -> Optional[EvalTally]:
    """Forward-only pass over the test set through the pipeline. Batches are padded to the
    training batch size (the stages' buffers have that shape); padded rows are ignored."""
    module.eval()
    n_test = len(ds.test) if ds is not None else 0
    n = torch.tensor([n_test if cfg.eval_samples is None else min(cfg.eval_samples, n_test)],
                     device=dev.device)  # nccl reduces only tensors on the GPU
    dist.all_reduce(n, op=dist.ReduceOp.MAX)
    n = int(n)
    tally = EvalTally(loss_function(cfg.loss))
    try:
        for start in range(0, n, cfg.batch_size):
            rows = min(cfg.batch_size, n - start)
            x = y = None
            if ds is not None:
                x, y = ds.test.take(torch.arange(start, start + rows))
                x, y = dev.arrive(_pad(x, cfg.batch_size)), dev.arrive(_pad(y, cfg.batch_size))
            if first:
                schedule.eval(x)
            elif last:
                out = schedule.eval(target=y, losses=[])
                tally.add(out[:rows], y[:rows])
            else:
                schedule.eval()
    finally:
        module.train()
    return tally if last else None


def _pad(t: torch.Tensor, rows: int) -> torch.Tensor:
    if t.shape[0] == rows:
        return t
    return torch.cat([t, t.new_zeros((rows - t.shape[0], *t.shape[1:]))])

