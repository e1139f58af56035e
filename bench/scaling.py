#!/usr/bin/env python3
"""Samples/s against number of stages and layer width for backprop, pipeline, locked and
unlocked, all measured in this one run; plus a cost model fitted from the same runs that
predicts throughput for more cores than this machine has.

    python bench/scaling.py                          # stages 1,2,4,8 x width 256,1024
    python bench/scaling.py --stages 1,2 --widths 512 --steps 30

The model: each stage s costs c_s seconds of compute per step and m_s seconds of messaging
(encode, decode, hand-off), both measured from the locked and unlocked workers' own timings.
- locked (every update waits for the gradient): a step is one pass down and back, so
  t_locked = sum_s (c_s + m_s) + 3 (K-1) hop (activation down; gradient up via the coordinator,
  two hops), with `hop` the one-message latency of a ping-pong as in bench/transport.py;
- unlocked with one core per stage: the slowest stage sets the pace, t = max_s (c_s + m_s);
  with C cores shared by K stages: t = max(max_s (c_s + m_s), sum_s (c_s + m_s) / C).
The model is checked against what is measured here (2 cores) and then evaluated for 4-16 cores.
Writes bench/results/scaling.json. Uses the synthetic set: throughput does not depend on data.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from synthgrad.common.config import RunConfig  # noqa: E402
from synthgrad.common.procs import available_cores  # noqa: E402
from synthgrad.coordinator.train import train  # noqa: E402

HIDDEN = 8  # hidden layers, so that up to 9 stages have a layer each


def per_step(summary: dict) -> list[tuple[float, float]]:
    """(compute, messaging) seconds per step of each stage, from the workers' own totals."""
    out = []
    for w in summary["workers"]:
        steps = max(w["steps"], 1)
        # CPU seconds, not wall: with more stages than cores, wall time inside a compute span
        # includes the time other stages held the core
        compute = w.get("compute_cpu_s", w.get("compute_s", 0.0))
        out.append((compute / steps, (w.get("send_s", 0.0) + w.get("recv_s", 0.0)) / steps))
    return out


def predict(costs: list[tuple[float, float]], cores: int, batch: int, mode: str, hop: float) -> float:
    stage = [c + m for c, m in costs]
    if mode == "locked":
        return batch / (sum(stage) + 3 * (len(stage) - 1) * hop)
    return batch / max(max(stage), sum(stage) / cores)


def build_parser() -> argparse.ArgumentParser:
    """This script's command line (tests/test_docs.py parses the documented commands with it)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stages", default="1,2,4,8")
    p.add_argument("--widths", default="256,1024")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--true-grad-every", type=int, default=10)
    p.add_argument("--hop-us", type=float, default=None,
                   help="one-message latency for the locked model (default: measured by a short ping-pong)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    return p


def main() -> None:
    args = build_parser().parse_args()
    cores = len(available_cores())
    out = Path(args.out)
    hop = args.hop_us * 1e-6 if args.hop_us is not None else _measure_hop()
    print(f"{cores} cores; {args.steps} steps of batch 256 per run; MLP 784-{HIDDEN}x W-10; "
          f"message hop {1e6 * hop:.0f} us", flush=True)
    rows = []
    for width in [int(w) for w in args.widths.split(",")]:
        layers = (784, *([width] * HIDDEN), 10)
        for k in [int(s) for s in args.stages.split(",")]:
            base = RunConfig(dataset="synthetic", synthetic_train=25600, synthetic_test=256,
                             layers=layers, stages=k, steps=args.steps, epochs=1, eval_samples=256,
                             true_grad_every=args.true_grad_every, progress_every=600.0,
                             microbatches=max(4, k), timeline_steps=0)
            modes = ["backprop", "pipeline", "locked", "unlocked"] if k > 1 else ["backprop", "locked", "unlocked"]
            measured = {}
            for mode in modes:
                cfg = base.replace(mode=mode, out=str(out / "runs" / f"scaling-w{width}-k{k}-{mode}"),
                                   backprop_threads=cores)
                _, s = train(cfg, log=lambda *_: None)
                measured[mode] = s
                rows.append({"width": width, "stages": k, "mode": mode, "cores": cores,
                             "samples_per_s": s["samples_per_s"]})
            line = "  ".join(f"{m} {measured[m]['samples_per_s']:7.0f}" for m in modes)
            model = {}
            for mode in ("locked", "unlocked"):
                costs = per_step(measured[mode])
                here = predict(costs, cores, base.batch_size, mode, hop)
                more = {c: predict(costs, c, base.batch_size, mode, hop) for c in (4, 8, 16)}
                model[mode] = {"predicted_here": here, "measured_here": measured[mode]["samples_per_s"],
                               "predicted_cores": more,
                               "stage_compute_s": [c for c, _ in costs], "stage_messaging_s": [m for _, m in costs]}
            rows.append({"width": width, "stages": k, "model": model, "cores": cores})
            print(f"W={width:<5} K={k}  {line}   | model here: locked {model['locked']['predicted_here']:.0f}"
                  f" unlocked {model['unlocked']['predicted_here']:.0f};  unlocked on 16 cores "
                  f"{model['unlocked']['predicted_cores'][16]:.0f}", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "scaling.json").write_text(json.dumps({"cores": cores, "hop_s": hop, "rows": rows}, indent=2) + "\n")


def _measure_hop() -> float:
    """Median one-way latency of a small activation message over ipc (ping-pong)."""
    import psutil

    from bench import transport  # the repository root is on sys.path (above)
    from bench.transport import measure
    saved, affinity = transport.SIZES_KIB, psutil.Process().cpu_affinity()
    transport.SIZES_KIB = (64,)
    try:
        rows = measure("ipc", 0.3, available_cores())
    finally:
        transport.SIZES_KIB = saved
        psutil.Process().cpu_affinity(affinity)  # measure() pinned this process
    return rows[0]["latency_us"] * 1e-6


if __name__ == "__main__":
    main()
