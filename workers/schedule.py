"""The run's schedule, one for every trainer (stage 0 of the stage workers, mode backprop, the
pipeline ranks): which batch is trained at which step, when the test set is evaluated, where a
checkpoint may be taken, and where a resumed run picks up. Pure: it yields events and the
trainer acts on them, so the order is testable without processes.

Every mode draws its batches from common.data.train_batches with the same seed, so the same step
sees the same batch in backprop, pipeline and every stage-worker mode; a resumed run skips the
batches of the steps its checkpoint holds and so continues the same sequence.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import repeat
from typing import Any, Optional, Union

import torch

from synthgrad.common.config import RunConfig
from synthgrad.common.data import Split, train_batches
from synthgrad.common.wire import Phase


@dataclass(frozen=True)
class TrainBatch:
    step: int
    epoch: int
    x: Optional[torch.Tensor]  # None on a pipeline rank that reads no data
    labels: Optional[torch.Tensor]


@dataclass(frozen=True)
class Evaluate:
    """Evaluate the test set now (after `step` training steps). `last`: no training follows, so
    a trainer reports its final interval before this evaluation is timed."""
    epoch: int
    step: int
    last: bool = False


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


Batches = Callable[[int], Iterable[tuple[Any, Any]]]  # epoch -> that epoch's (x, labels) in order


def split_batches(cfg: RunConfig, train: Split) -> Batches:
    """An epoch's batches of `train` in the run's seeded order."""
    return lambda epoch: train_batches(train, cfg.batch_size, cfg.seed, epoch)


def no_batches(per_epoch: int) -> Batches:
    """A trainer that reads no data (a middle pipeline rank) keeps the same steps."""
    return lambda epoch: repeat((None, None), per_epoch)


def schedule(cfg: RunConfig, batches: Batches, per_epoch: int, total: int, first_step: int = 0) -> Iterator[Event]:
    """The run from `first_step` (0, or one past a resumed checkpoint)."""
    step = 0
    for epoch in range(cfg.epochs):
        if (epoch + 1) * per_epoch <= first_step:  # resumed: this epoch and its test are done
            step = (epoch + 1) * per_epoch
            continue
        for x, y in batches(epoch):
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
        yield Evaluate(epoch, step, last=step >= total or epoch == cfg.epochs - 1)
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

    def problem(self, phase: Phase, step: int, true_grad: bool) -> str | None:
        """Why this message cannot be next (None when it can)."""
        done = self.last_step + 1  # training steps done before what comes now
        if phase is Phase.TRAIN:
            if step != done:
                return f"training step {step} out of order (expected {done})"
            if true_grad != self.cfg.true_grad_at(step):
                return f"training step {step} with a true-gradient flag the schedule does not give"
        elif phase is Phase.EVAL:
            if step != self.next_eval_batch:
                return f"evaluation batch {step} out of order (expected {self.next_eval_batch})"
        elif phase in (Phase.EVAL_END, Phase.END):
            if step != done:
                return f"{phase.value} marker after step {step}, but {done} steps came"
        elif phase is Phase.CHECKPOINT:
            if step != self.last_step:
                return f"checkpoint marker for step {step}, but the last step was {self.last_step}"
        return None

    def accept(self, phase: Phase, step: int) -> None:
        if phase is Phase.TRAIN:
            self.last_step = step
        elif phase is Phase.EVAL:
            self.next_eval_batch += 1
        elif phase is Phase.EVAL_END:
            self.next_eval_batch = 0
