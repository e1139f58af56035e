"""`torchrun ... launch.py train ...`: the same job under PyTorch's launcher (and so under Slurm
or any cluster where torchrun runs).

Rank 0 is the coordinator; rank r >= 1 runs stage r-1. The world size must be stages + 1.
Rendezvous is torchrun's own: every rank opens torchrun's key-value store from the environment
it sets (MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE); rank 0 binds the coordinator on its
address towards MASTER_ADDR (port 0) and writes the endpoint there, the stages read it. From
then on everything travels over synthgrad's own ZeroMQ links, exactly as in a hand-started run.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable, Optional

from synthgrad.common.config import ConfigError, RunConfig
from synthgrad.common.modes import STAGE_WORKER_MODES, spoken
from synthgrad.common.endpoints import address_towards, tcp_host
from synthgrad.common.placement import plan_placement
from synthgrad.common.security import resolve_keys


@dataclass(frozen=True)
class TorchrunEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    local_world_size: int = 1  # ranks on this node


def detect(environ: Optional[dict] = None) -> Optional[TorchrunEnv]:
    """The torchrun (torch.distributed.run) environment, or None when not started by it."""
    env = os.environ if environ is None else environ
    if not all(k in env for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")):
        return None
    return TorchrunEnv(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)),
                       env["MASTER_ADDR"], int(env["MASTER_PORT"]), int(env.get("LOCAL_WORLD_SIZE", 1)))


def check_world(cfg: RunConfig, env: TorchrunEnv) -> None:
    if not cfg.mode.on_stage_workers:
        raise ConfigError(f"under torchrun the modes are {spoken(STAGE_WORKER_MODES)}; mode '{cfg.mode}' "
                          f"starts its own processes (run it with python launch.py train)")
    if cfg.stages_auto:
        raise ConfigError(f"under torchrun the stages are its ranks: give --stages {env.world_size - 1} "
                          f"(--stages auto counts one host's cores)")
    if cfg.num_layers is None and cfg.stages is None and cfg.groups is None:
        raise ConfigError(f"under torchrun, a model given by import path needs --stages {env.world_size - 1} "
                          f"(or --groups): every rank must know the number of stages before the model "
                          f"is built")
    stages = cfg.stages if cfg.groups is None and cfg.stages is not None else len(cfg.stage_groups)
    if env.world_size != stages + 1:
        raise ConfigError(f"torchrun started {env.world_size} processes, but this run needs "
                          f"{stages + 1}: rank 0 coordinates and ranks 1..{stages} run the {stages} "
                          f"stages. Make nnodes x nproc-per-node = {stages + 1}, or pass "
                          f"--stages {env.world_size - 1}")


ENDPOINT_KEY = "synthgrad/coordinator-endpoint"


def run_rank(cfg: RunConfig, env: TorchrunEnv, log: Callable[[str], None] = print,
             on_status: Optional[Callable[[dict], None]] = None) -> None:
    """Run this rank's part; rank 0 returns after the run (raising what train raises), the
    stage ranks exit the process with the worker's exit code."""
    import torch.distributed as dist
    cfg.validate()
    check_world(cfg, env)
    # every rank checks its keys before the rendezvous: a missing folder fails each rank at once
    keys = resolve_keys(cfg.secure, cfg.keys, "coordinator" if env.rank == 0 else "worker",
                        f"torchrun rank {env.rank}'s link to the coordinator")
    # torchrun's own store (the agent's TCPStore at MASTER_ADDR:MASTER_PORT): rank 0 writes the
    # coordinator's endpoint there, the stages wait for it. No collective, so no gloo mesh.
    store, _, _ = next(dist.rendezvous("env://", rank=env.rank, world_size=env.world_size,
                                       timeout=timedelta(seconds=cfg.start_timeout)))
    if env.rank == 0:
        from synthgrad.coordinator.train import format_summary, train
        announced = False

        def announce(endpoint: str) -> None:
            nonlocal announced
            store.set(ENDPOINT_KEY, endpoint)
            announced = True

        try:
            host = address_towards(env.master_addr)
            _, summary = train(cfg, log, on_status, bind=f"tcp://{host}:0", on_listening=announce)
        finally:
            if not announced:  # failed before listening: tell the stages instead of letting them wait
                store.set(ENDPOINT_KEY, "")
        log(format_summary(summary))
        return
    from synthgrad.workers.worker import WorkerSpec, run_worker
    try:
        store.wait([ENDPOINT_KEY], timedelta(seconds=cfg.start_timeout))
    except Exception:  # torch raises DistStoreError (a RuntimeError) on timeout
        raise SystemExit(f"rank {env.rank}: the coordinator (rank 0) did not announce itself within "
                         f"{cfg.start_timeout:.0f}s") from None
    endpoint = store.get(ENDPOINT_KEY).decode()
    if not endpoint:
        raise SystemExit(f"rank {env.rank}: the coordinator (rank 0) failed before it started")
    # each rank places itself among this node's ranks (stage costs are not known here: equal)
    core = plan_placement([1.0] * env.local_world_size, cfg.placement).cores[env.local_rank]
    coord_host = tcp_host(endpoint)
    host = address_towards(coord_host)
    run_worker(WorkerSpec(env.rank - 1, endpoint, -1, "tcp", host, "", core,
                          connect_timeout=cfg.start_timeout, keys=keys, local_index=env.local_rank))
