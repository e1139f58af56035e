"""mode=backprop: the whole network in one process with ordinary PyTorch autograd.

This is the reference the other modes are measured against (numerically for `locked`, on the
wall clock for all), so it uses the same units, batches, optimiser and evaluation, and writes
the same run files. It uses every core through torch's own threads unless told otherwise.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from synthgrad.common.config import RunConfig, default_backprop_threads
from synthgrad.common.data import eval_batches, steps_per_epoch
from synthgrad.common.datasets import run_dataset
from synthgrad.common.devices import CPU, Compute, stage_device
from synthgrad.common.evaluation import EvalTally, eval_line, eval_record
from synthgrad.common.models import build_units, loss_function, make_optimizer
from synthgrad.common.modes import Mode
from synthgrad.common.recurrent import reset_streams
from synthgrad.common.streams import IGNORE
from synthgrad.common.reports import StatusSink, progress_line, run_summary
from synthgrad.common.scores import in_bits
from synthgrad.workers.checkpointing import final_path, save_stage
from synthgrad.workers.meter import Meter
from synthgrad.workers.schedule import Evaluate, TrainBatch, schedule, split_batches
from synthgrad.workers.stage import require_finite


@torch.no_grad()
def evaluate(model: nn.Module, split, batch_size: int, limit, loss=F.cross_entropy,
             dev: Compute = CPU) -> EvalTally:
    reset_streams(model, training=False)  # an evaluation reads its streams from their start
    model.eval()
    tally = EvalTally(loss)
    for x, y in eval_batches(split, batch_size, limit):
        with dev.autocast():
            logits = model(dev.arrive(x))
        tally.add(logits, y)  # scored outside autocast, as the last stage scores it
    model.train()
    return tally


def run_backprop(cfg: RunConfig, run_dir: Path, log: Callable[[str], None], stream: StatusSink,
                 total: int) -> dict:
    """Train `total` steps in this process; reports and evaluations go to `stream`
    (metrics.jsonl, monitors)."""
    t_created = time.monotonic()
    threads = cfg.backprop_threads or default_backprop_threads()
    torch.set_num_threads(threads)
    ds = run_dataset(cfg)
    units = build_units(cfg)
    dev = Compute.of(stage_device(cfg.device, 0), cfg.precision)
    model = nn.Sequential(*units).to(dev.device)
    loss_fn = loss_function(cfg.loss, cfg.per_position)
    opt = make_optimizer(model.parameters(), cfg.optimizer, cfg.lr, cfg.momentum)
    per_epoch = steps_per_epoch(len(ds.train), cfg.batch_size)
    meter = Meter(0, model, dev.device)
    evals: list[dict] = []
    last_progress = time.monotonic()
    log(f"backprop: one process, {threads} torch threads, {dev.device} {cfg.precision}; "
        f"training {total} steps")

    def report(final: bool = False) -> None:
        """This interval's figures, to the status stream (and a progress line now and then)."""
        nonlocal last_progress
        rec = {"event": "worker", "wall_s": time.monotonic() - meter.started, **meter.interval(final)}
        stream.worker(rec)
        if time.monotonic() - last_progress >= cfg.progress_every:
            log(progress_line(rec["steps"], total, rec["samples_per_s"], rec.get("loss")))
            last_progress = time.monotonic()

    meter.start()
    stream_epoch = 0
    for event in schedule(cfg, split_batches(cfg, ds.train), per_epoch, total):
        if isinstance(event, TrainBatch):
            if event.epoch != stream_epoch:  # a new epoch restarts the streams, as on the stages
                reset_streams(model, training=True)
                stream_epoch = event.epoch
            t0 = time.perf_counter()
            x, y = dev.arrive(event.x), dev.arrive(event.labels)
            with dev.autocast():  # the layers and the loss, as the last stage computes them
                loss = loss_fn(model(x), y)
            require_finite(loss.detach(), "the loss", 0, event.step)  # the same policy as the stages'
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            dev.synchronize()  # on a GPU: the work done, not the work queued
            targets = int((y != IGNORE).sum()) if cfg.per_position else 1  # per target, as the stages report
            meter.step_done(event.step, int(y.shape[0]), time.perf_counter() - t0, loss.item(), targets)
            if meter.due(cfg.metrics_every):
                report()
            stream.tick(time.monotonic() - meter.started)
        elif isinstance(event, Evaluate):
            if event.last:
                report(final=True)
            tally = evaluate(model, ds.test, cfg.batch_size, cfg.eval_samples, loss_fn, dev)
            rec = eval_record(event.epoch, event.step, time.monotonic() - meter.started, tally.loss,
                              tally.accuracy, tally.n, in_bits(cfg.per_position, cfg.loss))
            evals.append(rec)
            stream.eval(rec)
            log(eval_line(rec))
    wall = time.monotonic() - meter.started
    stream.tick(wall, done=True)
    path = final_path(run_dir, 0)
    save_stage(path, 0, 0, model, {"optimizer": opt.state_dict()}, meter.last_step, cfg)
    return run_summary(
        Mode.BACKPROP, steps=meter.steps, samples=meter.samples, wall_clock_s=wall,
        startup_s=meter.started - t_created, evals=evals, true_gradient_steps=meter.steps, num_stages=1,
        threads=threads, workers=[{**meter.totals(), "units": [0, len(units)], "checkpoint": str(path)}])
