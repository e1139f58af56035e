#!/usr/bin/env python3
"""Two timescales across processes: a fast LSTM reads characters in one stage process, and a
slow LSTM in another ticks every SLOW_EVERY characters on the fast one's output; a read-out of
both predicts the next character (the text task: the Python standard library's sources).

    python examples/two_timescales.py                 # unlocked: the slow stage's gradient is synthetic
    python examples/two_timescales.py --mode locked   # the fast stage waits for the true one

In `unlocked` the fast stage steps at once on its synthetic-gradient model's prediction of what
the slow stage will send back (and both cores' states get a synthetic gradient at each window's
end); in `locked` it waits for the true gradient, which is exact truncated BPTT through both.
`unlocked` runs the DNI paper's rule here (DNI_RULE): on this model the default head prior,
a local classifier on the fast core's output plus a learnt correction, ran slower than
`locked` and ended further from it (docs/results.md, two timescales).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from torch import nn

import synthgrad

MODULE = Path(__file__).stem if __name__ == "__main__" else __name__
FAST, SLOW, SLOW_EVERY = 128, 128, 4
# the predictor alone, stepped on as it is, trained on true gradients only (the DNI paper's rule)
DNI_RULE = dict(sg_prior="none", sg_trust_scale=False, sg_true_updates=False)


def make(input_shape, num_classes):
    """Three layers: fast core | slow core (ticks every SLOW_EVERY positions) | read-out. Run
    with --groups 1,2: the fast core alone in stage 0, the slow core and the read-out in stage 1."""
    return [nn.LSTM(input_shape[-1], FAST, batch_first=True),
            synthgrad.Slow(nn.LSTM(FAST, SLOW, batch_first=True), every=SLOW_EVERY),
            nn.Linear(FAST + SLOW, num_classes)]


def build_parser() -> argparse.ArgumentParser:
    """This script's command line (tests/test_docs.py parses the documented commands with it)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", default="unlocked")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--text-chars", type=int, default=400_000)
    p.add_argument("--out", default="runs/example-two-timescales")
    return p


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    cfg = synthgrad.RunConfig(model=f"{MODULE}:make", dataset="text", mode=args.mode, groups=(1, 2), bptt=16,
                              batch_size=32, steps=args.steps, epochs=100, text_chars=args.text_chars,
                              out=args.out, **DNI_RULE)
    _, summary = synthgrad.train(cfg)
    print(synthgrad.format_summary(summary))
    return summary


if __name__ == "__main__":
    main()
