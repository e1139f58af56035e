"""The mode vocabulary: every way synthgrad can train, and, for the modes that run on stage
workers, the update rule that says what a stage does with a step.

A stage's step is always: forward its batch, send the output on, then ask its rule

- ``local_gradient``: which dL/dh to step on now, without waiting (None: no update now);
- ``on_gradient``: what to do when the true (or bootstrapped) dL/dh of an earlier step comes
  back, and what dL/dx travels on towards stage 0;
- ``waits_for_gradient``: whether step s+1 waits for step s's true gradient;
- ``true_grad_at``: which steps' true gradients come back at all.

Adding a rule means one class here and its entry in ``Mode`` and ``RULES``; the config, the
command line, compare, resume and torchrun read everything else from these objects.
"""
from __future__ import annotations

from enum import Enum
from typing import TYPE_CHECKING, ClassVar, Optional

if TYPE_CHECKING:  # only for annotations: this module stays importable without torch loaded
    import torch

    from synthgrad.workers.stage import Kept, StageLogic


class Mode(str, Enum):
    """How a run trains. A str, so configs and JSON keep plain names."""
    BACKPROP = "backprop"  # the whole network in one process (the reference)
    PIPELINE = "pipeline"  # torch.distributed.pipelining stages over gloo (the strongest locked peer)
    LOCKED = "locked"  # stage workers; every update waits for its true gradient
    UNLOCKED = "unlocked"  # stage workers; updates from synthetic gradients, true ones every N steps
    STALE = "stale"  # stage workers; updates reuse the latest true gradient (a control)
    LOCAL = "local"  # stage workers; each stage learns from its own classifier head (DGL)
    DELAYED = "delayed"  # stage workers; true gradients applied when they arrive (DDG, PipeDream)
    CORRECTED = "corrected"  # stage workers; local heads, plus every N-th true gradient applied late

    def __str__(self) -> str:
        return self.value

    @property
    def rule(self) -> Optional["UpdateRule"]:
        """The update rule of a stage-worker mode; None for modes with their own processes."""
        return RULES.get(self)

    @property
    def on_stage_workers(self) -> bool:
        """Runs on synthgrad's stage workers and coordinator (so: remote workers, torchrun,
        checkpoints, resume, restart)."""
        return self in RULES

    @property
    def takes_n(self) -> bool:
        """`--true-grad-every N` (and compare's `mode:N`) means something for this mode."""
        rule = self.rule
        return rule is not None and rule.takes_n


class UpdateRule:
    """What a stage does after its forward pass and when a gradient arrives. Stateless: a
    stage's state (kept graphs, predictor, last true gradient) lives in its StageLogic."""
    mode: ClassVar[Mode]
    waits_for_gradient: ClassVar[bool] = False
    takes_n: ClassVar[bool] = True  # true gradients every N steps, not every step
    # the optimiser moves the weights before the true gradient of a step arrives: that step's
    # forward must keep its own weights (weight stashing) for dL/dx to be the true one
    weights_move_before_gradient: ClassVar[bool] = True
    uses_predictor: ClassVar[bool] = False  # the stage owns a synthetic-gradient model
    uses_head: ClassVar[bool] = False  # the stage owns a small classifier head (a local loss)

    def true_grad_at(self, step: int, every: int) -> bool:
        """Steps count from 0; every N-th step (N-1, 2N-1, ...) carries a true gradient."""
        return (step + 1) % every == 0

    def lr_scale(self, sg_update_lr_scale: float, is_last: bool) -> float:
        """The layers' learning rate factor: a stage stepped by an estimate takes smaller steps."""
        return 1.0 if is_last else sg_update_lr_scale

    def local_gradient(self, stage: "StageLogic", step: int, h: torch.Tensor, labels: torch.Tensor,
                       kept: Optional["Kept"]) -> Optional[torch.Tensor]:
        """dL/dh (mean over the batch) to step on now, or None for no update now."""
        raise NotImplementedError

    def on_gradient(self, stage: "StageLogic", step: int, kept: "Kept", g: torch.Tensor,
                    true_grad: bool) -> Optional[torch.Tensor]:
        """A gradient for `step` arrived: learn from it; return dL/dx to pass on, or None."""
        raise NotImplementedError


class Locked(UpdateRule):
    """Backprop split across processes: step s's update is its true gradient, and step s+1
    waits for it."""
    mode = Mode.LOCKED
    waits_for_gradient = True
    takes_n = False
    weights_move_before_gradient = False

    def true_grad_at(self, step: int, every: int) -> bool:
        return True

    def lr_scale(self, sg_update_lr_scale: float, is_last: bool) -> float:
        return 1.0

    def local_gradient(self, stage, step, h, labels, kept):
        return None

    def on_gradient(self, stage, step, kept, g, true_grad):
        assert kept.h is not None
        kept.h.backward(g)
        stage.step_optimizer()
        return kept.x.grad if kept.x is not None else None


class Unlocked(UpdateRule):
    """Decoupled neural interfaces: step now on the synthetic-gradient model's prediction; a
    true gradient trains the predictor, travels on as the true dL/dx of its own step, and (with
    --sg-true-updates, by default where N > 1) steps the layers too, at the weights that step's
    forward pass used, as mode delayed does: it costs one more product with the kept graph, and
    the layers of a predictor that cannot predict still learn from every N-th step."""
    mode = Mode.UNLOCKED
    uses_predictor = True

    def local_gradient(self, stage, step, h, labels, kept):
        per_sample = stage.predict(h, labels)
        if kept is not None and kept.h is not None:
            kept.sg_pred = per_sample
        return per_sample / stage.batch_rows(h)  # the whole batch's mean, whichever rows this process holds

    def on_gradient(self, stage, step, kept, g, true_grad):
        stage.learn_predictor(step, kept, g)
        if true_grad and stage.cfg.applies_true_gradients:
            return stage.apply_stashed(step, kept, g)
        return stage.true_dx(kept, g) if true_grad else None


class Stale(UpdateRule):
    """A control: step on the latest true gradient that has arrived (nothing until one has)."""
    mode = Mode.STALE

    def local_gradient(self, stage, step, h, labels, kept):
        last = stage.last_true
        return last if last is not None and last.shape == h.shape else None

    def on_gradient(self, stage, step, kept, g, true_grad):
        if not true_grad:
            return None
        stage.last_true = g.clone()
        return stage.true_dx(kept, g)


class Local(UpdateRule):
    """Decoupled greedy learning (Belilovsky et al. 2019): every stage but the last trains on a
    small classifier head of its own (the labels travel forward with the activations) and steps
    at once. Nothing travels backward: no gradient, no relay, no stage ever waits."""
    mode = Mode.LOCAL
    takes_n = False
    weights_move_before_gradient = False  # no gradient ever comes back: nothing to stash
    uses_head = True

    def true_grad_at(self, step: int, every: int) -> bool:
        return False

    def lr_scale(self, sg_update_lr_scale: float, is_last: bool) -> float:
        return 1.0  # a true gradient, of a local loss

    def local_gradient(self, stage, step, h, labels, kept):
        return stage.head_gradient(step, h, labels)

    def on_gradient(self, stage, step, kept, g, true_grad):
        raise ValueError(f"stage {stage.stage}: a gradient arrived for step {step}, but mode local "
                         f"sends none back")


class Delayed(UpdateRule):
    """Delayed gradients with weight stashing (DDG, Huo et al. 2018; PipeDream's stashing): every
    step's true gradient flows back, no stage waits for it, and a stage applies the gradient of
    step s, computed on the weights step s's forward pass used, when it arrives."""
    mode = Mode.DELAYED
    takes_n = False

    def true_grad_at(self, step: int, every: int) -> bool:
        return True

    def lr_scale(self, sg_update_lr_scale: float, is_last: bool) -> float:
        return 1.0  # a true gradient, late

    def local_gradient(self, stage, step, h, labels, kept):
        return None  # the update comes with the gradient

    def on_gradient(self, stage, step, kept, g, true_grad):
        return stage.apply_stashed(step, kept, g)


class Corrected(Local):
    """Local heads corrected by sparse true gradients: every stage steps at once on its head's
    gradient (as local), and every N-th step's true gradient also comes back and is applied at
    the weights that step's forward pass used, when it arrives (as delayed). The layers learn
    the network's objective as well as their own, while nine steps in ten send nothing back.
    Tried beside other candidates in bench/rules.py (see the README's results)."""
    mode = Mode.CORRECTED
    takes_n = True
    weights_move_before_gradient = True

    def true_grad_at(self, step: int, every: int) -> bool:
        return UpdateRule.true_grad_at(self, step, every)

    def on_gradient(self, stage, step, kept, g, true_grad):
        return stage.apply_stashed(step, kept, g)


RULES: dict[Mode, UpdateRule] = {rule.mode: rule for rule in
                                 (Locked(), Unlocked(), Stale(), Local(), Delayed(), Corrected())}
MODE_NAMES: tuple[str, ...] = tuple(m.value for m in Mode)
STAGE_WORKER_MODES: tuple[str, ...] = tuple(m.value for m in Mode if m.on_stage_workers)


def spoken(names: tuple[str, ...]) -> str:
    """'a, b and c': mode lists in messages."""
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"
