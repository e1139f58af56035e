"""A run's layout, decided once before any process starts: how many layers each stage gets
(`--stages K`: split by cost; `--groups`: as given; neither: one layer per stage) and which core
each stage runs on (`--placement`), with the throughput ceiling that layout predicts. The
resolved split goes into the run's config (config.json, and every stage's START), so a resumed
or restarted run keeps it."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from synthgrad.common.config import RunConfig
from synthgrad.common.costs import core_flops_per_s, predictor_cost, stage_costs, unit_costs
from synthgrad.common.models import build_units, unit_shapes
from synthgrad.common.modes import Mode
from synthgrad.common.placement import Placement, partition, plan_placement


@dataclass(frozen=True)
class Layout:
    groups: tuple[int, ...]  # layers per stage
    stage_flops: tuple[float, ...]  # training FLOPs per sample of each stage (predictor included)
    placement: Placement
    core_flops_per_s: float  # one core's best matmul rate here (common/costs.py)
    on_cpu: bool = True  # every stage computes on the CPU (--device cpu)

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
                "placement": p.asked, "cores": list(p.cores), "pinned": p.pinned, "reason": p.reason,
                "busiest_core_mflops_per_sample": round(p.busiest / 1e6, 3),
                "core_gflops_per_s": round(self.core_flops_per_s / 1e9, 2),
                "ceiling_samples_per_s": None if self.ceiling_samples_per_s is None
                else round(self.ceiling_samples_per_s, 1)}

    def describe(self) -> str:
        mflops = ", ".join(f"{f / 1e6:.2f}" for f in self.stage_flops)
        ceiling = self.ceiling_samples_per_s
        return (f"layout: layers per stage {list(self.groups)}, MFLOPs per sample {mflops}; "
                f"{self.placement.describe()}"
                + (f"; ceiling {ceiling:,.0f} samples/s" if ceiling is not None else ""))


def plan_layout(cfg: RunConfig) -> tuple[RunConfig, Optional[Layout]]:
    """The config with its split resolved, and the layout (None for backprop: one process)."""
    if cfg.mode == Mode.BACKPROP:
        return cfg, None
    units = build_units(cfg)
    costs = unit_costs(cfg, units)
    if cfg.groups is None and cfg.stages is not None:
        n = len(units)
        predictors = [predictor_cost(cfg, shape) for shape in unit_shapes(units, cfg.sample_shape)]

        def group_cost(a: int, b: int) -> float:  # a stage's units, and its predictor unless last
            return sum(costs[a:b]) + (predictors[b - 1] if b < n else 0.0)

        cfg = cfg.replace(groups=partition(n, cfg.stages, group_cost))
    flops = stage_costs(cfg, cfg.stage_groups, units, costs)
    on_cpu = all(d.strip() == "cpu" for d in cfg.device.split(","))
    return cfg, Layout(tuple(cfg.stage_groups), tuple(flops), plan_placement(flops, cfg.placement),
                       core_flops_per_s(cfg.batch_size), on_cpu)
