#!/usr/bin/env python3
"""What a built-in dataset costs the process that reads it (stage 0, backprop, the pipeline's
first and last ranks): resident memory after loading, and the time to draw one epoch of batches.
Each variant runs in a fresh interpreter, one after another.

    python bench/datasets.py                         # Fashion-MNIST from the Debian package (gzipped)
    python bench/datasets.py --data-dir DIR          # also an uncompressed copy (gunzip'ed files)

Variants: `bytes` is how synthgrad holds it (pixels as bytes, memory-mapped when uncompressed,
normalised a batch at a time); `floats` materialises every sample as a normalised float32
tensor, as a loader that normalises up front holds it. Writes bench/results/datasets.json.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHILD = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
import psutil, torch
from synthgrad.common.data import train_batches
from synthgrad.common.datasets import load_dataset
data_dir = sys.argv[2] or None
proc = psutil.Process()
before = proc.memory_info().rss
t0 = time.perf_counter()
ds = load_dataset("fashion-mnist", data_dir)
held = [ds.train.images, ds.test.images] if sys.argv[3] == "floats" else []
load_s = time.perf_counter() - t0
after = proc.memory_info().rss
t0 = time.perf_counter()
batches = sum(1 for _ in train_batches(ds.train, 256, 0, 0))
print(json.dumps({"rss_mib": (after - before) / 2**20, "load_s": load_s,
                  "epoch_of_batches_s": time.perf_counter() - t0, "batches": batches}))
"""


def build_parser() -> argparse.ArgumentParser:
    """This script's command line (tests/test_docs.py parses the documented commands with it)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=None, help="a folder of uncompressed Fashion-MNIST IDX files")
    return p


def main() -> None:
    args = build_parser().parse_args()
    sources = [("Debian package (gzipped)", "")] + ([("uncompressed folder", args.data_dir)] if args.data_dir else [])
    print(f"{'files':>26} {'held as':>8} {'resident MiB':>12} {'load s':>7} {'epoch of batches s':>18}")
    rows = []
    for name, folder in sources:
        for variant in ("bytes", "floats"):
            done = subprocess.run([sys.executable, "-c", CHILD, str(ROOT), folder, variant],
                                  capture_output=True, text=True, check=True)
            r = json.loads(done.stdout.strip().splitlines()[-1])
            print(f"{name:>26} {variant:>8} {r['rss_mib']:>12.0f} {r['load_s']:>7.2f} {r['epoch_of_batches_s']:>18.2f}")
            rows.append({"files": name, "held_as": variant, **r})
    out = ROOT / "bench" / "results" / "datasets.json"
    out.write_text(json.dumps({"dataset": "fashion-mnist", "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
