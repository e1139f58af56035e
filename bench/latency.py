#!/usr/bin/env python3
"""Locked against unlocked training as link latency grows: where unlocking should matter most.

    python bench/latency.py                              # delays 0,1,2,5,10 ms, 4 stages
    python bench/latency.py --delays 0,5 --steps 200 --transport tcp
    python bench/latency.py --delays 0 --curve       # each contender also with CURVE links

Latency is simulated in the transport (`--link-delay-ms`): every activation and every gradient
is delivered that long after it was sent, as over a link between hosts (this kernel has no
tc netem). Every (delay, mode) pair runs in this one invocation, on this machine's cores; the
table reports samples/s and each rule's ratio to locked per delay. Locked pays the delay on every
step (down the stages and back), unlocked only in its pipeline fill, so the ratio should grow
with the delay. Writes bench/results/latency.json. Synthetic data: speed does not depend on it.
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


def build_parser() -> argparse.ArgumentParser:
    """This script's command line (tests/test_docs.py parses the documented commands with it)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--delays", default="0,1,2,5,10", help="one-way delays in ms")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--stages", type=int, default=4)
    p.add_argument("--true-grad-every", type=int, default=10)
    p.add_argument("--transport", default="tcp")
    p.add_argument("--curve", action="store_true",
                   help="run each contender twice: plain and with CURVE-encrypted links (the default for tcp)")
    p.add_argument("--modes", default="", help="only these modes (default: locked, unlocked at N=1 and "
                   "--true-grad-every, local, delayed, corrected)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "latency.json"))
    return p


def main() -> None:
    args = build_parser().parse_args()
    delays = [float(d) for d in args.delays.split(",")]
    n = args.true_grad_every
    contenders = [("locked", 1), ("unlocked", 1), ("unlocked", n), ("local", 1), ("delayed", 1), ("corrected", n)]
    if args.modes:
        contenders = [c for c in contenders if c[0] in args.modes.split(",")]
    securities = [False, True] if args.curve else [False]
    base = RunConfig(dataset="synthetic", synthetic_train=args.steps * 256, synthetic_test=512,
                     epochs=1, stages=args.stages, transport=args.transport, eval_samples=512,
                     progress_every=1e9, out=str(ROOT / "bench" / "results" / "runs" / "latency"))
    cores = len(available_cores())
    rows = []
    print(f"{cores} cores, {args.stages} stage processes, {args.steps} steps of batch 256, "
          f"transport {args.transport}")
    print(f"{'delay ms':>8} {'links':>6} {'mode':>12} {'samples/s':>10} {'vs locked':>9} {'test acc':>8} "
          f"{'stage-0 gradient delay, steps':>30}")
    for delay in delays:
        for secure in securities:
            locked_rate = None
            for mode, n in contenders:
                cfg = base.replace(mode=mode, true_grad_every=n, link_delay_ms=delay,
                                   secure=secure)  # True: CURVE with keys made for the run
                _, s = train(cfg, log=lambda _: None)
                rate = s["samples_per_s"]
                locked_rate = rate if mode == "locked" else locked_rate
                name = f"{mode}:{n}" if mode in ("unlocked", "corrected") else mode
                ratio = rate / locked_rate if locked_rate else None
                lag = s["workers"][0].get("gradient_delay_mean")  # delayed: how late step s's gradient came
                rows.append({"delay_ms": delay, "curve": secure, "mode": mode, "true_grad_every": n,
                             "samples_per_s": rate, "ratio_to_locked": ratio, "stage0_gradient_delay": lag,
                             "test_accuracy": s["test_accuracy"], "cores": cores,
                             "stages": args.stages, "steps": s["steps"]})
                print(f"{delay:>8.1f} {'curve' if secure else 'plain':>6} {name:>12} {rate:>10.0f} "
                      f"{ratio:>8.2f}x {100 * s['test_accuracy']:>7.2f}% {'' if lag is None else f'{lag:30.1f}'}",
                      flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"cores": cores, "stages": args.stages, "steps": args.steps,
                                          "transport": args.transport, "delays_ms": delays,
                                          "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
