"""A run's layout, decided once before any process starts: how many layers each stage gets
(`--stages K`: split by cost; `--stages auto`: as many stages as this host can run side by side,
split by cost; `--groups`: as given; neither: one layer per stage) and which core
each stage runs on (`--placement`), with the throughput ceiling that layout predicts. The
resolved split goes into the run's config (config.json, and every stage's START), so a resumed
or restarted run keeps it."""
from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional

from synthgrad.common.config import ConfigError, RunConfig
from synthgrad.common.costs import (
    HeadChoice,
    Helpers,
    PredictorChoice,
    core_flops_per_s,
    helper_models,
    helper_flops,
    unit_costs,
)
from synthgrad.common.models import build_units, mixes_positions, position_wise_back, position_wise_front, unit_shapes
from synthgrad.common.modes import Mode
from synthgrad.common.placement import Placement, blocks, partition, plan_placement, useful_threads
from synthgrad.common.procs import available_cores


@dataclass(frozen=True)
class Layout:
    groups: tuple[int, ...]  # layers per stage
    stage_flops: tuple[float, ...]  # training FLOPs per sample of each stage (predictor included)
    placement: Placement
    core_flops_per_s: float  # one core's best matmul rate here (common/costs.py)
    on_cpu: bool = True  # every stage computes on the CPU (--device cpu)
    replicas: tuple[int, ...] = ()  # processes per stage (--replicas; workers/replicas.py)
    # each stage's helper models (predictor, head, state predictors), chosen here once: START
    # carries them and the stage builds exactly these; and each stage's own layers' FLOPs, which
    # their shares are of
    helpers: tuple[Helpers, ...] = ()
    own_flops: tuple[float, ...] = ()
    auto: str = ""  # with --stages auto: what the number of stages was taken from

    def _shares(self, pick: Callable[[Helpers], Optional[PredictorChoice | HeadChoice]]
                ) -> tuple[tuple, tuple]:
        """Each stage's helper of one kind and its share of the stage's FLOPs; () where no stage
        has one."""
        choices = tuple(pick(h) for h in self.helpers)
        if all(c is None for c in choices):
            return (), ()
        return choices, tuple(None if c is None else c.flops / max(own, 1.0) for c, own in zip(choices, self.own_flops))

    @property
    def predictors(self) -> tuple[Optional[PredictorChoice], ...]:
        return self._shares(lambda h: h.predictor)[0]

    @property
    def predictor_shares(self) -> tuple[Optional[float], ...]:
        return self._shares(lambda h: h.predictor)[1]

    @property
    def heads(self) -> tuple[Optional[HeadChoice], ...]:
        return self._shares(lambda h: h.head)[0]

    @property
    def head_shares(self) -> tuple[Optional[float], ...]:
        return self._shares(lambda h: h.head)[1]

    @property
    def state_predictors(self) -> tuple[tuple[PredictorChoice, ...], ...]:
        return tuple(h.state_predictors for h in self.helpers)

    @property
    def state_predictor_shares(self) -> tuple[tuple[float, ...], ...]:
        return tuple(tuple(c.flops / max(own, 1.0) for c in h.state_predictors)
                     for h, own in zip(self.helpers, self.own_flops))

    @property
    def ceiling_samples_per_s(self) -> Optional[float]:
        """The most samples/s this layout allows: the busiest core's FLOPs at its best rate
        (messages, elementwise work and waiting come on top, so real runs stay below it).
        None when stages compute on a GPU: the CPU's rate says nothing about them."""
        if not self.on_cpu:
            return None
        return self.core_flops_per_s / max(self.placement.busiest, 1.0)

    def record(self) -> dict:
        """For summary.json."""
        p = self.placement
        return {"groups": list(self.groups), "stage_mflops_per_sample": [round(f / 1e6, 3) for f in self.stage_flops],
                "placement": p.asked, "cores": list(p.cores), "threads": list(p.threads), "pinned": p.pinned,
                "yields": [p.yields_at(s) for s in range(len(self.groups))],
                "replicas": list(self.replicas or (1,) * len(self.groups)),
                "reason": p.reason, "stages_auto": self.auto or None,
                "flops_share": [round(f / max(sum(self.stage_flops), 1.0), 4) for f in self.stage_flops],
                "busiest_core_mflops_per_sample": round(p.busiest / 1e6, 3),
                "core_gflops_per_s": round(self.core_flops_per_s / 1e9, 2),
                "ceiling_samples_per_s": None if self.ceiling_samples_per_s is None
                else round(self.ceiling_samples_per_s, 1),
                "predictors": [None if c is None else {"rank": c.rank, "kernel": c.kernel,
                                                       "share_of_stage_flops": round(share, 4)}
                               for c, share in zip(self.predictors, self.predictor_shares)],
                "heads": [None if c is None else {"pool": c.pool, "depth": c.depth, "hidden": c.hidden,
                                                  "side": c.side, "attention": c.attention,
                                                  "next_layer": c.lead, "next_layers": c.lead_depth,
                                                  "lr_scale": c.lr_scale,
                                                  "share_of_stage_flops": round(share, 4)}
                          for c, share in zip(self.heads, self.head_shares)],
                "state_predictors": [[{"rank": c.rank, "share_of_stage_flops": round(share, 4)}
                                      for c, share in zip(cs, shares)]
                                     for cs, shares in zip(self.state_predictors, self.state_predictor_shares)]}

    def describe(self) -> str:
        mflops = ", ".join(f"{f / 1e6:.2f}" for f in self.stage_flops)
        ceiling = self.ceiling_samples_per_s
        sg = [f"{i}: rank {c.rank}{' 1x1' if c.kernel == 1 else ''} {_share(share, 0)}"
              for i, (c, share) in enumerate(zip(self.predictors, self.predictor_shares)) if c is not None]
        heads = [f"{i}: {_copied(c)}{'hidden layer ' * c.depth}{f'of {c.hidden} ' if c.depth and c.hidden else ''}"
                 f"{f'at {c.side}x{c.side} ' if c.depth and c.side else ''}"
                 f"{'attention ' if c.attention else ''}{f'lr x{c.lr_scale:g} ' if c.lr_scale != 1 else ''}"
                 f"{_share(share)}"
                 for i, (c, share) in enumerate(zip(self.heads, self.head_shares)) if c is not None]
        states = [f"{i}: rank {c.rank} {_share(share)}" for i, (cs, shares) in
                  enumerate(zip(self.state_predictors, self.state_predictor_shares)) for c, share in zip(cs, shares)]
        return (f"layout: layers per stage {list(self.groups)}{f' ({self.auto})' if self.auto else ''}, "
                f"MFLOPs per sample {mflops}; "
                f"{self.placement.describe()}"
                + (f"; replicas per stage {list(self.replicas)} (the stage's threads split among them)"
                   if any(r > 1 for r in self.replicas) else "")
                + (f"; ceiling {ceiling:,.0f} samples/s" if ceiling is not None else "")
                + (f"; predictors (share of their stage) {', '.join(sg)}" if sg else "")
                + (f"; local heads (share of their stage) {', '.join(heads)}" if heads else "")
                + (f"; state predictors (share of their stage) {', '.join(states)}" if states else ""))


def _share(share: float, digits: int = 1) -> str:
    """A helper's FLOPs as a share of its stage's: a percentage, or a multiple past 10 times (a
    stage of almost no FLOPs, a norm alone, would show millions of percent)."""
    return f"{share:,.0f}x" if share >= 10 else f"{100 * share:.{digits}f}%"


def auto_stages(cfg: RunConfig, blocks: int, cores: int, cuda_devices: int) -> tuple[int, str]:
    """--stages auto on a host with `cores` usable cores and `cuda_devices` CUDA devices: as many
    stages as run side by side there, never more than the model's `blocks` (its layers with
    parameters). Side by side: a device each under a bare --device cuda (cuda:N is one device),
    else one stage per core, or per the cores one stage asks for (--threads N, or --replicas R
    processes, whichever is more); under mode pipeline's 1f1b, at most --microbatches (each
    stage needs a microbatch in flight). Returns (stages, what they were taken from)."""
    device = cfg.device.strip()
    if device.startswith("cuda"):
        slots = cuda_devices if device == "cuda" else 1
        why = f"{slots} CUDA device{'s' if slots != 1 else ''}"
    else:
        per_stage = max(cfg.threads[0] if cfg.threads else 1, cfg.replicas[0] if cfg.replicas else 1)
        slots = cores // per_stage
        why = f"{cores} usable core{'s' if cores != 1 else ''}" + (f", {per_stage} per stage" if per_stage > 1 else "")
    if cfg.mode == Mode.PIPELINE and cfg.schedule == "1f1b" and cfg.microbatches < slots:
        slots, why = cfg.microbatches, f"{why}; 1f1b with {cfg.microbatches} microbatches"
    k = max(1, min(blocks, slots))
    if blocks < slots:
        why = f"{why}; the model has {blocks} layers with parameters"
    return k, f"--stages auto: {k} for {why}"


def _resolve_auto(cfg: RunConfig, blocks: int) -> tuple[RunConfig, str]:
    """--stages auto counted on this host: its usable cores (this process's CPU affinity) and,
    under --device cuda, its CUDA devices."""
    if not cfg.stages_auto:
        return cfg, ""
    devices = 0
    if cfg.device.strip() == "cuda":
        import torch
        devices = torch.cuda.device_count()
    k, why = auto_stages(cfg, blocks, len(available_cores()), devices)
    return cfg.replace(stages=k), why


def plan_layout(cfg: RunConfig) -> tuple[RunConfig, Optional[Layout]]:
    """The config with its split resolved, and the layout (None for backprop: one process).
    Stages are cut between blocks (common/placement.py `blocks`): a layer without parameters
    rides with the layer before it, so no stage is left with nothing to train; on stream data
    the position-wise layers in front (an embedding) ride with the first layer that mixes
    positions (common/models.py `position_wise_front`), and those at the back share the last
    stage (`position_wise_back`)."""
    if cfg.mode == Mode.BACKPROP:
        return cfg, None
    units = build_units(cfg)
    costs = unit_costs(cfg, units)
    trainable = [any(p.requires_grad for p in u.parameters()) for u in units]
    # on stream data, position-wise layers in front ride with the first that mixes positions,
    # and those at the back (a final norm, the read-out) share one stage
    mixing = mixes_positions(units, cfg.sample_shape) if cfg.per_position else []
    front, back = position_wise_front(mixing), position_wise_back(mixing, len(units))
    tail = next((i for i in range(back, len(units)) if trainable[i]), None)
    runs = blocks([t and i >= front and (i < back or i == tail) for i, t in enumerate(trainable)])
    cfg, auto = _resolve_auto(cfg, len(runs))
    if cfg.groups is not None:  # a split by hand (--groups, --split-at)
        _check_every_stage_trains(cfg, units)
    elif cfg.stages is not None or len(runs) < len(units):  # by cost; or the default, one stage per block
        k = cfg.stages if cfg.stages is not None else len(runs)
        if k > len(runs):
            raise ConfigError(f"--stages {k}: the model has {len(runs)} layers with parameters (a layer "
                              f"without them shares the stage of the one before); use --stages {len(runs)} "
                              f"or fewer")
        n = len(units)
        shapes = [cfg.sample_shape, *unit_shapes(units, cfg.sample_shape)]

        def group_cost(a: int, b: int) -> float:  # blocks a..b-1: their units, and the predictor unless last
            first, end = runs[a][0], runs[b - 1][1]
            own = sum(costs[first:end])
            return own + (helper_flops(cfg, shapes[end], own, shapes[first]) if end < n else 0.0)

        block_groups = partition(len(runs), k, group_cost)
        bounds = [0, *itertools.accumulate(block_groups)]
        cfg = cfg.replace(groups=tuple(runs[b - 1][1] - runs[a][0] for a, b in zip(bounds, bounds[1:])))
    # else one stage per layer, every layer trainable: groups stay unset, as the options gave them
    own, helpers = helper_models(cfg, units, costs)
    # each stage's layers and the predictor and head it was given, the heads' hidden layers
    # included (the split by cost above priced linear heads: the depths are chosen after it)
    flops = [o + sum(c.flops for c in (h.predictor, h.head) if c is not None) for o, h in zip(own, helpers)]
    on_cpu = all(d.strip() == "cpu" for d in cfg.device.split(","))
    rate = core_flops_per_s(cfg.batch_size)
    usable = tuple(useful_threads(f * cfg.batch_size / rate) for f in flops)  # threads each stage's step can use
    placement = plan_placement(flops, cfg.placement, threads=cfg.stage_thread_counts(), usable=usable)
    return cfg, Layout(tuple(cfg.stage_groups), tuple(flops), placement, rate, on_cpu, cfg.stage_replica_counts(),
                       helpers, own, auto)


def _check_every_stage_trains(cfg: RunConfig, units) -> None:
    """A split given by hand (--groups, --split-at) must not leave a stage without parameters."""
    start = 0
    for stage, n in enumerate(cfg.stage_groups):
        if not any(p.requires_grad for u in units[start:start + n] for p in u.parameters()):
            raise ConfigError(f"stage {stage} (layers {start}..{start + n - 1}) has no parameters to train: "
                              f"give its layers to a neighbouring stage (layers per stage now "
                              f"{','.join(map(str, cfg.stage_groups))})")
        start += n


def _copied(head: HeadChoice) -> str:
    """What a head's lead copies, for the layout's line: 'layer 2 copied ', 'layers 2-3 copied '."""
    if head.lead is None:
        return ""
    if head.lead_depth == 1:
        return f"layer {head.lead} copied "
    return f"layers {head.lead}-{head.lead + head.lead_depth - 1} copied "
