"""How a stage takes part in a checkpoint, and what its checkpoint file holds.

The coordinator asks stage 0 to save at its next step boundary. Stage 0 then sends a marker down
the activation links right after step T (each link is FIFO, so the marker follows step T to
every stage: a Chandy-Lamport cut of a pipeline), and every stage, on the marker, waits for the
gradients of steps <= T still travelling back, saves its state after T atomically (temporary
file, fsync, rename) and tells the coordinator where. The coordinator writes the manifest once
every stage has saved (coordinator/checkpoints.py): only then is the checkpoint complete, and
the coordinator tells every stage so (COMMITTED). A stage deletes only its files older than the
last committed checkpoint: if another stage's save failed, the last complete one stays whole.
"""
from __future__ import annotations

import socket as pysocket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from synthgrad.common import wire
from synthgrad.common.config import RunConfig
from synthgrad.common.files import atomic_torch_save
from synthgrad.workers.stage import StageLogic


def periodic_path(run_dir: Path, step: int, stage: int) -> Path:
    return run_dir / "checkpoints" / f"step-{step:09d}" / f"stage{stage}.pt"


def final_path(run_dir: Path, stage: int) -> Path:
    return run_dir / f"stage{stage}.pt"


def save_stage(path: Path, stage: int, first_unit: int, module: nn.Module, state: dict, step: int,
               cfg: RunConfig) -> None:
    """One stage's checkpoint file, whoever trained it (a stage worker, mode backprop as stage 0
    of one, a pipeline rank): its units' weights by unit index (so `launch.py export` joins any
    run's files the same way), the trainer's own state (optimiser, predictor, ...), the step
    it holds, and the run's config. Written atomically (temporary file, fsync, rename)."""
    atomic_torch_save(path, {
        "stage": stage,
        "units": {first_unit + j: unit.state_dict() for j, unit in enumerate(module.children())},
        "state": state,
        "step": step,
        "config": cfg.to_dict(),
    })


class StageCheckpoints:
    def __init__(self, stage: int, cfg: RunConfig, run_dir: Path, logic: StageLogic, first_unit: int,
                 fail_after: Optional[int] = None):
        self.stage = stage
        self.cfg = cfg
        self.run_dir = run_dir
        self.logic = logic
        self.first_unit = first_unit
        self.saved: dict[int, Path] = {}  # step -> this stage's periodic checkpoint file
        self.fail_after = fail_after  # a fault (common/faults.py): the periodic saves after this many fail

    def load(self, path: Path, step: int) -> None:
        """Continue from this stage's checkpoint of `step` (resume, restart)."""
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except (OSError, RuntimeError, EOFError) as exc:
            raise RuntimeError(f"stage {self.stage}: cannot read checkpoint {path}: {exc}") from None
        if ckpt.get("stage") != self.stage or ckpt.get("step") != step:
            raise RuntimeError(f"stage {self.stage}: {path} holds stage {ckpt.get('stage')} at step "
                               f"{ckpt.get('step')}, expected stage {self.stage} at step {step}")
        self.logic.load_state_dict(ckpt["state"])

    def save(self, path: Path, step: int) -> None:
        """This stage's state after `step`."""
        save_stage(path, self.stage, self.first_unit, self.logic.module, self.logic.state_dict(), step, self.cfg)

    def take(self, step: int, epoch: int, *, pass_marker: Callable[[wire.Activation], None] | None,
             wait_for_gradients: Callable[[], None], tell: Callable[[wire.Message], None]) -> None:
        """Save at `step`: pass the marker on first (the stages after this one save concurrently),
        wait for every gradient of steps <= `step`, save, tell the coordinator."""
        if pass_marker is not None:
            pass_marker(wire.Activation.marker(wire.Phase.CHECKPOINT, step, epoch))
        wait_for_gradients()
        path = periodic_path(self.run_dir, step, self.stage)
        try:
            if self.fail_after is not None and len(self.saved) >= self.fail_after:
                raise OSError(f"--fail-saves: stage {self.stage}'s saves fail after {self.fail_after}")
            self.save(path, step)
        except OSError as exc:  # a full disk fails this checkpoint, not the run
            print(f"[stage {self.stage}] checkpoint at step {step} failed: {exc}", file=sys.stderr, flush=True)
            tell(wire.Saved(self.stage, step, "", pysocket.gethostname(), str(exc)))
            return
        tell(wire.Saved(self.stage, step, str(path), pysocket.gethostname()))
        self.saved[step] = path

    def committed(self, step: int, drop: int = -1) -> None:
        """Step `step` is complete on every stage: this stage's files of older steps may go (the
        ones newer than it are kept: they may become the next complete checkpoint), and so may
        that of `drop`, a checkpoint that failed elsewhere and will never be complete."""
        for old in sorted(s for s in self.saved if s < step or s == drop):
            path = self.saved.pop(old)
            path.unlink(missing_ok=True)
            try:
                path.parent.rmdir()  # once every stage on this host has removed its file
            except OSError:
                pass
