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

import os
import socket
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Optional

import psutil
import torch
import torch.distributed as dist
from torch import nn

from synthgrad.common.config import RunConfig
from synthgrad.common.devices import Compute, stage_device
from synthgrad.common.data import steps_per_epoch, train_batches
from synthgrad.common.datasets import load_dataset
from synthgrad.common.evaluation import EvalTally, eval_record
from synthgrad.common.files import JsonlLog, atomic_torch_save, atomic_write_json
from synthgrad.common.models import build_units, loss_function, make_optimizer, stage_bounds, stage_io_shapes
from synthgrad.common.procs import (
    die_with_parent,
    pin_to_core,
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


def run_rank(spec: RankSpec) -> None:
    """Process entry point of one pipeline stage."""
    from torch.distributed.pipelining import PipelineStage
    die_with_parent()
    cfg = RunConfig.from_dict(spec.config)
    run_dir = Path(spec.run_dir)
    torch.set_num_threads(spec.threads)
    pin_to_core(spec.core, spec.threads)
    rank, world = spec.rank, spec.world
    first, last = rank == 0, rank == world - 1
    dev = Compute.of(stage_device(cfg.device, rank), cfg.precision)
    backend = "nccl" if dev.device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=(run_dir / ".pipeline-rendezvous").resolve().as_uri(),
                            rank=rank, world_size=world, timeout=timedelta(seconds=cfg.stall_timeout))
    units = build_units(cfg)
    a, b = stage_bounds(cfg)[rank]
    in_shape, out_shape = stage_io_shapes(cfg, units)[rank]
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
    ds = load_dataset(cfg.dataset, cfg.data_dir, cfg.synthetic_train, cfg.synthetic_test) \
        if (first or last) else None
    n_train = len(ds.train) if ds is not None else 0
    n_train_all = torch.tensor([n_train], device=dev.device)
    dist.all_reduce(n_train_all, op=dist.ReduceOp.MAX)  # middle ranks load no data
    per_epoch = steps_per_epoch(int(n_train_all), cfg.batch_size)
    total = spec.total_steps
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
            for x, y in train_batches(ds.train, cfg.batch_size, cfg.seed, epoch):
                yield dev.arrive(x), dev.arrive(y)
        else:
            for _ in range(per_epoch):
                yield None, None

    def test(epoch: int, step: int) -> None:
        tally = _evaluate(cfg, eval_schedule, module, ds, first, last, dev)
        if tally is not None:
            rec = eval_record(epoch, step, time.monotonic() - t_start, tally.loss, tally.accuracy, tally.n)
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
                # the stages' non-finite policy: fail naming rank and step before a NaN or Inf
                # gradient reaches the weights (a NaN loss makes every rank's gradients NaN)
                if last:
                    require_finite(torch.stack([l.detach() for l in losses]), "the loss", rank, step)
                for param in module.parameters():
                    if param.grad is not None:
                        require_finite(param.grad, "a gradient", rank, step)
                optimizer.step()
                dev.synchronize()  # on a GPU: the work done, not the work queued
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
    except NonFinite as exc:  # the launcher reads this and ends the run with it
        atomic_write_json(run_dir / f"pipeline-rank{rank}.error.json", {"error": str(exc)})
        raise
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

