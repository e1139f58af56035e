"""What one stage does with a batch, free of sockets and processes (so it is testable alone).

A stage owns some consecutive layers and runs an update rule over them (common/modes.py): per
training step it runs forward, hands the output on, and asks its rule what to step on now and
what to do when a gradient of an earlier step comes back. The rule is made of parts
(common/parts.py: the layers, and a predictor, a head or a stash where the rule names them),
which the stage builds from the helper models its layout chose; the stage saves, loads and
reports the parts without knowing which rule it runs.

A step whose true gradient will come back keeps its autograd graph. Where the layers move before
that gradient arrives (every rule but locked and local), such a step runs forward on
differentiable clones of the weights (the stash): the kept graph then still holds the weights
of that step, and dL/dx is exactly the gradient of the forward pass that produced h.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn as nn

from synthgrad.common.config import RunConfig
from synthgrad.common.costs import Helpers, choose_helpers, helper_models, training_flops, unit_costs
from synthgrad.common.devices import Compute
from synthgrad.common.evaluation import count_correct
from synthgrad.common.models import SyntheticGradient, build_units, loss_function, make_optimizer, stage_bounds, \
    stage_io_shapes
from synthgrad.common.modes import UpdateRule
from synthgrad.common.parts import (  # noqa: F401  (NonFinite, require_finite: re-exported)
    Head,
    Layers,
    NonFinite,
    Parts,
    Predictor,
    Rerun,
    Share,
    Stash,
    require_finite,
)
from synthgrad.common.recurrent import StateSynthesizer, recurrent_layers, reset_streams, state_sizes
from synthgrad.workers.sync import GradientSync

MAX_KEPT_STEPS = 4096  # a safety bound; bounded queues keep the real number far below it
SNAPSHOT_AT = (0.0, 0.1, 0.5, 1.0)  # fractions of the run at which to keep SG-vs-true samples


def snapshot_steps(cfg: RunConfig, total_steps: int) -> frozenset[int]:
    """The true-gradient steps nearest to each fraction of the run in SNAPSHOT_AT."""
    true_steps = [s for s in range(total_steps) if cfg.true_grad_at(s)]
    if not true_steps:
        return frozenset()
    return frozenset(true_steps[min(int(f * len(true_steps)), len(true_steps) - 1)] for f in SNAPSHOT_AT)


@dataclass
class Kept:
    """What a step keeps until its true or bootstrapped gradient comes back."""
    x: Optional[torch.Tensor]  # input leaf (requires grad) when dL/dx must be sent back
    h: Optional[torch.Tensor]  # output still attached to its graph (true-gradient steps)
    h_detached: torch.Tensor
    labels: torch.Tensor
    prediction: Optional[torch.Tensor] = None  # what the rule's predictor said at forward time
    prior: Optional[torch.Tensor] = None  # what the rule stepped on besides (residual: the head's)
    weights: Optional[dict] = None  # the stashed weights h was computed with (name -> clone)
    # the forward pass again at other weights (--sg-learn-weights): its input, random and stream state
    rerun: Optional["Rerun"] = None


@dataclass
class StageStats:
    """The layers' running sums since the last report (reset by ``take``), and counts."""
    loss_sum: float = 0.0
    loss_n: int = 0
    correct: int = 0
    seen: int = 0
    true_grads: int = 0  # true gradients received (cumulative, not reset)
    bootstrap_grads: int = 0
    dropped: int = 0

    def take(self) -> dict:
        rec = {"loss": self.loss_sum / self.loss_n if self.loss_n else None,
               "train_accuracy": self.correct / self.seen if self.seen else None,
               "true_grads": self.true_grads, "bootstrap_grads": self.bootstrap_grads,
               "dropped_steps": self.dropped}
        self.loss_sum, self.loss_n, self.correct, self.seen = 0.0, 0, 0, 0
        return rec


@dataclass
class Streams:
    """A recurrent stage's training streams: the epoch they are in (a new one restarts them),
    and each recurrent layer's state predictor (where the rule predicts gradients)."""
    synths: list[StateSynthesizer] = field(default_factory=list)
    epoch: Optional[int] = None

    def learn(self) -> None:
        for synth in self.synths:  # the window's backward pass gave its initial state a gradient
            synth.learn()


def build_parts(rule: type[UpdateRule], cfg: RunConfig, stage: int, is_last: bool, module: nn.Module,
                out_shape: tuple[int, ...], helpers: Helpers, dev: Compute, share: Share,
                snapshot_steps: frozenset[int], after_step) -> Parts:
    """The parts `rule` is made of, for this stage: exactly the helper models `helpers` names."""
    lr = cfg.lr * rule.lr_scale(cfg.sg_update_lr_scale, is_last)
    layers = Layers(module, make_optimizer(module.parameters(), cfg.optimizer, lr, cfg.momentum), lr, share,
                    after_step)
    seed = cfg.seed * 7919 + stage
    predictor = None if helpers.predictor is None else Predictor.build(
        helpers.predictor, cfg, out_shape, seed, dev.device, share, snapshot_steps)
    head = None if helpers.head is None else Head.build(helpers.head, cfg, out_shape, seed, dev.device, share, stage)
    stash = None
    if rule.stashes and not is_last:
        # where the layers step on estimates and on the true gradients too, each kind has its own
        # optimiser state at its own lr: Adam's moments would otherwise mix nine predicted
        # gradients with each true one and carry the predictions into its step
        true_updates = cfg.applies_true_gradients if rule.true_updates is None else rule.true_updates
        optimizer = make_optimizer(module.parameters(), cfg.optimizer, cfg.lr, cfg.momentum) if true_updates else None
        stash = Stash(layers, optimizer, cfg.lr, predictor, stage)
    return Parts(layers, share, predictor, head, stash)


class StageLogic:
    def __init__(self, cfg: RunConfig, stage: int, num_stages: int, module: nn.Module,
                 in_shape: tuple[int, ...], out_shape: tuple[int, ...],
                 snapshot_steps: frozenset[int] = frozenset(),
                 rule: Optional[type[UpdateRule]] = None, dev: Optional[Compute] = None,
                 sync: Optional[GradientSync] = None, helpers: Optional[Helpers] = None):
        """`in_shape`, `out_shape`: one sample's, in and out. `rule`: the mode's unless given
        (bench/rules.py tries rules that are not modes yet). `helpers`: the helper models the
        layout chose (START carries them); when not given, chosen here for this stage alone
        (`stage_helpers`: linear heads unless --head-depth is given). `dev`: the
        device and precision (default: the CPU, in the run's precision). What comes in (data,
        activations, gradients) is moved onto the device; what goes out comes back in the
        wire's dtype, in host memory. `sync`: this stage runs as one of several replicas, each
        on its share of every batch's rows (workers/replicas.py): each model's gradients are
        summed over the replicas before it steps, so every loss here counts for its share."""
        self.cfg = cfg
        self.stage = stage
        self.num_stages = num_stages
        rule_class = rule or cfg.rule
        if helpers is None:  # counted on the CPU, before the module moves (the layout counts the same)
            helpers = stage_helpers(cfg.replace(mode=rule_class.mode) if rule else cfg, module, in_shape,
                                    out_shape, self.is_last)
        widths = state_sizes(module, in_shape) if helpers.state_predictors else []  # probed on the CPU
        self.dev = dev or Compute(torch.device("cpu"), cfg.precision)
        module.to(self.dev.device)
        self.streams = Streams()
        self.parts = build_parts(rule_class, cfg, stage, self.is_last, module, out_shape, helpers, self.dev,
                                 Share(sync), snapshot_steps, self.streams.learn)
        self.streams.synths = self._state_synths(helpers, widths)
        self.rule: UpdateRule = rule_class(self.parts, self)
        # a predictor that learns on the weights' error runs true-gradient steps' forwards again
        self._reruns = self.parts.predictor is not None and self.parts.predictor.settings.learn_weights > 0
        self.latest_step = -1  # the latest step this stage has run forward
        self.loss_fn = loss_function(cfg.loss, cfg.per_position)  # the last stage's
        self.kept: dict[int, Kept] = {}
        self.stats = StageStats()
        self._pending: Optional[tuple] = None  # (step, h, x, keep_graph, labels) between forward and update

    def _state_synths(self, helpers: Helpers, widths: list[int]) -> list[StateSynthesizer]:
        """A state predictor per recurrent layer (of its state's `widths`), as `helpers` says,
        each attached to its layer."""
        cfg, synths = self.cfg, []
        for i, (layer, choice, width) in enumerate(zip(recurrent_layers(self.module), helpers.state_predictors,
                                                        widths)):
            torch.manual_seed(cfg.seed * 7919 + 104729 * (i + 1) + self.stage)
            model = SyntheticGradient((width,), cfg.sg_model, choice.rank).to(self.dev.device)
            synth = StateSynthesizer(model, make_optimizer(model.parameters(), cfg.sg_optimizer, cfg.sg_lr),
                                     cfg.sg_discount)
            layer.synthesizer = synth
            synths.append(synth)
        return synths

    @property
    def module(self) -> nn.Module:
        return self.parts.layers.module

    @property
    def is_first(self) -> bool:
        return self.stage == 0

    @property
    def is_last(self) -> bool:
        return self.stage == self.num_stages - 1

    @property
    def holding(self) -> bool:
        """A step ran forward and awaits its own update (the rules' Stage protocol)."""
        return self._pending is not None

    @property
    def step_input(self) -> Optional[torch.Tensor]:
        """The input of the step between its forward pass and its update (None outside one)."""
        return None if self._pending is None else self._pending[2]

    def begin_epoch(self, epoch: int) -> None:
        """A training step of `epoch` comes next: a new epoch restarts the streams (recurrent
        layers start from zero)."""
        if self.streams.epoch is not None and epoch != self.streams.epoch:
            reset_streams(self.module, training=True)
        self.streams.epoch = epoch

    # ------------------------------------------------------------------ figures
    def take_figures(self) -> dict:
        """The running figures since the last report: the layers', each part's, and the first
        recurrent layer's state predictor's (a stage rarely holds two)."""
        rec = {**self.stats.take(), **self.parts.take_stats()}
        for synth in self.streams.synths[:1]:
            rec.update(synth.take())
        return rec

    def totals(self) -> dict:
        """Cumulative figures for the stage's summary."""
        return {"true_grads_received": self.stats.true_grads,
                "bootstrap_grads_received": self.stats.bootstrap_grads, **self.parts.totals()}

    @property
    def snapshots(self) -> list[dict]:
        """The predictor's output beside the true gradient at a few steps (for a heatmap)."""
        predictor = self.parts.predictor
        return [] if predictor is None else [{"stage": self.stage, **snap} for snap in predictor.snapshots]

    # ------------------------------------------------------------------ helpers
    def _input(self, x: torch.Tensor, need_dx: bool) -> torch.Tensor:
        if need_dx and not self.is_first:
            return x.detach().requires_grad_(True)
        return x

    def _forward(self, x: torch.Tensor, stash_weights: bool) -> tuple[torch.Tensor, Optional[dict]]:
        """The output, and the stashed weights it was computed with (None when not stashed)."""
        with self.dev.autocast():
            if stash_weights:
                assert self.parts.stash is not None
                return self.parts.stash.forward(x)
            return self.module(x), None

    def _bound_kept(self, step: int) -> None:
        for old in [s for s in self.kept if s <= step - MAX_KEPT_STEPS]:
            del self.kept[old]
            self.stats.dropped += 1

    # ------------------------------------------------------------------ middle stages
    def forward(self, step: int, x: torch.Tensor, labels: torch.Tensor, true_grad: bool) -> torch.Tensor:
        """Forward one training batch of a non-last stage; returns h to send downstream."""
        x, labels = self.dev.arrive(x), self.dev.arrive(labels)
        keep_graph = true_grad
        need_dx = keep_graph or self.cfg.bootstrap
        x = self._input(x, need_dx)
        stash_weights = keep_graph and self.rule.stashes
        rerun = Rerun.before(x, self.dev.device, self.module) if stash_weights and self._reruns else None
        h, stash = self._forward(x, stash_weights=stash_weights)
        require_finite(h, "the output", self.stage, step)
        self.latest_step = step
        if keep_graph or self.cfg.bootstrap:
            self._bound_kept(step)
            self.kept[step] = Kept(x if need_dx and not self.is_first else None,
                                   h if keep_graph else None, h.detach(), labels, weights=stash, rerun=rerun)
        self._pending = (step, h, x, keep_graph, labels)
        return self.dev.leave(h)

    def local_update(self, step: int) -> Optional[torch.Tensor]:
        """Step now on what the rule gives, without waiting. Returns a bootstrapped dL/dx for
        the stage before, when bootstrapping on a step whose true gradient is not coming."""
        try:
            dx = self._local_update(step)
            return None if dx is None else self.dev.leave(dx)
        finally:
            if self.parts.stash is not None:  # late true gradients that arrived during this step
                self.parts.stash.release()

    def _local_update(self, step: int) -> Optional[torch.Tensor]:
        pstep, h, x, keep_graph, labels = self._pending
        assert pstep == step, "local_update must follow forward of the same step"
        try:  # the rule may read the step's input (step_input) meanwhile
            grad = self.rule.local_gradient(step, h, labels, self.kept.get(step))
        finally:
            self._pending = None
        if grad is None:
            return None
        scale = self.rule.step_scale()
        if scale <= 0:
            if not (self.cfg.bootstrap or self.streams.synths):  # nothing to step on, nothing to send back
                return None
        require_finite(grad, "the local gradient", self.stage, step)
        h.backward(grad.to(h.dtype), retain_graph=keep_graph)
        if scale > 0:
            self.parts.layers.step(self.parts.layers.lr * scale)
        else:  # a bootstrapped dL/dx still goes back, and the state predictors learn from the
            self.parts.layers.skip()  # window; the layers keep their weights
        if self.cfg.bootstrap and not keep_graph and x is not None and x.grad is not None:
            dx = x.grad
            x.grad = None
            return dx
        if x is not None and x.requires_grad:
            x.grad = None
        return None

    def receive_grad(self, step: int, g: torch.Tensor, true_grad: bool) -> Optional[torch.Tensor]:
        """A true or bootstrapped dL/dh for step `step` came back. Returns dL/dx to pass on
        (true gradients only, not on stage 0), or None."""
        kept = self.kept.pop(step, None)
        if kept is None:
            raise KeyError(f"stage {self.stage}: gradient for step {step}, which it does not hold")
        if g.shape != kept.h_detached.shape:
            raise ValueError(f"stage {self.stage}: gradient for step {step} has shape "
                             f"{list(g.shape)}, its output had {list(kept.h_detached.shape)}")
        if true_grad:
            self.stats.true_grads += 1
        else:
            self.stats.bootstrap_grads += 1
        g = self.dev.arrive(g).to(kept.h_detached.dtype)  # the wire's dtype may be narrower
        dx = self.rule.on_gradient(step, kept, g, true_grad)
        return None if dx is None else self.dev.leave(require_finite(dx, "dL/dx", self.stage, step))

    # ------------------------------------------------------------------ last stage
    def last_step(self, step: int, x: torch.Tensor, labels: torch.Tensor,
                  true_grad: bool) -> tuple[float, Optional[torch.Tensor]]:
        """Forward, loss, backward and update of the last stage. Returns the loss and the
        dL/dx to send back (true steps, and every step when bootstrapping)."""
        need_dx = true_grad or self.cfg.bootstrap
        x = self._input(self.dev.arrive(x), need_dx)
        labels = self.dev.arrive(labels)
        self.latest_step = step
        with self.dev.autocast():  # the loss too, exactly as mode backprop computes it
            out = self.module(x)
            loss = self.loss_fn(out, labels)
        require_finite(loss.detach(), "the loss", self.stage, step)
        self.parts.share.loss(loss).backward()
        self.parts.layers.step()
        value = loss.item()
        correct, counted = count_correct(out.detach(), labels)
        # weighted by the predictions it scored: a stream's windows hold different numbers of
        # targets (some none), and the reported loss is per target, as the evaluation's is
        self.stats.loss_sum += value * counted
        self.stats.loss_n += counted
        self.stats.correct += correct
        self.stats.seen += counted
        dx = x.grad if (need_dx and not self.is_first) else None
        return value, None if dx is None else self.dev.leave(require_finite(dx, "dL/dx", self.stage, step))

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def eval_forward(self, x: torch.Tensor, fresh: bool = False) -> torch.Tensor:
        """The stage's output in eval mode, ready for the wire (the last stage's logits stay as
        computed, on the device, for the evaluation's tally). `fresh`: an evaluation's first
        batch (its streams start from zero; the training streams' state is kept apart)."""
        if fresh:
            reset_streams(self.module, training=False)
        self.module.eval()
        try:
            with self.dev.autocast():
                out = self.module(self.dev.arrive(x))
        finally:
            self.module.train()
        return out if self.is_last else self.dev.leave(out)

    # ------------------------------------------------------------------ state
    def close(self) -> None:
        """Nothing to release (a replicated stage's other processes: workers/replicas.py)."""

    @property
    def replica_pids(self) -> list[int]:
        """The stage's other processes: none (workers/replicas.py has them)."""
        return []

    def outstanding(self) -> int:
        return len(self.kept)

    def state_dict(self) -> dict:
        """Everything training needs to continue: each part's state (the layers and their
        optimiser, and the rule's helper models with theirs), the rule's own (stale: the
        gradient it reuses) and where a recurrent stage's streams are. Raises NonFinite rather
        than hand over a poisoned state (a checkpoint is only ever written from this)."""
        state = {**self.parts.state_dict(), **self.rule.state_dict()}
        layers = recurrent_layers(self.module)
        if layers:  # where the training streams are: their epoch, and each layer's carried state
            state["streams"] = {"epoch": self.streams.epoch, "carried": [layer.carried() for layer in layers],
                                "synths": [synth.state_dict() for synth in self.streams.synths]}
        for t in _tensors(state):
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise NonFinite(f"stage {self.stage}: its state holds NaN or infinite values; "
                                f"not saved (training diverged: lower --lr or --sg-lr)")
        return state

    def load_state_dict(self, state: dict) -> None:
        """The inverse of state_dict (resuming from a checkpoint)."""
        self.parts.load_state_dict(state)
        self.rule.load_state_dict(state)
        streams = state.get("streams")
        if streams is not None:
            self.streams.epoch = streams["epoch"]
            for layer, carried in zip(recurrent_layers(self.module), streams["carried"]):
                layer.carry(None if carried is None else
                            tuple(map(self.dev.arrive, carried)) if isinstance(carried, (tuple, list))
                            else self.dev.arrive(carried))
            for synth, saved in zip(self.streams.synths, streams["synths"]):
                synth.load_state_dict(saved)


def stage_helpers(cfg: RunConfig, module: nn.Module, in_shape: tuple[int, ...], out_shape: tuple[int, ...],
                  is_last: bool) -> Helpers:
    """The helper models for a stage of these layers built alone (tests, tools): as the layout
    chooses them (common/costs.py helper_models), except that a head's hidden layers, which
    the layout chooses over every stage's cost (--head-depth auto), are none unless given."""
    rule = cfg.rule
    predicts_states = rule.uses_predictor and cfg.per_position and bool(recurrent_layers(module))
    if not (rule.uses_predictor or rule.uses_head):
        return Helpers()
    widths = state_sizes(module, in_shape) if predicts_states else []
    return choose_helpers(cfg, is_last=is_last, out_shape=out_shape, stage_flops=training_flops(module, in_shape),
                          state_widths=widths, in_shape=in_shape, recurrent=bool(recurrent_layers(module)))


@dataclass(frozen=True)
class StagePlan:
    """Where a stage sits in the network."""
    units: tuple[int, int]  # [first, end) unit indices
    in_shape: tuple[int, ...]  # one sample's, in and out
    out_shape: tuple[int, ...]
    num_classes: int
    num_stages: int


def build_stage(cfg: RunConfig, stage: int, total_steps: int, dev: Compute,
                sync: Optional[GradientSync] = None, helpers: Optional[Helpers] = None
                ) -> tuple[StageLogic, StagePlan]:
    """Stage `stage`'s logic with its layers, made the same way in every process that runs it
    (a stage worker, each of its replicas): the whole network is built from the seed, so the
    stage's weights are backprop's; with the helper models START gave (`helpers`)."""
    first_unit, end_unit = stage_bounds(cfg)[stage]
    units = build_units(cfg)
    shapes = stage_io_shapes(cfg, units)
    if helpers is None:  # as the layout chooses them, from every stage's cost
        helpers = helper_models(cfg, units, unit_costs(cfg, units))[1][stage]
    in_shape, out_shape = shapes[stage]
    num_stages = len(cfg.stage_groups)
    logic = StageLogic(cfg, stage, num_stages, nn.Sequential(*units[first_unit:end_unit]), in_shape, out_shape,
                       snapshot_steps=snapshot_steps(cfg, total_steps), dev=dev, sync=sync, helpers=helpers)
    # the last stage's output: one logit per class (at every position, for stream data)
    return logic, StagePlan((first_unit, end_unit), in_shape, out_shape, shapes[-1][1][-1], num_stages)


def _tensors(obj):
    """Every tensor in a nested state (dicts, lists, tuples)."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)
