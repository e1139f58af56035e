"""The parts an update rule is made of (common/modes.py), each owning its model, its optimiser,
its state in a checkpoint, its figures in the metrics, and the time it costs its stage:

- `Layers`: the stage's own layers and the optimiser the rule steps them with;
- `Predictor`: a synthetic-gradient model with its running statistics (the cosine with the true
  gradients it is trusted by, the scale of the gradients it learns);
- `Head`: a small classifier on the stage's output (a local loss);
- `Stash`: the weights a step's forward pass used, kept until its true gradient comes back, and
  true-gradient updates held until the step in hand has taken its own.

A stage (workers/stage.py) builds the parts its rule names from the helper models its layout
chose (common/costs.py `Helpers`, carried in START), hands them to the rule, and saves and reports whatever
the parts hold without knowing which rule it runs. Every part is pure torch: testable alone.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Protocol, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from synthgrad.common.costs import HeadChoice, PredictorChoice
from synthgrad.common.models import LocalHead, SyntheticGradient, loss_function, make_optimizer
from synthgrad.common.recurrent import recurrent_layers
from synthgrad.common.reports import RunFailed

TRUST_DECAY = 0.8  # the predictor's running cosine: each true-gradient step's weighs 1 - this
SCALE_DECAY = 0.9  # the true gradients' running RMS (--sg-normalize): each target's weighs 1 - this
SNAPSHOT_ROWS, SNAPSHOT_COLS = 16, 64  # samples x units kept per snapshot (for a heatmap)


class NonFinite(RunFailed):
    """Training produced NaN or Inf. The policy: the run fails here, naming the stage and step,
    before the value updates a weight or travels on, so no checkpoint ever holds it."""


def require_finite(t: torch.Tensor, what: str, stage: int, step: int) -> torch.Tensor:
    if not bool(torch.isfinite(t).all()):
        raise NonFinite(f"stage {stage}: {what} of step {step} is NaN or infinite (training diverged; "
                        f"lower --lr or --sg-lr, or check the data); it was not used")
    return t


class Sync(Protocol):
    """A replicated stage's gradient sum (workers/sync.py GradientSync)."""
    replicas: int
    share: float

    def total(self, t: torch.Tensor) -> None: ...

    def reduce(self, model: nn.Module) -> None: ...


@dataclass
class Share:
    """This process's part of a stage that runs as several replicas, each on its rows of every
    batch (workers/replicas.py); alone (sync None) the whole."""
    sync: Optional[Sync] = None

    def rows(self, t: torch.Tensor) -> int:
        """The rows of the whole batch `t` is (this process's part of) a tensor of."""
        return t.shape[0] if self.sync is None else t.shape[0] * self.sync.replicas

    def loss(self, loss: torch.Tensor) -> torch.Tensor:
        """A loss (a mean over this process's rows) as its share of the whole batch's mean."""
        return loss if self.sync is None else loss * self.sync.share

    def reduce(self, model: nn.Module) -> None:
        """Sum `model`'s gradients over the replicas before it steps (nothing without them)."""
        if self.sync is not None:
            self.sync.reduce(model)

    def total(self, sums: torch.Tensor) -> None:
        if self.sync is not None:
            self.sync.total(sums)


# ---------------------------------------------------------------------------- layers
class Layers:
    """The stage's layers and the optimiser its rule steps them with, at the rule's learning
    rate. `after_step` runs after every step of the layers (a recurrent stage's state
    predictors learn from the window the step's backward pass went through)."""
    key = "layers"

    def __init__(self, module: nn.Module, optimizer: torch.optim.Optimizer, lr: float, share: Share,
                 after_step: Any = None):
        self.module = module
        self.optimizer = optimizer
        self.lr = lr
        self.share = share
        self.after_step = after_step or (lambda: None)

    def step(self, lr: Optional[float] = None, optimizer: Optional[torch.optim.Optimizer] = None) -> None:
        """Step the layers on their .grad with `optimizer` (default: the rule's, at `lr`, default
        the rule's learning rate; another optimiser keeps the rate it was given)."""
        self.share.reduce(self.module)
        if optimizer is None:
            optimizer = self.optimizer
            for group in optimizer.param_groups:
                group["lr"] = self.lr if lr is None else lr
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        self.after_step()

    def skip(self) -> None:
        """Drop the gradients of a step not taken (the state predictors still learn)."""
        self.optimizer.zero_grad(set_to_none=True)
        self.after_step()

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    def set_grads(self, update: dict[str, torch.Tensor]) -> None:
        params = dict(self.module.named_parameters())
        for name, grad in update.items():
            params[name].grad = grad

    def state_dict(self) -> dict:
        return {"module": self.module.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])
        self.optimizer.load_state_dict(state["optimizer"])


# ---------------------------------------------------------------------------- predictor
@dataclass
class PredictorStats:
    loss_sum: float = 0.0
    loss_n: int = 0
    cos_sum: float = 0.0
    cos_n: int = 0
    untrusted_steps: int = 0  # steps on the predictor not taken (step_scale gave 0; cumulative)
    seconds: float = 0.0  # predicting and training (cumulative)

    def take(self) -> dict:
        rec = {"sg_loss": self.loss_sum / self.loss_n if self.loss_n else None,
               "sg_cosine": self.cos_sum / self.cos_n if self.cos_n else None,
               "untrusted_steps": self.untrusted_steps}
        self.loss_sum = self.cos_sum = 0.0
        self.loss_n = self.cos_n = 0
        return rec


@dataclass(frozen=True)
class PredictorSettings:
    """What the run's options say about stepping on and training a predictor."""
    normalize: bool = False  # --sg-normalize: learn gradients over their running RMS
    min_cosine: float = 0.0  # --sg-min-cosine: no step on it below this running cosine
    trust_scale: bool = True  # --sg-trust-scale: the step scales with the running cosine
    correction_min_cosine: float = 0.3  # --sg-correction-min-cosine: the head prior's bar
    replay: int = 0  # --sg-replay: earlier true gradients stepped on again with each new one
    tangent: bool = False  # --sg-correction-tangent: a correction loses its part along the output
    center: bool = False  # --sg-correction-center: a correction loses its mean over the batch
    on_weights: bool = True  # --sg-correction-weights: a correction is scored on the layers' gradients
    weights_every: int = 1  # --sg-correction-weights-every: on every this-many-th true gradient at the bar
    learn_weights: float = 0.0  # --sg-learn-weights: the share of the weights' error in what it learns
    gain: str = "fit"  # --sg-correction-gain: a correction's size on the weights, fit or direction

    @classmethod
    def of(cls, cfg: Any) -> "PredictorSettings":
        return cls(cfg.sg_normalize, cfg.sg_min_cosine, cfg.sg_trust_scale, cfg.sg_correction_min_cosine,
                   cfg.sg_replay, cfg.sg_correction_tangent, cfg.sg_correction_center,
                   cfg.sg_correction_weights and cfg.sg_prior == "head",  # a correction's option
                   cfg.sg_correction_weights_every,
                   cfg.sg_learn_weights if cfg.sg_prior == "head" else 0.0,
                   cfg.sg_correction_gain)


@dataclass(frozen=True)
class WeightProducts:
    """Dot products of the layers' gradients that a stage's output gradients give
    (common/modes.py weight_products): P a correction's, T its target's (the true gradient less
    the head's), and, where the gain follows the step's direction, H the head's own."""
    pt: float
    pp: float
    tt: float
    head: Optional[tuple[float, float, float]] = None  # H.H, H.P, H.T


def direction_gain(pt: float, pp: float, hh: float, hp: float, ht: float) -> float:
    """The gain c in [0, 1] at which the step H + cP points nearest the true gradient
    E = H + T, from the products of their weights' gradients (--sg-correction-gain direction).
    Adam steps by direction more than by size: a correction that fits its target in the least-
    squares sense can still turn the step away from E. Where the head's gradient is many times
    E's size, the target is mostly minus the head, easy to predict, and taking it shrinks the
    head and leaves the prediction's error a larger share of the step (the deeper CNN at K=4,
    docs/results.md). cos(c) is (H.E + c P.E) / |H + cP|, up to |E|; its one stationary point
    and the ends of [0, 1] are the candidates, and a tie goes to the smaller gain."""
    he, pe = hh + ht, hp + pt

    def cosine(c: float) -> float:
        size = hh + 2 * c * hp + c * c * pp
        return (he + c * pe) / math.sqrt(size) if size > 0 else -math.inf
    candidates = [0.0, 1.0]
    turn = pe * hp - he * pp
    if turn != 0:
        c = (he * hp - pe * hh) / turn
        if 0 < c < 1:
            candidates.append(c)
    return max(candidates, key=lambda c: (cosine(c), -c))


def _folded(trust: float, fit: tuple[float, float], cos: float, dot: float,
            pp: float) -> tuple[float, tuple[float, float]]:
    """A running cosine and running (p.t, p.p) with one more true gradient's folded in."""
    return (TRUST_DECAY * trust + (1 - TRUST_DECAY) * cos,
            (TRUST_DECAY * fit[0] + (1 - TRUST_DECAY) * dot, TRUST_DECAY * fit[1] + (1 - TRUST_DECAY) * pp))


class Predictor:
    """A synthetic-gradient model of the stage's output (DNI): it predicts dL/dh per sample
    now, and learns from each true (or bootstrapped) gradient that comes back later."""
    key = "predictor"

    def __init__(self, model: SyntheticGradient, optimizer: torch.optim.Optimizer, choice: PredictorChoice,
                 settings: PredictorSettings, share: Share, snapshot_steps: frozenset[int] = frozenset()):
        self.model = model
        self.optimizer = optimizer
        self.choice = choice
        self.settings = settings
        self.share = share
        self.snapshot_steps = snapshot_steps
        self.trust = 0.0  # the running cosine with the true gradients
        self.fit = (0.0, 0.0)  # running means of prediction . target and prediction . prediction
        # the same two on the gradients of the stage's weights (--sg-correction-weights)
        self.weight_trust = 0.0
        self.weight_fit = (0.0, 0.0)
        self.weight_head = (0.0, 0.0, 0.0)  # running H.H, H.P, H.T there (--sg-correction-gain direction)
        self.weight_asks = 0  # true gradients that reached the outputs' bar (every K-th is measured)
        self.scale = 0.0  # the running RMS of the per-sample gradients it learns (--sg-normalize)
        self.stats = PredictorStats()
        self.snapshots: list[dict] = []  # predicted beside true gradient at a few steps
        # --sg-replay: the last few (h, labels, per-sample true gradient), oldest first
        self.memory: list[tuple] = []

    @classmethod
    def build(cls, choice: PredictorChoice, cfg: Any, out_shape: Sequence[int], seed: int,
              device: torch.device, share: Share, snapshot_steps: frozenset[int] = frozenset()) -> "Predictor":
        torch.manual_seed(seed)
        model = choice.build(cfg, out_shape).to(device)
        return cls(model, make_optimizer(model.parameters(), cfg.sg_optimizer, cfg.sg_lr), choice,
                   PredictorSettings.of(cfg), share, snapshot_steps)

    def predict(self, h: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Per-sample dL/dh (batch size x dL_mean/dh), in float32 (predictors and heads are
        float32 whatever the layers' precision)."""
        t0 = time.perf_counter()
        with torch.no_grad():
            per_sample = self.model(h.detach().float(), labels)
            if self.settings.normalize:
                per_sample = per_sample * self.scale
        self.stats.seconds += time.perf_counter() - t0
        return per_sample

    def clamped_trust(self) -> float:
        return min(max(self.trust, 0.0), 1.0)

    def step_scale(self) -> float:
        """The factor on the layers' learning rate for the step on a prediction now (0: none;
        counted as a step not taken, so ask once a step).
        A predictor that does not (yet) predict gives updates of no use, and Adam turns even
        small ones into full-size steps in their direction, so the step follows the evidence:
        the running cosine with the true gradients, clamped to [0, 1] (--sg-trust-scale), and
        nothing below --sg-min-cosine."""
        return self._taken(self.clamped_trust())

    def correction_scale(self) -> float:
        """step_scale for a prediction added to another gradient (the head prior's correction):
        the least-squares gain of the predictions on their targets, E[p.t] / E[p.p], clamped
        to [0, 1]. There the size matters as much as the direction: at the cosine alone, an
        oversized correction that barely predicts is noise that swamps the head's gradient. The
        gain is the scale at which the correction's expected squared error is least, so an
        oversized one counts for little. A correction whose running cosine is below
        --sg-correction-min-cosine is not taken at all: the gain is a ratio of running means
        over a few true gradients, so a predictor that learns nothing still adds noise, and a
        weakly predicting one can feed itself (the small GPT, docs/results.md)."""
        dot, pp = self.fit
        if not self.judged_on_weights_alone and (self.trust < self.settings.correction_min_cosine or pp <= 0):
            return self._taken(0.0)
        if self.settings.on_weights:  # the bar again, and the gain, where the step acts
            dot, pp = self.weight_fit
            if self.weight_trust < self.settings.correction_min_cosine or pp <= 0:
                return self._taken(0.0)
            if self.settings.gain == "direction":
                return self._taken(direction_gain(dot, pp, *self.weight_head))
        return self._taken(min(max(dot / pp, 0.0), 1.0))

    @property
    def judged_on_weights_alone(self) -> bool:
        """A predictor that learns the weights' error (--sg-learn-weights) is not asked to
        predict the output's gradient well, only what it gives the weights: its corrections are
        measured and judged there alone, on every K-th true gradient."""
        return self.settings.on_weights and self.settings.learn_weights > 0

    def _taken(self, evidence: float) -> float:
        """The step's scale given the evidence, as the run's options say (--sg-trust-scale,
        --sg-min-cosine); a scale of 0 counts as a step not taken."""
        if self.settings.min_cosine > 0 and self.trust < self.settings.min_cosine:
            scale = 0.0
        else:
            scale = evidence if self.settings.trust_scale else 1.0
        if scale <= 0:
            self.stats.untrusted_steps += 1  # asked once a step: a step on it not taken
        return scale

    def score(self, step: int, predicted: torch.Tensor, g: torch.Tensor,
              on_weights: Optional[Callable[[torch.Tensor, torch.Tensor], WeightProducts]] = None) -> float:
        """The cosine of a prediction made at forward time with the gradient `g` (a mean over
        the batch) that came back for it, folded into the running trust. `on_weights`: the
        products of the layers' gradients that output gradients p and t (means over the batch)
        give, and the head's where asked; where given, and the outputs' running cosine is at
        least --sg-correction-min-cosine, the same running cosine and gain are kept there too
        (weight_trust, weight_fit, weight_head), which correction_scale then reads. The records
        report the outputs' cosine."""
        target = g.float() * self.share.rows(g)
        dot, pp, tt = self._whole_batch_products(predicted, target)
        cos = dot / max(math.sqrt(pp * tt), 1e-12)
        self.stats.cos_sum += cos
        self.stats.cos_n += 1
        self.trust, self.fit = _folded(self.trust, self.fit, cos, dot, pp)
        if on_weights is not None and (self.trust >= self.settings.correction_min_cosine
                                       or self.judged_on_weights_alone):
            # measured only where the outputs' cosine would take the correction (a predictor
            # judged on the weights alone: always), and there on every K-th (two backward
            # passes a time): below the bar it is not taken whatever the weights say; the first
            # time at the bar it is always measured
            if self.weight_asks % self.settings.weights_every == 0:
                w = on_weights(predicted / self.share.rows(predicted), g)
                self.weight_trust, self.weight_fit = _folded(self.weight_trust, self.weight_fit,
                                                             w.pt / max(math.sqrt(w.pp * w.tt), 1e-30), w.pt, w.pp)
                if w.head is not None:
                    self.weight_head = tuple(TRUST_DECAY * old + (1 - TRUST_DECAY) * new
                                             for old, new in zip(self.weight_head, w.head))
            self.weight_asks += 1
        if step in self.snapshot_steps:
            def corner(t: torch.Tensor) -> list:
                return t.reshape(t.shape[0], -1)[:SNAPSHOT_ROWS, :SNAPSHOT_COLS].tolist()
            self.snapshots.append({"step": step, "cosine": cos, "predicted": corner(predicted),
                                   "true": corner(target)})
        return cos

    def learn(self, h: torch.Tensor, labels: torch.Tensor, g: torch.Tensor,
              through_weights: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> None:
        """One step of the predictor towards `g` (a mean over the batch) at the output `h`; with
        --sg-replay R, then one step on each of the R true gradients before it, oldest first. A
        true gradient comes back one step in N, and one step on each is too little for a
        predictor to learn a stage's gradient: offline, the same predictors learn it from the
        same number of pairs seen several times (bench/predictability.py, docs/results.md).
        `through_weights`: r -> J J^T r for this step's stage (J: its output's Jacobian in its
        weights), given where it learns on the weights' error too (--sg-learn-weights)."""
        t0 = time.perf_counter()
        per_sample = g.float() * self.share.rows(g)
        scale = self._rescale(per_sample) if self.settings.normalize else 1.0
        loss = self._step(h.float(), labels, per_sample / scale,
                          through_weights if self.settings.learn_weights > 0 else None)
        for old_h, old_labels, old_target in self.memory:  # in today's units
            self._step(old_h, old_labels, old_target / scale)
        if self.settings.replay:
            kept = (h.detach().float().clone(), None if labels is None else labels.clone(), per_sample)
            self.memory = [*self.memory, kept][-self.settings.replay:]
        self.stats.seconds += time.perf_counter() - t0
        self.stats.loss_sum += loss
        self.stats.loss_n += 1

    def _step(self, h: torch.Tensor, labels: torch.Tensor, target: torch.Tensor,
              through_weights: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> float:
        """One optimiser step on the squared error of the prediction at `h`; with
        `through_weights`, on a blend of it and the error of the weights' gradients it gives,
        ||J^T (p - t)||^2, whose gradient in p is J J^T (p - t). The layers step on J^T of
        what they are given, and an error the predictor makes alike over the batch adds up
        there while the output's squared error hardly counts it (docs/results.md). The weights'
        term is scaled to the output's error's size: a direction, so the blend's share
        (--sg-learn-weights) means the same at any scale of the stage's Jacobian."""
        out = self.model(h, labels)
        loss = F.mse_loss(out, target)
        self.optimizer.zero_grad(set_to_none=True)
        if through_weights is None:
            self.share.loss(loss).backward()
        else:
            error = out.detach() - target
            in_weights = through_weights(error).to(error.dtype)
            in_weights = in_weights * (error.norm() / in_weights.norm().clamp_min(1e-30))
            share = self.settings.learn_weights
            blend = (1 - share) * error + share * in_weights
            out.backward(self.share.loss(blend * (2.0 / out.numel())))
        self.share.reduce(self.model)
        self.optimizer.step()
        return loss.item()

    def _whole_batch_products(self, predicted: torch.Tensor, true: torch.Tensor) -> tuple[float, float, float]:
        """p.t, p.p and t.t over the whole batch (summed over a replicated stage's processes, so
        every replica sees the same figures)."""
        p, t = predicted.reshape(-1).double(), true.reshape(-1).double()
        sums = torch.stack([p @ t, p @ p, t @ t])
        self.share.total(sums)
        dot, pp, tt = sums.tolist()
        return dot, pp, tt

    def _rescale(self, target: torch.Tensor) -> float:
        """Fold `target`'s RMS (over the whole batch) into the running scale and return it: the
        predictor learns targets of about unit size, so its optimiser's step means the same
        whatever the size of the gradients (Adam moves a weight by about --sg-lr per step)."""
        sums = torch.stack([target.double().pow(2).sum(),
                            torch.tensor(float(target.numel()), dtype=torch.float64, device=target.device)])
        self.share.total(sums)
        rms = math.sqrt(float(sums[0]) / max(float(sums[1]), 1.0))
        self.scale = rms if self.scale == 0 else SCALE_DECAY * self.scale + (1 - SCALE_DECAY) * rms
        return max(self.scale, 1e-30)

    def state_dict(self) -> dict:
        state = {"sg": self.model.state_dict(), "sg_optimizer": self.optimizer.state_dict(),
                 "sg_trust": self.trust, "sg_scale": self.scale, "sg_fit": list(self.fit)}
        if self.settings.on_weights:
            state.update(sg_weight_trust=self.weight_trust, sg_weight_fit=list(self.weight_fit),
                         sg_weight_asks=self.weight_asks)
            if self.settings.gain == "direction":
                state["sg_weight_head"] = list(self.weight_head)
        if self.settings.replay:
            state["sg_memory"] = [list(pair) for pair in self.memory]
        return state

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["sg"])
        self.optimizer.load_state_dict(state["sg_optimizer"])
        device = next(self.model.parameters()).device
        kept = state.get("sg_memory", []) if self.settings.replay else []
        self.memory = [tuple(None if t is None else t.to(device) for t in pair)
                       for pair in kept][-self.settings.replay:]
        self.trust = float(state.get("sg_trust", self.trust))
        self.scale = float(state.get("sg_scale", self.scale))
        dot, pp = state.get("sg_fit", self.fit)
        self.fit = (float(dot), float(pp))
        self.weight_trust = float(state.get("sg_weight_trust", self.weight_trust))
        dot, pp = state.get("sg_weight_fit", self.weight_fit)
        self.weight_fit = (float(dot), float(pp))
        self.weight_asks = int(state.get("sg_weight_asks", self.weight_asks))
        self.weight_head = tuple(float(v) for v in state.get("sg_weight_head", self.weight_head))

    def take_stats(self) -> dict:
        return self.stats.take()

    @property
    def seconds(self) -> float:
        return self.stats.seconds


# ---------------------------------------------------------------------------- head
@dataclass
class HeadStats:
    loss_sum: float = 0.0
    loss_n: int = 0
    seconds: float = 0.0  # training the head (cumulative)

    def take(self) -> dict:
        rec = {"head_loss": self.loss_sum / self.loss_n if self.loss_n else None}
        self.loss_sum, self.loss_n = 0.0, 0
        return rec


class Head:
    """A small classifier on the stage's output (DGL, Belilovsky et al. 2019): its loss on the
    labels that travel with the activations is the stage's local objective."""
    key = "head"

    def __init__(self, model: LocalHead, optimizer: torch.optim.Optimizer, choice: HeadChoice, share: Share,
                 per_position: bool = False, stage: int = 0, reconstruct: float = 0.0):
        self.stage = stage
        self.reconstruct = reconstruct  # the decoder's loss weight (where the choice built one)
        self.model = model
        self.optimizer = optimizer
        self.choice = choice
        self.share = share
        self.loss_fn = loss_function("cross_entropy", per_position)  # heads keep cross-entropy
        self.stats = HeadStats()

    @classmethod
    def build(cls, choice: HeadChoice, cfg: Any, out_shape: Sequence[int], seed: int, device: torch.device,
              share: Share, stage: int = 0) -> "Head":
        torch.manual_seed(seed)
        model = choice.build(cfg, out_shape, seed).to(device)
        optimizer = make_optimizer(model.parameters(), cfg.optimizer, cfg.lr * choice.lr_scale, cfg.momentum)
        return cls(model, optimizer, choice, share,
                   cfg.per_position, stage, cfg.head_reconstruct)

    def gradient(self, step: int, h: torch.Tensor, labels: torch.Tensor,
                 x: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Train the head one step on h and return dL_local/dh (a mean over the batch). `x`: the
        stage's input, which a head with a decoder also learns to reconstruct from h."""
        t0 = time.perf_counter()
        h_leaf = h.detach().float().requires_grad_(True)
        loss = self.loss_fn(self.model(h_leaf), labels)
        if self.model.decoder is not None and x is not None:
            loss = loss + self.reconstruct * F.mse_loss(self.model.decoder(h_leaf), x.detach().float())
        require_finite(loss.detach(), "the local head's loss", self.stage, step)
        self.optimizer.zero_grad(set_to_none=True)
        self.share.loss(loss).backward()
        self.share.reduce(self.model)
        self.optimizer.step()
        self.stats.seconds += time.perf_counter() - t0
        self.stats.loss_sum += loss.item()
        self.stats.loss_n += 1
        assert h_leaf.grad is not None
        return h_leaf.grad

    def state_dict(self) -> dict:
        return {"head": self.model.state_dict(), "head_optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["head"])
        self.optimizer.load_state_dict(state["head_optimizer"])

    def take_stats(self) -> dict:
        return self.stats.take()

    @property
    def seconds(self) -> float:
        return self.stats.seconds


# ---------------------------------------------------------------------------- stash
@dataclass
class Rerun:
    """What a kept step's forward pass needs to run again at other weights and be the same
    function of them: its input and the random state it began with (dropout draws the same
    masks), and the state its recurrent layers' streams carried in. A finite difference
    through it is the forward-mode product J u that double backward cannot give where an op's
    backward has no derivative (CPU flash attention)."""
    x: torch.Tensor
    cpu_rng: torch.Tensor
    device: torch.device
    device_rng: Optional[torch.Tensor] = None
    streams: list = field(default_factory=list)  # each recurrent layer's carried state

    @classmethod
    def before(cls, x: torch.Tensor, device: torch.device, module: nn.Module) -> "Rerun":
        """Taken just before `module`'s forward pass it reruns."""
        on_cuda = device.type == "cuda"
        return cls(x.detach(), torch.get_rng_state(), device, torch.cuda.get_rng_state(device) if on_cuda else None,
                   [layer.carried() for layer in recurrent_layers(module)])

    def output(self, module: nn.Module, weights: dict[str, torch.Tensor]) -> torch.Tensor:
        """`module`'s output on the kept input at `weights`, in float32 whatever the run's
        precision (the product it serves is taken on differences of it). Its buffers, random
        state and streams are as they were before: the run goes on as without it."""
        buffers = {name: b.clone() for name, b in module.named_buffers()}
        devices = [self.device] if self.device_rng is not None else []
        layers = recurrent_layers(module)
        now = [layer.carried() for layer in layers]
        try:
            with torch.random.fork_rng(devices=devices), torch.no_grad():
                torch.set_rng_state(self.cpu_rng)
                if self.device_rng is not None:
                    torch.cuda.set_rng_state(self.device_rng, self.device)
                for layer, state in zip(layers, self.streams):
                    layer.carry(state)
                return functional_call(module, {**weights, **buffers}, (self.x,)).float()
        finally:
            for layer, state in zip(layers, now):
                layer.carry(state)


@dataclass
class DelayStats:
    """Steps between a step's forward pass and its gradient's update."""
    total: int = 0  # cumulative, for the run's mean
    total_n: int = 0
    window_sum: int = 0  # since the last report
    window_n: int = 0
    max: int = 0  # cumulative

    def add(self, delay: int) -> None:
        self.window_sum += delay
        self.window_n += 1
        self.max = max(self.max, delay)
        self.total += delay
        self.total_n += 1

    def take(self) -> dict:
        rec = {"gradient_delay_mean": self.window_sum / self.window_n if self.window_n else None,
               "gradient_delay_max": self.max if self.window_n else None}
        self.window_sum = self.window_n = 0
        return rec


@dataclass
class Stash:
    """Weight stashing (PipeDream; DDG, Huo et al. 2018): a step whose true gradient comes back
    after the weights have moved runs forward on differentiable clones of them, so its kept
    graph still holds the weights it used and the gradient it gets is exactly that forward
    pass's. When the gradient comes back the update is applied now, or, while a later step has
    run forward and not yet taken its own update (its graph holds the current weights), held
    until it has. `optimizer`: the true gradients' own optimiser state (None: the rule's), at
    `lr`; `trust`: a predictor whose running cosine takes its part of the step (the part of a
    true gradient the predictor got right was stepped on when predicted)."""
    layers: Layers
    optimizer: Optional[torch.optim.Optimizer] = None
    lr: float = 0.0
    trust: Optional[Predictor] = None
    stage: int = 0
    held: list[dict] = field(default_factory=list)
    delays: DelayStats = field(default_factory=DelayStats)
    key = "stash"

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """The output of the layers on clones of their weights, and the clones."""
        module = self.layers.module
        clones = {name: p.clone() for name, p in module.named_parameters()}
        # buffers too: batch norm saves its running statistics for backward, and the next step's
        # forward updates them in place, which would make this step's graph unusable; the
        # updated copies are written back, so the statistics evolve exactly as without stashing
        buffers = {name: b.clone() for name, b in module.named_buffers()}
        h = functional_call(module, {**clones, **buffers}, (x,))
        with torch.no_grad():
            for name, b in module.named_buffers():
                b.copy_(buffers[name])
        return h, clones

    def apply(self, step: int, weights: dict, h: torch.Tensor, x: Optional[torch.Tensor], g: torch.Tensor,
              latest_step: int, hold: bool) -> Optional[torch.Tensor]:
        """Step the layers on step `step`'s gradient `g`, taken at the weights its forward pass
        used (`weights`, with output `h` and input leaf `x`); held while `hold`. Returns dL/dx."""
        names = list(weights)
        inputs = [weights[n] for n in names] + ([x] if x is not None else [])
        grads = torch.autograd.grad(h, inputs, g, allow_unused=True)
        update = {name: require_finite(grad, f"the gradient of {name}", self.stage, step)
                  for name, grad in zip(names, grads) if grad is not None}
        if hold:
            self.held.append(update)
        else:
            self._step_on(update)
        self.delays.add(latest_step - step)
        return grads[-1] if x is not None else None

    def release(self) -> None:
        """The step in hand has taken its update: apply what was held for it."""
        while self.held:
            self._step_on(self.held.pop(0))

    def _step_on(self, update: dict) -> None:
        self.layers.set_grads(update)
        if self.optimizer is not None:
            scale = 1 - self.trust.clamped_trust() if self.trust is not None else 1.0
            for group in self.optimizer.param_groups:
                group["lr"] = self.lr * scale
        self.layers.step(optimizer=self.optimizer)

    def state_dict(self) -> dict:
        return {} if self.optimizer is None else {"true_optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if self.optimizer is not None and "true_optimizer" in state:
            self.optimizer.load_state_dict(state["true_optimizer"])

    def take_stats(self) -> dict:
        return self.delays.take()

    seconds = 0.0


# ---------------------------------------------------------------------------- a rule's parts
@dataclass
class Parts:
    """What a stage's rule is made of: its layers always; a predictor, a head and a stash where
    the rule names them (common/modes.py). A stage saves, loads and reports them all alike."""
    layers: Layers
    share: Share
    predictor: Optional[Predictor] = None
    head: Optional[Head] = None
    stash: Optional[Stash] = None

    def helpers(self) -> list[Any]:
        """The parts besides the layers, in a fixed order."""
        return [p for p in (self.predictor, self.head, self.stash) if p is not None]

    def state_dict(self) -> dict:
        state = self.layers.state_dict()
        for part in self.helpers():
            state.update(part.state_dict())
        return state

    def load_state_dict(self, state: dict) -> None:
        self.layers.load_state_dict(state)
        for part in self.helpers():
            part.load_state_dict(state)

    def take_stats(self) -> dict:
        """Each part's figures since the last report (those a part does not have: None)."""
        rec: dict = {"sg_loss": None, "sg_cosine": None, "untrusted_steps": 0, "head_loss": None,
                     "gradient_delay_mean": None, "gradient_delay_max": None}
        for part in self.helpers():
            rec.update(part.take_stats())
        return rec

    def totals(self) -> dict:
        """Cumulative figures for the run's summary: seconds each helper cost, late updates."""
        delays = self.stash.delays if self.stash is not None else DelayStats()
        return {"sg_s": self.predictor.seconds if self.predictor is not None else 0.0,
                "head_s": self.head.seconds if self.head is not None else 0.0,
                "gradient_delay_mean": delays.total / delays.total_n if delays.total_n else None,
                "gradient_delay_max": delays.max if delays.total_n else None}
