"""Where the work goes: layers split into stages by cost (`--stages K`), and stages onto cores
(`--placement`). Pure functions of the costs (common/costs.py), so they are the same on every
launcher: the local coordinator, `launch.py worker`, torchrun ranks and the pipeline contender.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from synthgrad.common.config import PLACEMENTS
from synthgrad.common.procs import available_cores


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
    cores: tuple[int, ...]  # per stage; -1 = not pinned (the OS schedules it)
    busiest: float  # FLOPs per sample on the busiest core: what bounds throughput
    reason: str

    @property
    def pinned(self) -> bool:
        return any(c >= 0 for c in self.cores)

    def core_loads(self, costs: Sequence[float]) -> dict[int, float]:
        loads: dict[int, float] = {}
        for stage, core in enumerate(self.cores):
            loads[core] = loads.get(core, 0.0) + costs[stage]
        return loads

    def describe(self) -> str:
        where = ("stage->core " + ", ".join(f"{s}->{c}" for s, c in enumerate(self.cores))
                 if self.pinned else "not pinned")
        return f"placement {where} ({self.reason})"


def shared_bound(costs: Sequence[float], n_cores: int) -> float:
    """The busiest core's work when the OS shares the cores perfectly: the whole load spread
    evenly, but never less than the costliest stage (one process runs on one core at a time)."""
    return max(max(costs), sum(costs) / n_cores)


def plan_placement(costs: Sequence[float], how: str, cores: Sequence[int] | None = None) -> Placement:
    """`pin`: pin every stage, balancing the cores' work (balance). `none`: leave every stage to
    the OS. `auto`: pin when every stage gets a core of its own (nothing to share, and a pinned
    process keeps its caches); with more stages than cores, leave them to the OS, which hands a
    core to whichever process is ready while the others wait for messages: measured on
    bench/placement.py, a fixed split of the cores loses to that when stages wait on each other."""
    if how not in PLACEMENTS:
        raise ValueError(f"unknown placement {how!r}; choose one of {', '.join(PLACEMENTS)}")
    cores = list(cores if cores is not None else available_cores())
    shared = shared_bound(costs, len(cores))
    if how == "none" or (how == "auto" and len(costs) > len(cores)):
        reason = ("--placement none" if how == "none" else
                  f"{len(costs)} stages on {len(cores)} cores: the OS shares the cores")
        return Placement(how, tuple(-1 for _ in costs), shared, reason)
    placed = list(cores[:len(costs)]) if len(costs) <= len(cores) else balance(costs, cores)
    loads: dict[int, float] = {}
    for stage, core in enumerate(placed):
        loads[core] = loads.get(core, 0.0) + costs[stage]
    reason = ("one core per stage" if len(costs) <= len(cores) else
              f"{len(costs)} stages balanced over {len(cores)} cores")
    return Placement(how, tuple(placed), max(loads.values()), reason)
