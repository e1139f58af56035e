"""Where the work goes: layers split into stages by cost, stages onto cores, and the costs both
are computed from."""
from __future__ import annotations

import itertools

import re

import pytest
import torch
from torch import nn

from synthgrad.common.config import ConfigError, RunConfig
from synthgrad.common.costs import Helpers, helper_flops, training_flops, unit_costs
from synthgrad.common.placement import balance, partition, plan_placement, shared_bound
from synthgrad.coordinator.layout import plan_layout


def test_flops_count_matmuls_forward_and_backward():
    # Linear: 2*in*out forward; backward twice that (input and weight gradients)
    assert training_flops(nn.Linear(30, 20, bias=False), (30,)) == 3 * 2 * 30 * 20
    conv = nn.Conv2d(2, 4, 3, padding=1, bias=False)  # 2*Cin*Cout*k*k per output pixel
    assert training_flops(conv, (2, 5, 5)) == 3 * 2 * 2 * 4 * 9 * 25
    block = nn.Sequential(nn.Linear(30, 20, bias=False), nn.BatchNorm1d(20), nn.ReLU())
    before = [p.clone() for p in block.parameters()]
    training_flops(block, (30,))
    assert all(p.grad is None for p in block.parameters())  # measured on a copy
    assert all(torch.equal(a, b) for a, b in zip(before, block.parameters()))


def test_partition_minimises_the_costliest_stage_against_every_split():
    costs = [1.0, 9.0, 2.0, 2.0, 2.0, 3.0, 8.0, 1.0]

    def cost(a, b):
        return sum(costs[a:b])

    for k in range(1, len(costs) + 1):
        sizes = partition(len(costs), k, cost)
        assert len(sizes) == k and sum(sizes) == len(costs) and min(sizes) >= 1
        bounds = list(itertools.accumulate((0, *sizes)))
        worst = max(cost(a, b) for a, b in zip(bounds, bounds[1:]))
        best = min(max(cost(a, b) for a, b in zip((0, *cuts), (*cuts, len(costs))))
                   for cuts in itertools.combinations(range(1, len(costs)), k - 1))
        assert worst == best  # exhaustive search agrees
    assert partition(4, 2, lambda a, b: float(b - a)) == (2, 2)
    with pytest.raises(ValueError):
        partition(3, 4, cost)


def test_partition_counts_a_stages_predictor_but_not_the_last_stages():
    # units 1,1,1,1; a stage ending at unit i (not last) pays 10 for its predictor
    def cost(a, b):
        return (b - a) + (10.0 if b < 4 else 0.0)
    assert partition(4, 2, cost) == (1, 3)  # 1+10 vs 3: the predictor's stage gets less


def test_balance_puts_the_costliest_stages_apart():
    assert balance([4.0, 4.0, 1.6, 0.1], [0, 1]) == [0, 1, 0, 1]
    assert balance([1.0, 5.0, 1.0, 1.0, 1.0], [0, 1]) == [1, 0, 1, 1, 1]  # 5 alone, 4 ones together
    loads = {}
    for stage, core in enumerate(balance([3.0, 3.0, 2.0, 2.0, 2.0], [0, 1])):
        loads[core] = loads.get(core, 0.0) + [3.0, 3.0, 2.0, 2.0, 2.0][stage]
    assert max(loads.values()) == 7.0  # LPT's answer (the best is 6: within its 4/3 bound)


def test_placement_choices():
    costs = [4.0, 4.0, 1.6, 0.1]
    auto = plan_placement(costs, "auto", cores=[0, 1])
    assert not auto.pinned and auto.busiest == shared_bound(costs, 2) == 4.85
    pin = plan_placement(costs, "pin", cores=[0, 1])
    assert pin.cores == (0, 1, 0, 1) and pin.busiest == pytest.approx(5.6)
    assert plan_placement(costs, "none", cores=[0, 1, 2, 3]).cores == (-1,) * 4
    own = plan_placement([1.0, 1.2, 0.9, 1.1], "auto", cores=[2, 3, 5, 7])
    assert own.cores == (2, 3, 5, 7) and own.busiest == 1.2 and "one core per stage" in own.describe()
    # two stages carry 82% of the work: pinned, each would have one core (4.0 on the busiest);
    # shared, two threads each and the light two yielding (bound 9.7 / 4 cores)
    uneven = plan_placement(costs, "auto", cores=[2, 3, 5, 7])
    assert not uneven.pinned and uneven.threads == (2, 2, 1, 1) and uneven.busiest == pytest.approx(2.425)
    with pytest.raises(ValueError, match="unknown placement"):
        plan_placement(costs, "best", cores=[0])
    with pytest.raises(ConfigError, match="--placement"):
        RunConfig(placement="best").validate()


def test_stages_k_splits_by_cost_and_groups_stay_as_given():
    wide = RunConfig(mode="locked", layers=(784, 2048, 2048, 2048, 10), stages=2)
    cfg, layout = plan_layout(wide)
    assert cfg.groups == (2, 2) and layout.groups == (2, 2)  # by count it would be 2,2 too
    skewed = RunConfig(mode="locked", layers=(784, 2048, 2048, 64, 10), stages=2)
    cfg, layout = plan_layout(skewed)
    assert cfg.groups == (1, 3)  # by count (2, 2) would put both wide layers on one stage
    costs = unit_costs(skewed)
    assert layout.stage_flops == pytest.approx((costs[0], sum(costs[1:])))
    assert max(layout.stage_flops) < costs[0] + costs[1]
    given = RunConfig(mode="locked", layers=(784, 64, 2048, 2048, 10), groups=(1, 3))
    assert plan_layout(given)[0].groups == (1, 3)
    assert plan_layout(RunConfig(mode="backprop")) == (RunConfig(mode="backprop"), None)
    assert plan_layout(skewed.replace(mode="pipeline"))[0].groups == (1, 3)  # no predictor there


@pytest.mark.parametrize("changes, cores, devices, expected", [
    ({}, 2, 0, 2),  # one stage per usable core
    ({}, 16, 0, 4),  # never more than the layers
    ({}, 1, 0, 1),
    ({"threads": (2,)}, 6, 0, 3),  # a stage that asks for two cores takes two
    ({"replicas": (3,), "threads": (2,)}, 7, 0, 2),  # three processes: three cores
    ({"device": "cuda"}, 16, 2, 2),  # one stage per CUDA device
    ({"device": "cuda"}, 2, 8, 4),
    ({"device": "cuda:1"}, 16, 8, 1),  # one named device
    ({"mode": "pipeline", "microbatches": 2}, 8, 0, 2),  # 1f1b needs a microbatch per stage
    ({"mode": "pipeline", "microbatches": 2, "schedule": "gpipe"}, 8, 0, 4),
])
def test_stages_auto_counts_what_the_host_can_run_side_by_side(changes, cores, devices, expected):
    from synthgrad.coordinator.layout import auto_stages
    k, why = auto_stages(RunConfig(stages="auto", **changes), 4, cores, devices)
    assert k == expected and why.startswith(f"--stages auto: {expected} for ")


def test_stages_auto_splits_by_cost_on_the_cores_this_process_may_use(monkeypatch):
    """The run counts the cores of its CPU affinity, then splits the layers by cost as --stages K
    would; the resolved number goes into the config (config.json, every stage's START)."""
    from synthgrad.coordinator import layout as layout_module
    monkeypatch.setattr(layout_module, "available_cores", lambda: [3, 5])
    skewed = RunConfig(mode="locked", layers=(784, 2048, 2048, 64, 10), stages="auto")
    cfg, layout = plan_layout(skewed)
    assert cfg.stages == 2 and cfg.groups == (1, 3) and not cfg.stages_auto
    assert layout.groups == plan_layout(skewed.replace(stages=2))[1].groups
    assert layout.record()["stages_auto"] == "--stages auto: 2 for 2 usable cores"
    assert "(--stages auto: 2 for 2 usable cores)" in layout.describe()
    monkeypatch.setattr(layout_module, "available_cores", lambda: list(range(64)))
    cfg, layout = plan_layout(skewed)
    assert cfg.groups == (1, 1, 1, 1) and "the model has 4 layers with parameters" in layout.auto
    assert plan_layout(RunConfig(mode="backprop", stages="auto"))[1] is None


def test_an_unlocked_stage_pays_for_its_predictor():
    cfg = RunConfig(mode="unlocked", sg_prior="none", layers=(784, 256, 10), true_grad_every=10, sg_model="linear")
    locked = cfg.replace(mode="locked")
    assert helper_flops(locked, (256,)) == 0.0
    # linear predictor of (256 + 10 labels) -> 256: a forward every step, training every 10th
    assert helper_flops(cfg, (256,)) == pytest.approx(2 * 266 * 256 * (1 + 3 / 10))
    # the layout's stage FLOPs: the stage's own layers, plus its predictor unless it is the last
    unlocked_flops, locked_flops = plan_layout(cfg)[1].stage_flops, plan_layout(locked)[1].stage_flops
    assert unlocked_flops[0] == pytest.approx(locked_flops[0] + 2 * 266 * 256 * 1.3)
    assert unlocked_flops[1] == locked_flops[1]
    lowrank = cfg.replace(sg_model="lowrank", sg_hidden=16)  # (256 + 10) -> 16 -> 256
    assert helper_flops(lowrank, (256,)) == pytest.approx(2 * (266 * 16 + 16 * 256) * (1 + 3 / 10))
    local = cfg.replace(mode="local")  # a linear head 256 -> 10, trained every step
    assert helper_flops(local, (256,)) == 3 * 2 * 256 * 10


@pytest.mark.parametrize("shape, stage_flops", [
    ((256,), 3 * 2 * 784 * 256),  # a dense layer's output
    ((256,), 3 * 2 * 256 * 256),
    ((28, 64), 28 * 3 * 2 * 28 * 64),  # a sequence: 28 positions of 64 features
    ((32, 26, 26), 1.18e6),  # a cheap conv's output: the budget leaves only a 1x1 back-projection
    ((64, 12, 12), 6.4e7),  # a costly conv's output
    ((2048,), 3 * 2 * 8 * 2048),  # a stage far cheaper than what it sends: rank 1, over budget
], ids=["dense-784", "dense-256", "sequence", "cheap-conv", "costly-conv", "cheap-dense"])
@pytest.mark.parametrize("every", [1, 10])
def test_the_default_predictor_costs_at_most_its_budget(shape, stage_flops, every):
    """--sg-hidden auto: the largest rank (up to 64) whose predictor, trained every N-th step,
    costs at most --sg-budget of its stage's FLOPs; one rank more would cost more."""
    from synthgrad.common.costs import MAX_AUTO_RANK, _sg_flops, choose_predictor
    cfg = RunConfig(mode="unlocked", sg_prior="none", true_grad_every=every)
    choice = choose_predictor(cfg, shape, stage_flops)
    budget = cfg.sg_budget * stage_flops
    assert choice.flops <= budget or choice.rank == 1, choice
    assert choice.flops == pytest.approx(_sg_flops(cfg, shape, choice.rank, choice.kernel))
    if choice.rank < min(MAX_AUTO_RANK, shape[0] if len(shape) == 3 else shape[-1]):
        assert _sg_flops(cfg, shape, choice.rank + 1, choice.kernel) > budget
    built = choice.build(cfg, shape)
    assert built(torch.randn(3, *shape), torch.tensor([0, 1, 2])).shape == (3, *shape)
    if len(shape) == 3:  # 3x3 when it leaves rank 8 or more, else 1x1
        assert (choice.kernel == 3) == (choice.rank >= 8 and _sg_flops(cfg, shape, 8, 3) <= budget)


@pytest.mark.parametrize("shape, stage_flops, pool", [
    ((64, 12, 12), 6.4e7, 2),  # a costly conv: pooled to 2x2, as decoupled greedy learning's heads
    ((64, 12, 12), 5e4, 1),  # a cheap one: 2x2 (15k FLOPs) is over 20% of 50k, 1x1 (3.8k) is not
    ((256,), 3 * 2 * 784 * 256, None),  # dense: one linear map to the classes
    ((28, 64), 28 * 3 * 2 * 28 * 64, None),  # a sequence: the mean over positions, then linear
], ids=["costly-conv", "cheap-conv", "dense", "sequence"])
def test_a_linear_local_head_costs_at_most_its_budget(shape, stage_flops, pool):
    """A local head is priced against its stage like a predictor: within --sg-budget of the
    stage's FLOPs, a conv activation pooled to 1x1 when 2x2 would be over it. (A hidden layer,
    --head-depth auto, is priced against the pipeline instead: tests/test_heads.py.)"""
    from synthgrad.common.costs import choose_head, training_flops
    cfg = RunConfig(mode="local")
    choice = choose_head(cfg, shape, stage_flops)
    assert choice.flops <= cfg.sg_budget * stage_flops, choice
    assert choice.flops == training_flops(choice.build(cfg, shape), shape)
    if pool is not None:
        assert choice.pool == pool
    assert choice.build(cfg, shape)(torch.randn(3, *shape)).shape == (3, 10)
    # the layout reports each stage's head and its share, and the stage builds that head
    _, layout = plan_layout(RunConfig(mode="local", model="cnn", head_depth=0))
    heads = layout.record()["heads"]
    assert len(heads) == 4 and heads[-1] is None
    assert all(h["share_of_stage_flops"] <= cfg.sg_budget for h in heads[:-1])


def test_an_explicit_rank_is_kept_and_the_layout_reports_each_predictor():
    from synthgrad.common.costs import choose_predictor
    cfg = RunConfig(mode="unlocked", sg_prior="none", model="cnn", true_grad_every=10)
    assert choose_predictor(cfg.replace(sg_hidden=64), (32, 14, 14), 1e6).rank == 64
    _, layout = plan_layout(cfg)
    record = layout.record()["predictors"]
    assert len(record) == 4 and record[-1] is None  # the last stage has the loss
    for stage, entry in enumerate(record[:-1]):
        assert entry["share_of_stage_flops"] <= cfg.sg_budget + 1e-9, (stage, entry)
    assert record[0]["kernel"] == 1  # 32 channels of 14x14 after a 1->32 conv: a 3x3 is too dear
    # the stage builds the same predictor the layout priced
    from torch import nn

    from synthgrad.common.models import build_units, stage_io_shapes
    from synthgrad.workers.stage import StageLogic
    units = build_units(cfg)
    shapes = stage_io_shapes(cfg, units)
    logic = StageLogic(cfg, 0, 4, nn.Sequential(units[0]), shapes[0][0], shapes[0][1])
    assert (logic.parts.predictor.choice.rank, logic.parts.predictor.choice.kernel) == (record[0]["rank"], record[0]["kernel"])
    assert plan_layout(cfg.replace(mode="local"))[1].record()["predictors"] == []


def test_cores_follow_cost():
    """Threads per stage from its share of the run's FLOPs: pinned, the cores are apportioned
    (every core given, each stage at least one, spare cores to the largest work per thread);
    left to the OS, a stage gets its share of the cores, rounded, while the stages of several
    threads fit the cores together (else one per whole core's share)."""
    from synthgrad.common.placement import stage_threads, unpinned_threads
    cnn = [1.18, 64.25, 7.09, 0.01]  # MFLOPs of a CNN whose second conv dominates
    assert stage_threads(cnn, 2, pinned=False) == (1, 2, 1, 1)  # 1.77 cores' worth
    assert stage_threads(cnn, 16, pinned=False) == (1, 14, 2, 1)
    assert stage_threads(cnn, 16, pinned=True) == (1, 12, 2, 1) and sum(stage_threads(cnn, 16, True)) == 16
    assert stage_threads([1.0, 1.0], 2, pinned=True) == (1, 1)
    assert stage_threads([1.0, 1.0], 3, pinned=False) == (1, 1)  # 2 + 2 threads would not fit 3 cores
    assert stage_threads([1.0, 1.0, 2.0], 4, pinned=False) == (1, 1, 2)
    assert unpinned_threads(0.885, 2) == 2 and unpinned_threads(0.6, 2) == 1 and unpinned_threads(0.0, 8) == 1
    # the placement pins blocks of cores when every stage has its own, and the busiest figure
    # (the ceiling's divisor) is the largest work per thread
    p = plan_placement(cnn, "auto", cores=list(range(16)))
    assert p.threads == (1, 12, 2, 1) and p.cores == (0, 1, 13, 15) and p.pinned and not any(p.yields)
    assert p.busiest == pytest.approx(max(c / t for c, t in zip(cnn, p.threads)))
    assert p.shares == pytest.approx(tuple(c / sum(cnn) for c in cnn))
    shared = plan_placement(cnn, "auto", cores=[0, 1])
    assert not shared.pinned and shared.threads == (1, 2, 1, 1) and shared.busiest == pytest.approx(sum(cnn) / 2)
    given = plan_placement(cnn, "auto", cores=[0, 1], threads=(1, 1, 1, 1))  # --threads 1
    assert given.threads == (1, 1, 1, 1) and given.busiest == 64.25 and not any(given.yields)
    assert plan_placement(cnn, "pin", cores=[0, 1]).threads == (1, 1, 1, 1)  # stages share pinned cores


def test_light_stages_yield_to_a_heavy_one_on_shared_cores():
    """Two stages on two cores, one with 90% of the work: pinned, its core would carry 0.9 of
    the work against half of it shared, so auto shares them, the heavy stage on two threads and
    the light one yielding. Even stages stay pinned, and no stage yields on cores it has alone."""
    two = [65.43, 7.09]  # the digits CNN split by --stages 2
    p = plan_placement(two, "auto", cores=[0, 1])
    assert not p.pinned and p.threads == (2, 1) and p.yields == (False, True)
    assert p.busiest == pytest.approx(sum(two) / 2) and "stages 1 yield" in p.describe()
    assert plan_placement(two, "pin", cores=[0, 1]).threads == (1, 1)  # pinning asked for: one core each
    even = plan_placement([1.0, 1.0], "auto", cores=[0, 1])
    assert even.pinned and not any(even.yields)
    four = plan_placement([1.18, 64.25, 7.09, 0.01], "auto", cores=[0, 1])
    assert four.yields == (True, False, True, True)
    # --threads given: the same rule; equal threads yield to nobody
    assert plan_placement(two, "none", cores=[0, 1], threads=(2, 1)).yields == (False, True)
    assert not any(plan_placement(two, "none", cores=[0, 1], threads=(2, 2)).yields)
    assert not any(plan_placement(two, "none", cores=list(range(4)), threads=(2, 1)).yields)  # 3 threads, 4 cores
    assert plan_placement(two, "auto", cores=[0, 1]).yields_at(1) and not even.yields_at(0)


def test_a_stage_gets_no_more_threads_than_its_step_can_use():
    """Threads are capped by a stage's work per step (useful_threads: one per 20 ms of it on
    one core): a small layer gets one thread whatever its share, and then nobody yields;
    pinned, cores no stage can use stay free."""
    from synthgrad.common.placement import MIN_THREAD_STEP_S, stage_threads, useful_threads
    assert useful_threads(0.0002) == useful_threads(0.026) == 1  # the tiny MLP's, the built-in cnn's conv stage
    assert useful_threads(0.077) == int(0.077 / MIN_THREAD_STEP_S) >= 2  # the digits CNN's conv stage
    two = [65.43, 7.09]
    tiny = plan_placement(two, "auto", cores=[0, 1], usable=(1, 1))  # the same shares, a tiny step
    assert tiny.pinned and tiny.threads == (1, 1) and not any(tiny.yields)
    assert plan_placement(two, "auto", cores=[0, 1], usable=(15, 2)).threads == (2, 1)
    assert stage_threads([1.18, 64.25, 7.09, 0.01], 2, pinned=False, usable=(1, 1, 1, 1)) == (1, 1, 1, 1)
    assert stage_threads([1.18, 64.25, 7.09, 0.01], 16, pinned=True, usable=(1, 4, 1, 1)) == (1, 4, 1, 1)
    assert plan_placement(two, "none", cores=[0, 1], threads=(2, 1), usable=(1, 1)).threads == (2, 1)  # given: as given


def test_threads_option_and_the_layout_record():
    cfg = RunConfig(mode="unlocked", threads=(2,))
    assert cfg.stage_thread_counts() == (2, 2, 2, 2)
    assert RunConfig(mode="unlocked", threads=(1, 2, 1, 1)).stage_thread_counts() == (1, 2, 1, 1)
    assert RunConfig(mode="unlocked").stage_thread_counts() is None  # auto
    with pytest.raises(ConfigError, match="--threads lists 3 counts, but the run has 4 stages"):
        RunConfig(mode="unlocked", threads=(1, 2, 1)).validate()
    with pytest.raises(ConfigError, match="--threads entries must be at least 1"):
        RunConfig(mode="unlocked", threads=(0,)).validate()
    old = {k: v for k, v in RunConfig().to_dict().items() if k != "threads"}  # a run folder from before
    assert RunConfig.from_dict({**old, "threads_per_worker": 3}).threads == (3,)
    record = plan_layout(RunConfig(mode="unlocked", threads=(1, 2, 1, 1)))[1].record()
    assert record["threads"] == [1, 2, 1, 1] and sum(record["flops_share"]) == pytest.approx(1.0, abs=1e-3)
    assert record["yields"] == [True, False, True, True]


@pytest.mark.parametrize("spec_core, given, start, expected", [
    (None, None, (5, 3, 0.5), (5, 3)),  # a local stage: the coordinator's layout
    (None, (2,), (5, 3, 0.5), (5, 2)),  # --threads decides
    (4, None, (-1, 1, 0.9), (4, 1)),  # started by hand and pinned to one core of its host
    (-1, None, (-1, 1, 0.9), (-1, "share")),  # started by hand, not pinned: whole cores of its share here
])
def test_a_stage_places_itself_by_the_same_rule(spec_core, given, start, expected):
    from synthgrad.common import wire
    from synthgrad.common.placement import self_sized_threads
    from synthgrad.common.procs import available_cores
    from synthgrad.workers.worker import LayerWorker, WorkerSpec
    cfg = RunConfig(mode="unlocked", threads=given)
    worker = LayerWorker.__new__(LayerWorker)  # only its placement is asked here: no sockets
    worker.spec, worker.stage = WorkerSpec(1, "tcp://127.0.0.1:1", core=spec_core), 1
    core, threads, share = start
    got = worker._place(cfg, wire.Start(cfg, "", core, 10, Helpers(), threads=threads, share=share))
    if expected[1] == "share":
        expected = (-1, self_sized_threads(share, len(available_cores())))
    assert got == expected


def test_flop_counts_are_flopcountermodes():
    """costs.py counts with FlopCounterMode's per-op formulas but without its module tracking:
    the totals must be the same, on layers of every kind the built-in models use."""
    import copy

    from torch import nn
    from torch.utils.flop_counter import FlopCounterMode

    from synthgrad.common.costs import _PROBE_BATCH, training_flops
    layers = [(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                             nn.Linear(8 * 7 * 7, 10)), (3, 16, 16)),
              (nn.TransformerEncoderLayer(16, 2, 32, batch_first=True), (5, 16))]
    for layer, shape in layers:
        probe = copy.deepcopy(layer).train()
        x = torch.zeros(_PROBE_BATCH, *shape, requires_grad=True)
        with FlopCounterMode(display=False) as counter:
            probe(x).float().sum().backward()
        assert training_flops(layer, shape) == counter.get_total_flops() / _PROBE_BATCH, layer


def test_yielding_runs_give_their_workers_sleeping_openmp_threads(monkeypatch):
    """The workers of a run with yielding stages start with OMP_WAIT_POLICY=PASSIVE; other runs
    (and backprop) with OpenMP's defaults; an OpenMP wait setting of the user's own is kept.
    That the workers get it, and lose it again, is checked on real runs in test_training.py."""
    from synthgrad.common.procs import OPENMP_WAIT_SETTINGS, worker_environment
    for key in OPENMP_WAIT_SETTINGS:
        monkeypatch.delenv(key, raising=False)
    assert worker_environment(True) == {"OMP_WAIT_POLICY": "PASSIVE"} and worker_environment(False) == {}
    monkeypatch.setenv("GOMP_SPINCOUNT", "1000")
    assert worker_environment(True) == {}


def test_self_sized_stages_take_whole_cores_only():
    """A stage that sizes itself (by hand or torchrun, unpinned) sees neither the others nor
    yields: two such stages of half the work on 3 cores take one thread each, not 2 + 2."""
    from synthgrad.common.placement import self_sized_threads
    assert self_sized_threads(0.5, 3) == 1 and self_sized_threads(0.9, 2) == 1 and self_sized_threads(0.5, 4) == 2


def test_stages_auto_is_refused_where_the_stages_run_on_other_hosts():
    """auto counts this host's cores: a coordinator whose stages start elsewhere, or torchrun
    (whose ranks are the stages), needs the number."""
    from synthgrad.coordinator.torchrun import TorchrunEnv, check_world
    from synthgrad.coordinator.train import train
    with pytest.raises(ConfigError, match="the stages run on other hosts: give --stages K"):
        train(RunConfig(mode="locked", stages="auto"), bind="tcp://127.0.0.1:0")
    with pytest.raises(ConfigError, match="under torchrun the stages are its ranks: give --stages 4"):
        check_world(RunConfig(mode="locked", stages="auto"), TorchrunEnv(0, 5, 0, "127.0.0.1", 1))


def test_on_stream_data_a_position_wise_front_rides_with_the_first_layer_that_mixes_positions():
    """The default layout, one stage per layer, gives a GPT's embedding (each position alone) the
    stage of the first attention block: a per-position head on the embedding alone could learn
    only a bigram model. A model that mixes positions from its first layer (an LSTM) keeps one
    stage per layer, and so does a GPT whose split is given by hand."""
    from bench.models import small_gpt
    from synthgrad.common.models import build_units, mixes_positions, position_wise_back, position_wise_front
    text = dict(mode="local", dataset="text", input_shape=(8, 11), label_shape=(8,), num_classes=11)
    gpt = RunConfig(**text, model="bench.models:small_gpt")
    assert position_wise_front(mixes_positions(build_units(gpt), (8, 11))) == 1
    assert plan_layout(gpt)[0].stage_groups == (2, 1, 1, 1, 1)
    assert plan_layout(gpt.replace(groups=(1, 1, 1, 1, 1, 1)))[0].stage_groups == (1, 1, 1, 1, 1, 1)
    assert plan_layout(RunConfig(**text, model="lstm"))[0].stage_groups == (1, 1)
    # position-wise throughout (nothing mixes): no claim, one stage per layer
    units = [nn.Linear(11, 16), nn.Sequential(nn.ReLU(), nn.Linear(16, 11))]
    assert mixes_positions(units, (8, 11)) == [False, False]
    assert position_wise_front(mixes_positions(units, (8, 11))) == 0
    assert position_wise_back(mixes_positions(units, (8, 11)), 2) == 2
    assert position_wise_front(mixes_positions(small_gpt((8, 11), 11, width=16, heads=2, blocks=1), (8, 11))) == 1


def test_on_stream_data_a_final_norm_shares_the_read_outs_stage():
    """A GPT written with its final norm and read-out as children of their own (ln_f, lm_head)
    gets one stage for both, as the one-layer read-out of bench.models:small_gpt does: a stage of
    the norm alone trains almost nothing, and its local head would be the read-out again. A model
    whose last layer mixes positions, and a split by hand, keep their stages."""
    from synthgrad.common.models import build_units, mixes_positions, position_wise_back
    text = dict(mode="local", dataset="text", input_shape=(8, 11), label_shape=(8,), num_classes=11)
    gpt = RunConfig(**text, model="tests.user_models:gpt_split_readout")
    mixing = mixes_positions(build_units(gpt), (8, 11))
    assert mixing == [False, True, True, False, False]
    assert position_wise_back(mixing, 5) == 3
    assert plan_layout(gpt)[0].stage_groups == (2, 1, 2)
    by_hand, layout = plan_layout(gpt.replace(groups=(2, 1, 1, 1)))
    assert by_hand.stage_groups == (2, 1, 1, 1)
    # the norm alone (stage 2) has almost no FLOPs: its head shows as a multiple, not millions of %
    assert re.search(r"2: lr x3 [\d,]+x", layout.describe()), layout.describe()
    # torch's own encoder layers, with the norm and the read-out as children of their own
    assert plan_layout(gpt.replace(model="bench.models:encoder_gpt"))[0].stage_groups == (2, 1, 1, 1, 1, 2)
    assert position_wise_back([False, True], 2) == 2  # the last layer mixes: nothing to share
    assert position_wise_back([True, False], 3) == 3  # the probe stopped short: no claim
