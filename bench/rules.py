#!/usr/bin/env python3
"""Update rules tried in one process before they become modes: the real StageLogic of every
stage, chained by hand, with each backward hop delivered a fixed number of steps late (as the
stage processes deliver it when nobody waits). Fast enough to compare many rules on the real
data, and honest about accuracy: every rule sees the same batches in the same order.

    python bench/rules.py                         # every rule, Fashion-MNIST, 3 epochs, default MLP
    python bench/rules.py --rules local,corrected:10 --epochs 1
    python bench/rules.py --model bench.models:digits_cnn --batch-size 128 --steps 300 \
        --rules backprop,unlocked:10 --set sg_true_updates=false     # any RunConfig field

Rules: backprop (no delay: the reference), unlocked:N (the mode as the run's options say;
by default its predictor's prior is a local head's gradient), residual:N (unlocked with
--sg-prior head), dni:N (unlocked with --sg-prior none: the DNI paper's predictor alone), local
(DGL), delayed (DDG), corrected:N (local heads plus every N-th true gradient), and a candidate
that did not become a mode (swapped:N, below). Prints test accuracy per rule, how many
gradients travelled backward per step, each predictor's running cosine at the end and each
stage's share of dead units (outputs zero on all of 1,024 test samples); writes bench/results/rules.json. Throughput is not
measured here (one process): that is what `launch.py compare` does.

The stage-by-stage diagnosis (docs/results.md, "Synthetic gradients at depth"):

    python bench/rules.py --model bench.models:digits_cnn --batch-size 128 --epochs 2 \
        --rules unlocked:10,local --probe-every 20          # each stage's gradient against the exact one
    python bench/rules.py --model bench.models:digits_cnn --batch-size 128 --epochs 2 \
        --rules unlocked:10 --oracle 0                      # stage 0 steps on exact gradients

`--probe-every P`: every P steps, each stage's exact dL/dh at the current weights downstream
(the batch it just ran, the same labels) is set beside what the stage stepped on: their cosine
and relative error, per stage and per quarter of the run; on the weights' gradients, their
cosine, and how far the two halves of the batch agree on the step's error there (the most a
predictor of per-sample gradients could get right: `on_weights`). `--oracle I`: stage I steps on that
exact gradient every step (everything else as the rule says): what stage I's own error costs.
`--heads-from-readout`: every local head is the model's last stage at its current weights (for
residual models, whose stages all hand on the readout's input).

A small GPT (docs/results.md, "A small GPT on text"):

    python bench/rules.py --model bench.models:small_gpt --dataset text --set bptt=64 --batch-size 32 \
        --steps 1000 --rules backprop,local,residual:10 --probe-every 100
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

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from synthgrad.common.config import ConfigError, RunConfig, field_value  # noqa: E402
from synthgrad.common.data import eval_batches, train_batches  # noqa: E402
from synthgrad.common.datasets import run_dataset  # noqa: E402
from synthgrad.common.evaluation import EvalTally  # noqa: E402
from synthgrad.common.models import build_units, stage_bounds, stage_io_shapes  # noqa: E402
from synthgrad.common.modes import Corrected, Mode, UpdateRule, weight_gradients  # noqa: E402
from synthgrad.common.costs import helper_models, unit_costs  # noqa: E402
from synthgrad.workers.stage import StageLogic  # noqa: E402


class Swapped(Corrected):
    """As corrected, but a true-gradient step takes no local update: its one update is the true
    gradient when it arrives (so every step still makes exactly one update)."""

    def local_gradient(self, step, h, labels, kept):
        head = self.parts.head.gradient(step, h, labels)  # the head learns from every step
        return None if kept is not None and kept.h is not None else head


class ReadoutHead(nn.Module):
    """--heads-from-readout: a stage's local head is the model's own last stage, at its current
    weights (detached: the head's loss trains the stage, never the readout). The logit lens as
    a local loss, for models whose stages all hand on the readout's input shape (a residual
    stream): the readout's gradient at a stage's output is the direct path's share of the true
    gradient there."""

    def __init__(self, readout: nn.Module):
        super().__init__()
        self.__dict__["readout"] = readout  # not a submodule: the head's optimiser must not step it
        self.decoder = None

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        weights = {name: p.detach() for name, p in self.readout.named_parameters()}
        return torch.func.functional_call(self.readout, weights, (h,))


def make_rule(name: str) -> tuple[dict, type[UpdateRule] | None]:
    """(the config fields the rule sets, its rule class or None for the mode's own)."""
    base, _, n = name.partition(":")
    every = int(n) if n else 1
    mode, rule, fields = {"backprop": ("locked", None, {}), "unlocked": ("unlocked", None, {}),
                          "dni": ("unlocked", None, {"sg_prior": "none"}),
                          "residual": ("unlocked", None, {"sg_prior": "head"}),
                          "local": ("local", None, {}), "delayed": ("delayed", None, {}),
                          "corrected": ("corrected", None, {}), "swapped": ("corrected", Swapped, {})}[base]
    return {"mode": mode, "true_grad_every": every if Mode(mode).takes_n else 1, **fields}, rule


@torch.no_grad()
def _dead_units(stages: list[StageLogic], x: torch.Tensor) -> list[float]:
    """Per stage below the last, the share of its output units (channels of a conv output)
    that are zero on every one of the samples `x` in eval mode: ReLUs that never fire, which
    pass no gradient and so never come back."""
    shares = []
    for st in stages[:-1]:
        x = st.eval_forward(x)
        per_unit = x.reshape(x.shape[0], x.shape[1], -1).abs().amax(dim=(0, 2))
        shares.append(round(float((per_unit == 0).float().mean()), 3))
    return shares


class Probe:
    """Exact gradients at a stage's output: the batch it just ran, pushed through the current
    weights of every stage after it to the loss, with the random number generator and every
    buffer (batch norm's statistics) put back, so the run goes on exactly as without it."""

    def __init__(self, stages: list[StageLogic], every: int, oracle: int | None, on_probe=None):
        self.stages = stages
        self.every = every
        self.oracle = oracle
        self.on_probe = on_probe  # called (stage, step, h, labels, stepped on, exact) at every probe
        self.rows: list[list[tuple[int, float, float]]] = [[] for _ in stages[:-1]]  # (step, cos, rel. error)

    def exact(self, i: int, h: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        rng = torch.get_rng_state()
        modules = [st.parts.layers.module for st in self.stages[i + 1:]]
        buffers = [[b.clone() for b in m.buffers()] for m in modules]
        leaf = h.detach().requires_grad_(True)
        with torch.enable_grad():
            out = leaf
            for m in modules:
                out = m(out)
            loss = self.stages[-1].loss_fn(out, labels)
            (g,) = torch.autograd.grad(loss, leaf)
        for m, saved in zip(modules, buffers):
            for b, v in zip(m.buffers(), saved):
                b.copy_(v)
        for m in modules:
            m.zero_grad(set_to_none=True)
        torch.set_rng_state(rng)
        return g

    def watch(self, i: int, st: StageLogic) -> None:
        """Wrap stage i's rule: note (or, as the oracle, replace) what it steps on."""
        rule = st.rule
        local_gradient, step_scale = rule.local_gradient, rule.step_scale

        def probed(step, h, labels, kept):
            g = local_gradient(step, h, labels, kept)
            probing = self.every and step % self.every == 0
            if i == self.oracle or (probing and g is not None):
                exact = self.exact(i, h, labels)
                if probing and g is not None:
                    a, b = g.reshape(-1).double(), exact.reshape(-1).double()
                    cos = _cos(a, b)
                    self.rows[i].append((step, cos, float((a - b).norm() / max(float(b.norm()), 1e-30)),
                                         *on_weights(st.parts.layers.module, h, g, exact)))
                    if self.on_probe is not None:
                        self.on_probe(i, step, h, labels, g, exact)
                if i == self.oracle:
                    return exact
            return g

        rule.local_gradient = probed
        if i == self.oracle:
            rule.step_scale = lambda: 1.0
        else:
            rule.step_scale = step_scale

    def summary(self, steps: int) -> list[dict]:
        """Per stage: mean cosine and relative error over the run and per quarter of it; on the
        weights' gradients, the cosine, and the split-half cosine of the error's (on_weights)."""
        out = []
        for i, rows in enumerate(self.rows):
            if not rows:
                out.append({"stage": i, "probes": 0})
                continue
            quarters = [[r for r in rows if q * steps <= 4 * r[0] < (q + 1) * steps] for q in range(4)]
            split = sum(r[4] for r in rows) / len(rows)
            out.append({"stage": i, "probes": len(rows),
                        "cosine": sum(r[1] for r in rows) / len(rows),
                        "relative_error": sum(r[2] for r in rows) / len(rows),
                        "weights_cosine": sum(r[3] for r in rows) / len(rows),
                        "error_split_half": split,
                        "error_ceiling": math.sqrt(2 * max(split, 0.0) / (1 + max(split, 0.0))),
                        "cosine_by_quarter": [round(sum(r[1] for r in q) / len(q), 3) if q else None
                                              for q in quarters]})
        return out


def _flat_grad(module: nn.Module, h: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    return weight_gradients(h, list(module.parameters()), g)


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a @ b / max(float(a.norm() * b.norm()), 1e-30))


def on_weights(module: nn.Module, h: torch.Tensor, stepped: torch.Tensor, exact: torch.Tensor) -> tuple[float, float]:
    """On the gradients of the stage's weights: the cosine of what it stepped on with the exact
    gradient's, and the cosine between the two halves of the batch of the error's (exact less
    what it stepped on). A predictor of per-sample gradients can get right at most the part of
    that error the halves share: with rho their cosine, and the shared part S and the rest N
    alike in each half, rho = |S|^2 / (|S|^2 + 2 |N|^2), and a whole batch's error is predicted
    at a cosine of at most sqrt(2 rho / (1 + rho)) (summary's error_ceiling)."""
    exact_w = _flat_grad(module, h, exact)
    error = exact - stepped
    half = torch.zeros_like(error)
    half[: len(error) // 2] = 1
    first, second = _flat_grad(module, h, error * half), _flat_grad(module, h, error * (1 - half))
    return _cos(_flat_grad(module, h, stepped), exact_w), _cos(first, second)


def train_rule(name: str, cfg: RunConfig, ds, hop_delay: int, probe_every: int = 0,
               oracle: int | None = None, heads_from_readout: bool = False, on_probe=None) -> dict:
    fields, rule = make_rule(name)
    cfg = cfg.replace(**fields)
    rule = rule or cfg.rule
    delay = 0 if name == "backprop" else hop_delay
    units = build_units(cfg)
    shapes = stage_io_shapes(cfg, units)
    k = len(cfg.stage_groups)
    # the helper models the layout gives each stage (chosen over them all: --head-depth auto)
    helpers = helper_models(cfg.replace(mode=rule.mode), units, unit_costs(cfg, units))[1]
    stages = [StageLogic(cfg, i, k, nn.Sequential(*units[a:b]), shapes[i][0], shapes[i][1], rule=rule,
                         helpers=helpers[i])
              for i, (a, b) in enumerate(stage_bounds(cfg))]
    if heads_from_readout:
        for st in stages[:-1]:
            if st.parts.head is not None:
                st.parts.head.model = ReadoutHead(stages[-1].module)
    probe = Probe(stages, probe_every, oracle, on_probe)
    if probe_every or oracle is not None:
        if oracle is not None and not 0 <= oracle < k - 1:
            raise SystemExit(f"--oracle {oracle}: a stage before the last (0..{k - 2})")
        for i, st in enumerate(stages[:-1]):
            probe.watch(i, st)
    pending: list[tuple[int, int, int, torch.Tensor, bool]] = []  # (due step, stage, step, gradient, true)
    sent_back = step = 0
    t0 = time.perf_counter()

    def deliver(now: int) -> None:
        nonlocal sent_back
        while True:
            due = [p for p in pending if p[0] <= now]
            if not due:
                return
            item = min(due, key=lambda p: (p[0], -p[1]))
            pending.remove(item)
            _, i, s, g, true = item
            sent_back += 1
            dx = stages[i].receive_grad(s, g, true)
            if dx is not None and i > 0:
                pending.append((now + delay, i - 1, s, dx, true))

    for epoch in range(cfg.epochs):
        for x, y in train_batches(ds.train, cfg.batch_size, cfg.seed, epoch):
            if cfg.steps is not None and step >= cfg.steps:
                break
            deliver(step)
            true_grad = rule.true_grad_at(step, cfg.true_grad_every)
            h = x
            for i, st in enumerate(stages[:-1]):
                h = st.forward(step, h, y, true_grad)
                boot = st.local_update(step)  # --bootstrap: dL/dx of a step whose true gradient is not coming
                if boot is not None and i > 0:
                    pending.append((step + delay, i - 1, step, boot, False))
            _, dx = stages[-1].last_step(step, h, y, true_grad)
            if dx is not None:
                pending.append((step + delay, k - 2, step, dx, true_grad))
            step += 1
    deliver(10 ** 9)
    dead = _dead_units(stages, next(iter(eval_batches(ds.test, 1024)))[0])
    tally = EvalTally(stages[-1].loss_fn)
    for n, (x, y) in enumerate(eval_batches(ds.test, 1024)):
        h = x
        for st in stages:
            h = st.eval_forward(h, fresh=n == 0)
        tally.add(h, y)
    return {"rule": name, "test_accuracy": tally.accuracy, "test_loss": tally.loss, "steps": step,
            "dead_units": dead, "probes": probe.summary(step),
            "sg_cosine": [round(st.parts.predictor.trust, 3) for st in stages if st.parts.predictor is not None],
            # on the weights' gradients (where measured: --sg-correction-weights), and the steps
            # that took no correction (or no step on the predictor)
            "sg_weight_cosine": [round(st.parts.predictor.weight_trust, 3) for st in stages
                                 if st.parts.predictor is not None],
            "steps_without_prediction": [st.parts.predictor.stats.untrusted_steps for st in stages
                                         if st.parts.predictor is not None],
            "gradients_back_per_step": sent_back / step, "seconds": time.perf_counter() - t0}


def build_parser() -> argparse.ArgumentParser:
    """This script's command line (tests/test_docs.py parses the documented commands with it)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rules", default="backprop,unlocked:10,dni:10,local,delayed,corrected:10")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--hop-delay", type=int, default=2, help="steps each backward hop arrives late")
    p.add_argument("--layers", default="784,256,256,256,10")
    p.add_argument("--model", default=None, help="a model by import path (bench.models:digits_cnn), instead of --layers")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--steps", type=int, default=None, help="stop after this many steps")
    p.add_argument("--set", action="append", default=[], help="a RunConfig field=value for every rule (repeatable)")
    p.add_argument("--seeds", default="0", help="seeds to repeat every rule with (initial weights, batch order)")
    p.add_argument("--probe-every", type=int, default=0,
                   help="every P steps, set each stage's gradient beside the exact one (0: never)")
    p.add_argument("--oracle", type=int, default=None, help="this stage steps on exact gradients every step")
    p.add_argument("--heads-from-readout", action="store_true",
                   help="every local head is the model's last stage at its current weights (residual models)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "rules.json"))
    return p


def parse_fields(p: argparse.ArgumentParser, items: list[str]) -> dict:
    """`--set field=value` items as RunConfig fields (values as JSON where they parse)."""
    fields = {}
    for item in items:
        try:
            key, value = field_value(item)
        except ConfigError as exc:
            p.error(f"--set {exc}")
        if key in ("mode", "true_grad_every"):
            p.error(f"--set {key}: each rule sets it (unlocked:10)")
        fields[key] = value
    return fields


def main() -> None:
    p = build_parser()
    args = p.parse_args()
    torch.set_num_threads(1)
    fields = dict(dataset=args.dataset, epochs=args.epochs, layers=tuple(int(v) for v in args.layers.split(",")),
                  model=args.model or "mlp", batch_size=args.batch_size, steps=args.steps)
    fields.update(parse_fields(p, args.set))
    if args.steps is not None and args.steps < 1:
        p.error("--steps must be at least 1")
    cfg = RunConfig(**fields)
    if args.model:  # its layers are counted and its data's shapes filled in, as launch.py does
        from synthgrad.coordinator.train import _resolve
        cfg = _resolve(cfg)[0]
    ds = run_dataset(cfg)
    length = f"{args.steps} steps" if args.steps else f"{args.epochs} epochs"
    print(f"{cfg.dataset}, {args.model or 'MLP ' + args.layers}, {length}, batch {cfg.batch_size}, "
          f"Adam {cfg.lr}, each backward hop {args.hop_delay} steps late; one process, one thread")
    rows = []
    seeds = [int(v) for v in args.seeds.split(",")]
    for name in args.rules.split(","):
        runs = [train_rule(name, cfg.replace(seed=seed), ds, args.hop_delay, args.probe_every, args.oracle,
                           args.heads_from_readout) for seed in seeds]
        accs = [r["test_accuracy"] for r in runs]
        bits = [r["test_loss"] / math.log(2) for r in runs]
        mean = sum(accs) / len(accs)
        spread = (max(accs) - min(accs)) / 2
        rows.append({"rule": name, "seeds": seeds, "test_accuracy": accs, "mean": mean,
                     "test_loss": [r["test_loss"] for r in runs], "oracle": args.oracle,
                     "dead_units": [r["dead_units"] for r in runs],
                     "sg_cosine": [r["sg_cosine"] for r in runs], "probes": [r["probes"] for r in runs],
                     "sg_weight_cosine": [r["sg_weight_cosine"] for r in runs],
                     "steps_without_prediction": [r["steps_without_prediction"] for r in runs],
                     "gradients_back_per_step": runs[0]["gradients_back_per_step"]})
        in_bits = f"  bits per target {sum(bits) / len(bits):.3f}" if cfg.per_position else ""
        print(f"{name:>14}  test accuracy {100 * mean:6.2f}% +- {100 * spread:.2f} ({len(seeds)} seeds){in_bits}  "
              f"gradients back per step {runs[0]['gradients_back_per_step']:.2f}  "
              f"({sum(r['seconds'] for r in runs):.0f}s)"
              + (f"  predictors' running cosine {runs[0]['sg_cosine']} (weights {runs[0]['sg_weight_cosine']}; "
                 f"steps without one {runs[0]['steps_without_prediction']})" if runs[0]["sg_cosine"] else "")
              + f"  dead units per stage {runs[0]['dead_units']}", flush=True)
        for stage in runs[0]["probes"]:
            if stage["probes"]:
                print(f"{'':>16}stage {stage['stage']}: cosine with the exact gradient {stage['cosine']:.3f} "
                      f"(by quarter {stage['cosine_by_quarter']}), relative error {stage['relative_error']:.3f}; "
                      f"on the weights {stage['weights_cosine']:.3f}, the error's halves agree at "
                      f"{stage['error_split_half']:.3f} (a per-sample predictor's ceiling {stage['error_ceiling']:.2f})",
                      flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"epochs": args.epochs, "layers": args.layers,
                                          "hop_delay": args.hop_delay, "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
