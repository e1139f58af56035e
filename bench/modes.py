#!/usr/bin/env python3
"""Train the same model under each mode, one after another in this one invocation, and print
final test accuracy, wall-clock and samples/s side by side (ratios are only meaningful within
one run of this script). Writes bench/results/modes.json.

    python bench/modes.py                       # default MLP, Fashion-MNIST, 3 epochs
    python bench/modes.py --epochs 1 --dataset synthetic
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common.config import RunConfig  # noqa: E402
from common.procs import available_cores  # noqa: E402
from coordinator.train import train  # noqa: E402

CONTENDERS = [
    ("backprop", {"mode": "backprop"}),
    ("locked", {"mode": "locked"}),
    ("unlocked N=1", {"mode": "unlocked", "true_grad_every": 1}),
    ("unlocked N=10", {"mode": "unlocked", "true_grad_every": 10}),
    ("stale N=10", {"mode": "stale", "true_grad_every": 10}),
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = p.parse_args()
    cores = available_cores()
    out = Path(args.out)
    rows = []
    for name, changes in CONTENDERS:
        cfg = RunConfig(dataset=args.dataset, epochs=args.epochs, progress_every=30.0,
                        out=str(out / "runs" / name.replace(" ", "_").replace("=", "")), **changes)
        _, s = train(cfg, log=lambda line: print(f"  [{name}] {line}", flush=True))
        rows.append({"contender": name, "mode": s["mode"], "test_accuracy": s["test_accuracy"],
                     "wall_clock_s": s["wall_clock_s"], "samples_per_s": s["samples_per_s"],
                     "true_gradient_steps": s["true_gradient_steps"], "processes": s["num_stages"],
                     "cores": len(cores)})
    base = rows[0]["samples_per_s"]
    print(f"\n{len(cores)} cores; default MLP {RunConfig().layers}, batch {RunConfig().batch_size}, "
          f"{args.epochs} epochs of {args.dataset}")
    print(f"{'contender':<15} {'test acc':>9} {'wall s':>8} {'samples/s':>10} {'vs backprop':>12} {'true-grad steps':>16}")
    for r in rows:
        print(f"{r['contender']:<15} {100 * r['test_accuracy']:>8.2f}% {r['wall_clock_s']:>8.1f} "
              f"{r['samples_per_s']:>10.0f} {r['samples_per_s'] / base:>11.2f}x {r['true_gradient_steps']:>16}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "modes.json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
