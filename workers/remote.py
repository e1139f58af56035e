"""`launch.py worker`: start stage processes on this host for a coordinator elsewhere.

    python launch.py worker --coordinator tcp://10.0.0.1:5555 --stages 2,3

Each stage is its own process (the same LayerWorker as a local run); it registers with the
coordinator, binds its activation input on this host's address towards the coordinator (port 0,
reported back), and gets its neighbours' endpoints from the coordinator. The stages are pinned to
this host's cores. The command returns when every stage has exited: 0 if all finished cleanly.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Optional

from synthgrad.common.config import ConfigError
from synthgrad.common.endpoints import CONNECT_TIMEOUT_S, address_towards, tcp_host
from synthgrad.common.security import resolve_keys
from synthgrad.common.placement import plan_placement
from synthgrad.common.liveness import Process, Watch
from synthgrad.common.procs import ProcessGroup
from synthgrad.workers.worker import WorkerSpec, run_worker


@dataclass(frozen=True)
class RemoteStages:
    coordinator: str  # tcp://HOST:PORT the coordinator printed
    stages: tuple[int, ...]
    host: Optional[str] = None  # address to bind on; None = this host's address towards the coordinator
    run_dir: str = ""  # "" = the coordinator's run folder path, on this host
    placement: str = "auto"  # as train's --placement, for this host's stages (costs unknown here: equal)
    connect_timeout: float = CONNECT_TIMEOUT_S  # a stage gives up when the coordinator does not answer
    keys: Optional[str] = None  # keys folder (launch.py keys)
    secure: Optional[bool] = None  # False (--no-secure): plain tcp; otherwise CURVE with `keys`

    def specs(self) -> list[WorkerSpec]:
        try:
            coord_host = tcp_host(self.coordinator)
        except ValueError as exc:
            raise ConfigError(f"--coordinator: {exc}") from None
        if not self.stages or any(s < 0 for s in self.stages) or len(set(self.stages)) != len(self.stages):
            raise ConfigError(f"--stages needs distinct stage numbers >= 0, got {list(self.stages)}")
        try:
            host = self.host or address_towards(coord_host)
        except ValueError as exc:
            raise ConfigError(f"--coordinator {self.coordinator}: {exc}") from None
        keys = resolve_keys(self.secure, self.keys, "worker",
                            f"--coordinator {self.coordinator}")  # fails here, before any process
        try:
            cores = plan_placement([1.0] * len(self.stages), self.placement).cores
        except ValueError as exc:
            raise ConfigError(f"--placement: {exc}") from None
        return [WorkerSpec(stage, self.coordinator, -1, "tcp", host, self.run_dir,
                           cores[i], self.connect_timeout,
                           keys=keys)
                for i, stage in enumerate(self.stages)]


def run_stages(job: RemoteStages, log: Callable[[str], None] = print) -> int:
    """Start the stages, wait for all of them, stop them on Ctrl-C; 0 if every one exited 0."""
    specs = job.specs()
    group = ProcessGroup()
    watch = Watch()  # how each stage ended, said as the coordinator would (common/liveness.py)
    try:
        for spec in specs:
            child = group.start(f"stage-{spec.stage}", run_worker, spec)
            watch.add(spec.stage, Process.of_stage(spec.stage, child.process.pid), handle=child.process,
                      may_finish=True)
        log(f"stages {list(job.stages)} on {specs[0].host} (pids "
            f"{', '.join(str(c.process.pid) for c in group.children)}) -> {job.coordinator}")
        while not watch.all_ended():
            time.sleep(0.2)
    except KeyboardInterrupt:
        log("interrupted: stopping the stages started here")
        group.kill()
        return 130
    finally:
        group.shutdown()
    failed = watch.exits()
    for verdict in failed:
        log(str(verdict))
    return 1 if failed else 0
