"""Bounded memory: with one stage made slow, stage 0 is throttled by the bounded queues and the
memory of every process stays flat over thousands of steps."""
from __future__ import annotations

import json

import pytest

from tests.helpers import run

pytestmark = pytest.mark.slow  # every test here starts processes


@pytest.mark.timeout(180)
def test_slow_stage_throttles_stage_0_and_memory_stays_flat(tiny_cfg):
    q, k, steps = 2, 4, 1200
    run_dir, s = run(tiny_cfg, mode="unlocked", true_grad_every=10, steps=steps, epochs=100,
                     synthetic_train=4096, eval_samples=256, queue_depth=q, metrics_every=0.25,
                     slow_stage=(2, 4))  # stage 2 sleeps 4 ms a step: at most 16k samples/s
    assert s["steps"] == steps
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    workers = [r for r in recs if r["event"] == "worker"]
    status = [r for r in recs if r["event"] == "status" and r["workers"]]
    # throttled: stage 0 runs at the slow stage's pace, never far ahead of it
    assert s["workers"][0]["max_outstanding_steps"] <= 4 * (q + 1) * (k - 1)
    # stage 0 alone runs ~50x faster than 16k samples/s; held back by the queues, it can go no
    # faster than the slow stage lets it (a loaded machine only slows it further)
    ceiling = tiny_cfg.batch_size / 0.004
    assert s["workers"][0]["samples_per_s"] <= 1.05 * ceiling, (s["workers"][0]["samples_per_s"], ceiling)
    # flat memory: from a quarter of the run (warmed up) to its end, no process grows by 10 MB
    series = {stage: [(r["step"], r["rss_mb"]) for r in workers if r["stage"] == stage] for stage in range(k)}
    series["coordinator"] = [(r["step"], r["coordinator_rss_mb"]) for r in status]
    for who, points in series.items():
        later = [rss for step, rss in points if step >= steps // 4]
        assert len(later) >= 10, (who, len(later))
        assert max(later) - later[0] < 10.0, f"{who}: RSS grew {later[0]:.1f} -> {max(later):.1f} MB"
