#!/usr/bin/env python3
"""The recurrent claim the DNI paper's way (section 3.1): Copy and Repeat-Copy with a
curriculum over the sequence length N inside one run, truncated BPTT at window T (mode locked)
against BPTT at T with the state's synthetic gradient (mode unlocked), the whole network in
one stage; and bits per character on the text stream at small T.

    python bench/curriculum.py copy --task copy --windows 2,3,4,5 --seeds 0,1,2 --steps 6000
    python bench/curriculum.py copy --task repeat-copy --windows 2,3,4,5 --seeds 0,1,2 --steps 6000
    python bench/curriculum.py text --windows 2,3 --seeds 0,1,2 --steps 2000

One process, one thread: the stage's own StageLogic (workers/stage.py, the code a stage worker
runs) steps on every window; with one stage nothing else would run in another process, and
the copy streams can be rebuilt at a new N between two steps.

The curriculum (Curriculum): a run starts at N=1. Every --eval-every steps the model reads a
held-out stream of the current N from a fresh state (--eval-rows rows, each its own
generator's episodes from the first position, EVAL_EPISODES of the longest per row); when
its error is under SOLVED_BITS bits per target (bench/recurrent.py's criterion), N is solved
and the next training window is the first of a stream of N+1 (the carried state starts from
zero there, as at a new epoch). The figure is the longest N solved within --steps windows.
Held-out, rather than the training windows' running loss: the carried state in the flow of
training can score far better than the same model read afresh (docs/results.md), and a
solved N has to hold for sequences the model has not trained on.

Each invocation writes bench/results/curriculum-<task>.json: per run, the longest N, the
step each N was solved at, every held-out score, and the state predictor's running cosine.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from synthgrad.common.config import ConfigError, RunConfig, field_value  # noqa: E402
from synthgrad.common.data import eval_batches, train_batches  # noqa: E402
from synthgrad.common.datasets import StreamOptions, load_dataset  # noqa: E402
from synthgrad.common.devices import CPU  # noqa: E402
from synthgrad.common.evaluation import EvalTally  # noqa: E402
from synthgrad.common.streams import Stream, StreamSplit, copy_stream  # noqa: E402
from synthgrad.workers.stage import StageLogic, build_stage  # noqa: E402

SOLVED_BITS = 0.15  # bench/recurrent.py's criterion: held-out error under this many bits per target
EVAL_EPISODES = 8  # episodes of the longest kind per held-out row
CHUNK_STEPS = 2000  # training windows per generated stream (a longer level reads several)
RESULTS = ROOT / "bench" / "results"


@dataclass
class Curriculum:
    """The current N and when it rises: only when a held-out score at the current N is under
    the threshold. `solved` keeps (N, step) for every N solved, in order."""
    length: int = 1
    max_length: int = 64
    threshold: float = SOLVED_BITS
    solved: list[tuple[int, int]] = field(default_factory=list)

    @property
    def longest(self) -> int:
        """The longest N solved (0: none)."""
        return self.solved[-1][0] if self.solved else 0

    @property
    def done(self) -> bool:
        return self.longest >= self.max_length

    def judge(self, bits: float, step: int) -> bool:
        """A held-out score at the current N after `step` windows; True when it solved N (and
        N rose, unless it was the last)."""
        if self.done or not bits < self.threshold:
            return False
        self.solved.append((self.length, step))
        self.length = min(self.length + 1, self.max_length)
        return True


@dataclass(frozen=True)
class CopyData:
    """Copy (repeats 1) or Repeat-Copy streams at any N, cut into `rows` rows that each start
    with an episode's first position (so a row read from a fresh state can be scored whole).
    Every stream has its own generator seed, from the run's seed, N, and which stream it is;
    held-out streams never share one with a training stream."""
    repeats: int
    window: int
    seed: int

    def _seed(self, length: int, chunk: int, row: int, held_out: bool) -> int:
        return ((((self.seed * 2 + held_out) * 1000 + length) * 100_000 + chunk) * 1000 + row)

    def _rows(self, rows: int, positions: int, length: int, chunk: int, held_out: bool) -> StreamSplit:
        parts = [copy_stream(positions, length, self._seed(length, chunk, r, held_out), self.repeats)
                 for r in range(rows)]
        stream = Stream(torch.cat([p.inputs for p in parts]), torch.cat([p.targets for p in parts]),
                        parts[0].num_classes)
        return StreamSplit(stream, self.window, "held-out stream" if held_out else "training stream")

    def longest_episode(self, length: int) -> int:
        return length + 1 + self.repeats * length + 1

    def train(self, length: int, rows: int, steps: int, chunk: int) -> StreamSplit:
        """`steps` batches of `rows` windows at N = `length` (read with train_batches)."""
        return self._rows(rows, steps * self.window, length, chunk, held_out=False)

    def held_out(self, length: int, rows: int) -> StreamSplit:
        """EVAL_EPISODES of the longest episodes' positions per row, whole windows."""
        windows = math.ceil(EVAL_EPISODES * self.longest_episode(length) / self.window)
        return self._rows(rows, windows * self.window, length, 0, held_out=True)


def stage(cfg: RunConfig, steps: int) -> StageLogic:
    """The run's one stage, built as its worker builds it."""
    from synthgrad.coordinator.train import prepare
    return build_stage(prepare(cfg)[0], 0, steps, CPU)[0]


def held_out_bits(logic: StageLogic, split: StreamSplit, rows: int) -> float:
    """Bits per target on `split`, its rows read side by side from a fresh state."""
    tally = EvalTally(logic.loss_fn)
    for b, (x, y) in enumerate(eval_batches(split, rows)):
        tally.add(logic.eval_forward(x, fresh=b == 0), y)
    return tally.loss / math.log(2)


def synth_cosine(logic: StageLogic) -> Optional[float]:
    """The state predictor's running cosine with its targets since last asked (None: none)."""
    synths = logic.streams.synths
    return synths[0].take()["state_sg_cosine"] if synths else None


@dataclass
class CopyRun:
    """One curriculum run's settings."""
    task: str
    window: int
    mode: str
    seed: int
    steps: int
    eval_every: int
    eval_rows: int
    max_length: int
    fields: dict  # RunConfig fields every run shares (model, batch_size, lr, sg_discount, ...)
    threshold: float = SOLVED_BITS


def copy_run(run: CopyRun) -> dict:
    """Train with the curriculum until --steps windows (or max_length solved)."""
    cfg = RunConfig(dataset=run.task, mode=run.mode, stages=1, bptt=run.window, copy_length=1, seed=run.seed,
                    synthetic_train=run.steps, synthetic_test=1, epochs=1, **run.fields)
    torch.manual_seed(run.seed)
    logic = stage(cfg, run.steps)
    data = CopyData(cfg.copy_repeats if run.task == "repeat-copy" else 1, run.window, run.seed)
    cur = Curriculum(max_length=run.max_length, threshold=run.threshold)
    held_out: dict[int, StreamSplit] = {}
    scores: list[tuple[int, int, float, Optional[float]]] = []  # (step, N, bits, state predictor's cosine)
    step = chunk = 0
    t0 = time.perf_counter()
    while step < run.steps and not cur.done:
        split = data.train(cur.length, cfg.batch_size, min(CHUNK_STEPS, run.steps - step), chunk)
        logic.begin_epoch(chunk)  # a new stream: the carried state starts from zero
        chunk += 1
        for x, y in train_batches(split, cfg.batch_size, run.seed, 0):
            logic.last_step(step, x, y, cfg.true_grad_at(step))
            step += 1
            if step % run.eval_every == 0 or step == run.steps:
                n = cur.length
                split_n = held_out.setdefault(n, data.held_out(n, run.eval_rows))
                bits = held_out_bits(logic, split_n, run.eval_rows)
                scores.append((step, n, round(bits, 4), synth_cosine(logic)))
                if cur.judge(bits, step) or step >= run.steps:
                    break
    return {"task": run.task, "window": run.window, "mode": run.mode, "seed": run.seed, "steps": step,
            "longest": cur.longest, "solved": cur.solved, "last_length": scores[-1][1] if scores else cur.length,
            "last_bits": scores[-1][2] if scores else None, "scores": scores,
            "seconds": round(time.perf_counter() - t0, 1)}


def text_run(window: int, mode: str, seed: int, steps: int, text_chars: int, fields: dict) -> dict:
    """`steps` windows of the text stream (epochs as needed), then the test part's bits per
    character from a fresh state."""
    cfg = RunConfig(dataset="text", mode=mode, stages=1, bptt=window, seed=seed, text_chars=text_chars,
                    steps=steps, epochs=10_000, **fields)
    torch.manual_seed(seed)
    logic = stage(cfg, steps)
    ds = load_dataset("text", None, stream=StreamOptions.of(cfg))
    step = epoch = 0
    t0 = time.perf_counter()
    while step < steps:
        logic.begin_epoch(epoch)
        for x, y in train_batches(ds.train, cfg.batch_size, seed, epoch):
            logic.last_step(step, x, y, cfg.true_grad_at(step))
            step += 1
            if step >= steps:
                break
        epoch += 1
    cos = synth_cosine(logic)
    return {"task": "text", "window": window, "mode": mode, "seed": seed, "steps": step,
            "bits": round(held_out_bits(logic, ds.test, cfg.batch_size), 4), "state_sg_cosine": cos,
            "seconds": round(time.perf_counter() - t0, 1)}


RULES = {"locked": "BPTT", "unlocked": "state SG"}


def summary(runs: list[dict], key: str) -> list[dict]:
    """Per (window, mode): `key` per seed, its median and range."""
    rows = []
    for window in sorted({r["window"] for r in runs}):
        for mode in RULES:
            vals = [r[key] for r in runs if r["window"] == window and r["mode"] == mode]
            if vals:
                rows.append({"window": window, "mode": mode, key: vals, "median": statistics.median(vals),
                             "range": [min(vals), max(vals)]})
    return rows


def shared_fields(args) -> dict:
    """The RunConfig fields every run of the invocation shares (--set adds any other)."""
    fields = dict(model=args.model, batch_size=args.batch_size, lr=args.lr, progress_every=1e9)
    if args.sg_discount is not None:
        fields["sg_discount"] = args.sg_discount
    try:
        fields.update(field_value(item) for item in args.set)
    except ConfigError as exc:
        raise SystemExit(f"--set {exc}") from None
    return fields


def write(path: Path, args, runs: list[dict], key: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"argv": sys.argv[1:], "settings": vars(args), "summary": summary(runs, key),
                                "runs": runs}, indent=1) + "\n")


def copy(args) -> None:
    out = Path(args.out or RESULTS / f"curriculum-{args.task}.json")
    print(f"{args.task}, --model {args.model} in one stage, one thread, {args.steps} windows of batch "
          f"{args.batch_size}; N rises when held-out error < {SOLVED_BITS} bits per target "
          f"(checked every {args.eval_every} windows)", flush=True)
    runs = []
    for window in map(int, args.windows.split(",")):
        for seed in map(int, args.seeds.split(",")):
            for mode in args.modes.split(","):
                rec = copy_run(CopyRun(args.task, window, mode, seed, args.steps, args.eval_every, args.eval_rows,
                                       args.max_length, shared_fields(args)))
                runs.append(rec)
                write(out, args, runs, "longest")
                print(f"T={window} {RULES[mode]:>8} seed {seed}: longest N {rec['longest']:>2} "
                      f"(solved at steps {[s for _, s in rec['solved']]}; last check: N={rec['last_length']}, "
                      f"{rec['last_bits']} bits)  ({rec['seconds']:.0f}s)", flush=True)
    print("\nlongest N solved: per seed, median [range]")
    for row in summary(runs, "longest"):
        print(f"T={row['window']} {RULES[row['mode']]:>8}: {row['longest']}  {row['median']} "
              f"[{row['range'][0]}-{row['range'][1]}]")
    print(f"wrote {out}")


def text(args) -> None:
    out = Path(args.out or RESULTS / "curriculum-text.json")
    print(f"text ({args.text_chars:,} characters), --model {args.model} in one stage, one thread, {args.steps} "
          f"windows of batch {args.batch_size}", flush=True)
    runs = []
    for window in map(int, args.windows.split(",")):
        for seed in map(int, args.seeds.split(",")):
            for mode in args.modes.split(","):
                rec = text_run(window, mode, seed, args.steps, args.text_chars, shared_fields(args))
                runs.append(rec)
                write(out, args, runs, "bits")
                print(f"T={window} {RULES[mode]:>8} seed {seed}: {rec['bits']:.3f} bits per character "
                      f"({rec['seconds']:.0f}s)", flush=True)
    print("\nbits per character: per seed, median [range]")
    for row in summary(runs, "bits"):
        print(f"T={row['window']} {RULES[row['mode']]:>8}: {row['median']:.3f} "
              f"[{row['range'][0]:.3f}-{row['range'][1]:.3f}]")
    print(f"wrote {out}")


def build_parser() -> argparse.ArgumentParser:
    """This script's command line (tests/test_docs.py parses the documented commands with it)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("copy", help="longest Copy / Repeat-Copy N solved with a curriculum in one run")
    c.add_argument("--task", default="copy", choices=("copy", "repeat-copy"))
    c.add_argument("--steps", type=int, default=6000, help="training windows per run (the budget)")
    c.add_argument("--eval-every", type=int, default=250, help="windows between held-out checks of the current N")
    c.add_argument("--eval-rows", type=int, default=64, help="held-out rows (each EVAL_EPISODES episodes long)")
    c.add_argument("--max-length", type=int, default=64)
    t = sub.add_parser("text", help="bits per character on the standard library's sources")
    t.add_argument("--steps", type=int, default=2000)
    t.add_argument("--text-chars", type=int, default=1_000_000)
    for q in (c, t):
        q.add_argument("--windows", default="2,3,4,5")
        q.add_argument("--seeds", default="0,1,2")
        q.add_argument("--modes", default="locked,unlocked", help="locked (BPTT at T), unlocked (state SG)")
        q.add_argument("--model", default="lstm")
        q.add_argument("--batch-size", type=int, default=32)
        q.add_argument("--lr", type=float, default=1e-3)
        q.add_argument("--sg-discount", type=float, default=None, help="default: the run config's")
        q.add_argument("--set", action="append", default=[],
                       help="a RunConfig field=value for every run (repeatable): sg_model=linear, sg_lr=0.003")
        q.add_argument("--out", default=None, help="default: bench/results/curriculum-<task>.json")
    return p


def main() -> None:
    args = build_parser().parse_args()
    torch.set_num_threads(1)
    {"copy": copy, "text": text}[args.command](args)


if __name__ == "__main__":
    main()
