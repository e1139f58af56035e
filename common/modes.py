"""The mode vocabulary: every way synthgrad can train, and, for the modes that run on stage
workers, the update rule that says what a stage does with a step.

A rule is one class in this file (its mode's entry in ``Mode`` sits beside it). It names the
parts it is made of (common/parts.py: a predictor, a head, a stash of weights), which the stage
builds from the helper models its layout chose and hands to it, and it says

- ``local_gradient``: which dL/dh to step on now, without waiting (None: no update now), and
  ``step_scale``: how large a step to take on it;
- ``on_gradient``: what to do when the true (or bootstrapped) dL/dh of an earlier step comes
  back, and what dL/dx travels on towards stage 0;
- ``waits_for_gradient``: whether step s+1 waits for step s's true gradient;
- ``true_grad_at``: which steps' true gradients come back at all.

The stage (workers/stage.py) runs a rule over its layers and knows no rule by name; the config,
the command line, compare, the layout, resume and torchrun read everything else from the rule
classes. This module imports no torch and nothing of the workers: a rule reaches its stage only
through the `Stage` protocol below.
"""
from __future__ import annotations

import math
from enum import Enum
from functools import partial
from typing import TYPE_CHECKING, Any, ClassVar, Optional, Protocol

if TYPE_CHECKING:  # only for annotations: this module stays importable without torch loaded
    import torch

    from synthgrad.common.parts import Parts, WeightProducts


class Mode(str, Enum):
    """How a run trains. A str, so configs and JSON keep plain names."""
    BACKPROP = "backprop"  # the whole network in one process (the reference)
    PIPELINE = "pipeline"  # torch.distributed.pipelining stages over gloo (the strongest locked peer)
    LOCKED = "locked"  # stage workers; every update waits for its true gradient
    UNLOCKED = "unlocked"  # stage workers; updates from synthetic gradients, true ones every N steps
    # (its predictor's prior, --sg-prior: a local head's gradient by default, or none as in DNI)
    STALE = "stale"  # stage workers; updates reuse the latest true gradient (a control)
    LOCAL = "local"  # stage workers; each stage learns from its own classifier head (DGL)
    DELAYED = "delayed"  # stage workers; true gradients applied when they arrive (DDG, PipeDream)
    CORRECTED = "corrected"  # stage workers; local heads, plus every N-th true gradient applied late

    def __str__(self) -> str:
        return self.value

    @property
    def rule(self) -> Optional[type["UpdateRule"]]:
        """The update rule of a stage-worker mode (unlocked: with the default prior; a run's own
        is RunConfig.rule); None for modes with their own processes."""
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


class Stage(Protocol):
    """What a rule may ask of the stage it runs on (workers/stage.py StageLogic)."""
    stage: int  # its place in the network, for messages
    latest_step: int  # the latest step it has run forward

    @property
    def step_input(self) -> Optional["torch.Tensor"]:
        """The input of the step in hand (between its forward pass and its update): what a
        local head's decoder learns to reconstruct."""

    @property
    def holding(self) -> bool:
        """A step has run forward and not yet taken its own update (its graph holds the current
        weights, so an update that comes in meanwhile waits for it)."""


class UpdateRule:
    """What a stage does after its forward pass and when a gradient arrives. One object per
    stage, holding that stage's parts; state of its own beyond them goes in state_dict."""
    mode: ClassVar[Mode]
    waits_for_gradient: ClassVar[bool] = False
    takes_n: ClassVar[bool] = True  # true gradients every N steps, not every step
    # the layers move before the true gradient of a step arrives: that step's forward runs on a
    # stash of its own weights, for dL/dx (and a late update) to be that forward pass's
    stashes: ClassVar[bool] = True
    uses_predictor: ClassVar[bool] = False  # the stage owns a synthetic-gradient model
    uses_head: ClassVar[bool] = False  # the stage owns a small classifier head (a local loss)
    # the layers also step on the true gradients that come back, with an optimiser state of
    # their own (Stash.optimizer); None: as the run's options say (RunConfig.applies_true_gradients)
    true_updates: ClassVar[Optional[bool]] = False

    def __init__(self, parts: "Parts", stage: Stage) -> None:
        self.parts = parts
        self.stage = stage

    @classmethod
    def true_grad_at(cls, step: int, every: int) -> bool:
        """Steps count from 0; every N-th step (N-1, 2N-1, ...) carries a true gradient."""
        return (step + 1) % every == 0

    @classmethod
    def lr_scale(cls, sg_update_lr_scale: float, is_last: bool) -> float:
        """The layers' learning rate factor: a stage stepped by an estimate takes smaller steps."""
        return 1.0 if is_last else sg_update_lr_scale

    def local_gradient(self, step: int, h: "torch.Tensor", labels: "torch.Tensor",
                       kept: Optional[Any]) -> Optional["torch.Tensor"]:
        """dL/dh (mean over the batch) to step on now, or None for no update now. `kept`: what
        this step keeps for its gradient's return (None where nothing comes back)."""
        raise NotImplementedError

    def step_scale(self) -> float:
        """The factor on the layers' learning rate for the step on local_gradient (0: none)."""
        return 1.0

    def on_gradient(self, step: int, kept: Any, g: "torch.Tensor", true_grad: bool) -> Optional["torch.Tensor"]:
        """A gradient for `step` arrived: learn from it; return dL/dx to pass on, or None."""
        raise NotImplementedError

    def state_dict(self) -> dict:
        """The rule's own state beyond its parts'."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    # ------------------------------------------------------------------ shared by the rules
    def apply_late(self, step: int, kept: Any, g: "torch.Tensor") -> Optional["torch.Tensor"]:
        """Step the layers on step `step`'s true gradient at the weights its forward used."""
        assert self.parts.stash is not None and kept.h is not None and kept.weights is not None
        return self.parts.stash.apply(step, kept.weights, kept.h, kept.x, g, self.stage.latest_step,
                                      hold=self.stage.holding)


def true_dx(kept: Any, g: "torch.Tensor") -> Optional["torch.Tensor"]:
    """dL/dx of a kept step's own forward pass (None on stage 0 or without a kept graph)."""
    if kept.x is None or kept.h is None:
        return None
    import torch
    (dx,) = torch.autograd.grad(kept.h, kept.x, g)
    return dx


# ---------------------------------------------------------------------------- locked
class Locked(UpdateRule):
    """Backprop split across processes: step s's update is its true gradient, and step s+1
    waits for it."""
    mode = Mode.LOCKED
    waits_for_gradient = True
    takes_n = False
    stashes = False

    @classmethod
    def true_grad_at(cls, step: int, every: int) -> bool:
        return True

    @classmethod
    def lr_scale(cls, sg_update_lr_scale: float, is_last: bool) -> float:
        return 1.0

    def local_gradient(self, step, h, labels, kept):
        return None

    def on_gradient(self, step, kept, g, true_grad):
        assert kept.h is not None
        kept.h.backward(g)
        self.parts.layers.step()
        return kept.x.grad if kept.x is not None else None


# ---------------------------------------------------------------------------- unlocked
class Unlocked(UpdateRule):
    """Decoupled neural interfaces: step now on the synthetic-gradient model's prediction; a
    true gradient trains the predictor, travels on as the true dL/dx of its own step, and (with
    --sg-true-updates, by default where N > 1) steps the layers too, at the weights that step's
    forward pass used, as mode delayed does: it costs one more product with the kept graph, and
    the layers of a predictor that cannot predict still learn from every N-th step."""
    mode = Mode.UNLOCKED
    uses_predictor = True
    true_updates = None  # as --sg-true-updates says

    def local_gradient(self, step, h, labels, kept):
        predictor = self.parts.predictor
        per_sample = predictor.predict(h, labels)
        if kept is not None and kept.h is not None:
            kept.prediction = per_sample
        return per_sample / predictor.share.rows(h)  # the whole batch's mean, whichever rows this process holds

    def step_scale(self) -> float:
        return self.parts.predictor.step_scale()

    def on_gradient(self, step, kept, g, true_grad):
        predictor = self.parts.predictor
        if kept.prediction is not None:
            predictor.score(step, kept.prediction, g)
        predictor.learn(kept.h_detached, kept.labels, g)
        if true_grad and self.parts.stash.optimizer is not None:
            return self.apply_late(step, kept, g)
        return true_dx(kept, g) if true_grad else None


# ---------------------------------------------------------------------------- stale
class Stale(UpdateRule):
    """A control: step on the latest true gradient that has arrived (nothing until one has)."""
    mode = Mode.STALE

    def __init__(self, parts: "Parts", stage: Stage) -> None:
        super().__init__(parts, stage)
        self.last_true: Optional["torch.Tensor"] = None

    def local_gradient(self, step, h, labels, kept):
        last = self.last_true
        return last if last is not None and last.shape == h.shape else None

    def on_gradient(self, step, kept, g, true_grad):
        if not true_grad:
            return None
        self.last_true = g.clone()
        return true_dx(kept, g)

    def state_dict(self) -> dict:
        return {} if self.last_true is None else {"last_true": self.last_true}

    def load_state_dict(self, state: dict) -> None:
        last_true = state.get("last_true")
        self.last_true = None if last_true is None else last_true.to(self.parts.layers.device)


# ---------------------------------------------------------------------------- local
class Local(UpdateRule):
    """Decoupled greedy learning (Belilovsky et al. 2019): every stage but the last trains on a
    small classifier head of its own (the labels travel forward with the activations) and steps
    at once. Nothing travels backward: no gradient, no relay, no stage ever waits."""
    mode = Mode.LOCAL
    takes_n = False
    stashes = False  # no gradient ever comes back: nothing to stash
    uses_head = True

    @classmethod
    def true_grad_at(cls, step: int, every: int) -> bool:
        return False

    @classmethod
    def lr_scale(cls, sg_update_lr_scale: float, is_last: bool) -> float:
        return 1.0  # a true gradient, of a local loss

    def local_gradient(self, step, h, labels, kept):
        return self.parts.head.gradient(step, h, labels, self.stage.step_input)

    def on_gradient(self, step, kept, g, true_grad):
        raise ValueError(f"stage {self.stage.stage}: a gradient arrived for step {step}, but mode local "
                         f"sends none back")


# ---------------------------------------------------------------------------- delayed
class Delayed(UpdateRule):
    """Delayed gradients with weight stashing (DDG, Huo et al. 2018; PipeDream's stashing): every
    step's true gradient flows back, no stage waits for it, and a stage applies the gradient of
    step s, computed on the weights step s's forward pass used, when it arrives."""
    mode = Mode.DELAYED
    takes_n = False

    @classmethod
    def true_grad_at(cls, step: int, every: int) -> bool:
        return True

    @classmethod
    def lr_scale(cls, sg_update_lr_scale: float, is_last: bool) -> float:
        return 1.0  # a true gradient, late

    def local_gradient(self, step, h, labels, kept):
        return None  # the update comes with the gradient

    def on_gradient(self, step, kept, g, true_grad):
        return self.apply_late(step, kept, g)


# ---------------------------------------------------------------------------- corrected
class Corrected(UpdateRule):
    """Local heads corrected by sparse true gradients: every stage steps at once on its head's
    gradient (as local), and every N-th step's true gradient also comes back and is applied at
    the weights that step's forward pass used, when it arrives (as delayed). The layers learn
    the network's objective as well as their own, while nine steps in ten send nothing back."""
    mode = Mode.CORRECTED
    uses_head = True

    @classmethod
    def lr_scale(cls, sg_update_lr_scale: float, is_last: bool) -> float:
        return 1.0  # true gradients: of a local loss now, of the network's later

    def local_gradient(self, step, h, labels, kept):
        return self.parts.head.gradient(step, h, labels, self.stage.step_input)

    def on_gradient(self, step, kept, g, true_grad):
        return self.apply_late(step, kept, g)


# ---------------------------------------------------------------------------- residual
class Residual(UpdateRule):
    """Mode unlocked with --sg-prior head (the default): a synthetic gradient whose prior is the
    local head's. Step now on dL_head/dh + c SG(h), where the predictor learns only the
    correction (true - head gradient) from every N-th true
    gradient, and c is the predictor's own evidence: the least-squares gain of its corrections
    on the true ones, clamped to [0, 1], and 0 while their running cosine is below
    --sg-correction-min-cosine (Predictor.correction_scale). The gain, not the cosine, since
    the correction is added to a gradient whose size matters; the correction is also never
    larger than the head's gradient (`bounded`). With no true gradient (N = infinity) it is
    `local`; the better the predictor learns the correction, the nearer each step is to
    backprop's. A correction taken
    at full size before it predicts kills units (measured on the digits CNN: docs/results.md).
    The head's part is an exact gradient of a local loss and is always taken in full; the true
    gradients train the predictor only. Once a correction's cosine passes the bar it must pass
    it on the weights' gradients too, and is taken at its gain there (`weight_products`,
    --sg-correction-weights): errors that add up over the batch move the weights while hardly
    moving the outputs' cosine (the small GPT, docs/results.md); with --sg-correction-gain
    direction, at the gain at which the step points nearest the true gradient there
    (common/parts.py direction_gain). Two guards on its shape are
    options, off by default: less its batch mean (`centered`, --sg-correction-center) and its
    part along the output (`tangent`, --sg-correction-tangent)."""
    mode = Mode.UNLOCKED
    uses_head = True
    uses_predictor = True

    @classmethod
    def lr_scale(cls, sg_update_lr_scale: float, is_last: bool) -> float:
        return 1.0

    def local_gradient(self, step, h, labels, kept):
        head = self.parts.head.gradient(step, h, labels, self.stage.step_input)
        predictor = self.parts.predictor
        if predictor is None:  # none fits its budget here (common/costs.py): the head's gradient alone
            return head
        if kept is not None:  # a gradient will come back for this step (true, or bootstrapped)
            kept.prior = head
        scale = predictor.correction_scale()
        scored = kept is not None and kept.h is not None  # scored against the true gradient only
        if scale <= 0 and not scored:  # a correction neither taken nor scored: not predicted (a
            return head  # predictor may cost a fifth of its stage's work; 9 steps in 10 at N=10)
        correction = predictor.predict(h, labels)
        if predictor.settings.center:
            correction = centered(correction)
        if predictor.settings.tangent:
            correction = tangent(correction, h)
        if scored:
            kept.prediction = correction
        if scale <= 0:
            return head
        return head + bounded(correction * (scale / predictor.share.rows(h)), head)

    def on_gradient(self, step, kept, g, true_grad):
        predictor = self.parts.predictor
        if predictor is None:
            return true_dx(kept, g) if true_grad else None
        wanted = g - kept.prior.to(g.dtype)
        kept_graph = kept.h is not None and bool(kept.weights)
        if kept.prediction is not None:
            on_weights = (partial(weight_products, kept, share=predictor.share,
                                  with_head=predictor.settings.gain == "direction")
                          if predictor.settings.on_weights and kept_graph else None)
            predictor.score(step, kept.prediction, wanted, on_weights)
        through = (partial(through_weights, kept, self.parts.layers.module, share=predictor.share)
                   if kept_graph and kept.rerun is not None else None)  # --sg-learn-weights
        predictor.learn(kept.h_detached, kept.labels, wanted, through)
        return true_dx(kept, g) if true_grad else None


def weight_products(kept: Any, p: "torch.Tensor", t: "torch.Tensor", share: Any,
                    with_head: bool = False) -> "WeightProducts":
    """The products of the gradients of the weights a kept step's forward pass used
    (kept.weights) that output gradients p (a correction) and t (its target) give, and with
    `with_head` those of the head's own (kept.prior) too; each summed over a replicated stage's
    processes before the products. A backward pass through the stage for each; the kept graph
    stays for the step's own dL/dx."""
    import torch

    from synthgrad.common.parts import WeightProducts
    weights = list(kept.weights.values())
    outs = (p, t, kept.prior) if with_head else (p, t)
    flat = [weight_gradients(kept.h, weights, out) for out in outs]
    both = torch.cat(flat)
    share.total(both)
    g = both.view(len(flat), -1)
    gram = (g @ g.T).tolist()
    return WeightProducts(gram[0][1], gram[0][0], gram[1][1],
                          (gram[2][2], gram[2][0], gram[2][1]) if with_head else None)


def weight_gradients(h: "torch.Tensor", weights: list, g: "torch.Tensor") -> "torch.Tensor":
    """The gradients of `weights` that output gradient `g` gives through `h`'s graph (kept for
    more), flat and in float64, zeros for a weight `h` does not use."""
    import torch
    grads = torch.autograd.grad(h, weights, g.to(h.dtype), retain_graph=True, allow_unused=True)
    return torch.cat([(torch.zeros_like(w) if d is None else d).reshape(-1).double() for w, d in zip(weights, grads)])


FD_STEP = 1e-3  # through_weights' finite difference: its step, as a share of the weights' norm


def through_weights(kept: Any, module: Any, r: "torch.Tensor", share: Any) -> "torch.Tensor":
    """J J^T r for a kept step, J the Jacobian of its output in its weights: r back through the
    kept graph to the weights its forward pass used (their gradients summed over a replicated
    stage's processes), then forward again along them by a central difference of that forward
    pass rerun (kept.rerun). What a predictor learning the weights' error follows
    (--sg-learn-weights, Predictor._step). Two forward passes and one backward through the
    stage; the kept graph stays for the step's own dL/dx. A step of FD_STEP of the weights'
    norm keeps float32's rounding (about 1e-7 of the output) well below the change it
    measures (about 1e-3 of it) and the curvature's error, of the step's square, smaller."""
    import torch
    names = list(kept.weights)
    weights = [kept.weights[n] for n in names]
    flat = weight_gradients(kept.h, weights, r)
    share.total(flat)
    size = float(flat.norm())
    if size == 0:
        return torch.zeros_like(r)
    at = {n: w.detach() for n, w in zip(names, weights)}
    eps = FD_STEP * max(math.sqrt(sum(float(w.float().pow(2).sum()) for w in at.values())), 1e-12) / size
    pieces = dict(zip(names, flat.split([w.numel() for w in weights])))

    def moved(sign: float) -> dict:
        return {n: w + (sign * eps) * pieces[n].view_as(w).to(w.dtype) for n, w in at.items()}
    ahead, behind = kept.rerun.output(module, moved(1.0)), kept.rerun.output(module, moved(-1.0))
    return ((ahead - behind) / (2 * eps)).reshape(r.shape)


def centered(correction: torch.Tensor) -> torch.Tensor:
    """The correction less its mean over the batch. The layers' gradient sums each sample's
    input times its output gradient: an error the predictor makes alike for every sample adds up
    over the batch (and positions) where the samples' own errors cancel, and Adam, which steps
    by sign more than by size, follows it step after step: on the small GPT one stage's
    correction became one vector for every sample and position (docs/results.md). Off by
    default: where the true gradient's batch mean is large, it goes too."""
    return correction - correction.mean(0, keepdim=True)


def tangent(correction: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """The correction less its part along the stage's output, sample by sample. A step on that
    part changes the output's size, and a predictor whose input is the output can answer a
    bigger output with a bigger push the same way: on the small GPT one stage's corrections
    turned into one vector along its output and blew the residual stream up
    (docs/results.md). A true gradient through a normalising layer has next to no such part;
    the head's gradient is left whole."""
    flat = correction.reshape(len(correction), -1)
    along = h.detach().reshape(len(h), -1).to(flat.dtype)
    size = along.pow(2).sum(1, keepdim=True)
    share = (flat * along).sum(1, keepdim=True) / size.clamp_min(1e-30)
    return (flat - share * along).reshape(correction.shape)


def bounded(correction: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
    """The correction, shrunk where needed to at most the prior's norm (over the whole batch).
    A gain is measured on past batches; one prediction far out of line on a new batch would
    be a gradient spike, which Adam turns into several steps of about 3x the learning rate in
    its direction. (It does not stop a correction that feeds itself step after step: on the
    small GPT that took the cosine bar, docs/results.md.)"""
    limit = prior.norm()
    size = correction.norm()
    return correction * (limit / size) if size > limit else correction


# what --sg-prior names: the rule of mode unlocked whose predictor has that prior
SG_PRIORS: dict[str, type[UpdateRule]] = {"head": Residual, "none": Unlocked}
DEFAULT_SG_PRIOR = "head"
# what --head-fill names: how --head-depth auto spends --head-budget (common/costs.py head_depths)
HEAD_FILLS = ("width", "stages")
# what --sg-correction-gain names: how large a correction is taken (common/parts.py Predictor.correction_scale)
CORRECTION_GAINS = ("fit", "direction")
RULES: dict[Mode, type[UpdateRule]] = {rule.mode: rule for rule in
                                       (Locked, Unlocked, Stale, Local, Delayed, Corrected)}
RULES[Mode.UNLOCKED] = SG_PRIORS[DEFAULT_SG_PRIOR]
MODE_NAMES: tuple[str, ...] = tuple(m.value for m in Mode)
STAGE_WORKER_MODES: tuple[str, ...] = tuple(m.value for m in Mode if m.on_stage_workers)


def spoken(names: tuple[str, ...]) -> str:
    """'a, b and c': mode lists in messages."""
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"
