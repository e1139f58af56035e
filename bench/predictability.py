#!/usr/bin/env python3
"""How much of a stage's true gradient can a predictor learn at all, given every true gradient
of a run and not one in N? An upper bound for the synthetic gradient, per stage and per kind
of predictor, measured offline.

A `local` run (one process, bench/rules.py's in-process chain) records, every `--every` steps
from `--from-step` on, each stage's output h, the labels, the head's gradient it stepped on
and the exact gradient at the current weights downstream. Each predictor then learns, on the
first 60% of those records in time order, the correction the head prior misses (exact minus
head's gradient), and is scored on the last 25%: the cosine of its prediction with the true
correction, and the cosine with the exact gradient of the head's gradient alone and of the
head's gradient plus the prediction (at its least-squares gain on the 15% between, which it
did not learn from, as a run measures it). A
predictor that cannot reach a useful cosine here, with many times the true gradients a run at
N=10 gives it, will not reach it in the run.

    python bench/predictability.py --model bench.models:small_gpt --dataset text --set bptt=64 \\
        --batch-size 32 --steps 1000 --from-step 400 --every 2
    python bench/predictability.py --model bench.models:deep_cnn --batch-size 128 --steps 400 \\
        --from-step 200 --every 1 --set stages=8

Predictors (`--kinds`): the synthetic-gradient models the runs use (`linear`, `lowrank`, `mlp`,
each given the labels: `--sg-conditioned`), and for sequences two that read the window:
`later` (each position reads itself and the positions after it, through one attention layer:
a block's gradient at position t comes from the positions that attend to t) and `window`
(every position reads the whole window). Writes bench/results/predictability-<model>.json.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.rules import parse_fields, train_rule  # noqa: E402
from synthgrad.common.config import RunConfig  # noqa: E402
from synthgrad.common.datasets import run_dataset  # noqa: E402
from synthgrad.common.models import SyntheticGradient, one_hot  # noqa: E402

TRAIN_SHARE = 0.6  # the records a predictor learns from, in time order;
GAIN_SHARE = 0.15  # then those its gain is measured on (as a run measures it: on gradients it has
# not learnt from); the last quarter scores it


class WindowReader(nn.Module):
    """A sequence predictor that reads other positions: one attention layer (`later`: each
    position reads itself and the positions after it; `window`: all of them), its output beside
    the position's own features and target, then one hidden layer. The last layer starts at
    zero, as every synthetic-gradient model here does."""

    def __init__(self, features: int, classes: int, later_only: bool, width: int = 64, hidden: int = 256):
        super().__init__()
        self.later_only = later_only
        self.width, self.heads = width, max(1, width // 32)
        self.qkv = nn.Linear(features + classes, 3 * width)
        self.out = nn.Sequential(nn.Linear(features + classes + width, hidden), nn.ReLU(), nn.Linear(hidden, features))
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)

    def forward(self, h: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
        x = torch.cat([h, onehot], dim=-1)
        b, t, _ = x.shape
        q, k, v = (z.reshape(b, t, self.heads, -1).transpose(1, 2) for z in self.qkv(x).chunk(3, dim=-1))
        mask = None
        if self.later_only:  # position t reads positions >= t
            mask = torch.ones(t, t, dtype=torch.bool).triu()
        read = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out(torch.cat([x, read.transpose(1, 2).reshape(b, t, self.width)], dim=-1))


class Predictor(nn.Module):
    """One kind of predictor for one stage's activation shape, fed (h, labels)."""

    def __init__(self, kind: str, shape: tuple[int, ...], classes: int):
        super().__init__()
        self.classes = classes
        if kind in ("later", "window"):
            if len(shape) != 2:
                raise ValueError(f"`{kind}` reads a sequence's positions; this stage's output is {shape}")
            self.net = WindowReader(shape[1], classes, later_only=kind == "later")
            self.reads_window = True
        else:
            self.net = SyntheticGradient(shape, kind=kind, hidden=256, conditioned=True, num_classes=classes)
            self.reads_window = False

    def forward(self, h: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.reads_window:
            return self.net(h, one_hot(labels, self.classes).to(h.dtype))
        return self.net(h, labels)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.reshape(-1).double(), b.reshape(-1).double()
    return float(a @ b / max(float(a.norm() * b.norm()), 1e-30))


def fit(kind: str, records: list[dict], classes: int, epochs: int, lr: float) -> dict:
    """Train one predictor on the first TRAIN_SHARE of the records, take its gain on the next
    GAIN_SHARE, score it on the rest."""
    cut = max(1, int(len(records) * TRAIN_SHARE))
    cut2 = max(cut + 1, int(len(records) * (TRAIN_SHARE + GAIN_SHARE)))
    train, held, test = records[:cut], records[cut:cut2], records[cut2:]
    shape = tuple(records[0]["h"].shape[1:])
    torch.manual_seed(0)
    model = Predictor(kind, shape, classes)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    batch = records[0]["h"].shape[0]
    # targets per sample (batch x the mean's gradient), over their RMS on the training records,
    # so every stage's predictor learns at the same learning rate
    scale = math.sqrt(sum(float((batch * r["correction"]).pow(2).mean()) for r in train) / len(train)) or 1.0
    t0 = time.perf_counter()
    for _ in range(epochs):
        for r in train:
            loss = F.mse_loss(model(r["h"].float(), r["labels"]), batch * r["correction"].float() / scale)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    with torch.no_grad():
        def predicted(r):  # on the gradient's own scale
            return model(r["h"].float(), r["labels"]) * scale / batch

        # the least-squares gain of the prediction on records it did not learn from, as the rule takes it
        pt = sum(float((predicted(r) * r["correction"].float()).sum()) for r in held)
        pp = sum(float(predicted(r).pow(2).sum()) for r in held)
        gain = min(max(pt / pp, 0.0), 1.0) if pp > 0 else 0.0
        rows = [(cosine(predicted(r), r["correction"]), cosine(r["head"], r["exact"]),
                 cosine(r["head"].float() + gain * predicted(r), r["exact"])) for r in test]
    mean = [sum(x[j] for x in rows) / len(rows) for j in range(3)]
    return {"kind": kind, "parameters": sum(p.numel() for p in model.parameters()),
            "train_records": len(train), "test_records": len(test), "gain": round(gain, 3),
            "correction_cosine": round(mean[0], 3), "head_cosine": round(mean[1], 3),
            "head_plus_prediction_cosine": round(mean[2], 3), "seconds": round(time.perf_counter() - t0, 1)}


def build_parser() -> argparse.ArgumentParser:
    """This script's command line (tests/test_docs.py parses the documented commands with it)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a model by import path (bench.models:small_gpt)")
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=1000, help="the local run's length")
    p.add_argument("--from-step", type=int, default=400, help="record from this step on")
    p.add_argument("--every", type=int, default=2, help="record every this many steps")
    p.add_argument("--kinds", default="linear,mlp,later,window",
                   help="predictors to fit (later and window: sequences only, skipped elsewhere)")
    p.add_argument("--fit-epochs", type=int, default=4, help="passes over the training records")
    p.add_argument("--lr", type=float, default=1e-3, help="the predictors' Adam learning rate")
    p.add_argument("--set", action="append", default=[], help="a RunConfig field=value (repeatable)")
    p.add_argument("--out", default=None, help="default: bench/results/predictability-<model>.json")
    return p


def main() -> None:
    p = build_parser()
    args = p.parse_args()
    if not 0 <= args.from_step < args.steps or args.every < 1:
        p.error("need 0 <= --from-step < --steps and --every >= 1")
    torch.set_num_threads(1)
    fields = dict(dataset=args.dataset, model=args.model, batch_size=args.batch_size, steps=args.steps, epochs=10 ** 6)
    fields.update(parse_fields(p, args.set))
    from synthgrad.coordinator.train import _resolve
    cfg = _resolve(RunConfig(**fields))[0]
    ds = run_dataset(cfg)
    records: dict[int, list[dict]] = {}

    def keep(i, step, h, labels, stepped_on, exact):
        if step >= args.from_step:
            records.setdefault(i, []).append({"h": h.detach().half(), "labels": labels.clone(),
                                              "head": stepped_on.detach().float(), "exact": exact.detach().float(),
                                              "correction": (exact - stepped_on).detach().float()})

    print(f"{cfg.dataset}, {args.model}, local for {args.steps} steps, batch {cfg.batch_size}; records every "
          f"{args.every} steps from step {args.from_step}; one process, one thread", flush=True)
    run = train_rule("local", cfg, ds, hop_delay=0, probe_every=args.every, on_probe=keep)
    print(f"local: test loss {run['test_loss']:.4f}, accuracy {100 * run['test_accuracy']:.2f}% "
          f"({run['seconds']:.0f}s)", flush=True)
    classes = cfg.classes
    stages = []
    for i in sorted(records):
        rows = []
        sequence = records[i][0]["h"].dim() == 3
        for kind in args.kinds.split(","):
            if kind in ("later", "window") and not sequence:
                continue
            row = fit(kind, records[i], classes, args.fit_epochs, args.lr)
            rows.append(row)
            print(f"stage {i} {kind:>7}: correction cosine {row['correction_cosine']:+.3f}; with the exact gradient "
                  f"head {row['head_cosine']:.3f} -> head + prediction {row['head_plus_prediction_cosine']:.3f} "
                  f"(gain {row['gain']}, {row['parameters']} parameters, {row['train_records']} records, "
                  f"{row['seconds']}s)", flush=True)
        stages.append({"stage": i, "shape": list(records[i][0]["h"].shape[1:]), "predictors": rows})
    out = Path(args.out or ROOT / "bench" / "results" / f"predictability-{args.model.split(':')[-1]}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": args.model, "dataset": cfg.dataset, "steps": args.steps,
                               "from_step": args.from_step, "every": args.every, "fit_epochs": args.fit_epochs,
                               "local_test_loss": run["test_loss"], "stages": stages}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
