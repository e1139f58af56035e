#!/usr/bin/env python3
"""fp32 against bf16 (`--precision`), mode by mode, one run after another in one invocation:
throughput, the gradient bytes that travel back per step, and test accuracy.

    python bench/precision.py                                      # synthetic, 784-1024x3-10
    python bench/precision.py --dataset fashion-mnist --layers 784,256,256,256,10 --epochs 1 --steps 0
    python bench/precision.py --device cuda                        # where a GPU is present

bf16 halves what crosses every link; whether it is faster depends on the device: a CPU without
bf16 matrix instructions computes it more slowly than fp32. Writes
bench/results/precision-<device>-<layers>.json.
"""
from __future__ import annotations

import argparse
import json
import platform
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
    p.add_argument("--dataset", default="synthetic")
    p.add_argument("--layers", default="784,1024,1024,1024,10")
    p.add_argument("--modes", default="backprop,locked,unlocked:10,local,delayed",
                   help="modes, with :N for --true-grad-every")
    p.add_argument("--device", default="cpu")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--steps", type=int, default=120, help="0: whole epochs")
    return p


def main() -> None:
    args = build_parser().parse_args()
    layers = tuple(int(v) for v in args.layers.split(","))
    steps = args.steps or None
    base = RunConfig(dataset=args.dataset, layers=layers, epochs=args.epochs, steps=steps, device=args.device,
                     synthetic_train=256 * (steps or 100), synthetic_test=1024, eval_samples=2048,
                     progress_every=1e9, out=str(ROOT / "bench" / "results" / "runs" / "precision"))
    cores = len(available_cores())
    print(f"{cores} cores ({platform.processor() or platform.machine()}), device {args.device}; MLP {args.layers}, "
          f"{args.dataset}, {steps or args.epochs} {'steps' if steps else 'epochs'}; one stage per layer")
    print(f"{'mode':>12} {'precision':>9} {'samples/s':>10} {'bf16/fp32':>9} {'bytes back/step':>16} {'test acc':>8}")
    rows = []
    for spec in args.modes.split(","):
        mode, _, n = spec.partition(":")
        fp32 = None
        for precision in ("fp32", "bf16"):
            _, s = train(base.replace(mode=mode, true_grad_every=int(n or 1), precision=precision), log=lambda _: None)
            back = s.get("bytes_backward_per_step")
            ratio = "" if fp32 is None else f"{s['samples_per_s'] / fp32:.2f}"
            fp32 = s["samples_per_s"] if fp32 is None else fp32
            print(f"{spec:>12} {precision:>9} {s['samples_per_s']:>10.0f} {ratio:>9} "
                  f"{'' if back is None else f'{back:,.0f}':>16} {100 * s['test_accuracy']:>7.2f}%", flush=True)
            rows.append({"mode": spec, "precision": precision, "samples_per_s": s["samples_per_s"],
                         "bytes_backward_per_step": back, "test_accuracy": s["test_accuracy"]})
    out = ROOT / "bench" / "results" / f"precision-{args.device.replace(':', '')}-{args.layers.replace(',', '-')}.json"
    out.write_text(json.dumps({"cores": cores, "device": args.device, "dataset": args.dataset, "layers": args.layers,
                               "steps": steps, "epochs": args.epochs, "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
