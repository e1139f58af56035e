#!/usr/bin/env python3
"""The synthetic-gradient predictor's accuracy/cost frontier: unlocked runs with the low-rank
predictor at each rank (and the budgeted default, and the full linear map), at each N, one
after another in one invocation.

    python bench/predictors.py                                   # Fashion-MNIST, default MLP, 3 epochs
    python bench/predictors.py --dataset synthetic --layers 784,2048,2048,2048,10 --steps 80
    python bench/predictors.py --model bench.models:digits_cnn --batch-size 128 --epochs 1 \\
        --ranks auto,1,4,16,64                                   # conv activations

Ranks: a number (`--sg-hidden`), `auto` (the default: the largest rank up to 64 within
`--sg-budget` of the stage's FLOPs) or `full` (`--sg-model linear`). Prints per configuration:
test accuracy, samples/s, each stage's predictor (rank, kernel) with its share of the stage's
FLOPs as the layout counts it, the largest measured share of a stage's compute spent on its
predictor, and the mean cosine between predicted and true gradients; writes
bench/results/predictors-<dataset>-<model>.json.
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
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--model", default="mlp", help="mlp (sizes from --layers), cnn, or package.module:factory")
    p.add_argument("--layers", default="784,256,256,256,10")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--ranks", default="16,32,64,128,full,auto",
                   help="lowrank ranks; 'full' = the linear map; 'auto' = the budgeted default")
    p.add_argument("--every", default="1,10", help="values of N (--true-grad-every)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--steps", type=int, default=None)
    return p


def main() -> None:
    args = build_parser().parse_args()
    layers = tuple(int(v) for v in args.layers.split(","))
    base = RunConfig(dataset=args.dataset, model=args.model, layers=layers, mode="unlocked", epochs=args.epochs,
                     steps=args.steps, batch_size=args.batch_size, synthetic_train=256 * (args.steps or 100),
                     synthetic_test=512, progress_every=1e9,
                     out=str(ROOT / "bench" / "results" / "runs" / "predictors"))
    cores = len(available_cores())
    what = args.model if args.model != "mlp" else f"MLP {args.layers}"
    print(f"{cores} cores; unlocked, {what}, {args.dataset}, batch {args.batch_size}, "
          f"{args.steps or args.epochs} {'steps' if args.steps else 'epochs'}, one stage process per layer")
    print(f"{'N':>3} {'predictor':>10} {'test acc':>8} {'samples/s':>10} {'max sg share':>12} {'cosine':>7}  "
          f"per stage: rank/kernel (share of its FLOPs)")
    rows = []
    for n in [int(v) for v in args.every.split(",")]:
        for rank in args.ranks.split(","):
            sg = ({"sg_model": "linear"} if rank == "full" else {"sg_model": "lowrank", "sg_hidden": None}
                  if rank == "auto" else {"sg_model": "lowrank", "sg_hidden": int(rank)})
            _, s = train(base.replace(true_grad_every=n, **sg), log=lambda _: None)
            share = max(w["sg_share_of_compute"] for w in s["workers"])
            cos = [r["sg_cosine"] for r in _worker_records(s["run_dir"]) if r.get("sg_cosine") is not None]
            cosine = sum(cos) / len(cos) if cos else float("nan")
            stages = s["layout"]["predictors"]
            per_stage = "  ".join(f"{e['rank']}/{e['kernel']}x{e['kernel']} ({100 * e['share_of_stage_flops']:.0f}%)"
                                  for e in stages if e is not None)
            name = "linear" if rank == "full" else f"lowrank {rank}"
            acc = s["test_accuracy"]
            print(f"{n:>3} {name:>10} {100 * acc:>7.2f}% {s['samples_per_s']:>10.0f} {100 * share:>11.1f}% "
                  f"{cosine:>7.2f}  {per_stage}", flush=True)
            rows.append({"true_grad_every": n, "predictor": name, "stages": stages, "test_accuracy": acc,
                         "samples_per_s": s["samples_per_s"], "sg_share_of_compute": share,
                         "sg_cosine_mean": cosine})
    model = args.layers.replace(",", "-") if args.model == "mlp" else args.model.split(":")[-1]
    out = ROOT / "bench" / "results" / f"predictors-{args.dataset}-{model}.json"
    out.write_text(json.dumps({"cores": cores, "dataset": args.dataset, "model": args.model, "layers": args.layers,
                               "batch_size": args.batch_size, "epochs": args.epochs, "steps": args.steps,
                               "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")


def _worker_records(run_dir: str) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [r for r in (json.loads(line) for line in path.read_text().splitlines()) if r.get("event") == "worker"]


if __name__ == "__main__":
    main()
