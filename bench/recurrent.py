#!/usr/bin/env python3
"""Recurrent models past their BPTT window, and networks of two timescales (the DNI paper's
sections 3.1-3.2), measured with real runs (`synthgrad.train`, stage processes).

    python bench/recurrent.py copy --task copy --windows 2,3,4          # longest length solved
    python bench/recurrent.py copy --task repeat-copy --windows 2,3,4
    python bench/recurrent.py text --windows 4,8,16                     # bits per character
    python bench/recurrent.py timescales --repeats 3                     # locked vs unlocked

copy and text compare, for each window T: truncated BPTT at T (mode locked), BPTT at 2T, and
BPTT at T with the state's synthetic gradient (mode unlocked), the whole network in one stage
(the paper's set-up: `--stages 1`, so the output's gradient is the true one and only the
window's end is synthetic). copy raises the sequence length N from 1 until a run fails the
criterion: test error under 0.15 bits per target after --steps windows; it reports the
longest N solved (each N a fresh run; no curriculum). timescales trains
examples/two_timescales.py (a fast LSTM in one stage process, a slow one ticking every 4
characters in another) locked and unlocked, alternating, --repeats times: BPC and wall clock;
unlocked with the example's rule (its DNI_RULE; --set sg_prior=head and the like override it).
Each run's record is appended to bench/results/recurrent-<command>.jsonl.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from synthgrad.common.config import ConfigError, RunConfig, field_value  # noqa: E402
from synthgrad.common.procs import available_cores  # noqa: E402
from synthgrad.coordinator.train import train  # noqa: E402
from examples.two_timescales import DNI_RULE  # noqa: E402  (timescales runs the example's rule)

SOLVED_BITS = 0.15  # the criterion: test error under this many bits per target
RESULTS = ROOT / "bench" / "results"


def bits(summary: dict) -> float:
    """The final evaluation's loss in bits per target (nats / ln 2)."""
    return summary["evals"][-1]["test_loss"] / math.log(2)


def settings(windows: list[int]) -> list[tuple[str, int, str]]:
    """(label, window, mode) for every window T: BPTT at T, BPTT at 2T, DNI at T."""
    out = []
    for t in windows:
        out += [(f"BPTT T={t}", t, "locked"), (f"BPTT T={2 * t}", 2 * t, "locked"), (f"DNI T={t}", t, "unlocked")]
    return out


def one_run(cfg: RunConfig, record: dict, out: Path) -> dict:
    t0 = time.monotonic()
    _, summary = train(cfg, log=lambda _: None)
    rec = {**record, "bits": bits(summary), "test_accuracy": summary["test_accuracy"],
           "wall_clock_s": summary["wall_clock_s"], "samples_per_s": summary["samples_per_s"],
           "steps": summary["steps"], "run_s": time.monotonic() - t0, "cores": len(available_cores())}
    with open(out, "a") as f:
        f.write(json.dumps(rec) + "\n")
    return rec


def copy(args) -> None:
    out = RESULTS / f"recurrent-{args.task}.jsonl"
    print(f"{len(available_cores())} cores; {args.task}, --model lstm in one stage, {args.steps} windows of "
          f"batch {args.batch_size}, solved = test error < {SOLVED_BITS} bits per target")
    longest = {}
    for label, window, mode in settings([int(t) for t in args.windows.split(",")]):
        solved = 0
        for n in range(1, args.max_length + 1):
            cfg = RunConfig(dataset=args.task, model="lstm", mode=mode, stages=1, bptt=window, copy_length=n,
                            batch_size=args.batch_size, synthetic_train=args.batch_size * args.steps,
                            synthetic_test=args.batch_size * 50, epochs=1, lr=args.lr, seed=args.seed,
                            progress_every=1e9, out=str(RESULTS / "runs" / "recurrent"), **extra(args))
            rec = one_run(cfg, {"task": args.task, "setting": label, "window": window, "mode": mode, "length": n,
                                "seed": args.seed}, out)
            print(f"{label:>10}  N={n:<3} {rec['bits']:.3f} bits/target  ({rec['run_s']:.0f}s)", flush=True)
            if rec["bits"] >= SOLVED_BITS:
                break
            solved = n
        longest[label] = solved
    print("\nlongest length solved:")
    for label, n in longest.items():
        print(f"{label:>10}  {n}")


def text(args) -> None:
    out = RESULTS / "recurrent-text.jsonl"
    print(f"{len(available_cores())} cores; text (the first {args.text_chars:,} characters of the standard "
          f"library's sources), --model lstm in one stage, {args.steps} steps of batch {args.batch_size}")
    for label, window, mode in settings([int(t) for t in args.windows.split(",")]):
        cfg = RunConfig(dataset="text", model="lstm", mode=mode, stages=1, bptt=window, text_chars=args.text_chars,
                        batch_size=args.batch_size, steps=args.steps, epochs=100, lr=args.lr, seed=args.seed,
                        progress_every=1e9, out=str(RESULTS / "runs" / "recurrent"), **extra(args))
        rec = one_run(cfg, {"setting": label, "window": window, "mode": mode, "seed": args.seed}, out)
        print(f"{label:>10}  {rec['bits']:.3f} bits per character  ({rec['wall_clock_s']:.0f}s)", flush=True)


def timescales(args) -> None:
    out = RESULTS / "recurrent-timescales.jsonl"
    print(f"{len(available_cores())} cores; examples/two_timescales.py on text ({args.text_chars:,} characters), "
          f"windows of {args.window}, {args.steps} steps of batch {args.batch_size}; locked and unlocked alternate")
    rows: dict[str, list[dict]] = {"locked": [], "unlocked": []}
    options = {**DNI_RULE, **extra(args)}
    for i in range(args.repeats):
        for mode in rows:
            cfg = RunConfig(dataset="text", model="examples.two_timescales:make", groups=(1, 2), mode=mode,
                            bptt=args.window, text_chars=args.text_chars, batch_size=args.batch_size,
                            steps=args.steps, epochs=100, lr=args.lr, seed=args.seed, progress_every=1e9,
                            out=str(RESULTS / "runs" / "recurrent"), **options)
            rec = one_run(cfg, {"mode": mode, "invocation": i, "window": args.window,
                                "options": options}, out)
            rows[mode].append(rec)
            print(f"{mode:>9} #{i}: {rec['bits']:.3f} BPC, {rec['wall_clock_s']:.1f}s, "
                  f"{rec['samples_per_s']:.0f} windows/s", flush=True)
    locked = rows["locked"]
    print("\nmedian [range] over the invocations:")
    for mode, recs in rows.items():
        ratio = [r["samples_per_s"] / lk["samples_per_s"] for r, lk in zip(recs, locked)]
        print(f"{mode:>9}: {statistics.median(r['bits'] for r in recs):.3f} BPC "
              f"[{min(r['bits'] for r in recs):.3f}-{max(r['bits'] for r in recs):.3f}], wall clock "
              f"{statistics.median(r['wall_clock_s'] for r in recs):.1f}s, speed x locked "
              f"{statistics.median(ratio):.2f} [{min(ratio):.2f}-{max(ratio):.2f}]")


def build_parser() -> argparse.ArgumentParser:
    """This script's command line (tests/test_docs.py parses the documented commands with it)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("copy", help="longest Copy / Repeat-Copy length solved")
    c.add_argument("--task", default="copy", choices=("copy", "repeat-copy"))
    c.add_argument("--windows", default="2,3,4")
    c.add_argument("--steps", type=int, default=8000)
    c.add_argument("--max-length", type=int, default=16)
    t = sub.add_parser("text", help="bits per character on the standard library's sources")
    t.add_argument("--windows", default="4,8,16")
    t.add_argument("--steps", type=int, default=3000)
    t.add_argument("--text-chars", type=int, default=1_000_000)
    s = sub.add_parser("timescales", help="two timescales across processes: locked vs unlocked")
    s.add_argument("--window", type=int, default=16)
    s.add_argument("--steps", type=int, default=2000)
    s.add_argument("--repeats", type=int, default=3)
    s.add_argument("--text-chars", type=int, default=1_000_000)
    for q in (c, t, s):
        q.add_argument("--batch-size", type=int, default=32)
        q.add_argument("--lr", type=float, default=1e-3)
        q.add_argument("--seed", type=int, default=0)
        q.add_argument("--sg-discount", type=float, default=None, help="default: the run config's")
        q.add_argument("--set", action="append", default=[],
                       help="a RunConfig field=value for every run (repeatable): sg_prior=none")
    return p


def extra(args) -> dict:
    """The RunConfig fields given on the command line (--sg-discount, --set); the config's
    defaults hold for the rest."""
    fields = {} if args.sg_discount is None else {"sg_discount": args.sg_discount}
    try:
        fields.update(field_value(item) for item in args.set)
    except ConfigError as exc:
        raise SystemExit(f"--set {exc}") from None
    return fields


def main() -> None:
    args = build_parser().parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    {"copy": copy, "text": text, "timescales": timescales}[args.command](args)


if __name__ == "__main__":
    main()
