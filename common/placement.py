"""Which core each stage process is pinned to (one place, used by every launcher: the local
coordinator, `launch.py worker`, torchrun ranks and the pipeline contender)."""
from __future__ import annotations

from common.procs import available_cores


def snake_core(stage: int, cores: list[int]) -> int:
    """Cores in the order 0,1,..,C-1,C-1,..,1,0,0,1,..: with more stages than cores, the heavy
    first stage (widest input) shares its core with the light last stage (the head)."""
    lap, pos = divmod(stage, len(cores))
    return cores[pos if lap % 2 == 0 else len(cores) - 1 - pos]


def core_for(stage: int, pin: bool, cores: list[int] | None = None) -> int:
    """The core for the stage-th process started on this host, or -1 (not pinned)."""
    return snake_core(stage, cores or available_cores()) if pin else -1
