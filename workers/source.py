"""Stage 0's schedule: which batch is trained at which step, when the test set is evaluated, where
a checkpoint may be taken, and where a resumed run picks up. Pure: it yields events and the
stage process acts on them, so the order is testable without processes.

Every mode draws its batches from common.data.train_batches with the same seed, so the same step
sees the same batch in backprop, pipeline and every stage-worker mode; a resumed run skips the
batches of the steps its checkpoint holds and so continues the same sequence.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Union

import torch

from synthgrad.common.config import RunConfig
from synthgrad.common.data import Split, train_batches


@dataclass(frozen=True)
class TrainBatch:
    step: int
    epoch: int
    x: torch.Tensor
    labels: torch.Tensor


@dataclass(frozen=True)
class Evaluate:
    """Evaluate the test set now (after `step` training steps)."""
    epoch: int
    step: int


@dataclass(frozen=True)
class Boundary:
    """A checkpoint may be taken here: right after step `step`. Not at an epoch's last step,
    whose evaluation comes first, so a resumed run never skips an evaluation."""
    step: int
    epoch: int


@dataclass(frozen=True)
class End:
    step: int  # steps trained
    epoch: int


Event = Union[TrainBatch, Evaluate, Boundary, End]


def stage0_events(cfg: RunConfig, train: Split, per_epoch: int, total: int, first_step: int = 0) -> Iterator[Event]:
    """The run as stage 0 sees it, from `first_step` (0, or one past a resumed checkpoint)."""
    step = 0
    for epoch in range(cfg.epochs):
        if (epoch + 1) * per_epoch <= first_step:  # resumed: this epoch and its test are done
            step = (epoch + 1) * per_epoch
            continue
        for x, y in train_batches(train, cfg.batch_size, cfg.seed, epoch):
            if step >= total:
                break
            if step < first_step:  # resumed: the same batches as before, skipped
                step += 1
                continue
            yield TrainBatch(step, epoch, x, y)
            step += 1
            if cfg.mid_epoch_eval(step, per_epoch, total):
                yield Evaluate(epoch, step)
            if step < total and step % per_epoch:
                yield Boundary(step - 1, epoch)
        yield Evaluate(epoch, step)
        if step >= total:
            break
    yield End(step, cfg.epochs)


class StreamOrder:
    """What may arrive next on a stage's activation link. Stage 0 sends its schedule in order over
    FIFO links, so anything else (a step out of order or far ahead, a forged marker, a true-gradient
    flag that contradicts the schedule) is not from the run and is rejected before it is used."""

    def __init__(self, cfg: RunConfig, last_step: int = -1):
        self.cfg = cfg
        self.last_step = last_step  # the last training step received (a resumed run: its checkpoint's)
        self.next_eval_batch = 0

    def problem(self, phase: str, step: int, true_grad: bool) -> str | None:
        """Why this message cannot be next (None when it can)."""
        done = self.last_step + 1  # training steps done before what comes now
        if phase == "train":
            if step != done:
                return f"training step {step} out of order (expected {done})"
            if true_grad != self.cfg.is_true_grad_step(step):
                return f"training step {step} with a true-gradient flag the schedule does not give"
        elif phase == "eval":
            if step != self.next_eval_batch:
                return f"evaluation batch {step} out of order (expected {self.next_eval_batch})"
        elif phase in ("eval_end", "end"):
            if step != done:
                return f"{phase} marker after step {step}, but {done} steps came"
        elif phase == "checkpoint":
            if step != self.last_step:
                return f"checkpoint marker for step {step}, but the last step was {self.last_step}"
        else:
            return f"unknown phase {phase!r}"
        return None

    def accept(self, phase: str, step: int) -> None:
        if phase == "train":
            self.last_step = step
        elif phase == "eval":
            self.next_eval_batch += 1
        elif phase == "eval_end":
            self.next_eval_batch = 0
