"""What each part of a run costs per training sample, in floating-point operations: the input
of partitioning (`--stages K`) and placement (`--placement`).

Counted with torch's per-op FLOP formulas (torch.utils.flop_counter, the counts FlopCounterMode
gives) on one forward and backward pass, so any module counts the
same way (matmuls and convolutions; elementwise work such as batch norm and ReLU is not counted,
which is small beside a layer's matmul but makes tiny layers look cheaper than they run). A
stage that predicts its gradient adds its predictor: a forward pass every step, and a forward
and backward pass on every true-gradient step. Counting is deterministic: the same config gives
the same partition and placement on every machine.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import itertools
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple, Optional, Sequence

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from synthgrad.common.models import (
    CausalContext,
    LocalHead,
    Reconstruction,
    SyntheticGradient,
    build_units,
    unit_shapes,
)

if TYPE_CHECKING:  # annotations only
    from synthgrad.common.config import RunConfig

_PROBE_BATCH = 2  # batch norm needs two samples in training mode; costs are divided back


class _FlopCount(TorchDispatchMode):
    """Total FLOPs of the aten ops run inside it, by torch's own per-op formulas
    (torch.utils.flop_counter's registry), decomposing an op without a formula as
    FlopCounterMode does, so the totals are FlopCounterMode's. FlopCounterMode also tracks which
    module each op belongs to, with hooks on every module and tensor, for a breakdown nothing
    here reads."""

    def __init__(self) -> None:
        super().__init__()
        self.total = 0

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        """Never run under torch.compile, so its dispatch need not be wrapped to keep dynamo out
        (the wrapping imports torch._dynamo: 1.3 s of CPU in a launcher that has no other use
        for it). Were this hook gone from torch, the default only costs that time again."""
        return False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        packet = getattr(func, "_overloadpacket", None)  # None: a higher-order op, run as it is
        if packet is not None and packet not in flop_registry:
            with self:
                decomposed = func.decompose(*args, **kwargs)
            if decomposed is not NotImplemented:
                return decomposed
        out = func(*args, **kwargs)
        formula = flop_registry.get(packet) if packet is not None else None
        if formula is not None:
            self.total += formula(*args, **kwargs, out_val=out)
        return out


def training_flops(module: nn.Module, in_shape: Sequence[int]) -> float:
    """FLOPs of one forward and backward pass of `module`, per sample (on a copy: the module's
    statistics and gradients are not touched)."""
    probe = copy.deepcopy(module).train()
    x = torch.zeros(_PROBE_BATCH, *in_shape, requires_grad=True)
    seen: list[tuple[nn.RNNBase, tuple[int, ...]]] = []
    hooks = [m.register_forward_pre_hook(lambda m, args: seen.append((m, tuple(args[0].shape))))
             for m in probe.modules() if isinstance(m, nn.RNNBase)]
    with _FlopCount() as counter:
        out = probe(x)
        out = out[0] if isinstance(out, tuple) else out
        out.float().sum().backward()
    for h in hooks:
        h.remove()
    return (counter.total + sum(_uncounted_rnn_flops(m, shape) for m, shape in seen)) / _PROBE_BATCH


_GATES = {"LSTM": 4, "GRU": 3}  # matrix products per step and layer (a plain RNN's: 1)


def _uncounted_rnn_flops(rnn: nn.RNNBase, in_shape: tuple[int, ...]) -> float:
    """A torch recurrent layer whose fused kernel has no FLOP formula (nn.LSTM on the CPU counts
    0): its matrix products, forward and backward (three forwards' worth), counted by hand; 0
    when the counter saw them (its ops decomposed, as nn.GRU's do)."""
    probe = copy.deepcopy(rnn)
    x = torch.zeros(*in_shape, requires_grad=True)
    with _FlopCount() as counter:
        probe(x)[0].float().sum().backward()
    batch, steps = (in_shape[0], in_shape[1]) if rnn.batch_first else (in_shape[1], in_shape[0])
    gates, dirs, h = _GATES.get(rnn.mode, 1), 2 if rnn.bidirectional else 1, rnn.hidden_size
    by_hand = 0.0
    for layer in range(rnn.num_layers):
        d_in = rnn.input_size if layer == 0 else h * dirs
        by_hand += 3 * 2 * gates * h * (d_in + h) * steps * batch * dirs
    return by_hand if counter.total < by_hand / 2 else 0.0


def forward_flops(module: nn.Module, *inputs: torch.Tensor) -> float:
    """FLOPs of one forward pass of `module` on `inputs` (whose first dimension is the batch),
    per sample."""
    with torch.no_grad(), _FlopCount() as counter:
        module(*inputs)
    return counter.total / inputs[0].shape[0]


def unit_costs(cfg: RunConfig, units: Optional[Sequence[nn.Module]] = None) -> list[float]:
    """Training FLOPs per sample of every unit of the network (built from cfg when not given)."""
    units = list(units) if units is not None else build_units(cfg)
    shapes = [cfg.sample_shape, *unit_shapes(units, cfg.sample_shape)]
    return [training_flops(u, shapes[i]) for i, u in enumerate(units)]


@dataclass(frozen=True)
class PredictorChoice:
    """A stage's synthetic-gradient model: its rank (or hidden width), the kernel a conv
    predictor projects back with, and what it costs per sample averaged over steps."""
    rank: int
    kernel: int
    flops: float

    def build(self, cfg: RunConfig, out_shape: Sequence[int]) -> SyntheticGradient:
        return SyntheticGradient(out_shape, cfg.sg_model, self.rank, cfg.conditioned, cfg.classes, self.kernel)


MIN_CONV_RANK_3X3 = 8  # below this rank a 3x3 back-projection gives way to a 1x1 one of higher rank
# auto never goes above the former fixed default: a larger predictor on the stage that bounds the
# pipeline costs throughput (the budget alone would load the digits CNN's heavy stage with a
# much larger one: docs/results.md), and what a higher rank buys in accuracy is for
# bench/predictors.py to show, not for a default to assume
MAX_AUTO_RANK = 64


def _sg_flops(cfg: RunConfig, out_shape: Sequence[int], rank: int, kernel: int) -> float:
    """Per-sample FLOPs of a predictor, averaged over steps: a forward pass every step, and
    training (forward and backward, three forwards' worth) on every N-th."""
    forward = _sg_forward_flops(cfg.sg_model, tuple(out_shape), rank, kernel, cfg.conditioned, cfg.classes)
    return forward * (1 + 3 / max(cfg.true_grad_every, 1))


@functools.lru_cache(maxsize=4096)
def _sg_forward_flops(kind: str, out_shape: tuple[int, ...], rank: int, kernel: int, conditioned: bool,
                      classes: int) -> float:
    """Counted once per predictor (the split by cost asks for the same ones many times)."""
    sg = SyntheticGradient(out_shape, kind, rank, conditioned, classes, kernel)
    h = torch.zeros(_PROBE_BATCH, *out_shape)
    labels = torch.zeros(_PROBE_BATCH, dtype=torch.long)
    return forward_flops(sg, h, labels)


def choose_predictor(cfg: RunConfig, out_shape: Sequence[int], stage_flops: float) -> PredictorChoice:
    """The predictor a stage gets: `--sg-hidden` when given; otherwise (auto) the largest rank
    up to MAX_AUTO_RANK whose cost stays within `--sg-budget` of the stage's own training
    FLOPs, found by counting (the cost grows with the rank). A conv activation's predictor projects back with a 3x3
    kernel when that leaves it rank MIN_CONV_RANK_3X3 or more, else with a 1x1 kernel, which
    affords about ten times the rank. When even rank 1 is over the budget (a stage far cheaper
    than the activation it sends), rank 1: the layout reports the share it costs."""
    conv = len(out_shape) == 3
    if cfg.sg_hidden is not None:
        return PredictorChoice(cfg.sg_hidden, 3, _sg_flops(cfg, out_shape, cfg.sg_hidden, 3))
    if cfg.sg_model == "linear":  # no rank to choose
        return PredictorChoice(1, 3, _sg_flops(cfg, out_shape, 1, 3))
    budget = cfg.sg_budget * stage_flops
    width = out_shape[0] if conv else (out_shape[-1] if len(out_shape) in (1, 2) else math.prod(out_shape))
    for kernel in ((3, 1) if conv else (3,)):
        lo, hi = 0, max(min(width, MAX_AUTO_RANK), 1)  # the largest rank within the budget; 0: none is
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if _sg_flops(cfg, out_shape, mid, kernel) <= budget:
                lo = mid
            else:
                hi = mid - 1
        if not conv or kernel == 1 or lo >= min(MIN_CONV_RANK_3X3, width):
            rank = max(lo, 1)
            return PredictorChoice(rank, kernel, _sg_flops(cfg, out_shape, rank, kernel))
    raise AssertionError("unreachable: the last kernel always returns")


@dataclass(frozen=True)
class HeadChoice:
    """A stage's local classifier head: how far a conv activation is pooled, and what it costs
    per sample (it trains every step)."""
    pool: int
    flops: float
    depth: int = 0  # hidden layers before the classifier (--head-depth)
    # the stage's input shape, decoded from its output (--head-reconstruct); None: no decoder
    reconstructs: Optional[tuple[int, ...]] = None
    scale_free: bool = False  # reads its input over its RMS (--head-norm)
    attention: bool = False  # per position, also reads the earlier positions (--head-attention)
    hidden: Optional[int] = None  # a conv head's hidden channels; None: the activation's (or not a conv head)
    side: Optional[int] = None  # the largest map a conv head's hidden layers run on (--head-side); None: none run
    # the layer (unit index) after the stage, whose fresh copy the head runs first
    # (--head-next-layer); None: none
    lead: Optional[int] = None
    lead_is_output: bool = False  # that layer is the model's last: its output is the head's logits
    lead_depth: int = 1  # how many layers from `lead` on the head copies (--head-lead-depth)
    lr_scale: float = 1.0  # the head learns at this times the layers' learning rate (--head-lr-scale)

    def build(self, cfg: RunConfig, out_shape: Sequence[int], seed: int = 0) -> LocalHead:
        """`seed`: the head's; the lead's weights are drawn from a seed of their own beside it
        (a model of the run's shape built from it, the lead's layers kept), never the run's, so the
        lead does not start as the next stage's own layer (the head's seed is the run's for
        stage 0 at --seed 0)."""
        lead = None
        if self.lead is not None:
            drawn = build_units(cfg.replace(seed=LEAD_SEED + seed))[self.lead:self.lead + self.lead_depth]
            lead = drawn[0] if len(drawn) == 1 else nn.Sequential(*drawn)
        return LocalHead(out_shape, cfg.classes, self.pool, cfg.per_position, self.depth, self.reconstructs,
                         self.scale_free, self.attention, self.hidden, self.side, lead, self.lead_is_output)


LEAD_SEED = 1_000_003  # a head's lead is built from its head's seed plus this, never from the run's own seed


class Lead(NamedTuple):
    """The layers after a stage, offered as the start of its head (--head-next-layer): the
    first one's index among the model's layers, their training FLOPs per sample, the last
    one's output shape, whether that is the model's last layer, and how many there are
    (--head-lead-depth)."""
    index: int
    flops: float
    out_shape: tuple[int, ...]
    is_output: bool
    depth: int = 1


HEAD_POOLS = (2, 1)  # a conv activation's head pools to 2x2 (DGL's auxiliary nets), else 1x1


@functools.lru_cache(maxsize=1024)
def _head_flops(out_shape: tuple[int, ...], classes: int, pool: int, per_position: bool = False,
                depth: int = 0, reconstructs: Optional[tuple[int, ...]] = None, attention: bool = False,
                hidden: Optional[int] = None, side: Optional[int] = None,
                read_shape: Optional[tuple[int, ...]] = None) -> float:
    """A head's training FLOPs per sample, less its lead's (`read_shape`: what the lead gives
    the rest of the head; a decoder reads `out_shape`)."""
    read = out_shape if read_shape is None else read_shape
    head = LocalHead(read, classes, pool, per_position, depth, attention=attention, hidden=hidden, side=side)
    return (training_flops(head, read) + _decoder_flops(out_shape, reconstructs)
            + (_attention_flops(read) if attention else 0.0))


def _decoder_flops(out_shape: tuple[int, ...], reconstructs: Optional[tuple[int, ...]]) -> float:
    """--head-reconstruct's decoder, reading the stage's output (0 without one)."""
    return training_flops(Reconstruction(out_shape, reconstructs), out_shape) if reconstructs is not None else 0.0


def _attention_flops(out_shape: tuple[int, ...]) -> float:
    """The causal attention's scores and weighted sum, which the counter does not see (the CPU's
    fused attention kernel has no FLOP formula): two (T x T x width) products forward, twice
    that backward, per sample; counted in full although causal attention needs half."""
    positions, width = out_shape[0], CausalContext(out_shape[-1]).width
    return 3 * 2 * (2 * positions * positions * width)


def choose_head(cfg: RunConfig, out_shape: Sequence[int], stage_flops: float,
                in_shape: Optional[Sequence[int]] = None, depth: int = 0, hidden: Optional[int] = None,
                side: Optional[int] = None, lead: Optional[Lead] = None) -> HeadChoice:
    """The local head a stage gets: priced against the stage's own training FLOPs like a
    predictor (`--sg-budget`). A conv activation's head pools to 2x2, or to 1x1 when 2x2 is
    over the budget; its hidden layers are chosen against --head-budget (`head_depths`). A head
    is at least a linear map from the activation's features to the classes; a stage cheaper
    than that keeps it, and the layout reports its share. `depth`, `hidden`, `side`: its hidden
    layers, a conv head's hidden channels and map side where --head-depth is auto
    (`head_depths` chose them); a given --head-depth overrides them (all the channels, at
    --head-side). `lead`: the layer after the stage, which the head runs first
    (--head-next-layer); its cost is the head's too, but not what the pooling is chosen by."""
    if cfg.head_depth is not None:
        depth, hidden, side = cfg.head_depth, None, None
    return _head_of_depth(cfg, out_shape, stage_flops, in_shape, depth, hidden, side, lead)


def _head_of_depth(cfg: RunConfig, out_shape: Sequence[int], stage_flops: float,
                   in_shape: Optional[Sequence[int]], depth: int, hidden: Optional[int] = None,
                   side: Optional[int] = None, lead: Optional[Lead] = None) -> HeadChoice:
    shape = tuple(out_shape) if lead is None else tuple(lead.out_shape)
    reconstruct_from = tuple(out_shape)
    wanted = (cfg.head_reconstruct > 0 and in_shape is not None
              and Reconstruction.fits(reconstruct_from, in_shape))
    reconstructs = tuple(in_shape) if wanted and in_shape is not None else None
    if lead is not None and lead.is_output:  # the head is that layer alone (and a decoder where asked)
        return HeadChoice(HEAD_POOLS[0], lead.flops + _decoder_flops(reconstruct_from, reconstructs), 0,
                          reconstructs, cfg.head_norm, False, None, None, lead.index, True, lead.depth)
    pools = HEAD_POOLS if len(shape) == 3 else (HEAD_POOLS[0],)
    budget = cfg.sg_budget * stage_flops
    attention = cfg.head_attention and cfg.per_position
    hidden_convs = depth > 0 and len(shape) == 3
    hidden = hidden if hidden_convs and hidden != shape[0] else None  # None: all of the channels
    side = (side or cfg.head_side) if hidden_convs else None  # None: --head-side
    for pool in pools:
        flops = _head_flops(reconstruct_from, cfg.classes, pool, cfg.per_position, depth, reconstructs, attention,
                            hidden, side, None if lead is None else shape)
        if flops <= budget or pool == pools[-1]:
            return HeadChoice(pool, flops + (0.0 if lead is None else lead.flops), depth, reconstructs,
                              cfg.head_norm, attention, hidden, side, None if lead is None else lead.index,
                              False, 1 if lead is None else lead.depth)
    raise AssertionError("unreachable: the last pool always returns")


class HiddenLayer(NamedTuple):
    """What --head-depth auto gives a stage's head: `depth` hidden layers; on a conv activation
    `hidden` channels (None: the activation's) on a map of at most `side` a side (None:
    --head-side)."""
    depth: int
    hidden: Optional[int] = None
    side: Optional[int] = None


def head_depths(cfg: RunConfig, own_flops: Sequence[float],
                offered: Sequence[Sequence[tuple[HiddenLayer, float]]]) -> tuple[HiddenLayer, ...]:
    """--head-depth auto: each stage's head's hidden layer, given each stage's own training
    FLOPs and the hidden layers offered it (`hidden_layer_options`: each with the FLOPs it
    adds, the largest first; none offered: a linear head). A linear head asks its stage for
    features a linear map can already sort by class, and the stage throws away what later
    stages need: on a CNN with one dominant block `local` lost 5.9 points with linear heads
    and 0.7 with a hidden layer in every head; on an eight-stage CNN, 26.8 and 1.9
    (docs/results.md). The hidden layers together stay within --head-budget x the model's
    FLOPs (on few cores every stage's work counts).

    Stage by stage (--head-fill stages, and the fallback of width), each gets the first
    offered that also leaves it within (1 + --head-budget) x the heaviest stage's own FLOPs
    (the pipeline's pace slows by at most that); a stage none fits keeps a linear head.
    --head-fill width (the default) first asks whether the allowance pays for the cheapest
    hidden layer of all its channels (on a conv map, the smallest map) in every head offered
    one. If so, every head gets that, not held to the pace, and then, from the first stage
    on, a larger map where one fits both bounds. On an eight-stage CNN the heads' width
    counted for more than their map, and stage by stage the early stages' larger maps left
    the late ones narrow heads, because a full-width one takes a late stage past the pace
    (docs/results.md, "A deeper CNN at K=8")."""
    if cfg.head_depth is not None:
        return tuple(HiddenLayer(cfg.head_depth) for _ in own_flops)
    heaviest, allowance = max(own_flops, default=0.0), cfg.head_budget * sum(own_flops)
    full_width = [[o for o in options if o[0].hidden is None][-1:] for options in offered]  # the cheapest
    every_head = sum(extra for option in full_width for _, extra in option)
    given: list[Optional[tuple[HiddenLayer, float]]]
    if cfg.head_fill == "width" and every_head <= allowance:
        given, spent = [option[0] if option else None for option in full_width], every_head
        candidates = [[o for o in options if o[0].hidden is None and given[i] is not None and o[1] > given[i][1]]
                      for i, options in enumerate(offered)]  # larger maps, the largest first
    else:
        given, spent, candidates = [None] * len(own_flops), 0.0, [list(options) for options in offered]
    for stage, options in enumerate(candidates):
        held = given[stage][1] if given[stage] is not None else 0.0
        for layer, extra in options:
            if spent - held + extra <= allowance and own_flops[stage] + extra <= (1 + cfg.head_budget) * heaviest:
                given[stage], spent = (layer, extra), spent - held + extra
                break
    return tuple(HiddenLayer(0) if g is None else g[0] for g in given)


SMALL_HEAD_SIDE = 4  # where --head-side's map is over the budget, a conv head's hidden layer tries this


def hidden_layer_options(cfg: RunConfig, out_shape: Sequence[int], stage_flops: float,
                         in_shape: Optional[Sequence[int]] = None) -> list[tuple[HiddenLayer, float]]:
    """The hidden layers `head_depths` may give the head `choose_head` gives a stage, the
    largest first, each with what it adds to the head's FLOPs. On a conv activation a 3x3 conv
    of its channels on the map pooled to at most --head-side (8) a side; then, as the pooling
    of a head does (2x2 before 1x1), on a smaller map (4x4) and with a half, a quarter, ...
    down to 1/--head-narrowest of the channels: a larger map kept more for the head on the
    CNNs whose early maps are large, and on an eight-stage CNN's 7x7 stages the 4x4 conv was
    what the budget could pay for (docs/results.md). Otherwise one, a dense layer of the
    activation's width (up to HEAD_HIDDEN_MAX)."""
    base = _head_of_depth(cfg, out_shape, stage_flops, in_shape, 0).flops
    layers = [HiddenLayer(1, None, cfg.head_side)]
    if len(out_shape) == 3 and cfg.head_narrowest > 1:
        small = min(cfg.head_side, SMALL_HEAD_SIDE)
        if small < cfg.head_side:
            layers.append(HiddenLayer(1, None, small))
        divisors = itertools.takewhile(lambda d: d <= cfg.head_narrowest, (2 ** i for i in range(1, 7)))
        layers += [HiddenLayer(1, w, small)
                   for w in sorted({out_shape[0] // d for d in divisors if out_shape[0] // d >= 1}, reverse=True)]
    return [(layer, _head_of_depth(cfg, out_shape, stage_flops, in_shape, 1, layer.hidden, layer.side).flops - base)
            for layer in layers]


def helper_flops(cfg: RunConfig, out_shape: Sequence[int], stage_flops: float = 0.0,
                 in_shape: Optional[Sequence[int]] = None) -> float:
    """FLOPs per sample a (non-last) stage spends on its own helper models, averaged over steps:
    a synthetic-gradient model predicts every step and trains (forward and backward) on
    true-gradient steps; a local classifier head trains every step. `stage_flops`: the stage's
    own layers, which auto-sized helpers are priced against. The split by cost
    (coordinator/layout.py) prices candidate stages with it before the stages exist, so under
    --head-depth auto a head here is linear: the hidden layers are chosen over the stages the
    split made (`helper_models`), which the layout's stage FLOPs count."""
    helpers = choose_helpers(cfg, is_last=False, out_shape=out_shape, stage_flops=stage_flops, in_shape=in_shape)
    return sum(c.flops for c in (helpers.predictor, helpers.head) if c is not None)


@dataclass(frozen=True)
class Helpers:
    """The helper models a stage's rule uses, chosen once by its layout (coordinator/layout.py)
    and carried to the stage in START, which builds exactly these. None / empty: none of that
    kind."""
    predictor: Optional[PredictorChoice] = None
    head: Optional[HeadChoice] = None
    state_predictors: tuple[PredictorChoice, ...] = ()  # one per recurrent layer (stream data)

    def flops(self) -> float:
        return sum(c.flops for c in (self.predictor, self.head, *self.state_predictors) if c is not None)


# --head-lr-scale auto for per-position heads of stages without a recurrent layer: on the small
# GPT heads at 3 times the blocks' rate narrowed `local`'s gap in every seed; conv heads at 3x
# did worse on the digits CNN and no better at K=8, and the recurrent stages' heads were not
# measured so: both keep the layers' rate (docs/results.md, "Heads that keep up")
HEAD_LR_SCALE_STREAM = 3.0


def head_lr_scale(cfg: RunConfig, recurrent: bool) -> float:
    """The factor on --lr a stage's head learns at: --head-lr-scale, or under auto
    HEAD_LR_SCALE_STREAM on stream data where the stage has no recurrent layer, else 1."""
    if cfg.head_lr_scale is not None:
        return float(cfg.head_lr_scale)
    return HEAD_LR_SCALE_STREAM if cfg.per_position and not recurrent else 1.0


def choose_helpers(cfg: RunConfig, *, is_last: bool, out_shape: Sequence[int], stage_flops: float,
                   state_widths: Sequence[int] = (), in_shape: Optional[Sequence[int]] = None,
                   head_layer: HiddenLayer = HiddenLayer(0), lead: Optional[Lead] = None,
                   recurrent: bool = False) -> Helpers:
    """The helper models the run's rule gives a stage: a predictor of its output and a local
    head (not on the last stage, whose gradient is exact) where the rule uses them, and a state
    predictor per recurrent layer (`state_widths`) where the rule predicts gradients on stream
    data, every one priced against the stage's own training FLOPs (`stage_flops`).
    `head_layer`: the head's hidden layers where --head-depth is auto (the layout's
    `head_depths`, which sees every stage); `lead`: the layer after the stage, where
    --head-next-layer gives the head a copy of it (the layout's, which sees every layer);
    `recurrent`: the stage has a recurrent layer (its head's learning rate, head_lr_scale)."""
    rule = cfg.stage_rule  # None for the modes with processes of their own (pipeline)
    if rule is None:
        return Helpers()
    predictor = choose_predictor(cfg, out_shape, stage_flops) if rule.uses_predictor and not is_last else None
    if (predictor is not None and rule.uses_head and cfg.sg_hidden is None
            and (predictor.flops > cfg.sg_budget * stage_flops
                 or (len(out_shape) == 3 and predictor.rank < MIN_CONV_RANK_3X3))):
        # a stage far cheaper than the activation it sends affords only a predictor of rank 1,
        # or on a conv map a few channels predicting each pixel's gradient from that pixel
        # alone: at depth those learn no correction (docs/results.md) and their memory-bound
        # work on a large map costs the stage a quarter of its time. With a head's gradient to
        # step on, the stage goes without; without one, it keeps what it can afford
        predictor = None
    head = (dataclasses.replace(choose_head(cfg, out_shape, stage_flops, in_shape, *head_layer, lead=lead),
                                lr_scale=head_lr_scale(cfg, recurrent))
            if rule.uses_head and not is_last else None)
    states = tuple(choose_predictor(cfg.replace(conditioned=False), (width,), stage_flops)
                   for width in state_widths) if rule.uses_predictor and cfg.per_position else ()
    return Helpers(predictor, head, states)


def helper_models(cfg: RunConfig, units: Sequence[nn.Module], costs: Sequence[float]
                  ) -> tuple[tuple[float, ...], tuple[Helpers, ...]]:
    """Each stage's own training FLOPs (`costs`: each unit's), and the helper models its rule
    gets (choose_helpers, priced against those FLOPs; the heads' depths chosen over all the
    stages, head_depths): what the layout records and START carries to the stage."""
    from synthgrad.common.recurrent import recurrent_layers, state_sizes
    shapes = [cfg.sample_shape, *unit_shapes(units, cfg.sample_shape)]
    rule = cfg.stage_rule
    bounds = [0, *itertools.accumulate(cfg.stage_groups)]
    spans = list(zip(bounds, bounds[1:]))
    own_flops = [sum(costs[a:b]) for a, b in spans]
    last = len(spans) - 1
    # per-position heads (stream data) are offered none: on the small GPT a hidden layer in
    # every head bought nothing (docs/results.md); --head-attention is theirs
    offered = rule is not None and rule.uses_head and cfg.head_depth is None and not cfg.per_position
    # --head-next-layer: the first stages' heads begin with the layer after them, which is
    # their hidden depth (none more is offered them under auto; a given --head-depth adds it)
    led = auto_next_layer(cfg, units, bounds) if cfg.head_next_layer is None else cfg.head_next_layer
    leads = [next_layer_lead(units, costs, shapes, b, cfg.head_lead_depth if i == 0 else 1)
             if rule is not None and rule.uses_head and i < min(led, last) else None
             for i, (a, b) in enumerate(spans)]
    options = [hidden_layer_options(cfg, shapes[b], own, shapes[a]) if offered and i < last and leads[i] is None
               else [] for i, ((a, b), own) in enumerate(zip(spans, own_flops))]
    depths = head_depths(cfg, own_flops, options)
    helpers = []
    for i, ((a, b), own) in enumerate(zip(spans, own_flops)):
        widths = (state_sizes(nn.Sequential(*units[a:b]), shapes[a])
                  if rule is not None and rule.uses_predictor and cfg.per_position else [])
        lead = leads[i]
        helpers.append(choose_helpers(cfg, is_last=i == last, out_shape=shapes[b], stage_flops=own,
                                      state_widths=widths, in_shape=shapes[a], head_layer=depths[i], lead=lead,
                                      recurrent=bool(recurrent_layers(nn.Sequential(*units[a:b])))))
    return tuple(own_flops), tuple(helpers)


def auto_next_layer(cfg: RunConfig, units: Sequence[nn.Module], bounds: Sequence[int]) -> int:
    """--head-next-layer auto: 1 on stream data (per-position heads) where the layer after the
    first stage is a hidden layer (not the read-out) without a recurrent state, else 0. On
    the small GPT the first stage's head held most of `local`'s gap and this lead took back a
    third of it; on an eight-stage CNN it bought nothing, and on conv nets the first stage's
    next layer is the heavy one, which the lead would double (docs/results.md)."""
    from synthgrad.common.recurrent import recurrent_layers
    if not cfg.per_position or len(bounds) < 3 or bounds[1] >= len(units) - 1:
        return 0
    return 0 if recurrent_layers(units[bounds[1]]) else 1


def next_layer_lead(units: Sequence[nn.Module], costs: Sequence[float], shapes: Sequence[Sequence[int]],
                    index: int, depth: int = 1) -> Lead:
    """The layer at `index` (the one after a stage), and up to depth - 1 more after it but never
    the model's last (the head reads out itself), as the start of that stage's head
    (--head-next-layer, --head-lead-depth). A recurrent layer is refused: a head has no stream
    to carry its state along, and a fresh state every window is not the layer the stage feeds."""
    from synthgrad.common.validation import ConfigError
    from synthgrad.common.recurrent import recurrent_layers
    depth = max(1, min(depth, len(units) - 1 - index))
    for i in range(index, index + depth):
        if recurrent_layers(units[i]):
            raise ConfigError(f"--head-next-layer: layer {i} ({type(units[i]).__name__}) is recurrent; a "
                              f"head cannot begin with a copy of it (take fewer stages' heads or a shallower "
                              f"lead, or 0)")
    end = index + depth
    return Lead(index, sum(costs[index:end]), tuple(shapes[end]), end == len(units), depth)


def core_flops_per_s(batch: int = 256, width: int = 1024, repeats: int = 5) -> float:
    """What one core does at its best here: FLOP/s of a single-threaded (batch x width) @
    (width x width) matmul, the best of a few (about 50 ms). Turns FLOPs into a throughput
    ceiling; real layers (smaller, with elementwise work and messages) run below it."""
    import time
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        a, b = torch.randn(batch, width), torch.randn(width, width)
        a @ b  # warm
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - t0)
    finally:
        torch.set_num_threads(threads)
    return 2 * batch * width * width / best
