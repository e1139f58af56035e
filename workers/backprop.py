"""mode=backprop: the whole network in one process with ordinary PyTorch autograd.

This is the reference the other modes are measured against (numerically for `locked`, on the
wall clock for all), so it uses the same units, batches, optimiser and evaluation, and writes
the same run files. It uses every core through torch's own threads unless told otherwise.
"""
from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import torch
import torch.nn.functional as F
from torch import nn

from synthgrad.common.config import RunConfig, default_backprop_threads
from synthgrad.common.devices import CPU, Compute, stage_device
from synthgrad.common.data import eval_batches, steps_per_epoch, train_batches
from synthgrad.common.datasets import load_dataset
from synthgrad.common.evaluation import EvalTally, eval_line, eval_record
from synthgrad.common.files import atomic_torch_save
from synthgrad.common.models import build_units, loss_function, make_optimizer
from synthgrad.common.modes import Mode
from synthgrad.common.reports import StatusSink, run_summary
from synthgrad.workers.stage import require_finite


@torch.no_grad()
def evaluate(model: nn.Module, split, batch_size: int, limit, loss=F.cross_entropy,
             compute: Compute = CPU) -> EvalTally:
    model.eval()
    tally = EvalTally(loss)
    for x, y in eval_batches(split, batch_size, limit):
        with compute.autocast():
            logits = model(compute.arrive(x))
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
    ds = load_dataset(cfg.dataset, cfg.data_dir, cfg.synthetic_train, cfg.synthetic_test)
    units = build_units(cfg)
    dev = Compute.of(stage_device(cfg.device, 0), cfg.precision)
    model = nn.Sequential(*units).to(dev.device)
    loss_fn = loss_function(cfg.loss)
    opt = make_optimizer(model.parameters(), cfg.optimizer, cfg.lr, cfg.momentum)
    per_epoch = steps_per_epoch(len(ds.train), cfg.batch_size)
    proc = psutil.Process()
    proc.cpu_percent(None)
    evals: list[dict] = []
    step = samples = 0
    compute = 0.0
    t_start = last_report = last_progress = time.monotonic()
    interval_loss, interval_n, interval_samples, interval_compute = 0.0, 0, 0, 0.0
    log(f"backprop: one process, {threads} torch threads, {dev.device} {cfg.precision}; "
        f"training {total} steps")

    def test(epoch: int, step: int) -> None:
        tally = evaluate(model, ds.test, cfg.batch_size, cfg.eval_samples, loss_fn, dev)
        rec = eval_record(epoch, step, time.monotonic() - t_start, tally.loss, tally.accuracy, tally.n)
        evals.append(rec)
        stream.eval(rec)
        log(eval_line(rec))

    def report(now: float, step: int, samples: int, total: int, final: bool = False) -> None:
        """This interval's figures, to the status stream (and a progress line now and then)."""
        nonlocal last_report, last_progress, interval_loss, interval_n, interval_samples, interval_compute
        span = max(now - last_report, 1e-9)
        loss = interval_loss / max(interval_n, 1)
        stream.worker({"event": "worker", "wall_s": now - t_start, "stage": 0, "pid": os.getpid(),
                       "final": final, "step": step - 1, "steps": step, "samples": samples,
                       "samples_per_s": interval_samples / span, "busy_fraction": interval_compute / span,
                       "loss": loss, "cpu_percent": proc.cpu_percent(None),
                       "rss_mb": proc.memory_info().rss / 2**20})
        if now - last_progress >= cfg.progress_every:
            log(f"train step {step}/{total} ({100 * step / total:.0f}%)  "
                f"{interval_samples / span:.0f} samples/s  loss {loss:.4f}")
            last_progress = now
        last_report = now
        interval_loss, interval_n, interval_samples, interval_compute = 0.0, 0, 0, 0.0

    for epoch in range(cfg.epochs):
        for x, y in train_batches(ds.train, cfg.batch_size, cfg.seed, epoch):
            if step >= total:
                break
            t0 = time.perf_counter()
            x, y = dev.arrive(x), dev.arrive(y)
            with dev.autocast():  # the layers and the loss, as the last stage computes them
                loss = loss_fn(model(x), y)
            require_finite(loss.detach(), "the loss", 0, step)  # the same policy as the stages'
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            dev.synchronize()  # on a GPU: the work done, not the work queued
            dt = time.perf_counter() - t0
            compute += dt
            interval_compute += dt
            step += 1
            samples += int(y.shape[0])
            interval_samples += int(y.shape[0])
            interval_loss += loss.item()
            interval_n += 1
            if cfg.mid_epoch_eval(step, per_epoch, total):
                test(epoch, step)
            now = time.monotonic()
            if now - last_report >= cfg.metrics_every:
                report(now, step, samples, total)
            stream.tick(now - t_start)
        if step >= total or epoch == cfg.epochs - 1:  # the last interval, before the final test
            report(time.monotonic(), step, samples, total, final=True)
        test(epoch, step)
        if step >= total:
            break
    wall = time.monotonic() - t_start
    stream.tick(wall, done=True)
    path = run_dir / "stage0.pt"
    atomic_torch_save(path, {"stage": 0, "units": {i: u.state_dict() for i, u in enumerate(units)},
                             "state": {"optimizer": opt.state_dict()}, "step": step - 1,
                             "config": cfg.to_dict()})
    return run_summary(
        Mode.BACKPROP, steps=step, samples=samples, wall_clock_s=wall, startup_s=t_start - t_created,
        evals=evals, true_gradient_steps=step, num_stages=1, threads=threads,
        workers=[{"stage": 0, "pid": os.getpid(), "host": socket.gethostname(), "steps": step,
                  "samples": samples, "samples_per_s": samples / wall if wall > 0 else 0.0,
                  "busy_fraction": compute / wall if wall > 0 else 0.0,
                  "units": [0, len(units)], "checkpoint": str(path)}])
