#!/usr/bin/env python3
"""How exactly `locked` (and `pipeline` with one microbatch) reproduce single-process backprop.

    python bench/equivalence.py                          # Adam and SGD, 20 and 200 steps
    ATEN_CPU_CAPABILITY=default python bench/equivalence.py --steps 20
    MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 python bench/equivalence.py

Every contender trains the tests' small network (784-64-64-64-10, batch 64, synthetic data,
same seed, same batches; and the built-in CNN) and is compared with `backprop` on one torch thread: the table gives
the largest element-wise difference of any parameter or batch-norm statistic, and where it is.
`backprop` with more threads is listed too: it sums in another order, so it is "equal" only in
the same sense. The kernel path (ATen's vector level, and the MKL / oneDNN limits from the
environment) is printed with the figures, because that is what decides how each run rounds.
The tests' tolerances (tests/helpers.py) are derived from what this prints.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from synthgrad.common.config import RunConfig, default_backprop_threads  # noqa: E402
from synthgrad.common.files import largest_difference, load_model_state  # noqa: E402
from synthgrad.coordinator.train import train  # noqa: E402

KERNEL_ENV = ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "MKL_CBWR", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")
OPTIMIZERS = {"adam": {"optimizer": "adam", "lr": 1e-3}, "sgd": {"optimizer": "sgd", "lr": 0.05, "momentum": 0.9}}


def kernel_path() -> dict:
    return {"cpu_capability": torch.backends.cpu.get_cpu_capability(),
            **{k: os.environ[k] for k in KERNEL_ENV if k in os.environ}}


def contenders(steps: int) -> dict[str, dict]:
    both = max(2, default_backprop_threads())
    return {
        f"backprop, {both} threads": {"mode": "backprop", "backprop_threads": both},
        "locked, 4 stages": {"mode": "locked"},
        "locked, 4 stages, tcp": {"mode": "locked", "transport": "tcp"},
        "locked, 2 stages (1,3)": {"mode": "locked", "groups": (1, 3)},
        "pipeline, 2 stages, 1 microbatch": {"mode": "pipeline", "stages": 2, "microbatches": 1,
                                             "schedule": "gpipe"},
    }


def build_parser() -> argparse.ArgumentParser:
    """This script's command line (tests/test_docs.py parses the documented commands with it)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", default="20,200", help="run lengths to compare at")
    p.add_argument("--optimizers", default="adam,sgd")
    p.add_argument("--models", default="mlp,cnn", help="mlp (784-64-64-64-10) and/or cnn (the built-in CNN)")
    p.add_argument("--out", default=None, help="also write the figures as JSON here")
    return p


def main() -> None:
    args = build_parser().parse_args()
    # one torch thread per stage, as the reference (--threads auto may give a costly stage more)
    base = RunConfig(dataset="synthetic", layers=(784, 64, 64, 64, 10), batch_size=64, synthetic_train=2048,
                     synthetic_test=512, epochs=100, progress_every=3600, checkpoint_every=0, threads=(1,))
    path = kernel_path()
    print("kernel path: " + ", ".join(f"{k}={v}" for k, v in path.items()))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models.split(","):
            for opt in args.optimizers.split(","):
                for steps in (int(s) for s in args.steps.split(",")):
                    cfg = base.replace(model=model, steps=steps, **OPTIMIZERS[opt])
                    tag = f"{model}-{opt}-{steps}"
                    ref_dir, _ = train(cfg.replace(mode="backprop", backprop_threads=1, out=f"{tmp}/{tag}-ref"),
                                       log=lambda *_: None)
                    ref = load_model_state(ref_dir)
                    for i, (name, changes) in enumerate(contenders(steps).items()):
                        got_dir, _ = train(cfg.replace(out=f"{tmp}/{tag}-{i}", **changes), log=lambda *_: None)
                        worst, where = largest_difference(ref, load_model_state(got_dir))
                        rows.append({"model": model, "optimizer": opt, "steps": steps, "contender": name,
                                     "largest_difference": worst, "where": where})
                        print(f"{model:>3} {opt:>4} {steps:>4} steps  {name:<34} {worst:.2e}  ({where})",
                              flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"kernel_path": path, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
