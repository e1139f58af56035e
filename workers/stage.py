"""What one stage does with a batch, free of sockets and processes (so it is testable alone).

A stage owns some consecutive layers, their optimiser, and (when its update rule uses one) a
synthetic-gradient model with its own optimiser. Per training step it runs forward, hands the
output on, and asks its update rule (common/modes.py) what to step on now and what to do when a
gradient of an earlier step comes back; this class holds the machinery the rules share.

A step whose true gradient will come back keeps its autograd graph. Where the optimiser changes
the weights before that gradient arrives (every rule but locked), such a step runs forward on
differentiable clones of the weights: the kept graph then still holds the weights of that step,
and dL/dx is exactly the gradient of the forward pass that produced h (no recomputation).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from synthgrad.common.config import RunConfig
from synthgrad.common.costs import HeadChoice, PredictorChoice, choose_head, choose_predictor, training_flops
from synthgrad.common.devices import Compute
from synthgrad.common.models import (
    LocalHead,
    SyntheticGradient,
    build_units,
    loss_function,
    make_optimizer,
    stage_bounds,
    stage_io_shapes,
)
from synthgrad.common.evaluation import count_correct
from synthgrad.common.modes import UpdateRule
from synthgrad.common.recurrent import StateSynthesizer, recurrent_layers, reset_streams, state_sizes
from synthgrad.common.reports import RunFailed
from synthgrad.workers.sync import GradientSync

TRUST_DECAY = 0.8  # the predictor's running cosine: each true-gradient step's weighs 1 - this
SCALE_DECAY = 0.9  # the true gradients' running RMS (--sg-normalize): each target's weighs 1 - this
MAX_KEPT_STEPS = 4096  # a safety bound; bounded queues keep the real number far below it
SNAPSHOT_AT = (0.0, 0.1, 0.5, 1.0)  # fractions of the run at which to keep SG-vs-true samples
SNAPSHOT_ROWS, SNAPSHOT_COLS = 16, 64  # samples x units kept per snapshot (for a heatmap)


def snapshot_steps(cfg: RunConfig, total_steps: int) -> frozenset[int]:
    """The true-gradient steps nearest to each fraction of the run in SNAPSHOT_AT."""
    true_steps = [s for s in range(total_steps) if cfg.true_grad_at(s)]
    if not true_steps:
        return frozenset()
    return frozenset(true_steps[min(int(f * len(true_steps)), len(true_steps) - 1)] for f in SNAPSHOT_AT)


class NonFinite(RunFailed):
    """Training produced NaN or Inf. The policy: the run fails here, naming the stage and step,
    before the value updates a weight or travels on, so no checkpoint ever holds it."""


def require_finite(t: torch.Tensor, what: str, stage: int, step: int) -> torch.Tensor:
    if not bool(torch.isfinite(t).all()):
        raise NonFinite(f"stage {stage}: {what} of step {step} is NaN or infinite (training diverged; "
                        f"lower --lr or --sg-lr, or check the data); it was not used")
    return t


@dataclass
class Kept:
    """What a step keeps until its true or bootstrapped gradient comes back."""
    x: Optional[torch.Tensor]  # input leaf (requires grad) when dL/dx must be sent back
    h: Optional[torch.Tensor]  # output still attached to its graph (true-gradient steps)
    h_detached: torch.Tensor
    labels: torch.Tensor
    sg_pred: Optional[torch.Tensor] = None  # the synthetic gradient used at forward time
    weights: Optional[dict] = None  # the stashed weights h was computed with (name -> clone)


@dataclass
class StageStats:
    """Running sums since the last metrics report (reset by ``take``)."""
    loss_sum: float = 0.0
    loss_n: int = 0
    correct: int = 0
    seen: int = 0
    sg_loss_sum: float = 0.0
    sg_loss_n: int = 0
    cos_sum: float = 0.0
    cos_n: int = 0
    true_grads: int = 0  # true gradients received (cumulative, not reset)
    bootstrap_grads: int = 0
    dropped: int = 0
    sg_seconds: float = 0.0  # predicting and training the synthetic-gradient model (cumulative)
    head_loss_sum: float = 0.0  # the local classifier head's loss (mode local)
    head_loss_n: int = 0
    head_seconds: float = 0.0  # training the local head (cumulative)
    delay_sum: int = 0  # steps between a step's forward pass and its gradient's update (delayed)
    delay_n: int = 0
    delay_max: int = 0  # cumulative
    delay_total: int = 0  # cumulative, for the run's mean
    delay_total_n: int = 0
    untrusted_steps: int = 0  # steps on the predictor not taken (predictor_step_scale gave 0; cumulative)
    state_synths: tuple = ()  # the stage's StateSynthesizers: their figures join each record

    def take(self) -> dict:
        rec = {
            "loss": self.loss_sum / self.loss_n if self.loss_n else None,
            "train_accuracy": self.correct / self.seen if self.seen else None,
            "sg_loss": self.sg_loss_sum / self.sg_loss_n if self.sg_loss_n else None,
            "sg_cosine": self.cos_sum / self.cos_n if self.cos_n else None,
            "true_grads": self.true_grads,
            "bootstrap_grads": self.bootstrap_grads,
            "dropped_steps": self.dropped,
            "untrusted_steps": self.untrusted_steps,
            "head_loss": self.head_loss_sum / self.head_loss_n if self.head_loss_n else None,
            "gradient_delay_mean": self.delay_sum / self.delay_n if self.delay_n else None,
            "gradient_delay_max": self.delay_max if self.delay_n else None,
        }
        for synth in self.state_synths[:1]:  # the first recurrent layer's (a stage rarely holds two)
            rec.update(synth.take())
        self.loss_sum = self.sg_loss_sum = self.cos_sum = self.head_loss_sum = 0.0
        self.loss_n = self.correct = self.seen = self.sg_loss_n = self.cos_n = self.head_loss_n = 0
        self.delay_sum = self.delay_n = 0
        return rec


class StageLogic:
    def __init__(self, cfg: RunConfig, stage: int, num_stages: int, module: nn.Module,
                 in_shape: tuple[int, ...], out_shape: tuple[int, ...],
                 snapshot_steps: frozenset[int] = frozenset(),
                 rule: Optional[UpdateRule] = None, dev: Optional[Compute] = None,
                 sync: Optional[GradientSync] = None):
        """`in_shape`, `out_shape`: one sample's, in and out (a predictor is priced against
        the stage's FLOPs on them). `rule`: the mode's unless given (bench/rules.py tries rules
        that are not modes yet). `dev`: the device and precision (default: the CPU, in the
        run's precision). What comes in (data, activations, gradients) is moved onto the
        device; what goes out comes back in the wire's dtype, in host memory. `sync`: this
        stage runs as one of several replicas, each on its share of every batch's rows
        (workers/replicas.py): each model's gradients are summed over the replicas before it
        steps, so every loss here counts for its share of the batch."""
        self.cfg = cfg
        self.sync = sync
        self.rule: UpdateRule = rule or cfg.rule
        uses_predictor = stage < num_stages - 1 and self.rule.uses_predictor
        uses_head = stage < num_stages - 1 and self.rule.uses_head
        # a recurrent layer's state at a window's end gets a synthetic gradient where the rule
        # predicts gradients, on any stage (the last one's too: its window still ends)
        synth_states = self.rule.uses_predictor and cfg.per_position and bool(recurrent_layers(module))
        # counted on the CPU, before the module moves to its device (the layout counts the same)
        own_flops = training_flops(module, in_shape) if (uses_predictor or uses_head or synth_states) else 0.0
        sizes = state_sizes(module, in_shape) if synth_states else []  # probed on the CPU too
        self.dev = dev or Compute(torch.device("cpu"), cfg.precision)
        module.to(self.dev.device)
        self.stage = stage
        self.is_first = stage == 0
        self.is_last = stage == num_stages - 1
        self.module = module
        self.lr = cfg.lr * self.rule.lr_scale(cfg.sg_update_lr_scale, self.is_last)
        self.optimizer = make_optimizer(module.parameters(), cfg.optimizer, self.lr, cfg.momentum)
        # where the layers step on predictions and on the true gradients too (--sg-true-updates),
        # each kind has its own optimiser state at its own lr: Adam's moments would otherwise mix
        # nine predicted gradients with each true one and carry the predictions into its step
        self.true_optimizer: Optional[torch.optim.Optimizer] = None
        if self.rule.uses_predictor and cfg.applies_true_gradients and not self.is_last:
            self.true_optimizer = make_optimizer(module.parameters(), cfg.optimizer, cfg.lr, cfg.momentum)
        self.sg: Optional[SyntheticGradient] = None
        self.predictor: Optional[PredictorChoice] = None
        self.sg_optimizer: Optional[torch.optim.Optimizer] = None
        if uses_predictor:
            self.predictor = choose_predictor(cfg, out_shape, own_flops)
            torch.manual_seed(cfg.seed * 7919 + stage)
            self.sg = self.predictor.build(cfg, out_shape).to(self.dev.device)
            self.sg_optimizer = make_optimizer(self.sg.parameters(), cfg.sg_optimizer, cfg.sg_lr)
        self.head: Optional[LocalHead] = None
        self.head_choice: Optional[HeadChoice] = None
        self.head_optimizer: Optional[torch.optim.Optimizer] = None
        if uses_head:
            self.head_choice = choose_head(cfg, out_shape, own_flops)
            torch.manual_seed(cfg.seed * 7919 + stage)
            self.head = self.head_choice.build(cfg, out_shape).to(self.dev.device)
            self.head_optimizer = make_optimizer(self.head.parameters(), cfg.optimizer, cfg.lr, cfg.momentum)
        self.state_synths: list[StateSynthesizer] = []
        if synth_states:
            for i, size in enumerate(sizes):
                choice = choose_predictor(cfg.replace(conditioned=False), (size,), own_flops)
                torch.manual_seed(cfg.seed * 7919 + 104729 * (i + 1) + stage)
                model = SyntheticGradient((size,), cfg.sg_model, choice.rank).to(self.dev.device)
                self.state_synths.append(StateSynthesizer(
                    model, make_optimizer(model.parameters(), cfg.sg_optimizer, cfg.sg_lr), cfg.sg_discount))
            for layer, synth in zip(recurrent_layers(module), self.state_synths):
                layer.synthesizer = synth
        self.sg_trust = 0.0  # the predictor's running cosine with the true gradients (predictor_step_scale)
        self.sg_scale = 0.0  # the running RMS of the per-sample gradients it learns (--sg-normalize)
        self.stream_epoch: Optional[int] = None  # the epoch the training streams are in
        self.latest_step = -1  # the latest step this stage has run forward
        self.loss_fn = loss_function(cfg.loss, cfg.per_position)  # the last stage's
        self.head_loss = loss_function("cross_entropy", cfg.per_position)  # local heads keep cross-entropy
        self.kept: dict[int, Kept] = {}
        self.last_true: Optional[torch.Tensor] = None  # stale mode
        self.stats = StageStats(state_synths=tuple(self.state_synths))
        self.snapshot_steps = snapshot_steps
        self.snapshots: list[dict] = []  # synthetic beside true gradient at a few steps
        self._pending: Optional[tuple] = None  # (step, h, x, keep_graph, labels) between forward and update
        self._deferred: list[dict] = []  # late true gradients held until the pending step's update

    # ------------------------------------------------------------------ what the rules use
    def step_optimizer(self, lr: Optional[float] = None, optimizer: Optional[torch.optim.Optimizer] = None) -> None:
        """Step the layers on their .grad with `optimizer` (default: the rule's, at `lr`,
        default the rule's learning rate; the true gradients' optimiser keeps --lr)."""
        self._synced(self.module)
        if optimizer is None:
            optimizer = self.optimizer
            for group in optimizer.param_groups:
                group["lr"] = self.lr if lr is None else lr
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        self._learn_states()

    def _learn_states(self) -> None:
        for synth in self.state_synths:  # the window's backward pass gave its initial state a gradient
            synth.learn()

    def begin_epoch(self, epoch: int) -> None:
        """A training step of `epoch` comes next: a new epoch restarts the streams (recurrent
        layers start from zero)."""
        if self.stream_epoch is not None and epoch != self.stream_epoch:
            reset_streams(self.module, training=True)
        self.stream_epoch = epoch

    def predict(self, h: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The synthetic-gradient model's per-sample dL/dh (batch size x dL_mean/dh), in float32
        (predictors and heads are float32 whatever the layers' precision)."""
        assert self.sg is not None
        t0 = time.perf_counter()
        with torch.no_grad():
            per_sample = self.sg(h.detach().float(), labels)
            if self.cfg.sg_normalize:
                per_sample = per_sample * self.sg_scale
        self.stats.sg_seconds += time.perf_counter() - t0
        return per_sample

    def learn_predictor(self, step: int, kept: Kept, g: torch.Tensor) -> None:
        """Score the prediction made at forward time against `g`, then train the predictor on it."""
        if self.sg is None:
            return
        if kept.sg_pred is not None:
            target = g.float() * self.batch_rows(g)
            cos = self._whole_batch_cosine(kept.sg_pred, target)
            self.stats.cos_sum += cos
            self.stats.cos_n += 1
            self.sg_trust = TRUST_DECAY * self.sg_trust + (1 - TRUST_DECAY) * cos
            if step in self.snapshot_steps:
                self._snapshot(step, kept.sg_pred, target, cos)
        self._train_sg(kept, g)

    def _whole_batch_cosine(self, predicted: torch.Tensor, true: torch.Tensor) -> float:
        """The cosine between a prediction and the true gradient over the whole batch (summed
        over a replicated stage's processes, so every replica sees the same figure)."""
        p, t = predicted.reshape(-1).double(), true.reshape(-1).double()
        sums = torch.stack([p @ t, p @ p, t @ t])
        if self.sync is not None:
            self.sync.total(sums)
        dot, pp, tt = sums.tolist()
        return dot / max(math.sqrt(pp * tt), 1e-12)

    def predictor_step_scale(self) -> float:
        """The factor on the layers' learning rate for a step on the synthetic-gradient model
        now (0: no step). A predictor that does not (yet) predict gives updates of no use, and
        Adam turns even small ones into full-size steps in their direction, so the step follows
        the evidence: the predictor's running cosine with the true gradients (an average over
        true-gradient steps, TRUST_DECAY), clamped to [0, 1] (--sg-trust-scale), and nothing
        below --sg-min-cosine."""
        if self.sg is None:
            return 1.0
        if self.cfg.sg_min_cosine > 0 and self.sg_trust < self.cfg.sg_min_cosine:
            return 0.0
        return self._trust() if self.cfg.sg_trust_scale else 1.0

    def _trust(self) -> float:
        """The predictor's running cosine with the true gradients, clamped to [0, 1]."""
        return min(max(self.sg_trust, 0.0), 1.0)

    def head_gradient(self, step: int, h: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Train the local classifier head one step on h and return dL_local/dh (mean over the
        batch): what the layers step on in mode local."""
        assert self.head is not None and self.head_optimizer is not None
        t0 = time.perf_counter()
        h_leaf = h.detach().float().requires_grad_(True)
        loss = self.head_loss(self.head(h_leaf), labels)
        require_finite(loss.detach(), "the local head's loss", self.stage, step)
        self.head_optimizer.zero_grad(set_to_none=True)
        self._shared(loss).backward()
        self._synced(self.head)
        self.head_optimizer.step()
        self.stats.head_seconds += time.perf_counter() - t0
        self.stats.head_loss_sum += loss.item()
        self.stats.head_loss_n += 1
        return h_leaf.grad

    def apply_stashed(self, step: int, kept: Kept, g: torch.Tensor) -> Optional[torch.Tensor]:
        """Step the layers on step `step`'s true gradient, taken at the weights its forward pass
        used (kept.weights), now; return its dL/dx. The delay (steps run forward since) is
        counted for the report."""
        assert kept.h is not None and kept.weights is not None
        names = list(kept.weights)
        inputs = [kept.weights[n] for n in names] + ([kept.x] if kept.x is not None else [])
        grads = torch.autograd.grad(kept.h, inputs, g, allow_unused=True)
        update = {name: require_finite(grad, f"the gradient of {name}", self.stage, step)
                  for name, grad in zip(names, grads) if grad is not None}
        if self._pending is not None:  # a step ran forward and awaits its own update: its graph
            self._deferred.append(update)  # holds these weights, so they change after it
        else:
            self._step_on(update)
        delay = self.latest_step - step
        self.stats.delay_sum += delay
        self.stats.delay_n += 1
        self.stats.delay_max = max(self.stats.delay_max, delay)
        self.stats.delay_total += delay
        self.stats.delay_total_n += 1
        return grads[-1] if kept.x is not None else None

    def _step_on(self, update: dict) -> None:
        """Step the layers on a true gradient. Where the rule steps on predictions too, with the
        true gradients' own optimiser, at --lr x (1 - the predictor's running cosine): the part
        of this gradient the predictor got right was stepped on when it was predicted, so a
        predictor that predicts well leaves its true gradients little to add (at N=1 they would
        otherwise double every step), and one that does not leaves them the whole step."""
        params = dict(self.module.named_parameters())
        for name, grad in update.items():
            params[name].grad = grad
        if self.true_optimizer is not None:
            for group in self.true_optimizer.param_groups:
                group["lr"] = self.cfg.lr * (1 - self._trust())
        self.step_optimizer(optimizer=self.true_optimizer)

    @staticmethod
    def true_dx(kept: Kept, g: torch.Tensor) -> Optional[torch.Tensor]:
        """dL/dx of the kept step's own forward pass (None on stage 0 or without a kept graph)."""
        if kept.x is None or kept.h is None:
            return None
        (dx,) = torch.autograd.grad(kept.h, kept.x, g)
        return dx

    # ------------------------------------------------------------------ helpers
    def batch_rows(self, t: torch.Tensor) -> int:
        """The rows of the whole batch `t` is (this process's part of) a tensor of."""
        return t.shape[0] if self.sync is None else t.shape[0] * self.sync.replicas

    def _shared(self, loss: torch.Tensor) -> torch.Tensor:
        """A loss (a mean over this process's rows) as its share of the whole batch's mean."""
        return loss if self.sync is None else loss * self.sync.share

    def _synced(self, model: nn.Module) -> None:
        """Sum `model`'s gradients over the replicas before it steps (nothing without them)."""
        if self.sync is not None:
            self.sync.reduce(model)

    def _input(self, x: torch.Tensor, need_dx: bool) -> torch.Tensor:
        if need_dx and not self.is_first:
            return x.detach().requires_grad_(True)
        return x

    def _forward(self, x: torch.Tensor, stash_weights: bool) -> tuple[torch.Tensor, Optional[dict]]:
        """The output, and the stashed weights it was computed with (None when not stashed)."""
        with self.dev.autocast():
            return self._forward_as_is(x, stash_weights)

    def _forward_as_is(self, x: torch.Tensor, stash_weights: bool) -> tuple[torch.Tensor, Optional[dict]]:
        if not stash_weights:
            return self.module(x), None
        clones = {name: p.clone() for name, p in self.module.named_parameters()}
        # buffers too: batch norm saves its running statistics for backward, and the next step's
        # forward updates them in place, which would make this step's graph unusable; the
        # updated copies are written back, so the statistics evolve exactly as without stashing
        buffers = {name: b.clone() for name, b in self.module.named_buffers()}
        h = functional_call(self.module, {**clones, **buffers}, (x,))
        with torch.no_grad():
            for name, b in self.module.named_buffers():
                b.copy_(buffers[name])
        return h, clones

    def _train_sg(self, kept: Kept, g: torch.Tensor) -> None:
        assert self.sg is not None and self.sg_optimizer is not None
        t0 = time.perf_counter()
        target = g.float() * self.batch_rows(g)
        if self.cfg.sg_normalize:
            target = target / self._rescale(target)
        pred = self.sg(kept.h_detached.float(), kept.labels)
        loss = F.mse_loss(pred, target)
        self.sg_optimizer.zero_grad(set_to_none=True)
        self._shared(loss).backward()
        self._synced(self.sg)
        self.sg_optimizer.step()
        self.stats.sg_seconds += time.perf_counter() - t0
        self.stats.sg_loss_sum += loss.item()
        self.stats.sg_loss_n += 1

    def _rescale(self, target: torch.Tensor) -> float:
        """Fold `target`'s RMS (over the whole batch, summed over a replicated stage's
        processes) into the running scale and return it: the predictor learns targets of about
        unit size, so its optimiser's step means the same whatever the size of the gradients
        (Adam moves a weight by about --sg-lr per step whatever the gradient's size)."""
        sums = torch.stack([target.double().pow(2).sum(),
                            torch.tensor(float(target.numel()), dtype=torch.float64, device=target.device)])
        if self.sync is not None:
            self.sync.total(sums)
        rms = math.sqrt(float(sums[0]) / max(float(sums[1]), 1.0))
        self.sg_scale = rms if self.sg_scale == 0 else SCALE_DECAY * self.sg_scale + (1 - SCALE_DECAY) * rms
        return max(self.sg_scale, 1e-30)

    def _snapshot(self, step: int, predicted: torch.Tensor, true: torch.Tensor, cos: float) -> None:
        def corner(t: torch.Tensor) -> list:
            return t.reshape(t.shape[0], -1)[:SNAPSHOT_ROWS, :SNAPSHOT_COLS].tolist()
        self.snapshots.append({"stage": self.stage, "step": step, "cosine": cos,
                               "predicted": corner(predicted), "true": corner(true)})

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
        h, stash = self._forward(x, stash_weights=keep_graph and self.rule.weights_move_before_gradient)
        require_finite(h, "the output", self.stage, step)
        self.latest_step = step
        if keep_graph or self.cfg.bootstrap:
            self._bound_kept(step)
            self.kept[step] = Kept(x if need_dx and not self.is_first else None,
                                   h if keep_graph else None, h.detach(), labels, weights=stash)
        self._pending = (step, h, x, keep_graph, labels)
        return self.dev.leave(h)

    def local_update(self, step: int) -> Optional[torch.Tensor]:
        """Step now on what the rule gives, without waiting. Returns a bootstrapped dL/dx for
        the stage before, when bootstrapping on a step whose true gradient is not coming."""
        try:
            dx = self._local_update(step)
            return None if dx is None else self.dev.leave(dx)
        finally:
            while self._deferred:  # late true gradients that arrived during this step
                self._step_on(self._deferred.pop(0))

    def _local_update(self, step: int) -> Optional[torch.Tensor]:
        pstep, h, x, keep_graph, labels = self._pending
        assert pstep == step, "local_update must follow forward of the same step"
        self._pending = None
        grad = self.rule.local_gradient(self, step, h, labels, self.kept.get(step))
        if grad is None:
            return None
        scale = self.predictor_step_scale()
        if scale <= 0:
            self.stats.untrusted_steps += 1
            if not (self.cfg.bootstrap or self.state_synths):  # nothing to step on, nothing to send back
                return None
        require_finite(grad, "the local gradient", self.stage, step)
        h.backward(grad.to(h.dtype), retain_graph=keep_graph)
        if scale > 0:
            self.step_optimizer(self.lr * scale)
        else:  # a bootstrapped dL/dx still goes back, and the state predictors learn from the
            self.optimizer.zero_grad(set_to_none=True)  # window; the layers keep their weights
            self._learn_states()
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
        dx = self.rule.on_gradient(self, step, kept, g, true_grad)
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
        self._shared(loss).backward()
        self.step_optimizer()
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
        """Everything training needs to continue: layers, optimizer, synthetic-gradient model and
        its optimizer, and (stale mode) the gradient being reused. Raises NonFinite rather than
        hand over a poisoned state (a checkpoint is only ever written from this)."""
        state = {"module": self.module.state_dict(), "optimizer": self.optimizer.state_dict()}
        if self.true_optimizer is not None:
            state["true_optimizer"] = self.true_optimizer.state_dict()
        if self.sg is not None and self.sg_optimizer is not None:
            state["sg"] = self.sg.state_dict()
            state["sg_optimizer"] = self.sg_optimizer.state_dict()
        if self.head is not None and self.head_optimizer is not None:
            state["head"] = self.head.state_dict()
            state["head_optimizer"] = self.head_optimizer.state_dict()
        if self.last_true is not None:
            state["last_true"] = self.last_true
        if self.sg is not None:
            state["sg_trust"] = self.sg_trust
            state["sg_scale"] = self.sg_scale
        layers = recurrent_layers(self.module)
        if layers:  # where the training streams are: their epoch, and each layer's carried state
            state["streams"] = {"epoch": self.stream_epoch, "carried": [layer.carried() for layer in layers],
                                "synths": [synth.state_dict() for synth in self.state_synths]}
        for t in _tensors(state):
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise NonFinite(f"stage {self.stage}: its state holds NaN or infinite values; "
                                f"not saved (training diverged: lower --lr or --sg-lr)")
        return state

    def load_state_dict(self, state: dict) -> None:
        """The inverse of state_dict (resuming from a checkpoint)."""
        self.module.load_state_dict(state["module"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.true_optimizer is not None and "true_optimizer" in state:
            self.true_optimizer.load_state_dict(state["true_optimizer"])
        if self.sg is not None and self.sg_optimizer is not None:
            self.sg.load_state_dict(state["sg"])
            self.sg_optimizer.load_state_dict(state["sg_optimizer"])
        if self.head is not None and self.head_optimizer is not None:
            self.head.load_state_dict(state["head"])
            self.head_optimizer.load_state_dict(state["head_optimizer"])
        self.sg_trust = float(state.get("sg_trust", self.sg_trust))
        self.sg_scale = float(state.get("sg_scale", self.sg_scale))
        last_true = state.get("last_true")
        self.last_true = None if last_true is None else self.dev.arrive(last_true)
        streams = state.get("streams")
        if streams is not None:
            self.stream_epoch = streams["epoch"]
            for layer, carried in zip(recurrent_layers(self.module), streams["carried"]):
                layer.carry(None if carried is None else
                            tuple(map(self.dev.arrive, carried)) if isinstance(carried, (tuple, list))
                            else self.dev.arrive(carried))
            for synth, saved in zip(self.state_synths, streams["synths"]):
                synth.load_state_dict(saved)


@dataclass(frozen=True)
class StagePlan:
    """Where a stage sits in the network."""
    units: tuple[int, int]  # [first, end) unit indices
    in_shape: tuple[int, ...]  # one sample's, in and out
    out_shape: tuple[int, ...]
    num_classes: int
    num_stages: int


def build_stage(cfg: RunConfig, stage: int, total_steps: int, dev: Compute,
                sync: Optional[GradientSync] = None) -> tuple[StageLogic, StagePlan]:
    """Stage `stage`'s logic with its layers, made the same way in every process that runs it
    (a stage worker, each of its replicas): the whole network is built from the seed, so the
    stage's weights are backprop's."""
    first_unit, end_unit = stage_bounds(cfg)[stage]
    units = build_units(cfg)
    shapes = stage_io_shapes(cfg, units)
    in_shape, out_shape = shapes[stage]
    num_stages = len(cfg.stage_groups)
    logic = StageLogic(cfg, stage, num_stages, nn.Sequential(*units[first_unit:end_unit]), in_shape, out_shape,
                       snapshot_steps=snapshot_steps(cfg, total_steps), dev=dev, sync=sync)
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
