"""What each part of a run costs per training sample, in floating-point operations: the input
of partitioning (`--stages K`) and placement (`--placement`).

Counted with torch's FlopCounterMode on one forward and backward pass, so any module counts the
same way (matmuls and convolutions; elementwise work such as batch norm and ReLU is not counted,
which is small beside a layer's matmul but makes tiny layers look cheaper than they run). A
stage that predicts its gradient adds its predictor: a forward pass every step, and a forward
and backward pass on every true-gradient step. Counting is deterministic: the same config gives
the same partition and placement on every machine.
"""
from __future__ import annotations

import copy
from typing import Optional, Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from synthgrad.common.config import RunConfig
from synthgrad.common.modes import Mode
from synthgrad.common.models import LocalHead, SyntheticGradient, build_units, unit_shapes

_PROBE_BATCH = 2  # batch norm needs two samples in training mode; costs are divided back


def training_flops(module: nn.Module, in_shape: Sequence[int]) -> float:
    """FLOPs of one forward and backward pass of `module`, per sample (on a copy: the module's
    statistics and gradients are not touched)."""
    probe = copy.deepcopy(module).train()
    x = torch.zeros(_PROBE_BATCH, *in_shape, requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        probe(x).float().sum().backward()
    return counter.get_total_flops() / _PROBE_BATCH


def forward_flops(module: nn.Module, *inputs: torch.Tensor) -> float:
    """FLOPs of one forward pass of `module` on `inputs` (whose first dimension is the batch),
    per sample."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module(*inputs)
    return counter.get_total_flops() / inputs[0].shape[0]


def unit_costs(cfg: RunConfig, units: Optional[Sequence[nn.Module]] = None) -> list[float]:
    """Training FLOPs per sample of every unit of the network (built from cfg when not given)."""
    units = list(units) if units is not None else build_units(cfg)
    shapes = [cfg.sample_shape, *unit_shapes(units, cfg.sample_shape)]
    return [training_flops(u, shapes[i]) for i, u in enumerate(units)]


def predictor_cost(cfg: RunConfig, out_shape: Sequence[int]) -> float:
    """FLOPs per sample a (non-last) stage spends on its own helper model, averaged over steps:
    a synthetic-gradient model predicts every step and trains (forward and backward) on
    true-gradient steps; a local classifier head trains every step."""
    rule = Mode(cfg.mode).rule  # None for the modes with processes of their own (pipeline)
    if rule is not None and rule.uses_head:
        return training_flops(LocalHead(out_shape, cfg.classes), out_shape)
    if rule is None or not rule.uses_predictor:
        return 0.0
    sg = SyntheticGradient(out_shape, cfg.sg_model, cfg.sg_hidden, cfg.conditioned, cfg.classes)
    h = torch.zeros(_PROBE_BATCH, *out_shape)
    labels = torch.zeros(_PROBE_BATCH, dtype=torch.long)
    forward = forward_flops(sg, h, labels)
    return forward * (1 + 3 / max(cfg.true_grad_every, 1))


def stage_costs(cfg: RunConfig, groups: Sequence[int], units: Optional[Sequence[nn.Module]] = None,
                costs: Optional[Sequence[float]] = None) -> list[float]:
    """FLOPs per sample of each stage when the units are split into `groups` (layers per stage):
    its units, plus its predictor when the mode has one (not on the last stage, which has the
    loss)."""
    units = list(units) if units is not None else build_units(cfg)
    costs = list(costs) if costs is not None else unit_costs(cfg, units)
    shapes = unit_shapes(units, cfg.sample_shape)
    out, start = [], 0
    for i, n in enumerate(groups):
        end = start + n
        cost = sum(costs[start:end])
        if i < len(groups) - 1:
            cost += predictor_cost(cfg, shapes[end - 1])
        out.append(cost)
        start = end
    return out


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
