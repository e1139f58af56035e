"""Stage logic played in one process the way the stage workers play it (workers/worker.py): a
chain of StageLogic objects, each training step run forward through every stage with each
stage's update at once, and the gradients that come back (true ones, and bootstrapped ones)
handed to their stage `delay` steps late, as the coordinator's relay hands them to a stage that
has moved on meanwhile. A late gradient is handed over between the stage's forward pass and its
update, the moment the worker may take it in while it waits to send (StageLogic holds its
update until the pending step's own). `delay=0` hands each gradient over at once (and a locked
rule always waits for it). A checkpoint is the workers' cut (workers/checkpointing.py): every
gradient of the steps run so far is handed over first, then each stage's state_dict is taken.
"""
from __future__ import annotations

import contextlib
import copy
from pathlib import Path
from typing import Iterator

import torch
import torch.nn as nn

from synthgrad.common.config import RunConfig
from synthgrad.common.costs import helper_models, unit_costs
from synthgrad.common.models import build_units, stage_bounds, stage_io_shapes
from synthgrad.workers.checkpointing import StageCheckpoints, periodic_path
from synthgrad.workers.stage import StageLogic


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """One torch thread while the stages play: products this small gain nothing from a second,
    and lose much where the cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def chain(cfg: RunConfig) -> list[StageLogic]:
    """The run's stages, each built as a worker builds its own (the whole network from the seed)."""
    units = build_units(cfg)
    shapes = stage_io_shapes(cfg)
    k = len(cfg.stage_groups)
    helpers = helper_models(cfg, units, unit_costs(cfg, units))[1]  # as the layout chooses them
    return [StageLogic(cfg, i, k, nn.Sequential(*units[a:b]), shapes[i][0], shapes[i][1], helpers=helpers[i])
            for i, (a, b) in enumerate(stage_bounds(cfg))]


def run_step(stages: list[StageLogic], step: int, x, y, cfg: RunConfig) -> None:
    """One step through the chain, delivering each gradient at once."""
    Chain(stages, cfg).step(step, x, y)


class Chain:
    """Plays `stages` step by step; records what it handed to whom (`delivered`: stage, step,
    true or bootstrapped, in order) and the last stage's losses."""

    def __init__(self, stages: list[StageLogic], cfg: RunConfig, delay: int = 0):
        self.stages = stages
        self.cfg = cfg
        self.delay = 0 if stages[0].rule.waits_for_gradient else delay
        self.queue: list[tuple[int, int, int, torch.Tensor, bool]] = []  # (due step, stage, step, g, true)
        self.delivered: list[tuple[int, int, bool]] = []
        self.losses: list[float] = []

    def step(self, step: int, x: torch.Tensor, y: torch.Tensor, epoch: int = 0) -> list[torch.Tensor]:
        """One training step; returns what each stage but the last sent on."""
        true_grad = self.cfg.true_grad_at(step)
        h, sent = x, []
        for i, stage in enumerate(self.stages[:-1]):
            stage.begin_epoch(epoch)
            h = stage.forward(step, h, y, true_grad)
            sent.append(h)
            self._hand_over_due(i, step)
            dx = stage.local_update(step)
            if dx is not None:  # bootstrapped dL/dx for the stage before
                self._send(i - 1, step, dx, False)
        last = self.stages[-1]
        last.begin_epoch(epoch)
        loss, dx = last.last_step(step, h, y, true_grad)
        self.losses.append(loss)
        if dx is not None:
            self._send(len(self.stages) - 2, step, dx, true_grad)
        return sent

    def evaluate(self, x: torch.Tensor, fresh: bool) -> torch.Tensor:
        """One evaluation batch through every stage (the last stage's logits)."""
        for stage in self.stages:
            x = stage.eval_forward(x, fresh=fresh)
        return x

    def drain(self) -> int:
        """Hand over every gradient still travelling (what a worker waits for before it saves
        and at the end); returns how many there were."""
        n = 0
        while self.queue:
            _, stage, step, g, true_grad = self.queue.pop(0)
            self._hand_over(stage, step, g, true_grad)
            n += 1
        return n

    def checkpoint(self) -> tuple[list[dict], int]:
        """The workers' cut: every stage's state after every gradient of the steps run so far
        has been applied (deep copies), and how many gradients were still travelling."""
        n = self.drain()
        assert all(s.outstanding() == 0 for s in self.stages), "a stage still awaits a gradient at the cut"
        return [copy.deepcopy(s.state_dict()) for s in self.stages], n

    # ------------------------------------------------------------------ the relay
    def _send(self, stage: int, step: int, g: torch.Tensor, true_grad: bool) -> None:
        if stage < 0:
            return
        if self.delay == 0:
            self._hand_over(stage, step, g, true_grad)
        else:
            self.queue.append((self.stages[stage].latest_step + self.delay, stage, step, g, true_grad))

    def _hand_over_due(self, stage: int, now: int) -> None:
        due = [m for m in self.queue if m[1] == stage and m[0] <= now]
        self.queue = [m for m in self.queue if not (m[1] == stage and m[0] <= now)]
        for _, _, step, g, true_grad in due:
            self._hand_over(stage, step, g, true_grad)

    def _hand_over(self, stage: int, step: int, g: torch.Tensor, true_grad: bool) -> None:
        self.delivered.append((stage, step, true_grad))
        dx = self.stages[stage].receive_grad(step, g, true_grad)
        if dx is not None:
            self._send(stage - 1, step, dx, true_grad)


def assert_same_state(expected, got, where: str = "state") -> None:
    """Bitwise equality of two nested states (dicts, lists, tuples, tensors, numbers): the same
    keys, dtypes, shapes and values everywhere."""
    if isinstance(expected, torch.Tensor):
        assert isinstance(got, torch.Tensor), f"{where}: a tensor became {type(got).__name__}"
        assert expected.dtype == got.dtype and expected.shape == got.shape, f"{where}: dtype or shape differs"
        assert torch.equal(expected, got), f"{where} differs"
    elif isinstance(expected, dict):
        assert isinstance(got, dict) and list(expected) == list(got), \
            f"{where}: keys differ ({list(expected)} vs {list(got) if isinstance(got, dict) else got!r})"
        for k in expected:
            assert_same_state(expected[k], got[k], f"{where}[{k!r}]")
    elif isinstance(expected, (list, tuple)):
        assert isinstance(got, (list, tuple)) and len(expected) == len(got), f"{where}: lengths differ"
        for i, (a, b) in enumerate(zip(expected, got)):
            assert_same_state(a, b, f"{where}[{i}]")
    else:
        assert expected == got, f"{where}: {expected!r} vs {got!r}"


def differs(a, b) -> bool:
    """Whether two nested states differ anywhere (a tensor's values, a number, a missing key)."""
    try:
        assert_same_state(a, b)
    except AssertionError:
        return True
    return False


def through_files(cfg: RunConfig, saving: list[StageLogic], loading: list[StageLogic], folder: Path,
                  step: int) -> None:
    """Save `saving` after `step` as the workers save (workers/checkpointing.py, into `folder`),
    and load each file into the stage of `loading` in its place, as a resumed worker does."""
    firsts = [a for a, _ in stage_bounds(cfg)]
    for i, (saved, fresh) in enumerate(zip(saving, loading)):
        path = periodic_path(folder, step, i)
        StageCheckpoints(i, cfg, folder, saved, firsts[i]).save(path, step)
        StageCheckpoints(i, cfg, folder, fresh, firsts[i]).load(path, step)
