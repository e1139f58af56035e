"""Where a run's records go: metrics.jsonl, monitors (a PUB socket), the live terminal view and,
with --tensorboard, TensorBoard event files.

One StatusStream per run, in whichever process watches it: the coordinator (locked, unlocked,
stale), the training process itself (backprop) or the launcher (pipeline). Each feeds it the
workers' reports and evaluations; about once a second (`--metrics-every`) the stream turns the
latest reports into one status record (coordinator/status.py) and hands it to every consumer.
"""
from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Optional

import psutil
import zmq

from synthgrad.common import wire
from synthgrad.common.config import RunConfig
from synthgrad.common.endpoints import bind_wildcard
from synthgrad.common.files import JsonlLog
from synthgrad.common.security import Guard
from synthgrad.coordinator.status import status_record


class StatusStream:
    def __init__(self, cfg: RunConfig, run_dir: Path, *, num_stages: int, total_steps: int,
                 on_status: Optional[Callable[[dict], None]] = None,
                 guard: Optional[Guard] = None):
        self.cfg = cfg
        self.num_stages = num_stages
        self.total_steps = total_steps
        self.on_status = on_status  # e.g. the live terminal view of `launch.py train`
        self.latest: dict[int, dict] = {}
        self.evals: list[dict] = []
        self._own_ctx = guard is None
        self.guard = guard or Guard(zmq.Context())
        self.ctx = self.guard.ctx
        # monitors subscribe here; PUB never blocks the run and drops records for slow readers
        self.pub = self.ctx.socket(zmq.PUB)
        self.guard.server(self.pub, "status", domain="status")  # monitor keys only
        self.pub.setsockopt(zmq.SNDHWM, 64)
        self.pub.setsockopt(zmq.LINGER, 0)
        self.endpoint = bind_wildcard(self.pub, cfg.transport, cfg.host)
        self.metrics = JsonlLog(Path(run_dir) / "metrics.jsonl")
        self.tensorboard = None
        if cfg.tensorboard:
            from synthgrad.coordinator.tensorboard import TensorBoardWriter
            self.tensorboard = TensorBoardWriter(Path(run_dir) / "tensorboard")
        self._last_status = time.monotonic()
        self._proc = psutil.Process()

    def worker(self, rec: dict, logged: bool = False) -> None:
        """A worker's periodic report (event "worker"); `logged` if it is in metrics.jsonl already."""
        self.latest[rec["stage"]] = rec
        if not logged:
            self.metrics.write(rec)

    def eval(self, rec: dict, logged: bool = False) -> None:
        """A test evaluation (event "eval")."""
        self.evals.append(rec)
        if not logged:
            self.metrics.write(rec)
        self._publish(rec)
        if self.tensorboard is not None:
            self.tensorboard.eval(rec)
        self._last_status = -math.inf  # the next tick emits: views show the new accuracy at once

    def tick(self, wall_s: float, done: bool = False) -> Optional[dict]:
        """Emit a status record if one is due (or the run is done); return it."""
        now = time.monotonic()
        if not done and now - self._last_status < self.cfg.metrics_every:
            return None
        self._last_status = now
        last = self.evals[-1] if self.evals else {}
        rec = status_record(self.latest, num_stages=self.num_stages, total_steps=self.total_steps,
                            batch_size=self.cfg.batch_size, wall_s=wall_s,
                            test_accuracy=last.get("test_accuracy"), test_bits=last.get("test_bits"),
                            test_perplexity=last.get("test_perplexity"), done=done)
        rec["coordinator_pid"] = os.getpid()  # the process publishing this (backprop: the trainer)
        rec["coordinator_rss_mb"] = self._proc.memory_info().rss / 2**20
        self.metrics.write(rec)
        self._publish(rec)
        if self.tensorboard is not None:
            self.tensorboard.status(rec)
        if self.on_status is not None:
            self.on_status(rec)
        return rec

    def _publish(self, record: dict) -> None:
        self.pub.send_multipart(wire.encode(wire.Record(record)), copy=False)

    def close(self) -> None:
        self.metrics.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None
        self.pub.close(0)
        if self._own_ctx:
            self.guard.close()
            self.ctx.term()
