"""Where the work goes: layers split into stages by cost (`--stages K`), and stages onto cores
(`--placement`). Pure functions of the costs (common/costs.py), so they are the same on every
launcher: the local coordinator, `launch.py worker`, torchrun ranks and the pipeline contender.
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from synthgrad.common.procs import available_cores

# every --placement, with what it does (plan_placement's docstring says why)
PLACEMENTS = {
    "auto": "pin when every stage gets cores of its own and no stage's work makes its pinned cores the bound, "
            "else leave the stages to the OS",
    "pin": "pin every stage, balancing the cores' work",
    "none": "leave every stage to the OS",
}


# `--placement auto` leaves stages that could each have cores of their own to the OS only when
# that promises this much more throughput (the busiest pinned core's work over the shared
# bound), since pinned stages keep their caches and a promise is not a measurement: sharing
# gained less than the bound promised where it was measured. Only 2 cores were measured; on
# more the same bound decides. The figures: docs/results.md, "The placement rules' thresholds".
SHARE_GAIN = 1.25

# A thread's part of one training step (its FLOPs at this core's best matmul rate) below this
# costs more than a second thread gains: each parallel operation wakes and joins its threads,
# and a stage of several threads makes the lighter stages yield, so their work waits for its
# gaps. Set between a conv stage that gained from a second thread and lighter ones that lost
# (docs/results.md, "The placement rules' thresholds").
MIN_THREAD_STEP_S = 0.02


def useful_threads(step_seconds: float) -> int:
    """The most torch threads a stage whose training step takes `step_seconds` on one core can
    use well: one per MIN_THREAD_STEP_S of it, at least one."""
    return max(1, int(step_seconds / MIN_THREAD_STEP_S))


def partition(n: int, k: int, group_cost: Callable[[int, int], float]) -> tuple[int, ...]:
    """Split n units, in order, into k non-empty groups so that the costliest group costs least
    (a pipeline runs at the pace of its slowest stage); `group_cost(a, b)` is the cost of units
    [a, b) as one stage. Among splits with the same largest group, the one found first (earlier
    groups as large as possible) wins, so the answer is deterministic. Returns units per group."""
    if not 1 <= k <= n:
        raise ValueError(f"cannot split {n} units into {k} non-empty stages")
    inf = float("inf")
    # best[j][i]: the smallest largest-group cost of the first i units in j groups
    best = [[inf] * (n + 1) for _ in range(k + 1)]
    cut = [[0] * (n + 1) for _ in range(k + 1)]
    best[0][0] = 0.0
    for j in range(1, k + 1):
        for i in range(j, n - (k - j) + 1):
            for a in range(j - 1, i):
                worst = max(best[j - 1][a], group_cost(a, i))
                if worst < best[j][i] - 1e-12 * max(abs(worst), 1.0):
                    best[j][i], cut[j][i] = worst, a
    sizes, i = [], n
    for j in range(k, 0, -1):
        a = cut[j][i]
        sizes.append(i - a)
        i = a
    return tuple(reversed(sizes))


def blocks(trainable: Sequence[bool]) -> list[tuple[int, int]]:
    """[start, end) runs of units that must share a stage: each unit with parameters and the
    parameter-free units after it (those before the first join it). A stage of parameter-free
    units alone would have nothing to train and nothing to step (an activation, a reshape): it
    would only add a process and a hop."""
    starts = [i for i, t in enumerate(trainable) if t]
    if not starts:
        return [(0, len(trainable))]
    starts[0] = 0
    return list(zip(starts, [*starts[1:], len(trainable)]))


def balance(costs: Sequence[float], cores: Sequence[int]) -> list[int]:
    """A core for each stage so that the busiest core carries little work: the costliest stage
    first, each onto the least loaded core so far (longest-processing-time-first, within 4/3 of
    the best possible). Ties go to the earlier stage and the earlier core."""
    load = {c: 0.0 for c in cores}
    placed = [0] * len(costs)
    for stage in sorted(range(len(costs)), key=lambda s: (-costs[s], s)):
        core = min(cores, key=lambda c: (load[c], cores.index(c)))
        placed[stage] = core
        load[core] += costs[stage]
    return placed


@dataclass(frozen=True)
class Placement:
    """Where a run's stages go and what that predicts."""
    asked: str  # auto | pin | none
    cores: tuple[int, ...]  # per stage, the first of its block of `threads` cores; -1 = not pinned
    busiest: float  # FLOPs per sample on the busiest core: what bounds throughput
    reason: str
    threads: tuple[int, ...] = ()  # torch threads per stage (and cores per pinned stage)
    shares: tuple[float, ...] = ()  # each stage's share of the run's FLOPs
    yields: tuple[bool, ...] = ()  # per stage: runs at the lowest CPU priority (yielding_stages)

    def of(self, stage: int) -> tuple[int, int, float]:
        """(first core or -1, threads, share of the run's FLOPs) of one stage."""
        return (self.cores[stage], self.threads[stage] if self.threads else 1,
                self.shares[stage] if self.shares else 0.0)

    def yields_at(self, stage: int) -> bool:
        return bool(self.yields and self.yields[stage])

    @property
    def pinned(self) -> bool:
        return any(c >= 0 for c in self.cores)

    def core_loads(self, costs: Sequence[float]) -> dict[int, float]:
        loads: dict[int, float] = {}
        for stage, core in enumerate(self.cores):
            loads[core] = loads.get(core, 0.0) + costs[stage]
        return loads

    def describe(self) -> str:
        def block(s: int, c: int) -> str:
            t = self.threads[s] if self.threads else 1
            return f"{s}->{c}" if t == 1 else f"{s}->{c}+{t - 1}"
        where = ("stage->core " + ", ".join(block(s, c) for s, c in enumerate(self.cores))
                 if self.pinned else "not pinned")
        threads = f"; threads per stage {list(self.threads)}" if self.threads else ""
        yielding = [s for s, y in enumerate(self.yields) if y]
        if yielding:
            threads += f"; stages {', '.join(map(str, yielding))} yield the CPU to the others"
        return f"placement {where} ({self.reason}){threads}"


def shared_bound(costs: Sequence[float], n_cores: int, threads: Sequence[int] | None = None) -> float:
    """The busiest core's work when the OS shares the cores perfectly: the whole load spread
    evenly, but never less than the costliest stage's work per thread (a stage runs on at most
    as many cores as it has threads)."""
    threads = threads or [1] * len(costs)
    return max(max(c / t for c, t in zip(costs, threads)), sum(costs) / n_cores)


def unpinned_threads(share: float, n_cores: int) -> int:
    """Torch threads for one stage the OS schedules among others: its share of the run's work
    in cores, rounded (at least one). stage_threads decides for a whole run."""
    return max(1, math.floor(n_cores * share + 0.5))


def self_sized_threads(share: float, n_cores: int) -> int:
    """Torch threads for a stage that sizes itself without seeing the others (started by hand
    or by torchrun, not pinned): one per whole core's share it carries, at least one. Rounded
    up, two such stages could take more cores than the host has, and they do not yield."""
    return max(1, math.floor(n_cores * share + 1e-9))


def stage_threads(costs: Sequence[float], n_cores: int, pinned: bool,
                  usable: Sequence[int] | None = None) -> tuple[int, ...]:
    """Cores follow cost. Pinned (a block of cores per stage, at most one stage per core): every
    stage gets one core, and each spare core goes to the stage whose work per thread is then the
    largest, so the busiest stage's work per thread is as small as whole cores allow. Not
    pinned: each stage its share of the cores, rounded (unpinned_threads). Several threads run
    one stage's every operation in parallel and wait for each other at its end, so the stages
    of more than one thread must fit the cores together: when they do not, each stage gets one
    thread per whole core's worth of work instead (more threads than cores, each stage waiting
    for its slowest thread, ran far slower: docs/results.md). The stages of fewer threads
    share what is left and yield to the others (yielding_stages). `usable` caps each stage's
    threads at what its work per step can use (useful_threads; None: no cap): cores no stage
    can use stay free."""
    total = sum(costs) or 1.0
    shares = [c / total for c in costs]
    cap = list(usable) if usable is not None else [n_cores] * len(costs)
    if not pinned:
        rounded = [min(unpinned_threads(s, n_cores), u) for s, u in zip(shares, cap)]
        if sum(t for t in rounded if t > 1) <= n_cores:
            return tuple(rounded)
        return tuple(min(self_sized_threads(s, n_cores), u) for s, u in zip(shares, cap))
    if len(costs) > n_cores:
        return (1,) * len(costs)
    threads = [1] * len(costs)
    spare = n_cores - len(costs)
    # each spare core to the stage whose work per thread is then the largest (ties: earlier
    # stage), among those that can use another thread
    for _ in range(spare):
        can = [j for j in range(len(costs)) if threads[j] < cap[j]]
        if not can:
            break
        i = max(can, key=lambda j: (costs[j] / threads[j], -j))
        threads[i] += 1
    return tuple(threads)


def yielding_stages(threads: Sequence[int], n_cores: int, pinned: bool) -> tuple[bool, ...]:
    """Which stages run at the lowest CPU priority (common/procs.py yield_cpu): on cores shared
    by more threads than there are, a stage of fewer threads than the largest. A stage of
    several threads waits at the end of every operation for its slowest thread, so when the OS
    takes one of its cores for another stage, all its threads wait: the light stage's work costs
    the cores twice. Yielding, the light stages run in the heavy stage's gaps (its Python, its
    sends, its idle threads, which then sleep rather than spin: procs.worker_environment), and
    the pipeline's bounded queues stop the heavy stage when they fall behind, so they never
    starve. Measured on the digits CNN's two stages (bench/results/, docs/results.md)."""
    if pinned or sum(threads) <= n_cores or len(set(threads)) < 2:
        return (False,) * len(threads)
    most = max(threads)
    return tuple(t < most for t in threads)


def plan_placement(costs: Sequence[float], how: str, cores: Sequence[int] | None = None,
                   threads: Sequence[int] | None = None, usable: Sequence[int] | None = None) -> Placement:
    """Where each stage runs, and with how many torch threads (`threads`: given per stage, or
    None for stage_threads, capped by `usable`). `pin`: pin every stage, balancing the cores' work (balance). `none`:
    leave every stage to the OS. `auto`: pin when every stage gets cores of its own (nothing to
    share, and a pinned process keeps its caches): each stage a block of as many cores as it
    has threads; with more stages than cores, or when one stage's work makes the busiest
    pinned core carry more than the OS sharing all cores would (the digits CNN's two stages,
    90% of the work in one, on 2 cores), leave them to the OS, which hands a core to whichever
    process is ready while the others wait for messages: measured on bench/placement.py, a
    fixed split of the cores loses to that when stages wait on each other. Stages sharing cores
    this way get yielding_stages."""
    if how not in PLACEMENTS:
        raise ValueError(f"unknown placement {how!r}; choose one of {', '.join(PLACEMENTS)}")
    cores = list(cores if cores is not None else available_cores())
    total = sum(costs) or 1.0
    shares = tuple(c / total for c in costs)
    own = len(costs) <= len(cores)  # every stage can have cores of its own
    pinned = how == "pin" or (how == "auto" and own)
    chosen = tuple(threads) if threads is not None else stage_threads(costs, len(cores), pinned and own, usable)
    if how == "auto" and own and threads is None:
        # pinning gives each stage only cores of its own: when one stage carries most of the
        # work, the busiest core can carry more than sharing every core would give it
        shared_threads = stage_threads(costs, len(cores), pinned=False, usable=usable)
        pinned_busiest = max(c / t for c, t in zip(costs, chosen))
        if shared_bound(costs, len(cores), shared_threads) * SHARE_GAIN < pinned_busiest:
            pinned, chosen = False, shared_threads
    if not pinned or (own and sum(chosen) > len(cores)):
        reason = ("--placement none" if how == "none" else
                  f"{len(costs)} stages on {len(cores)} cores: the OS shares the cores" if not own else
                  f"{sum(chosen)} threads on {len(cores)} cores: the OS shares the cores")
        return Placement(how, tuple(-1 for _ in costs), shared_bound(costs, len(cores), chosen), reason,
                         chosen, shares, yielding_stages(chosen, len(cores), pinned=False))
    if own:  # a block of cores per stage, in order
        starts = [0, *itertools.accumulate(chosen)][:-1]
        placed = [cores[i] for i in starts]
        busiest = max(c / t for c, t in zip(costs, chosen))
        reason = "one core per stage" if set(chosen) == {1} else "a block of cores per stage, sized by cost"
        return Placement(how, tuple(placed), busiest, reason, chosen, shares)
    placed = balance(costs, cores)  # --placement pin, more stages than cores: one thread each
    loads: dict[int, float] = {}
    for stage, core in enumerate(placed):
        loads[core] = loads.get(core, 0.0) + costs[stage]
    return Placement(how, tuple(placed), max(loads.values()),
                     f"{len(costs)} stages balanced over {len(cores)} cores", (1,) * len(costs), shares)


def replica_blocks(core: int, threads: int, replicas: int, usable: Sequence[int]) -> list[tuple[int, int]]:
    """(first core or -1, torch threads) for each process of a stage that runs as `replicas`
    processes (workers/replicas.py): the stage's `threads` cores from `core` on are split into
    equal blocks, one per replica (each at least one core; with fewer cores than replicas, the
    replicas share the stage's cores in turn). Not pinned (core -1): each replica gets its part
    of the threads and the OS places it."""
    per = max(threads // max(replicas, 1), 1)
    if core < 0:
        return [(-1, per)] * replicas
    first = list(usable).index(core) if core in usable else 0
    block = list(usable)[first:first + max(threads, 1)] or [core]
    return [(block[(r * per) % len(block)], per) for r in range(replicas)]
