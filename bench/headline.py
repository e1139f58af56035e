#!/usr/bin/env python3
"""Headline ratios that survive the machine's drift: each invocation runs backprop and each rule
alternately (backprop, rule A, backprop, rule B, ...), so every ratio is taken between two runs
minutes apart at most; a figure worth quoting is the median of three or more invocations, with
its range (one invocation can hold a lucky pair).

    for i in 0 1 2; do python bench/headline.py run --model bench.models:digits_cnn --batch-size 128 \\
        --epochs 2 --seed $i --rules local,unlocked:10 --out bench/results/headline-cnn.jsonl; done
    python bench/headline.py run ... --rules local,local+replicas=1/2/1/1   # a rule's own options
    python bench/headline.py run ... --rules unlocked:10+sg-true-updates=false+sg-trust-scale=false
    python bench/headline.py summary bench/results/headline-cnn.jsonl

`run` appends one JSON line per pair to --out (a pair that failed as a line with its reason)
and keeps every run's folder under bench/results/runs/headline/<invocation>/; `summary` prints,
per rule: samples/s ratio to backprop (median [min-max]), test accuracy minus backprop's in
points (median [min-max]), the wall-clock ratio at which the rule first came within 0.5 point
of backprop's final accuracy (when it did), and the invocations counted; failed pairs are
listed and left out of the medians.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from synthgrad.common.config import RunConfig, rule_options  # noqa: E402
from synthgrad.common.reports import RunFailed  # noqa: E402
from synthgrad.common.procs import available_cores  # noqa: E402
from synthgrad.coordinator.train import train  # noqa: E402

WITHIN = 0.005  # "reaches backprop's accuracy": within half a point of its final test accuracy


def _config(args, rule: str, out: Path) -> RunConfig:
    rule, options = rule_options(rule)
    mode, _, n = rule.partition(":")
    changes = {"mode": mode, "out": str(out), **options}
    if n:
        changes["true_grad_every"] = int(n)
    layers = tuple(int(v) for v in args.layers.split(",")) if args.layers else RunConfig.layers
    return RunConfig(model=args.model, layers=layers, dataset=args.dataset, batch_size=args.batch_size,
                     epochs=args.epochs, steps=args.steps, eval_every=args.eval_every, seed=args.seed,
                     eval_samples=args.eval_samples, progress_every=1e9,
                     **changes).validate()


def _first_within(evals: list[dict], target: float) -> float | None:
    for e in evals:
        if e["test_accuracy"] >= target - WITHIN:
            return e["wall_s"]
    return None


def run(args) -> None:
    cores = len(available_cores())
    invocation = f"{os.getpid()}-{int(time.time())}"
    # a folder per invocation and per run: a later invocation never overwrites the records
    # of one whose figures (or failure) are still being read
    runs = ROOT / "bench" / "results" / "runs" / "headline" / invocation
    print(f"run folders under {runs}", flush=True)
    with open(args.out, "a") as sink:
        for i, rule in enumerate(args.rules.split(",")):
            folder = rule.replace(":", "").replace("+", "-").replace("/", "").replace("=", "")
            folders = [runs / f"{i}-backprop", runs / f"{i}-{folder}"]
            running = "backprop"
            try:
                _, bp = train(_config(args, "backprop", folders[0]), log=lambda _: None)
                running = rule
                _, got = train(_config(args, rule, folders[1]), log=lambda _: None)
            except RunFailed as exc:  # recorded, and left out of the medians: `summary` counts it
                sink.write(json.dumps({"invocation": invocation, "cores": cores, "model": args.model,
                                       "layers": args.layers, "seed": args.seed, "rule": rule,
                                       "failed": f"{running}: {exc}",
                                       "run_folders": [str(f) for f in folders]}) + "\n")
                sink.flush()
                print(f"{rule:>14}: FAILED in {running} ({exc}); its run folders: {folders[0]}, {folders[1]}",
                      flush=True)
                continue
            reached = _first_within(got["evals"], bp["test_accuracy"])
            bp_reached = _first_within(bp["evals"], bp["test_accuracy"])
            row = {"invocation": invocation, "cores": cores, "model": args.model, "layers": args.layers,
                   "dataset": args.dataset, "batch_size": args.batch_size, "epochs": args.epochs,
                   "steps": args.steps, "seed": args.seed, "rule": rule,
                   "backprop_samples_per_s": bp["samples_per_s"], "samples_per_s": got["samples_per_s"],
                   "ratio": got["samples_per_s"] / bp["samples_per_s"],
                   "backprop_accuracy": bp["test_accuracy"], "accuracy": got["test_accuracy"],
                   "accuracy_gap_points": 100 * (got["test_accuracy"] - bp["test_accuracy"]),
                   "backprop_reached_s": bp_reached, "reached_s": reached,
                   "time_to_accuracy_ratio": None if reached is None or not bp_reached else reached / bp_reached,
                   "layout": got.get("layout"), "run_folders": [str(f) for f in folders]}
            sink.write(json.dumps(row) + "\n")
            sink.flush()
            print(f"{rule:>14}: {row['ratio']:.2f}x backprop ({got['samples_per_s']:,.0f} vs "
                  f"{bp['samples_per_s']:,.0f} samples/s), accuracy {100 * got['test_accuracy']:.2f}% vs "
                  f"{100 * bp['test_accuracy']:.2f}%", flush=True)


def _spread(values: list[float], fmt: str) -> str:
    return f"{statistics.median(values):{fmt}} [{min(values):{fmt}}-{max(values):{fmt}}]"


def summary(args) -> None:
    rows = [json.loads(line) for line in Path(args.file).read_text().splitlines() if line.strip()]
    failed = [r for r in rows if "failed" in r]
    rows = [r for r in rows if "failed" not in r]
    for r in failed:
        print(f"left out: {r['rule']} (seed {r.get('seed')}, invocation {r['invocation']}) failed: {r['failed']}")
    if not rows:
        print("no finished pairs")
        return
    print(f"{len({r['invocation'] for r in rows})} invocations, {rows[0]['cores']} cores, {rows[0]['model']}")
    print(f"{'rule':>14} {'samples/s ratio':>22} {'accuracy gap (pt)':>24} {'time to bp acc ratio':>24} n")
    for rule in dict.fromkeys(r["rule"] for r in rows):
        mine = [r for r in rows if r["rule"] == rule]
        ttas = [r["time_to_accuracy_ratio"] for r in mine if r["time_to_accuracy_ratio"] is not None]
        tta = _spread(ttas, ".2f") + f" ({len(ttas)}/{len(mine)})" if ttas else f"never (0/{len(mine)})"
        print(f"{rule:>14} {_spread([r['ratio'] for r in mine], '.2f'):>22} "
              f"{_spread([r['accuracy_gap_points'] for r in mine], '+.2f'):>24} {tta:>24} {len(mine)}")
    bp = [r["backprop_samples_per_s"] for r in rows]
    print(f"backprop samples/s over the invocations: {_spread(bp, ',.0f')}")


def build_parser() -> argparse.ArgumentParser:
    """This script's command line (tests/test_docs.py parses the documented commands with it)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run")
    r.add_argument("--model", default="mlp")
    r.add_argument("--layers", default=None, help="MLP sizes (model mlp)")
    r.add_argument("--dataset", default="fashion-mnist")
    r.add_argument("--batch-size", type=int, default=256)
    r.add_argument("--epochs", type=int, default=2)
    r.add_argument("--steps", type=int, default=None)
    r.add_argument("--seed", type=int, default=0, help="initial weights and batch order (vary it across invocations "
                                                       "for medians over seeds)")
    r.add_argument("--eval-every", type=int, default=None, help="also evaluate every N steps (time to accuracy)")
    r.add_argument("--eval-samples", type=int, default=None, help="evaluate on the first N test samples")
    r.add_argument("--rules", default="local,corrected:10,unlocked:10")
    r.add_argument("--out", required=True, help="JSON lines file to append this invocation's pairs to")
    s = sub.add_parser("summary")
    s.add_argument("file")
    return p


def main() -> None:
    args = build_parser().parse_args()
    (run if args.command == "run" else summary)(args)


if __name__ == "__main__":
    main()
