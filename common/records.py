"""What a stage worker tells the coordinator about itself, as typed records: a WorkerReport every
--metrics-every seconds (METRICS) and its StageSummary at the end (DONE). The wire checks every
field against these annotations, so the coordinator reads attributes it can trust instead of a
dict's keys; metrics.jsonl and summary.json hold them as JSON (`dataclasses.asdict`), field for
field as before."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class WorkerReport:
    """One interval of a stage's work (workers/meter.py Meter.interval, workers/reporting.py);
    figures a stage has no data for this interval are None."""
    stage: int
    pid: int
    device: str  # where the stage's parameters are ("cpu", "cuda:0")
    final: bool  # the last report of the run
    step: int  # the last training step done (-1: none yet)
    steps: int
    samples: int
    samples_per_s: float
    busy_fraction: float
    send_fraction: float
    recv_fraction: float
    wait_input_fraction: float
    wait_send_fraction: float
    wait_grad_fraction: float
    cpu_percent: float
    rss_mb: float
    messaging_fraction: float
    outstanding_steps: int
    rejected_messages: int
    loss: Optional[float]
    train_accuracy: Optional[float]
    true_grads: int
    bootstrap_grads: int
    dropped_steps: int
    sg_loss: Optional[float]
    sg_cosine: Optional[float]
    untrusted_steps: int
    head_loss: Optional[float]
    gradient_delay_mean: Optional[float]
    gradient_delay_max: Optional[int]
    # a recurrent stage's state predictor (None where the stage has none)
    state_sg_loss: Optional[float] = None
    state_sg_cosine: Optional[float] = None


@dataclass(frozen=True)
class StageSummary:
    """A stage's whole run (workers/reporting.py final_summary): summary.json's worker entry,
    and what the coordinator's manifest names (last_step, checkpoint, host)."""
    stage: int
    pid: int
    host: str
    device: str
    steps: int
    last_step: int
    samples: int
    elapsed_s: float
    samples_per_s: float
    busy_fraction: float
    input_endpoint: str
    core: int
    threads: int
    cores_allowed: Optional[int]  # None where the OS does not say
    cpu_priority: str
    omp_wait_policy: Optional[str]
    units: list[int]  # [first, end) of the model's units this stage holds
    replica_pids: list[int]
    messaging_fraction: float
    compute_s: float
    send_s: float
    recv_s: float
    wait_input_s: float
    wait_send_s: float
    wait_grad_s: float
    compute_cpu_s: float
    max_outstanding_steps: int
    true_grads_received: int
    bootstrap_grads_received: int
    sg_s: float
    sg_share_of_compute: float
    head_share_of_compute: float
    gradient_delay_mean: Optional[float]
    gradient_delay_max: Optional[int]
    rejected_messages: int
    checkpoint: str  # the stage's final checkpoint, on `host`
