#!/usr/bin/env python3
"""Placement against the OS: the same run under --placement none, pin and auto, one after
another in one invocation, with the layout's predicted ceiling beside each measured rate.

    python bench/placement.py                                        # 784-2048x3-10, unlocked N=10
    python bench/placement.py --layers 784,256,256,256,10 --mode unlocked --true-grad-every 10
    python bench/placement.py --stages 2 --mode locked

Synthetic data (speed does not depend on it). Each configuration runs `--repeats` times,
interleaved, and the table shows the median; writes bench/results/placement-<name>.json.
"""
from __future__ import annotations

import argparse
import json
import statistics
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
    p.add_argument("--layers", default="784,2048,2048,2048,10")
    p.add_argument("--mode", default="unlocked")
    p.add_argument("--true-grad-every", type=int, default=10)
    p.add_argument("--stages", type=int, default=None)
    p.add_argument("--sg-model", default="linear")
    p.add_argument("--sg-hidden", type=int, default=1024)
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--placements", default="none,pin,auto")
    return p


def main() -> None:
    args = build_parser().parse_args()
    layers = tuple(int(v) for v in args.layers.split(","))
    base = RunConfig(dataset="synthetic", layers=layers, mode=args.mode, true_grad_every=args.true_grad_every,
                     stages=args.stages, sg_model=args.sg_model, sg_hidden=args.sg_hidden,
                     batch_size=args.batch_size, synthetic_train=args.batch_size * args.steps,
                     synthetic_test=512, epochs=1, eval_samples=512, progress_every=1e9,
                     out=str(ROOT / "bench" / "results" / "runs" / "placement"))
    cores = len(available_cores())
    placements = args.placements.split(",")
    rates: dict[str, list[float]] = {pl: [] for pl in placements}
    layout: dict[str, dict] = {}
    for _ in range(args.repeats):
        for pl in placements:
            _, s = train(base.replace(placement=pl), log=lambda _: None)
            rates[pl].append(s["samples_per_s"])
            layout[pl] = s["layout"]
    name = f"{args.mode}-{args.layers.replace(',', '-')}" + (f"-k{args.stages}" if args.stages else "")
    print(f"{cores} cores; {args.mode} (N={args.true_grad_every}) MLP {args.layers}, layers per stage "
          f"{layout[placements[0]]['groups']}, {args.steps} steps of batch {args.batch_size}; "
          f"median of {args.repeats}")
    print(f"{'placement':>9} {'cores':>14} {'samples/s':>10} {'vs none':>8} {'ceiling':>9}  runs")
    none = statistics.median(rates["none"]) if "none" in rates else None
    rows = []
    for pl in placements:
        med = statistics.median(rates[pl])
        ratio = med / none if none else float("nan")
        lay = layout[pl]
        print(f"{pl:>9} {str(lay['cores']):>14} {med:>10.0f} {ratio:>7.2f}x {lay['ceiling_samples_per_s'] or float('nan'):>9.0f}  "
              f"{', '.join(f'{r:.0f}' for r in rates[pl])}")
        rows.append({"placement": pl, "cores_used": lay["cores"], "samples_per_s": rates[pl],
                     "median": med, "ratio_to_none": ratio, "layout": lay})
    out = ROOT / "bench" / "results" / f"placement-{name}.json"
    out.write_text(json.dumps({"cores": cores, "mode": args.mode, "layers": args.layers,
                               "true_grad_every": args.true_grad_every, "steps": args.steps,
                               "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
