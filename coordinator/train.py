"""`launch.py train` on one host: check the config, start the coordinator here and one spawned
process per stage, run to the end, write summary.json, and stop every process it started."""
from __future__ import annotations

import os
import shutil
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple, Optional

import zmq
from torch import nn

from synthgrad.common import scores
from synthgrad.common.config import ConfigError, RunConfig
from synthgrad.common.models import BUILT_IN_MODELS, ModelError, check_model, groups_at, unit_names
from synthgrad.common.modes import STAGE_WORKER_MODES, Mode, spoken
from synthgrad.common.devices import check_run_devices
from synthgrad.common.data import total_steps
from synthgrad.common.datasets import StreamOptions, check_dataset, count_train, data_spec
from synthgrad.common.endpoints import tcp_host
from synthgrad.common.files import atomic_write_json
from synthgrad.common.security import Guard, Keys, MonitorKeys, local_run_keys, resolve_keys
from synthgrad.common.procs import ProcessGroup, warm_up, worker_environment
from synthgrad.coordinator.coordinator import Coordinator, ProcessFailure, RunFailed
from synthgrad.coordinator.layout import Layout, plan_layout
from synthgrad.coordinator.pipeline import run_pipeline
from synthgrad.coordinator import record
from synthgrad.coordinator.restarts import decide, failure_record
from synthgrad.coordinator.resume import read_manifest
from synthgrad.coordinator.stream import StatusStream
from synthgrad.workers.backprop import run_backprop
from synthgrad.workers.worker import WorkerSpec, run_worker

RUN_FILES = ("summary.json", "metrics.jsonl", "timeline-stage*.json", "sg-snapshots-stage*.json",
             "pipeline-rank*.json")


def make_run_dir(cfg: RunConfig) -> Path:
    """The run folder, emptied of an earlier run's records (metrics.jsonl is appended to, and
    plots read every file there): a new run into the same --out starts clean."""
    if cfg.resume:  # the same folder, records kept: the resumed run's curves continue them
        return Path(cfg.resume)
    if cfg.out:
        path = Path(cfg.out)
    else:
        path = Path("runs") / f"{cfg.mode}-{time.strftime('%Y%m%d-%H%M%S')}"
    path.mkdir(parents=True, exist_ok=True)
    for pattern in RUN_FILES:
        for old in path.glob(pattern):
            old.unlink()
    if cfg.tensorboard:  # this run writes its own; without --tensorboard a folder there is not ours
        shutil.rmtree(path / "tensorboard", ignore_errors=True)
    # never delete weights: an earlier run's checkpoints and final stage files move aside (left
    # in place, its stage files would mix with this run's when the folder is read back)
    stamp = time.strftime('%Y%m%d-%H%M%S')
    aside = path / f"checkpoints.before-{stamp}"
    n = 1
    while aside.exists():  # two runs into one folder within a second
        n += 1
        aside = path / f"checkpoints.before-{stamp}-{n}"
    if (path / "checkpoints").exists():
        (path / "checkpoints").rename(aside)
    for old in sorted(path.glob("stage*.pt")):
        aside.mkdir(exist_ok=True)
        old.rename(aside / old.name)
    return path


class RunResult(NamedTuple):
    """What `train` returns. Unpacks as `run_dir, summary = train(cfg)`; `model()` loads the
    trained network from the run folder (a plain nn.Sequential in eval mode)."""
    run_dir: Path
    summary: dict  # summary.json's contents

    def model(self) -> nn.Sequential:
        from synthgrad.coordinator.export import trained_model
        return trained_model(self.run_dir)


def train(cfg: RunConfig, log: Callable[[str], None] = print,
          on_status: Optional[Callable[[dict], None]] = None, *,
          bind: Optional[str] = None, on_listening: Optional[Callable[[str], None]] = None
          ) -> RunResult:
    """Train one run; return its RunResult (run folder, summary, the trained model on demand).
    Raises ConfigError, DataError or RunFailed.
    `on_status` receives the run's status record about once a second (every mode).

    With `bind` (tcp://HOST:PORT, port 0 for any) this process is the coordinator only: it
    binds there, calls `on_listening(endpoint)`, and waits for workers started elsewhere
    (`launch.py worker`, or the other ranks under torchrun)."""
    if bind is None:
        cfg, layout = prepare(cfg)
        if cfg.mode != Mode.BACKPROP:  # backprop trains in this process: nothing is forked for it
            # processes will be started here, with what the layout asks of their OpenMP
            warm_up(worker_environment(layout is not None and any(layout.placement.yields)))
    else:
        if cfg.stages_auto:
            raise ConfigError("--stages auto counts this host's cores, but the stages run on other hosts: "
                              "give --stages K")
        cfg, layout = _resolve(cfg.validate())
    if bind is not None:  # the stages are started elsewhere: they bring keys from the same set
        cfg = _coordinator_only(cfg, bind)
        keys, worker_keys = resolve_keys(cfg.secure, cfg.keys, "coordinator", f"--bind {bind}"), None
        monitor_keys, key_source = None, cfg.keys
    else:  # this process starts every stage: a fresh set of keys for tcp links, unless given
        local = local_run_keys(cfg.secure, cfg.keys, cfg.transport)
        keys, worker_keys = (local.coordinator, local.worker) if local else (None, None)
        monitor_keys = local.monitor if local else None
        key_source = local.source if local else None
    run_dir = make_run_dir(cfg)
    atomic_write_json(run_dir / "config.json", cfg.to_dict())
    log(f"run folder {run_dir}  mode {cfg.mode}  stages {1 if cfg.mode == Mode.BACKPROP else list(cfg.stage_groups)}")
    if layout is not None:
        log(layout.describe() if bind is None else
            f"layout: layers per stage {list(layout.groups)} (each host pins its own stages)")
    # the run's length, computed once here and handed to everything that needs it
    total = total_steps(count_train(cfg.dataset, cfg.data_dir, cfg.synthetic_train, StreamOptions.of(cfg)), cfg.batch_size,
                        cfg.epochs, cfg.steps)
    resume = None
    if cfg.resume:
        resume = read_manifest(run_dir)
        if resume["step"] + 1 >= total:
            raise ConfigError(f"{run_dir} finished step {resume['step']} of {total}: nothing left to "
                              f"train (raise --epochs or --steps to go on)")
        log(f"resuming from the checkpoint at step {resume['step']} ({run_dir}/checkpoints/manifest.json)")
    guard = Guard(zmq.Context(), keys)  # one context; CURVE on its listeners when keys are set
    stream = StatusStream(cfg, run_dir, num_stages=cfg.num_stages,
                          total_steps=total,
                          on_status=on_status, guard=guard)
    if monitor_keys is not None:  # a private temporary folder, deleted when the run ends
        monitor_keys = MonitorKeys(monitor_keys)
    monitor_folder = monitor_keys.folder if monitor_keys else cfg.keys
    log(f"watch it: python launch.py monitor --connect {stream.endpoint}"
        + (f" --keys {monitor_folder}" if guard.on else ""))
    if guard.on:
        log("links are CURVE-encrypted and authenticated with "
            + ("keys made for this run" if key_source == "per-run" else f"the keys in {key_source}"))
    previous = record.previous_record(run_dir) if resume else None
    t0 = time.monotonic()
    status, error, summary = record.FAILED, None, None
    failures: list[dict] = []  # --on-failure restart: each failure and what was done about it
    try:
        if cfg.mode == Mode.BACKPROP:
            summary = run_backprop(cfg, run_dir, log, stream, total)
        elif cfg.mode == Mode.PIPELINE:
            summary = run_pipeline(cfg, run_dir, log, stream, total, layout.placement)
        elif bind is None and cfg.on_failure == "restart":
            summary = _train_restarting(cfg, run_dir, total, log, stream, resume, worker_keys, layout, failures)
        else:
            summary = _train_workers(cfg, run_dir, total, log, stream, bind, on_listening, resume,
                                     worker_keys, layout)
        status = record.DONE
    except KeyboardInterrupt:
        status, error = record.INTERRUPTED, "interrupted (Ctrl-C or SIGTERM)"
        raise
    except BaseException as exc:
        error = str(exc) if isinstance(exc, RunFailed) else f"{type(exc).__name__}: {exc}"
        raise
    finally:
        stream.close()
        guard.close()
        guard.ctx.term()
        if monitor_keys is not None:
            monitor_keys.remove()
        if summary is None:  # it did not finish: what is known of it
            summary = record.partial_summary(cfg, stream.latest, stream.evals, time.monotonic() - t0)
            if failures:  # and the failures that ended it, the last one not restarted
                summary.update(failures=failures, restarts=sum(f["restarted"] for f in failures))
        summary = record.finish(summary, cfg=cfg, run_dir=run_dir, status=status, error=error,
                                resumed_from=resume["step"] if resume else None, previous=previous)
        summary["config"] = cfg.to_dict()
        summary["run_dir"] = str(run_dir)
        summary["keys"] = key_source  # "per-run", a keys folder, or None (plain links)
        summary.setdefault("secure", guard.on)  # an unfinished run's summary says it too
        if layout is not None:
            summary["layout"] = layout.record()
        _write_summary(run_dir, summary, log)
    return RunResult(run_dir, summary)


def prepare(cfg: RunConfig):
    """Everything a run on this host checks and fills in before any process starts: the config,
    the data's files, what _resolve derives, and every stage's device. Returns (config, layout).
    compare calls it for every contender before the first one runs."""
    cfg.validate()
    check_dataset(cfg.dataset, cfg.data_dir, StreamOptions.of(cfg))  # stage 0 runs here: all its files, or a clear error
    cfg, layout = _resolve(cfg)
    check_run_devices(cfg)  # every stage starts on this host: its device must be here
    return cfg, layout


def _resolve(cfg: RunConfig):
    """What the run fills in before anything starts: one sample's shape and the classes (from
    the data), the layers of a model given by import path (built once and checked), the split
    and the placement. A resumed run keeps what its config.json holds."""
    if cfg.resume:
        return cfg, plan_layout(cfg)[1]
    spec = data_spec(cfg.dataset, cfg.data_dir, StreamOptions.of(cfg))
    cfg = cfg.replace(input_shape=spec.sample_shape, num_classes=spec.num_classes, label_shape=spec.label_shape)
    try:
        layers = check_model(cfg)
    except ModelError as exc:
        raise ConfigError(f"--model {cfg.model}: {exc}") from None
    if cfg.model not in BUILT_IN_MODELS:
        cfg = cfg.replace(model_layers=layers)
    if cfg.split_at:  # names become layers per stage (config.json keeps the split as --groups)
        try:
            cfg = cfg.replace(groups=groups_at(unit_names(cfg), cfg.split_at), split_at=None)
        except ModelError as exc:
            raise ConfigError(str(exc)) from None
    return plan_layout(cfg)


def _write_summary(run_dir: Path, summary: dict, log: Callable[[str], None]) -> None:
    """summary.json, whatever the ending; a failure to write it (a full disk) is said, and raised
    only when the run itself succeeded (otherwise the run's own error is the one to see)."""
    try:
        atomic_write_json(run_dir / "summary.json", summary)
    except OSError as exc:
        log(f"cannot write {run_dir / 'summary.json'}: {exc}")
        if summary.get("status") == record.DONE:
            raise


def _train_restarting(cfg: RunConfig, run_dir: Path, total: int, log: Callable[[str], None],
                      stream: StatusStream, resume: Optional[dict], worker_keys: Optional[Keys],
                      layout: Layout, failures: list[dict]) -> dict:
    """--on-failure restart: when a verdict on a stage or its replicas is one a restart can
    mend (coordinator/restarts.py: it died, hung, the run stalled), stop every stage and start
    them all again from the last checkpoint complete on every stage: the surviving stages have
    moved past it, and one consistent cut is what makes the result exact. A failure that would
    only repeat (training diverged, a configuration error) ends the run. Each failure is
    recorded in `failures` from its verdict, with what was done about it."""
    t_run = time.monotonic()
    wall0 = resume["wall_s"] if resume else 0.0
    while True:
        t_try = time.monotonic()
        if failures:
            failures[-1]["shutdown_s"] = t_try - failures[-1].pop("_failed_at")
        try:
            summary = _train_workers(cfg, run_dir, total, log, stream, resume=resume,
                                     worker_keys=worker_keys, layout=layout)
            if failures:  # failure noticed -> training again
                failures[-1]["restart_s"] = failures[-1]["shutdown_s"] + summary["startup_s"]
            break
        except ProcessFailure as exc:
            failed_at = time.monotonic()
            decision = decide(exc.verdict, len(failures), cfg.max_restarts)
            if not decision.restart:
                failures.append({**failure_record(exc.verdict, decision), "after_s": failed_at - t_try})
                log(decision.why)  # the verdict is the error raised, said by whoever reports it
                raise ProcessFailure(exc.verdict, note=decision.why) from None
            manifest = (run_dir / "checkpoints" / "manifest.json")
            resume = read_manifest(run_dir) if manifest.is_file() else resume
            if resume is not None and resume.get("final"):
                resume = None  # a final manifest of an earlier run in this folder is not ours
            reached = stream.latest.get(len(cfg.stage_groups) - 1, {}).get("step", -1)
            restart_from = resume["step"] if resume else -1
            failures.append({**failure_record(exc.verdict, decision), "after_s": failed_at - t_try,
                             "reached_step": reached, "restarted_from_step": restart_from,
                             "steps_lost": max(reached - restart_from, 0), "_failed_at": failed_at})
            if resume is not None:  # the wall clock of the run goes on across restarts
                resume = {**resume, "wall_s": wall0 + time.monotonic() - t_run}
            log(f"run failed: {exc.verdict}")
            log("restarting every stage from " + (f"the checkpoint at step {restart_from}" if resume else
                "the beginning (no checkpoint yet)") + f" ({decision.why})")
    summary["failures"] = failures
    summary["restarts"] = len(failures)
    return summary


def _coordinator_only(cfg: RunConfig, bind: str) -> RunConfig:
    if not cfg.mode.on_stage_workers:
        raise ConfigError(f"a coordinator with remote workers runs modes {spoken(STAGE_WORKER_MODES)}; "
                          f"mode '{cfg.mode}' starts its own processes (use launch.py train)")
    try:
        host = tcp_host(bind)
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
            probe.bind((host, 0))  # fails unless HOST is an address of this machine
    except (ValueError, OSError) as exc:
        raise ConfigError(f"the coordinator cannot listen on {bind}: {exc} (bind an address of "
                          f"this host; port 0 picks a free port)") from None
    # the status stream (monitors) listens on the same address as the coordinator
    return cfg.replace(transport="tcp", host=host)


def _train_workers(cfg: RunConfig, run_dir: Path, total: int, log: Callable[[str], None],
                   stream: StatusStream, bind: Optional[str] = None,
                   on_listening: Optional[Callable[[str], None]] = None,
                   resume: Optional[dict] = None, worker_keys: Optional[Keys] = None,
                   layout: Optional[Layout] = None) -> dict:
    coord = Coordinator(cfg, run_dir, total_steps=total, log=log, stream=stream, bind=bind,
                        guard=stream.guard, resume=resume, layout=layout)
    if bind is not None:
        how = "" if on_listening is not None else (
            f": python launch.py worker --coordinator {coord.endpoint} "
            f"--stages {','.join(map(str, range(coord.num_stages)))}")
        log(f"coordinator at {coord.endpoint}; waiting up to {cfg.start_timeout:.0f}s for "
            f"{coord.num_stages} stages{how}")
        try:
            if on_listening is not None:
                on_listening(coord.endpoint)
            return coord.serve(None)
        except BaseException as exc:
            coord.stop_all(f"run aborted: {type(exc).__name__}")
            raise
        finally:
            coord.close()
    group = ProcessGroup()
    try:
        for stage in range(coord.num_stages):
            spec = WorkerSpec(stage, coord.endpoint, os.getpid(), cfg.transport, cfg.host,
                              keys=worker_keys)
            coord.adopt(stage, group.start(f"stage-{stage}", run_worker, spec))
        log(f"coordinator at {coord.endpoint}; started {coord.num_stages} workers "
            f"(pids {', '.join(str(c.process.pid) for c in group.children)})")
        return coord.serve(group)
    except BaseException as exc:
        coord.stop_all(f"run aborted: {type(exc).__name__}")
        raise
    finally:
        try:
            group.shutdown()
        except KeyboardInterrupt:  # a second Ctrl-C: no more waiting
            group.kill()
        coord.close()


def format_summary(summary: dict) -> str:
    lines = [
        f"mode {summary['mode']}: {summary['steps']} steps, {summary['samples']} samples in "
        f"{summary['wall_clock_s']:.1f}s = {summary['samples_per_s']:.0f} samples/s; "
        f"{scores.describe(summary)}; "
        f"true-gradient steps {summary['true_gradient_steps']}",
    ]
    for w in summary.get("workers", []):
        lines.append(f"  stage {w['stage']} (pid {w['pid']}, units {w.get('units')}): "
                     f"{w['samples_per_s']:.0f} samples/s, busy {100 * w['busy_fraction']:.0f}%")
    lines.append(f"summary: {summary.get('run_dir', '')}/summary.json")
    return "\n".join(lines)
